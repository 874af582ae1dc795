"""GPU training throughput and MFU per CLIPA stage, for B/16 and L/14.

For each preset and stage (pretrain: 6x6 patches, 8 tokens; finetune 224 px / 32 tokens /
30% masked; finetune 336 px / 32 tokens / 40% masked) it runs the real training loop
(``train.train_loop``: bf16 autocast, fused AdamW, all-in-graph masking) on uint8 batches
already on the GPU, so it measures the model step, not the input pipeline. samples/s comes
from the last log window (the loop syncs once per window); MFU = training FLOPs per sample
(``model.flops_per_sample``, the planner's counter) x samples/s / the GPU's dense bf16 peak.

    python bench/bench_gpu.py                      # B/16 and L/14 on the visible GPU
    python bench/bench_gpu.py --compile --grad-checkpointing
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


def bench_stage(preset: str, stage_name: str, size: int, text_len: int, mask: float,
                batch: int, steps: int, device: torch.device, args) -> dict:
    """Train ``2 * steps`` steps; report the second window's samples/s and MFU."""
    torch.manual_seed(0)
    model = build_model(preset, size, text_len, mask)
    stage = StageConfig(stage=stage_name, image_size=size, text_len=text_len, mask_ratio=mask,
                        samples=2 * steps * batch, batch_size=batch, log_every=steps,
                        grad_checkpointing=args.grad_checkpointing, compile=args.compile,
                        precision="bf16")
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
    return {"preset": preset, "stage": stage_name, "px": size, "tokens": text_len, "mask": mask,
            "batch": batch, "samples_per_s": row["samples_per_s"],
            "tflops": row["samples_per_s"] * flops / 1e12, "mfu": row.get("mfu"), "mem_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["B/16", "L/14"])
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up)")
    ap.add_argument("--batch", type=int, default=0, help="override the per-preset batch")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, 2 steps, CPU")
    args = ap.parse_args()
    presets, steps = (["tiny"], 2) if args.tiny else (args.presets, args.steps)
    device = select_device("cpu" if args.tiny else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; bf16 peak {peak_flops(device) / 1e12:.0f} TFLOP/s; torch "
          f"{torch.__version__}; compile={args.compile}; grad_checkpointing={args.grad_checkpointing}")
    print(f"{'preset':<8}{'stage':<14}{'px':>5}{'tok':>5}{'mask':>6}{'batch':>7}"
          f"{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    for preset in presets:
        for stage_name, grid, text_len, mask in STAGES:
            size = image_size(preset, grid)
            batch = args.batch or BATCH.get(preset, 64)
            try:
                r = bench_stage(preset, stage_name, size, text_len, mask, batch, steps, device, args)
            except torch.cuda.OutOfMemoryError:
                print(f"{preset:<8}{stage_name:<14}{size:>5}  out of memory at batch {batch}")
                torch.cuda.empty_cache()
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"{preset:<8}{stage_name:<14}{size:>5}{text_len:>5}{mask:>6.0%}{batch:>7}"
                  f"{r['samples_per_s']:>11.1f}{r['tflops']:>9.1f}{mfu:>7}{r['mem_gib']:>9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
