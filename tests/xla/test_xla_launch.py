"""The TPU path of a training step with a CPU standing in (PJRT_DEVICE=CPU): device "auto"
picks xla, the step's launcher starts its worker through torch_xla's launch, the worker
takes its rank from PJRT, and exact accumulation (masks replayed from the XLA RNG) runs.

On a CPU, PJRT has one device, so torch_xla starts one worker; a TPU VM starts one per chip.
"""
import json
import os

import torch

from clipa_model.config import StageConfig
from clipa_model.launch import device_type, launch, node_layout
from clipa_model.train_stage import stage_worker
from pipelines.demo_data import write_demo_shards


def test_auto_device_is_xla_where_pjrt_is_configured():
    assert os.environ["PJRT_DEVICE"] == "CPU"
    assert device_type("auto") == "xla"
    assert device_type("auto", {}) in ("cpu", "cuda")  # no PJRT_DEVICE: not a TPU host
    layout = node_layout(0, "auto")
    assert (layout.device, layout.nodes, layout.procs_per_node) == ("xla", 1, 1)


def test_a_launched_stage_trains_on_xla_with_accumulation(tmp_path):
    shards = write_demo_shards(str(tmp_path), 24, seed=0, size=48, shard_size=16)
    stage = StageConfig(stage="finetune_28", image_size=28, text_len=8, mask_ratio=0.5,
                        samples=8 * 3, batch_size=8, accum_steps=2, lr=1e-3, precision="fp32",
                        log_every=1, num_threads=1, checkpoint_minutes=0, crop_scale=(0.8, 1.0))
    out = str(tmp_path / "model")
    layout = node_layout(0, stage.device)
    result = launch(stage_worker, (shards, out, stage, "tiny", None, None, layout), layout)
    assert result["steps"] == 3 and result["kind"] == "model"
    resolved = json.load(open(os.path.join(out, "resolved_config.json")))
    assert resolved["device"].startswith("xla") and resolved["stage"]["accum_steps"] == 2
    assert (resolved["world_size"], resolved["micro_batch"]) == (1, 4)
    history = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
