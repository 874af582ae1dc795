"""Live view of a training stage: TensorBoard events read back with tensorboard's own reader,
zero-shot probes during the stage (weights unchanged by them), W&B offline records."""
import glob
import json
import os
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipa_model.config import ConfigError, StageConfig
from clipa_model.live_log import parse_report_to
from clipa_model.train_stage import train_stage
from pipelines.demo_data import write_demo_shards, write_eval_set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    shards = write_demo_shards(str(root / "d"), 32, seed=0, size=64, shard_size=16)
    write_eval_set(str(root / "eval"), 2, seed=5, size=64)  # 2 images per class
    return shards, str(root / "eval")


def _stage(**kw) -> StageConfig:
    base = dict(stage="pretrain", image_size=28, text_len=8, samples=16 * 8, batch_size=16,
                lr=1e-3, warmup_frac=0.25, crop_scale=(0.8, 1.0), log_every=2, num_threads=1)
    return StageConfig(**{**base, **kw})


def _scalars(logdir: str) -> dict:
    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_hold_every_log_step_and_zero_shot_during_the_stage(data, tmp_path):
    shards, eval_set = data
    out = str(tmp_path / "m")
    # Probes every 48 samples, looked at on log steps (every 2 steps of 16): steps 4 and 6.
    train_stage(shards, out, _stage(zeroshot_every=48), preset="tiny", eval_set=eval_set)
    scalars = _scalars(os.path.join(out, "tensorboard"))
    history = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    logged = [r for r in history if r["step"] % 2 == 0]
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in logged])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in logged])
    for tag in ("train/logit_scale", "perf/samples_per_s", "perf/gflops_per_s",
                "perf/data_wait_frac"):
        assert [s for s, _ in scalars[tag]] == [2, 4, 6, 8], tag
    assert all(0.0 <= v <= 1.0 for _, v in scalars["perf/data_wait_frac"])
    assert [s for s, _ in scalars["zeroshot/top1"]] == [4, 6]
    assert [s for s, _ in scalars["zeroshot/top5"]] == [4, 6]
    assert all(0.0 <= v <= 1.0 for _, v in scalars["zeroshot/top1"] + scalars["zeroshot/top5"])
    assert [r["step"] for r in history if "zeroshot_top1" in r] == [4, 6]
    # The probes touch neither the weights nor the RNG streams of training.
    plain = str(tmp_path / "plain")
    train_stage(shards, plain, _stage(), preset="tiny", report_to="")
    a = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(plain, "checkpoint.pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(plain, "tensorboard"))


def test_zero_shot_without_an_eval_set_or_an_unknown_reporter_fail_before_training(data,
                                                                                  tmp_path):
    shards, _ = data
    with pytest.raises(ConfigError, match="zeroshot_every=48 .* expected an eval set"):
        train_stage(shards, str(tmp_path / "m"), _stage(zeroshot_every=48), preset="tiny")
    with pytest.raises(ValueError, match="report_to='tensorbord': unknown"):
        parse_report_to("tensorbord")
    assert not os.path.exists(tmp_path / "m")


def _wandb_records(path: str):
    """Records of a .wandb file: W&B's 7-byte header, then LevelDB log blocks of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_gets_the_same_rows(data, tmp_path, monkeypatch):
    shards, _ = data
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "m")
    train_stage(shards, out, _stage(), preset="tiny", report_to="tensorboard,wandb")
    (run_file,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    rows = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            rows[record.history.step.num] = items
    assert sorted(rows) == [2, 4, 6, 8]
    history = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "history.jsonl")))}
    assert all(rows[s]["train/loss"] == pytest.approx(history[s]["loss"]) for s in rows)


def test_a_running_stage_shows_its_rows_and_events_before_it_ends(data, tmp_path):
    """The command line trains in a subprocess; while it runs (no marker yet), history.jsonl
    and the event files already hold the logged steps."""
    import signal
    import subprocess
    import sys
    import time

    from support import REPO_ROOT

    shards, _ = data
    out = str(tmp_path / "m")
    sets = {"image_size": 28, "samples": 16 * 400, "batch_size": 16, "log_every": 1,
            "num_threads": 1, "num_workers": 0, "crop_scale": [0.8, 1.0]}
    cmd = [sys.executable, "-m", "components.train", shards, out, "--preset", "tiny",
           *[f"--set={k}={json.dumps(v)}" for k, v in sets.items()]]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = os.path.join(out, "history.jsonl")
    try:
        deadline = time.monotonic() + 300
        rows = []
        while len(rows) < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
            rows = open(history).read().splitlines() if os.path.exists(history) else []
        assert not os.path.exists(os.path.join(out, "clipa_artifact.json"))  # still training
        steps = [json.loads(r)["step"] for r in rows if r.endswith("}")]
        assert steps[:3] == [1, 2, 3]
        while 3 not in [s for s, _ in _scalars(os.path.join(out, "tensorboard")).get(
                "train/loss", [])]:  # SummaryWriter flushes every 10 s
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_vertex_events_go_to_the_aip_tensorboard_dir_on_gcs_too(data, gcs, monkeypatch):
    """On a custom job with a TensorBoard instance Vertex sets AIP_TENSORBOARD_LOG_DIR (gs://);
    the Model artifact itself may be gs:// as well (GCS emulator on loopback)."""
    shards, _ = data
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://bkt/jobs/logs")
    train_stage(shards, "gs://bkt/run/model", _stage(samples=16 * 4), preset="tiny")
    for logdir in ("gs://bkt/run/model/tensorboard", "gs://bkt/jobs/logs/pretrain"):
        assert [s for s, _ in _scalars(logdir)["train/loss"]] == [2, 4], logdir
    rows = gcs.cat("bkt/run/model/history.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_gloo_processes_probe_and_log_once(data, tmp_path):
    """torch.distributed.run with 2 CPU processes: rank 0 alone writes the events and runs the
    zero-shot probes while rank 1 waits in its next collective (no deadlock)."""
    import subprocess
    import sys

    from support import REPO_ROOT

    shards, eval_set = data
    out = str(tmp_path / "m")
    sets = {"image_size": 28, "samples": 128, "batch_size": 16, "log_every": 2,
            "num_threads": 1, "num_workers": 0, "checkpoint_every": 1, "checkpoint_minutes": 0,
            "zeroshot_every": 48, "crop_scale": [0.8, 1.0]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "components.train", shards, out, "--preset", "tiny", "--eval-set", eval_set,
           "--checkpoint-root", str(tmp_path / "root"),
           *[f"--set={k}={json.dumps(v)}" for k, v in sets.items()]]
    subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True, timeout=600)
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1  # one writer
    scalars = _scalars(os.path.join(out, "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in scalars["zeroshot/top1"]] == [4, 6]
