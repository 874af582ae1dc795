"""A local run's steps, their children and temporary folders end with the run.

Real processes and real SIGKILLs: a driver enters ``guarded_tasks`` and starts a step
through kfp.local's own ``run_local_subprocess``; the step starts a grandchild and makes
a temporary folder, then the driver is killed (or ends) and the test looks at /proc.
"""
import os
import subprocess
import sys

import pytest

from process_tree import descendants, reaped, sigkill, wait_for, wait_until_gone
from support import REPO_ROOT

# The step: a temporary folder (as evaluate / download / Beam make), a grandchild that
# would run for 5 minutes (detached from the step's output, as a leftover worker that
# kfp.local would not wait for), the folder's name written to a file, then it waits.
STEP = ("import os, subprocess, sys, tempfile, time; "
        "d = tempfile.mkdtemp(prefix='clipa-eval-'); "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "open(sys.argv[1] + '.tmp', 'w').write(d); os.rename(sys.argv[1] + '.tmp', sys.argv[1]); "
        "time.sleep(float(sys.argv[2]))")

DRIVER = ("import sys; from kfp.local import subprocess_task_handler as h; "
          "from pipelines.process_guard import guarded_tasks\n"
          "with guarded_tasks() as tmp:\n"
          "    print(tmp, flush=True)\n"
          "    h.run_local_subprocess([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]])\n")


@pytest.fixture
def start(tmp_path):
    """start(step_seconds) -> (driver, run_tmp, the step's temporary folder)."""
    started = []

    def start(step_seconds: float):
        ready = tmp_path / "ready"
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, STEP, str(ready),
                                   str(step_seconds)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  text=True)
        started.append(driver)
        run_tmp = driver.stdout.readline().strip()
        wait_for(ready.exists, 60)
        return driver, run_tmp, ready.read_text()

    yield start
    for driver in started:  # a failed test must not leave its driver behind
        if driver.poll() is None:
            driver.terminate()
            driver.wait()


def test_sigkill_of_the_run_takes_steps_grandchildren_and_temp_folders(start):
    driver, run_tmp, step_tmp = start(300)
    assert step_tmp.startswith(run_tmp + os.sep)  # the step's tempfile went into the run's
    tree, survivors = sigkill(driver)
    assert len(tree) >= 3  # the step, its grandchild, the reaper
    assert survivors == set()
    wait_for(lambda: not os.path.exists(run_tmp), 20)


def test_a_finished_run_leaves_no_worker_and_no_temp_folder(start):
    driver, run_tmp, step_tmp = start(0.5)
    tree = descendants(driver.pid)  # the step has left a grandchild running
    assert driver.wait(60) == 0
    assert wait_until_gone(tree) == set()
    assert not os.path.exists(run_tmp) and not os.path.exists(step_tmp)


def test_die_with_parent_ends_a_child_when_its_parent_is_killed(tmp_path):
    # parent -> child; the child asks to die with its parent; the parent is SIGKILLed.
    pid_file = tmp_path / "child"
    child = ("import sys, time, os; from components.parent_death import die_with_parent; "
             "assert die_with_parent(); open(sys.argv[1], 'w').write(str(os.getpid())); "
             "time.sleep(300)")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); time.sleep(300)",
         child, str(pid_file)], cwd=REPO_ROOT, start_new_session=True)
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60)
    tree, survivors = sigkill(parent, 10)
    assert len(tree) == 1
    assert survivors == set()


def _training_step_with_loader(root_pid: int):
    """The pretrain step's process once it runs its loader worker, else None."""
    for pid, _ in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if "executor_main" in cmdline and "/pretrain/" in cmdline and descendants(pid):
            return pid
    return None


@pytest.mark.slow
def test_sigkill_of_clipa_run_during_training_leaves_nothing_behind(tmp_path):
    """A real ``clipa run --recipe smoke``, SIGKILLed while pretrain's loader runs: no
    process of it survives and its temporary root holds nothing but torch's cache."""
    tmp_root = tmp_path / "tmp"  # the run's system temporary folder, to list afterwards
    tmp_root.mkdir()
    with reaped(subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "run", "--recipe", "smoke", "--workdir",
             str(tmp_path / "run")], cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(tmp_root)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) as run:
        wait_for(lambda: _training_step_with_loader(run.pid), 600, every=1.0)
        tree, survivors = sigkill(run, 30)  # the step, its loader, the reaper, Beam/KFP leftovers
        assert tree and survivors == set()
    # torchinductor_<user> is torch's compile cache, shared by every run of the user.
    wait_for(lambda: [p.name for p in tmp_root.iterdir()
                      if not p.name.startswith("torchinductor_")] == [], 30)
