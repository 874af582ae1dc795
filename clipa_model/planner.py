"""The compute planner: FLOPs per sample per stage, totals, accelerator-hours and cost.

One FLOP counter (``model.flops_per_sample``) serves the planner, the MFU in the training
log and the 84-vs-224 benchmark. It counts the matmuls from the token counts: image patches
after masking, text length. Two conventions appear side by side:

- ``paper_gflops``: forward multiply-adds per sample, in G: the unit of CLIPA-v2's Table 3
  (fvcore's "FLOPs"). H/14 at 224 px / 32 tokens gives 177.0 G, at 336 px / 40% mask
  237.6 G (paper: 237.8 G).
- ``train_flops``: real training FLOPs, 2 per multiply-add and x3 for forward + backward,
  i.e. 6x the paper's unit; these set the accelerator-hours.

The paper's third figure, 135.9 G at 224 px with 30% masking, is not what its own other two
rows imply: 30% of 256 patches leaves 180 tokens, 125.8 G; 135.9 G is 24% masking (25%
gives 134.4 G). tests/clipa_model/test_planner.py states this.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clipa_model.config import StageConfig
from clipa_model.model import flops_per_sample
from clipa_model.presets import get_preset


@dataclass(frozen=True)
class Accelerator:
    """One accelerator: dense bf16 peak FLOP/s and an on-demand price per hour (USD).

    Prices are rough Google Cloud list prices per chip / GPU; pass your own with --price.
    """

    name: str
    peak_flops: float
    price_per_hour: float


ACCELERATORS = {a.name: a for a in (
    Accelerator("a100", 312e12, 2.93),
    Accelerator("h100", 989e12, 11.06),
    Accelerator("h200", 989e12, 13.00),
    Accelerator("l4", 121e12, 0.71),
    Accelerator("tpu-v3", 123e12, 2.20),
    Accelerator("tpu-v4", 275e12, 3.22),
    Accelerator("tpu-v5e", 197e12, 1.20),
    Accelerator("tpu-v5p", 459e12, 4.20),
)}


# Model FLOPs utilisation per (accelerator, preset, stage): the one table ``clipa plan``
# reads (``utilization_for``). Rows come from bench/bench_gpu.py (it prints them as
# ``UTILIZATION`` entries); none is measured yet, since no GPU was available to this
# project's sessions, so every stage falls back to DEFAULT_UTILIZATION, marked "assumed".
UTILIZATION: dict[tuple[str, str, str], float] = {}
DEFAULT_UTILIZATION = 0.4

# This CPU, measured: bench/bench_trainer.py trains the tiny preset at 84 px (bf16, batch
# 32) at 232.4 samples/s on 2 cores x 218.5 MFLOP per sample = 25.4 GFLOP/s per core
# (docs/TRAINING.md). What the local-run guard prices a recipe with.
CPU_CORE_FLOPS = 25.4e9


def utilization_for(accelerator: str, preset: str, stage: str) -> tuple[float, str]:
    """(MFU, "measured" or "assumed") for a stage on an accelerator, from ``UTILIZATION``."""
    key = (accelerator, preset, stage)
    if key in UTILIZATION:
        return UTILIZATION[key], "measured"
    return DEFAULT_UTILIZATION, "assumed"


def local_cpu(cores: int | None = None) -> Accelerator:
    """This machine's CPU as an accelerator: its measured FLOP/s at utilisation 1, no price."""
    import os

    cores = cores or os.cpu_count() or 1
    return Accelerator(f"cpu ({cores} cores)", CPU_CORE_FLOPS * cores, 0.0)


def paper_gflops(preset: str, image_size: int, text_len: int, mask_ratio: float = 0.0) -> float:
    """Forward multiply-adds per sample in G (CLIPA-v2 Table 3's unit)."""
    return flops_per_sample(preset, image_size, text_len, mask_ratio, train=False) / 2e9


@dataclass(frozen=True)
class StagePlan:
    """The compute of one stage (FLOPs per sample are per image-text pair)."""

    stage: str
    image_size: int
    text_len: int
    mask_ratio: float
    samples: int
    batch_size: int
    steps: int
    lr: float
    paper_gflops: float
    train_flops_per_sample: float
    train_flops: float
    accelerator_hours: float
    cost: float
    utilization: float = DEFAULT_UTILIZATION
    utilization_source: str = "given"


def plan_stage(preset: str, stage: StageConfig, accel: Accelerator, utilization: float | None,
               price_per_hour: float | None = None) -> StagePlan:
    """Compute, time and cost of one stage on ``accel`` at ``utilization`` (MFU, 0..1];
    None reads it from the ``UTILIZATION`` table."""
    source = "given"
    if utilization is None:
        utilization, source = utilization_for(accel.name, preset, stage.stage)
    per_sample = flops_per_sample(preset, stage.image_size, stage.text_len, stage.mask_ratio)
    total = per_sample * stage.samples
    hours = total / (accel.peak_flops * utilization) / 3600
    price = accel.price_per_hour if price_per_hour is None else price_per_hour
    return StagePlan(stage.stage, stage.image_size, stage.text_len, stage.mask_ratio,
                     stage.samples, stage.batch_size, stage.steps, stage.lr,
                     per_sample / 6e9, per_sample, total, hours, hours * price, utilization,
                     source)


def plan_recipe(recipe, accelerator: str | Accelerator = "a100", utilization: float | None = None,
                price_per_hour: float | None = None) -> dict:
    """Every stage of ``recipe`` (a ``recipes.Recipe``) and the totals.

    ``accelerator``: a name in ACCELERATORS or an Accelerator (e.g. ``local_cpu()``);
    ``utilization`` None: per stage from the ``UTILIZATION`` table.

    Returns:
        {"preset", "accelerator", "utilization", "price_per_hour", "stages": [StagePlan
        as dict], "total": {"train_flops", "accelerator_hours", "cost", "samples",
        "avg_paper_gflops"}}
    """
    if isinstance(accelerator, Accelerator):
        accel, accelerator = accelerator, accelerator.name
    elif accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r}: expected one of {sorted(ACCELERATORS)}")
    else:
        accel = ACCELERATORS[accelerator]
    if utilization is not None and not 0 < utilization <= 1:
        raise ValueError(f"utilization={utilization}: expected a fraction in (0, 1]")
    stages = [plan_stage(recipe.preset, s, accel, utilization, price_per_hour)
              for s in recipe.stages.values()]
    samples = sum(s.samples for s in stages)
    total = {"train_flops": sum(s.train_flops for s in stages),
             "accelerator_hours": sum(s.accelerator_hours for s in stages),
             "cost": sum(s.cost for s in stages), "samples": samples,
             "avg_paper_gflops": sum(s.paper_gflops * s.samples for s in stages) / samples}
    return {"preset": recipe.preset, "accelerator": accelerator, "utilization": utilization,
            "price_per_hour": accel.price_per_hour if price_per_hour is None else price_per_hour,
            "stages": [dataclasses.asdict(s) for s in stages], "total": total}


def resolved_config(stage: StageConfig, preset: str, world_size: int = 1, device: str = "cpu",
                    data_count: int | None = None, nodes: int = 1,
                    procs_per_node: int | None = None) -> dict:
    """What a run actually runs with, derived values included (saved next to checkpoints).

    "stage" is the whole StageConfig; world_size = nodes x procs_per_node processes.
    """
    flops = flops_per_sample(preset, stage.image_size, stage.text_len, stage.mask_ratio)
    grid = (stage.image_size // get_preset(preset).patch_size) ** 2
    from clipa_model.token_reduction import num_kept

    return {
        "preset": preset, "architecture": dataclasses.asdict(get_preset(preset)),
        "stage": stage.to_dict(), "world_size": world_size, "nodes": nodes,
        "procs_per_node": world_size // nodes if procs_per_node is None else procs_per_node,
        "device": device, "per_rank_batch": stage.batch_size // world_size,
        "micro_batch": stage.batch_size // world_size // stage.accum_steps,
        "accum_steps": stage.accum_steps, "steps": stage.steps,
        "warmup_steps": stage.warmup_steps, "peak_lr": stage.lr,
        "image_tokens": 1 + (num_kept(grid, stage.mask_ratio) if stage.mask_ratio else grid),
        "text_tokens": stage.text_len, "train_flops_per_sample": flops,
        "paper_gflops_per_sample": flops / 6e9, "data_count": data_count,
        "epochs": None if not data_count else stage.samples / data_count,
    }
