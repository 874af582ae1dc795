"""Child processes that die with their parent (Linux ``PR_SET_PDEATHSIG``).

A SIGKILLed process runs no cleanup, so its children live on: img2dataset's worker
processes (~1 GB each) kept fetching into a dead run's folder. A child that asks the
kernel for a signal when its parent dies cannot outlive it. Elsewhere (macOS) this is a
no-op; ``pipelines.process_guard`` still reaps whole process groups there.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Args:
        sig: the signal (SIGKILL: no handler needed, nothing can delay it).
        parent_pid: the parent this process was started by; default: multiprocessing's
            parent process, else the current parent. If it already died (the process is
            orphaned before the call), this process exits at once.

    Returns:
        True when the kernel took the request (Linux), False elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before the request: too late for it
        os.kill(os.getpid(), sig)
    return True
