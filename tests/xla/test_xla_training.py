"""The training loop on torch_xla (PJRT), for real, with a CPU standing in for the TPU.

Checks what makes a loop XLA-friendly: after the first two steps (the second one adds the
optimizer state) the step graph is compiled once and reused, and the host reads device
values only when a log window is flushed.
"""
import json
import os

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met

from clipa_model.config import StageConfig
from clipa_model.devices import select_device
from clipa_model.distributed import DistEnv
from clipa_model.model import build_model, get_tokenizer
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
from clipa_model.train_loop import train_loop
from clipa_model.train_stage import train_stage
from pipelines.demo_data import write_demo_shards

STEPS, LOG_EVERY = 6, 3


def _batches(n: int, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    tok = get_tokenizer("tiny", 8)
    captions = ["a red circle", "blue stripes", "a large star", "green dots"] * (batch // 4)
    return [(torch.randint(0, 256, (batch, 3, 28, 28), generator=g, dtype=torch.uint8),
             tok(captions)) for _ in range(n)]


def test_train_loop_compiles_once_and_syncs_only_at_log_steps():
    device = select_device("xla")
    assert device.type == "xla" and os.environ["PJRT_DEVICE"] == "CPU"
    torch.manual_seed(0)
    model = build_model("tiny", 28, 8, mask_ratio=0.5).to(device)  # masking: static shapes
    stage = StageConfig(image_size=28, text_len=8, mask_ratio=0.5, samples=8 * STEPS,
                        batch_size=8, precision="fp32", log_every=LOG_EVERY)
    met.clear_all()
    history = train_loop(model, _batches(STEPS), stage, IMAGE_MEAN, IMAGE_STD, device=device,
                         dist_env=DistEnv())
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    compiles = met.metric_data("CompileTime")[0]
    assert compiles <= 3, met.short_metrics_report()  # init + first step + steady state
    # Host reads: losses and scales once per log window, nothing inside the steps.
    reads = met.metric_data("TransferFromDeviceTime")[0]
    assert reads <= 2 * (STEPS // LOG_EVERY), met.short_metrics_report()


def test_a_whole_stage_on_xla_writes_the_model_artifact(tmp_path):
    shards = write_demo_shards(str(tmp_path), 24, seed=0, size=48, shard_size=16)
    stage = StageConfig(stage="pretrain", image_size=28, text_len=8, samples=8 * 4, batch_size=8,
                        lr=1e-3, precision="fp32", device="xla", log_every=2, num_threads=1,
                        checkpoint_every=2, checkpoint_minutes=0, crop_scale=(0.8, 1.0))
    out = str(tmp_path / "model")
    result = train_stage(shards, out, stage, preset="tiny",
                         dist_env=DistEnv())
    assert result["steps"] == 4 and result["kind"] == "model"
    resolved = json.load(open(os.path.join(out, "resolved_config.json")))
    assert resolved["device"].startswith("xla")
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["visual.conv1.weight"].device.type == "cpu"
    assert torch_xla.__version__.startswith("2.9")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
