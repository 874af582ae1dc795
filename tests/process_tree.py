"""Processes seen through /proc (Linux): a tree's descendants, and whether they still run.

A process is identified by (pid, start time) so that a pid the kernel reuses for a new
process is not taken for a survivor.
"""
from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process below ``pid``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat:
                parents.setdefault(stat[1], []).append((int(entry), stat[2]))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def running(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``procs`` still running (not gone, not a zombie, not a reused pid)."""
    alive = set()
    for pid, start in procs:
        stat = _stat(pid)
        if stat and stat[0] != "Z" and stat[2] == start:
            alive.add((pid, start))
    return alive


def wait_until_gone(procs: set[tuple[int, int]], seconds: float = 20.0) -> set[tuple[int, int]]:
    """Wait up to ``seconds`` for ``procs`` to end; returns those still running."""
    end = time.monotonic() + seconds
    while running(procs) and time.monotonic() < end:
        time.sleep(0.1)
    return running(procs)


def wait_for(predicate, seconds: float = 120.0, every: float = 0.2):
    """Poll ``predicate()`` until it returns something true (returned) or time is up."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not reached within {seconds} s: {predicate}")


def sigkill(proc: subprocess.Popen, seconds: float = 20.0) -> tuple[set, set]:
    """SIGKILL ``proc`` alone, as the OOM killer or a user would (its descendants get no
    signal from here: what ends them is what the caller tests).

    Returns:
        (its descendants running at the kill, those of them still running ``seconds`` later)
    """
    tree = running(descendants(proc.pid))
    proc.kill()
    proc.wait()
    return tree, wait_until_gone(tree, seconds)


@contextmanager
def reaped(proc: subprocess.Popen):
    """``proc``, SIGKILLed on the way out if it still runs, so a failed test leaves no process."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
