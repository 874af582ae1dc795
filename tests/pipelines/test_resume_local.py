"""`clipa run` SIGKILLed mid-pretrain (its whole process group) and rerun with the same command
and workdir: the pretrain resumes from its newest checkpoint under PIPELINE_ROOT/checkpoints,
and the weights of every stage equal those of each stage run uninterrupted on the same data.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipa_model import resume
from clipa_model.artifacts import read_json
from clipa_model.config import StageConfig
from clipa_model.train_stage import train_stage
from support import REPO_ROOT

# The smoke recipe, smaller: a 12-step pretrain checkpointing every 2 steps, short finetunes.
PARAMS = {"stage_overrides": json.dumps({"pretrain": {"samples": 768},
                                         "finetune_224": {"samples": 64},
                                         "finetune_336": {"samples": 32}}),
          "checkpoint_every": 2}
KILL_AFTER = 4  # pretrain steps checkpointed before the kill


def _command(workdir: str) -> list[str]:
    params = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
    return [sys.executable, "-m", "pipelines.cli", "run", "--recipe", "smoke", "--workdir",
            workdir, *params]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}


def _wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline, f"nothing matched {pattern}"
        time.sleep(0.05)


def _stage_models(root: str) -> dict:
    """Model folders of the newest run of each training task (task name -> folder)."""
    models = {}
    for run in sorted(glob.glob(os.path.join(root, "clipa-training-*"))):
        for task in ("pretrain", "finetune", "finetune-2"):
            path = os.path.join(run, task, "model")
            if os.path.exists(os.path.join(path, "clipa_artifact.json")):
                models[task] = path
    return models


def _weights(model_dir: str) -> dict:
    return torch.load(os.path.join(model_dir, "checkpoint.pt"), weights_only=True)


@pytest.mark.slow
def test_clipa_run_killed_mid_pretrain_resumes_and_matches_uninterrupted_stages(tmp_path):
    workdir = str(tmp_path / "w")
    root = os.path.join(workdir, "pipeline_root")
    proc = subprocess.Popen(_command(workdir), cwd=REPO_ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        step_file = _wait_for(os.path.join(root, "checkpoints", "pretrain-*",
                                           f"step-{KILL_AFTER:09d}.pt"), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, kfp.local's task and its loader
        proc.wait()
    ckpt_dir = os.path.dirname(step_file)
    saved = [s for s, _ in resume.list_checkpoints(ckpt_dir)]
    assert max(saved) >= KILL_AFTER and max(saved) < 12

    rerun = subprocess.run(_command(workdir), cwd=REPO_ROOT, env=_env(), capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr + open(os.path.join(workdir, "clipa-run.log")).read()
    assert re.search(r"pretrain-84 done in .*resumed from step \d+", rerun.stdout)  # the console
    resumed = [int(n) for n in re.findall(r"pretrain: resumed from step (\d+)", log)]
    assert resumed == [max(saved)]
    assert not re.search(r"finetune_\d+: resumed from step", log)
    assert resume.list_checkpoints(ckpt_dir) == []  # done: step files removed
    models = _stage_models(root)
    assert sorted(models) == ["finetune", "finetune-2", "pretrain"]
    for model in models.values():
        assert not [p for p in glob.glob(os.path.join(model, "**"), recursive=True)
                    if ".tmp-" in p or os.path.basename(p).startswith("step-")]

    # The same three stages, uninterrupted, on the same data with the configs they ran.
    data = glob.glob(os.path.join(root, "clipa-training-*", "filter-shard", "filtered"))[0]
    init = None
    for task in ("pretrain", "finetune", "finetune-2"):
        stage = StageConfig.from_dict(read_json(os.path.join(models[task], "stage_config.json")))
        preset = read_json(os.path.join(models[task], "model_config.json"))["preset"]
        ref = str(tmp_path / "ref" / task)
        train_stage(data, ref, stage, preset=None if init else preset, init_model_dir=init,
                    report_to="")
        a, b = _weights(ref), _weights(models[task])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), task
        init = ref


def test_an_unknown_reporter_fails_before_the_run_starts(tmp_path, capsys):
    from pipelines.cli import main

    workdir = str(tmp_path / "w")
    assert main(["run", "--recipe", "smoke", "--workdir", workdir, "--report-to", "wandbb"]) == 2
    assert "report_to='wandbb': unknown ['wandbb']" in capsys.readouterr().err
    assert not os.path.exists(workdir)
