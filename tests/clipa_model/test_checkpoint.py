"""Resumable checkpoints: SIGKILL at a random step, rerun, same weights; gs://; bad resumes."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipa_model import resume
from clipa_model.config import ConfigError
from clipa_model.recipes import DEMO
from clipa_model.train_stage import train_stage
from pipelines.demo_data import write_demo_shards
from support import REPO_ROOT

STEPS = 10
# A small pretrain stage, checkpointing after every step; given to the CLI as --set.
OVERRIDES = {"image_size": 28, "text_len": 8, "samples": 16 * STEPS, "batch_size": 16,
             "lr": 1e-3, "warmup_frac": 0.2, "crop_scale": [0.8, 1.0], "log_every": 5,
             "num_threads": 1, "checkpoint_every": 1, "checkpoint_minutes": 0,
             "text_reduction": "random"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return write_demo_shards(str(root), 40, seed=1, size=64, shard_size=16)


def _stage(**kw):
    return DEMO["pretrain"].replace(**{**OVERRIDES, "crop_scale": (0.8, 1.0), **kw})


def _cli(data: str, out: str) -> list[str]:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in OVERRIDES.items()]
    return [sys.executable, "-m", "components.train", data, out, "--preset", "tiny", *sets]


def _weights(model_dir: str) -> dict:
    return torch.load(os.path.join(model_dir, "checkpoint.pt"), weights_only=True)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_gives_the_same_weights(shards, tmp_path):
    reference = str(tmp_path / "uninterrupted")
    train_stage(shards, reference, _stage(), preset="tiny")

    out = str(tmp_path / "killed")
    kill_after = random.randint(2, STEPS - 2)  # steps done before the kill
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(shards, out), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = resume.checkpoint_path(os.path.join(out, "checkpoints"), kill_after)
    deadline = time.monotonic() + 120
    while not os.path.exists(target):
        assert proc.poll() is None, "training ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "clipa_artifact.json"))
    steps_saved = [s for s, _ in resume.list_checkpoints(os.path.join(out, "checkpoints"))]
    assert steps_saved and max(steps_saved) >= kill_after

    result = train_stage(shards, out, _stage(), preset="tiny")  # the rerun resumes
    assert result["resumed_from"] == max(steps_saved)
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    hist = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    # Done: the step files are gone, the resolved config stays next to where they were.
    assert resume.list_checkpoints(os.path.join(out, "checkpoints")) == []
    resolved = json.load(open(os.path.join(out, "checkpoints", "resolved_config.json")))
    assert resolved["steps"] == STEPS and resolved["preset"] == "tiny"
    assert json.load(open(os.path.join(out, "resolved_config.json"))) == resolved


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    ckpt = str(tmp_path / "c")
    for step in (1, 2, 3):
        resume.save_state(ckpt, {"step": step, "x": torch.full((2,), float(step))}, keep=2)
    assert [s for s, _ in resume.list_checkpoints(ckpt)] == [2, 3]
    assert not [n for n in os.listdir(ckpt) if ".tmp-" in n]
    # A half-written file from a killed writer is never taken for a checkpoint.
    open(os.path.join(ckpt, "step-000000009.pt.tmp-dead"), "wb").write(b"\0" * 10)
    assert resume.load_latest(ckpt)["step"] == 3


def test_resume_refuses_another_stage_config_or_architecture(shards, tmp_path):
    out = str(tmp_path / "m")
    ckpt = str(tmp_path / "ck")
    stage = _stage(samples=16 * 3)
    state = {"step": 1, "stage": stage.to_dict(), "world_size": 1,
             "model_config": {"preset": "tiny", "architecture": {"vision_width": 999}}}
    resume.save_state(ckpt, state)
    with pytest.raises(ConfigError, match="architecture"):
        train_stage(shards, out, stage, preset="tiny", checkpoint_dir=ckpt)
    with pytest.raises(ConfigError, match="StageConfig.lr="):
        train_stage(shards, out, stage.replace(lr=5e-4), preset="tiny", checkpoint_dir=ckpt)


def test_checkpoints_on_gs(gcs):
    ckpt = "gs://bkt/run/checkpoints"
    for step in (4, 8, 12):
        resume.save_state(ckpt, {"step": step, "w": torch.arange(3.0) * step}, keep=2)
    assert [s for s, _ in resume.list_checkpoints(ckpt)] == [8, 12]
    state = resume.load_latest(ckpt)
    assert state["step"] == 12 and torch.equal(state["w"], torch.arange(3.0) * 12)
    resume.write_resolved_config(ckpt, {"steps": 12})
    assert json.loads(gcs.cat("bkt/run/checkpoints/resolved_config.json")) == {"steps": 12}
