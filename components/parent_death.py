"""Child processes that die with their parent process.

A SIGKILLed process runs no cleanup, so its children live on: img2dataset's worker
processes (~1 GB each) kept fetching into a dead run's folder. ``die_with_parent`` starts a
daemon thread that watches the parent's pid and SIGKILLs this process once it is orphaned.

Why not Linux's ``PR_SET_PDEATHSIG``: it fires when the parent *thread* that started the
child ends, not the parent process. multiprocessing's Pool starts replacement workers from
its worker-handler thread, which ends in ``Pool.terminate``; the kernel then killed workers
in the middle of a queue write, and terminate deadlocked on the queue's lock (img2dataset
hung after its last shard in ``make demo``). ``pipelines.process_guard`` still reaps whole
process groups of a ``clipa run``.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

POLL_SECONDS = 0.2  # how soon an orphaned child notices


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Send ``sig`` to this process as soon as its parent process is gone.

    Args:
        sig: the signal (SIGKILL: no handler needed, nothing can delay it).
        parent_pid: the parent this process was started by; default: multiprocessing's
            parent process, else the current parent. If it already died (the process is
            orphaned before the call), this process is signalled at once.

    Returns:
        True (the watcher runs); one watcher per process however often it is called.
    """
    global _watching
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else os.getppid()
    if os.getppid() != parent_pid:  # the parent died before the call
        os.kill(os.getpid(), sig)
    with _lock:
        if not _watching:
            threading.Thread(target=_watch, args=(parent_pid, sig), daemon=True,
                             name="die-with-parent").start()
            _watching = True
    return True


_lock = threading.Lock()
_watching = False


def _watch(parent_pid: int, sig: int) -> None:
    # An orphan is re-parented (to init or a subreaper): its ppid changes.
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), sig)
