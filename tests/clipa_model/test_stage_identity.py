"""Checkpoint folders keyed by the stage's identity; resumes check the data; leftovers; divergence."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from clipa_model import resume
from clipa_model.checkpoint import model_config
from clipa_model.config import ConfigError, StageConfig
from clipa_model.stage_identity import (data_identity, init_model_identity, stage_identity,
                                        stage_key)
from clipa_model.train_stage import train_stage
from pipelines.demo_data import write_demo_shards
from support import REPO_ROOT, make_model_artifact


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two filtered_shards artifacts with other images (seed 0 and seed 1)."""
    root = tmp_path_factory.mktemp("ident")
    return [write_demo_shards(str(root / f"d{seed}"), 32, seed=seed, size=64, shard_size=16)
            for seed in (0, 1)]


def _stage(**kw) -> StageConfig:
    base = dict(stage="pretrain", image_size=28, text_len=8, samples=16 * 4, batch_size=16,
                lr=1e-3, warmup_frac=0.25, crop_scale=(0.8, 1.0), log_every=2, num_threads=1,
                checkpoint_every=1, checkpoint_minutes=0)
    return StageConfig(**{**base, **kw})


def test_the_key_changes_with_every_input_that_decides_the_weights(datasets, tmp_path):
    a, b = datasets
    data_a = data_identity(a)
    assert data_a == data_identity(a) and data_a != data_identity(b)
    key = stage_key(stage_identity(_stage(), "tiny", data_a, None))
    assert key.startswith("pretrain-") and len(key) == len("pretrain-") + 16
    others = [stage_identity(_stage(seed=1), "tiny", data_a, None),
              stage_identity(_stage(lr=5e-4), "tiny", data_a, None),
              stage_identity(_stage(), "S/16", data_a, None),
              stage_identity(_stage(), "tiny", data_identity(b), None),
              stage_identity(_stage(), "tiny", data_a, "0" * 64)]
    assert len({key, *map(stage_key, others)}) == 6
    # Settings that do not change the weights keep the key: a rerun may log more often.
    same = stage_identity(_stage(log_every=7, num_threads=2, checkpoint_every=3,
                                 zeroshot_every=64), "tiny", data_a, None)
    assert stage_key(same) == key


def test_init_model_identity_is_its_weights(tmp_path):
    m1 = make_model_artifact(tmp_path / "m1", seed=0)
    m2 = make_model_artifact(tmp_path / "m2", seed=1)
    assert init_model_identity(m1) != init_model_identity(m2)
    marker = json.load(open(os.path.join(m1, "clipa_artifact.json")))
    import hashlib
    assert marker["weights_sha256"] == hashlib.sha256(
        open(os.path.join(m1, "checkpoint.pt"), "rb").read()).hexdigest()
    assert init_model_identity(None) is None


def _foreign_checkpoint(ckpt: str, stage: StageConfig, data_dir: str) -> None:
    """The state an interrupted run on ``data_dir`` leaves (real model and optimizer)."""
    from clipa_model.devices import rng_state
    from clipa_model.model import build_model
    from clipa_model.train_loop import make_optimizer

    model = build_model("tiny", stage.image_size, stage.text_len)
    identity = stage_identity(stage, "tiny", data_identity(data_dir), None)
    resume.save_state(ckpt, {
        "step": 2, "model": model.state_dict(),
        "optimizer": make_optimizer(model, stage).state_dict(),
        "history": [], "rng": [rng_state(torch.device("cpu"))], "stage": stage.to_dict(), "world_size": 1,
        "model_config": model_config("tiny", stage.image_size, stage.text_len),
        "identity": {**identity, "data_ref": data_dir, "init_model_ref": None}})


def test_a_rerun_on_other_data_never_resumes_a_foreign_checkpoint(datasets, tmp_path):
    a, b = datasets
    stage = _stage()
    # Into the same output / checkpoint folder (issue 15 item 4): refused, naming both.
    ckpt = str(tmp_path / "out" / "checkpoints")
    _foreign_checkpoint(ckpt, stage, a)
    with pytest.raises(ConfigError, match="another training data") as err:
        train_stage(b, str(tmp_path / "out"), stage, preset="tiny")
    assert a in str(err.value) and b in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "clipa_artifact.json")
    # Under a checkpoint root: data A's folder holds a checkpoint, data B gets its own
    # folder and starts fresh; A's checkpoint is untouched.
    root = str(tmp_path / "root")
    a_dir = os.path.join(root, stage_key(stage_identity(stage, "tiny", data_identity(a), None)))
    _foreign_checkpoint(a_dir, stage, a)
    result = train_stage(b, str(tmp_path / "m_b"), stage, preset="tiny", checkpoint_root=root)
    assert result["resumed_from"] == 0 and result["checkpoint_dir"] != a_dir
    assert [s for s, _ in resume.list_checkpoints(a_dir)] == [2]
    identity = json.load(open(os.path.join(result["checkpoint_dir"], "identity.json")))
    assert identity["data"] == data_identity(b) and identity["data_ref"] == b
    # Another seed or config on data A: a folder of its own, a fresh start.
    for other in (stage.replace(seed=3), stage.replace(lr=2e-3)):
        result = train_stage(a, str(tmp_path / f"m_{other.seed}_{other.lr}"), other,
                             preset="tiny", checkpoint_root=root)
        assert result["resumed_from"] == 0 and result["checkpoint_dir"] != a_dir
    # Data A under the same root continues A's checkpoint.
    result = train_stage(a, str(tmp_path / "m_a"), stage, preset="tiny", checkpoint_root=root)
    assert result["resumed_from"] == 2 and result["checkpoint_dir"] == a_dir


def test_a_save_killed_half_way_leaves_nothing_in_the_model_artifact(datasets, tmp_path):
    out = tmp_path / "m"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    # What SIGKILL during torch.save + write leaves: a temporary file, never renamed.
    (ckpt / "step-000000003.pt.tmp-0a1b2c3d").write_bytes(b"\0" * 4096)
    train_stage(datasets[0], str(out), _stage(), preset="tiny")
    left = [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name]
    assert left == []
    assert resume.list_checkpoints(str(ckpt)) == []


def test_a_diverging_lr_stops_naming_the_step_and_keeps_the_last_good_checkpoint(datasets,
                                                                                tmp_path):
    out, ckpt = str(tmp_path / "m"), str(tmp_path / "ck")
    # Warmup over 4 of 8 steps to an absurd peak: the first step is sane, then inf/nan.
    stage = _stage(samples=16 * 8, lr=1e4, warmup_frac=0.5, precision="fp32",
                   keep_checkpoints=10)
    with pytest.raises(ConfigError) as err:
        train_stage(datasets[0], out, stage, preset="tiny", checkpoint_dir=ckpt)
    message = str(err.value)
    assert "the loss diverged" in message and "at step " in message
    step = int(message.split("at step ")[1].split(",")[0].split()[0])
    assert 3 <= step <= 8
    assert not os.path.exists(os.path.join(out, "clipa_artifact.json"))
    kept = [s for s, _ in resume.list_checkpoints(ckpt)]
    assert all(s < step - 1 for s in kept)  # none of the weights that diverged
    for _, path in resume.list_checkpoints(ckpt):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert kept and f"step {kept[-1]}" in message and "resume_from=" in message
    # The restart with a lower lr continues from it, in a folder of its own.
    result = train_stage(datasets[0], str(tmp_path / "m2"), stage.replace(lr=1e-3),
                         preset="tiny", checkpoint_root=str(tmp_path / "root"),
                         resume_from=ckpt)
    assert result["resumed_from"] == kept[-1] and result["checkpoint_dir"] != ckpt
    assert result["steps"] == 8


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the syscalls")
def test_a_checkpoint_is_fsynced_before_its_rename(tmp_path):
    """The syscalls of a real save (strace): the temporary file's data is fsynced before it
    is renamed to step-N.pt, and the folder after it, so a machine crash cannot leave a
    step-N.pt that is empty or gone."""
    ckpt, trace = str(tmp_path / "ck"), str(tmp_path / "trace")
    code = ("import torch; from clipa_model import resume; "
            f"resume.save_state({ckpt!r}, {{'step': 3, 'w': torch.ones(3)}})")
    subprocess.run(["strace", "-f", "-e", "trace=openat,fsync,rename,renameat,renameat2",
                    "-o", trace, sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": REPO_ROOT})
    calls = [line.split(None, 1)[1] for line in open(trace) if ckpt in line or "fsync(" in line]
    opened = next(i for i, c in enumerate(calls) if ".pt.tmp-" in c and "O_CREAT" in c)
    fd = calls[opened].rsplit("= ", 1)[1].strip()
    renamed = next(i for i, c in enumerate(calls) if c.startswith("rename") and
                   c.rstrip().endswith("= 0") and "step-000000003.pt\"" in c)
    assert f"fsync({fd})" in [c.split(" ")[0] for c in calls[opened:renamed]]
    after = calls[renamed + 1:]
    dir_open = next(i for i, c in enumerate(after) if f'"{ckpt}"' in c and "O_RDONLY" in c)
    dir_fd = after[dir_open].rsplit("= ", 1)[1].strip()
    assert f"fsync({dir_fd})" in [c.split(" ")[0] for c in after[dir_open:]]


def test_the_data_identity_is_the_same_wherever_the_data_lives(datasets, gcs):
    a, b = datasets
    gcs.put(a, "bkt/copy/a", recursive=True)
    assert data_identity("gs://bkt/copy/a") == data_identity(a) != data_identity(b)
