"""A local run's processes and temporary folders end with it, however it ends.

``clipa run`` starts each pipeline step (kfp.local's SubprocessRunner) as a subprocess,
which starts loader workers, img2dataset workers, Beam workers. A SIGKILL of ``clipa
run`` runs no cleanup, so before this they trained and downloaded on into the dead run's
folder, and every temporary folder (``clipa-eval-*``, ``clipa-download-*``, Beam's, KFP's)
stayed in /tmp.

``guarded_tasks()`` makes two things hold for everything started inside it:

* each step starts in a process group of its own (all its descendants join it), whose
  id is handed to a *reaper*: a small process in its own session, which waits for the
  run to close its pipe. That happens when the run ends in any way, a SIGKILL included
  (the kernel closes a dead process's pipes); the reaper then SIGKILLs every step's
  process group, so no worker survives its run.
* ``TMPDIR`` (Python's ``tempfile``, Beam, torch) points into one run folder
  ``clipa-run-*`` under the system's temporary folder, which the reaper deletes last.

Run as ``python -m pipelines.process_guard RUN_TMP``, it is the reaper.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from typing import Iterator

RUN_TMP_PREFIX = "clipa-run-"
_active_root: str | None = None  # the run folder of the guard this process is in


def reap(groups: list[int], run_tmp: str, grace_seconds: float = 5.0) -> None:
    """SIGKILL each process group, wait for them to go, delete ``run_tmp``."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    end = time.monotonic() + grace_seconds
    while time.monotonic() < end and any(_group_alive(g) for g in groups):
        time.sleep(0.05)
    shutil.rmtree(run_tmp, ignore_errors=True)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reaper_main(argv: list[str]) -> int:
    """The reaper: read process group ids from stdin until EOF, then ``reap``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the run is not its end
    run_tmp = argv[0]
    groups = [int(line) for line in sys.stdin if line.strip()]
    reap(groups, run_tmp)
    return 0


class _Reaper:
    """The run's side of the reaper: start it, register groups, close (= reap)."""

    def __init__(self, run_tmp: str):
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.process_guard", run_tmp],
            stdin=subprocess.PIPE, text=True, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def register(self, group: int) -> None:
        with self.lock:
            self.proc.stdin.write(f"{group}\n")
            self.proc.stdin.flush()

    def close(self, timeout: float = 60.0) -> None:
        with self.lock:
            self.proc.stdin.close()
        self.proc.wait(timeout)


def _popen_in_own_group(reaper: _Reaper):
    """``subprocess.Popen`` that starts the command as a process group leader."""

    def popen(*args, **kwargs):
        proc = subprocess.Popen(*args, process_group=0, **kwargs)
        reaper.register(proc.pid)  # the group's id is its leader's pid
        return proc

    return popen


@contextlib.contextmanager
def _temporary_root(path: str) -> Iterator[None]:
    """TMPDIR (and this process's ``tempfile``) point to ``path`` while inside.

    torch's compile cache is meant to outlive runs (``<tmp>/torchinductor_<user>``): it
    stays where it was.
    """
    inductor = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    saved_dir = tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = path, path
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor)
    try:
        yield
    finally:
        tempfile.tempdir = saved_dir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def guarded_tasks() -> Iterator[str]:
    """kfp.local steps started inside run in reaped process groups with a run TMPDIR.

    Enter it as early as possible: imports make temporary folders too (wandb, which
    open_clip imports, makes two), and only those made inside go with the run. Nested
    entries share the outer one.

    Yields:
        The run's temporary folder (deleted when the context ends, or by the reaper
        when this process is killed).
    """
    global _active_root
    if _active_root is not None:  # nested (clipa run enters it first): one guard per run
        yield _active_root
        return
    from kfp.local import subprocess_task_handler as handler

    run_tmp = _active_root = tempfile.mkdtemp(prefix=RUN_TMP_PREFIX)
    reaper = _Reaper(run_tmp)
    saved = handler.subprocess
    handler.subprocess = types.SimpleNamespace(  # the subprocess module, but for Popen
        **{**vars(subprocess), "Popen": _popen_in_own_group(reaper)})
    try:
        with _temporary_root(run_tmp):
            yield run_tmp
    finally:
        handler.subprocess = saved
        _active_root = None
        reaper.close()


if __name__ == "__main__":
    sys.exit(reaper_main(sys.argv[1:]))
