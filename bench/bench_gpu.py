"""GPU training throughput and MFU per CLIPA stage, for B/16 and L/14 (the prepared GPU script).

For each preset and stage (pretrain: 6x6 patches, 8 tokens; finetune 224 px / 32 tokens /
30% masked; finetune 336 px / 32 tokens / 40% masked) it runs the real training loop
(``train.train_loop``: bf16 autocast, fused AdamW, all-in-graph masking) on uint8 batches
already on the GPU, so it measures the model step, not the input pipeline. samples/s comes
from the last log window (the loop syncs once per window); MFU = training FLOPs per sample
(``model.flops_per_sample``, the planner's counter) x samples/s / the GPU's dense bf16 peak.

Each stage runs in four variants: plain, ``accum`` (exact contrastive accumulation,
``accum_steps`` 4: one extra forward per sample), ``gc`` (grad checkpointing) and both. Then
the 84 px data loader's samples/s on one CPU core (decode, crop, tokenise; synthetic JPEG
shards at 256 px) beside the GPU's appetite at 84 px: the cores it takes to feed one GPU.
Last, the plain variant's MFU as rows of ``planner.UTILIZATION`` (what ``clipa plan`` reads).

    python bench/bench_gpu.py                      # B/16 and L/14 on the visible GPU
    python bench/bench_gpu.py --variants plain --compile
    python bench/bench_gpu.py --tiny               # the tiny preset on CPU: checks the script
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipa_model.config import StageConfig  # noqa: E402
from clipa_model.devices import peak_flops, select_device  # noqa: E402
from clipa_model.model import build_model, flops_per_sample  # noqa: E402
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD, get_preset  # noqa: E402
from clipa_model.train_loop import train_loop  # noqa: E402

# (stage, patch grid side, text tokens, mask ratio): 84 / 224 / 336 px for a /14 preset.
STAGES = [("pretrain", 6, 8, 0.0), ("finetune_224", 16, 32, 0.3), ("finetune_336", 24, 32, 0.4)]
BATCH = {"B/16": 256, "L/14": 128, "tiny": 32}


def image_size(preset: str, grid: int) -> int:
    """Side in pixels: the /14 sizes (84, 224, 336) where they tile, else grid x patch."""
    patch, size = get_preset(preset).patch_size, {6: 84, 16: 224, 24: 336}[grid]
    return size if size % patch == 0 else grid * patch


VARIANTS = {"plain": {}, "accum": {"accum_steps": 4}, "gc": {"grad_checkpointing": True},
            "accum+gc": {"accum_steps": 4, "grad_checkpointing": True}}


def bench_stage(preset: str, stage_name: str, size: int, text_len: int, mask: float,
                batch: int, steps: int, device: torch.device, args, variant: str = "plain") -> dict:
    """Train ``2 * steps`` steps; report the second window's samples/s and MFU."""
    torch.manual_seed(0)
    model = build_model(preset, size, text_len, mask)
    stage = StageConfig(stage=stage_name, image_size=size, text_len=text_len, mask_ratio=mask,
                        samples=2 * steps * batch, batch_size=batch, log_every=steps,
                        compile=args.compile, precision="bf16", **VARIANTS[variant])
    vocab = get_preset(preset).vocab_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    tokens = torch.randint(1, vocab, (batch, text_len), device=device)
    flops = flops_per_sample(preset, size, text_len, mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = train_loop(model.to(device), ((images, tokens) for _ in range(2 * steps)), stage,
                         IMAGE_MEAN, IMAGE_STD, flops, device=device)
    row = history[-1]
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"preset": preset, "stage": stage_name, "variant": variant, "px": size,
            "tokens": text_len, "mask": mask, "batch": batch, "samples_per_s": row["samples_per_s"],
            "tflops": row["samples_per_s"] * flops / 1e12, "mfu": row.get("mfu"), "mem_gib": mem}


def loader_samples_per_core(preset: str, samples: int = 512) -> float:
    """samples/s of the 84 px training loader in this process (one core): decode, crop, tokenise."""
    import tempfile
    import time

    from clipa_model.data import train_batches
    from clipa_model.model import get_tokenizer
    from pipelines.demo_data import write_demo_shards

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        shards = write_demo_shards(tmp, samples, seed=0, size=256, shard_size=256)
        tok = get_tokenizer(preset, 8)
        batch = 64
        steps = samples // batch
        list(train_batches(shards, 84, batch, 1, tok))  # warm up: imports, first shard
        t0 = time.perf_counter()
        n = sum(b[0].shape[0] for b in train_batches(shards, 84, batch, steps, tok))
        return n / (time.perf_counter() - t0)


def accelerator_key(device: torch.device) -> str:
    """The planner's accelerator name for this device ("" when it has none)."""
    if device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in ("h200", "h100", "a100", "l4") if k in name), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["B/16", "L/14"])
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up)")
    ap.add_argument("--batch", type=int, default=0, help="override the per-preset batch")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="tiny preset, 2 steps, CPU")
    args = ap.parse_args()
    presets, steps = (["tiny"], 2) if args.tiny else (args.presets, args.steps)
    device = select_device("cpu" if args.tiny else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; bf16 peak {peak_flops(device) / 1e12:.0f} TFLOP/s; torch "
          f"{torch.__version__}; compile={args.compile}")
    print(f"{'preset':<8}{'stage':<14}{'variant':<10}{'px':>5}{'tok':>5}{'mask':>6}{'batch':>7}"
          f"{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    rows = []
    for preset in presets:
        for stage_name, grid, text_len, mask in STAGES:
            size = image_size(preset, grid)
            batch = args.batch or BATCH.get(preset, 64)
            for variant in args.variants:
                try:
                    r = bench_stage(preset, stage_name, size, text_len, mask, batch, steps,
                                    device, args, variant)
                except torch.cuda.OutOfMemoryError:
                    print(f"{preset:<8}{stage_name:<14}{variant:<10}{size:>5}  out of memory at "
                          f"batch {batch}")
                    torch.cuda.empty_cache()
                    continue
                rows.append(r)
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
                print(f"{preset:<8}{stage_name:<14}{variant:<10}{size:>5}{text_len:>5}{mask:>6.0%}"
                      f"{batch:>7}{r['samples_per_s']:>11.1f}{r['tflops']:>9.1f}{mfu:>7}"
                      f"{r['mem_gib']:>9.1f}", flush=True)
    per_core = loader_samples_per_core(presets[0], 128 if args.tiny else 1024)
    for r in rows:
        if r["stage"] == "pretrain" and r["variant"] == "plain":
            print(f"loader at 84 px: {per_core:.0f} samples/s per CPU core; {r['preset']} pretrain "
                  f"eats {r['samples_per_s']:.0f} samples/s: {r['samples_per_s'] / per_core:.1f} "
                  "cores per GPU")
    key = accelerator_key(device)
    print("planner.UTILIZATION rows (plain variant):")
    for r in rows:
        if r["variant"] == "plain" and r["mfu"]:
            print(f'    ("{key}", "{r["preset"]}", "{r["stage"]}"): {r["mfu"]:.3f},')


if __name__ == "__main__":
    main()
