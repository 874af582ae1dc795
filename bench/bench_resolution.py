"""Does 84 px training run as much faster than 224 px as the FLOP counter says?

Same model and batch, training steps on in-memory uint8 batches (the compute path only:
normalise, forward, loss, backward, AdamW), text length fixed, bf16 on CPU. Prints samples/s
at both sizes, the measured speed-up, the FLOP ratio from ``model.flops_per_sample`` (the
counter the planner and the MFU log use) and their quotient (target: >= 80%).

    OMP_NUM_THREADS=1 python bench/bench_resolution.py [--preset tiny] [--batch 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipa_model.config import StageConfig  # noqa: E402
from clipa_model.model import build_model, flops_per_sample, get_tokenizer  # noqa: E402
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD  # noqa: E402
from clipa_model.train_loop import train_loop  # noqa: E402


def samples_per_s(preset: str, size: int, text_len: int, batch: int, steps: int, warmup: int,
                  precision: str) -> float:
    """Steady-state training samples/s at ``size`` px (the first ``warmup`` steps dropped)."""
    torch.manual_seed(0)
    model = build_model(preset, size, text_len)
    tok = get_tokenizer(preset, text_len)(["a photo of a red circle in the top left"] * batch)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    stage = StageConfig(image_size=size, text_len=text_len, samples=batch * (steps + warmup),
                        batch_size=batch, precision=precision, log_every=steps + warmup)
    times = []  # a timestamp after every step, taken through the checkpoint_due hook
    train_loop(model, ((images, tok) for _ in range(steps + warmup)), stage, IMAGE_MEAN,
               IMAGE_STD, on_log=None, checkpoint=lambda *a: None,
               checkpoint_due=lambda step: times.append(time.perf_counter()) and False)
    return batch * steps / (times[-1] - times[warmup - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--text-len", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    rate, flops = {}, {}
    for size in (84, 224):
        rate[size] = samples_per_s(args.preset, size, args.text_len, args.batch, args.steps,
                                   args.warmup, args.precision)
        flops[size] = flops_per_sample(args.preset, size, args.text_len)
        print(f"{size:>4} px: {rate[size]:8.1f} samples/s, {flops[size] / 1e9:6.2f} GFLOP/sample, "
              f"{rate[size] * flops[size] / 1e9:6.1f} GFLOP/s")
    speedup, flop_ratio = rate[84] / rate[224], flops[224] / flops[84]
    print(f"{args.preset}, batch {args.batch}, {args.precision}, {torch.get_num_threads()} thread(s)")
    print(f"speed-up 84 vs 224 px: {speedup:.2f}x; FLOP ratio: {flop_ratio:.2f}x; "
          f"speed-up / FLOP ratio: {speedup / flop_ratio:.0%} (target >= 80%)")
    print(f"load average after: {os.getloadavg()} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
