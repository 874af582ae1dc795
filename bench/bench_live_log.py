"""What watching a stage costs: wall time of the same pretrain without live logging, with
TensorBoard events, with events + zero-shot probes, and with a checkpoint every few steps.

Same tiny stage (84 px, demo shards), seed and threads in each run; each run is a fresh
``train_stage`` in this process, in an order repeated ``--rounds`` times (the median is
kept). Prints seconds and the ratio to the run without live logging.

    OMP_NUM_THREADS=1 python bench/bench_live_log.py [--steps 60] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from clipa_model.recipes import DEMO
    from clipa_model.train_stage import train_stage
    from pipelines.demo_data import write_demo_shards, write_eval_set

    tmp = tempfile.mkdtemp(prefix="clipa-bench-live-")
    shards = write_demo_shards(os.path.join(tmp, "d"), 256, seed=0, size=128, shard_size=128)
    eval_set = os.path.join(tmp, "eval")
    write_eval_set(eval_set, 4, seed=5, size=128)  # 40 images
    stage = DEMO["pretrain"].replace(samples=args.steps * args.batch, batch_size=args.batch,
                                     log_every=10, num_threads=1, num_workers=1)
    every = args.steps * args.batch // 4
    variants = {
        "no live logging": (stage, {"report_to": ""}),
        "tensorboard events": (stage, {}),
        "events + 4 zero-shot probes": (stage.replace(zeroshot_every=every),
                                        {"eval_set": eval_set}),
        "events + checkpoint every 10 steps": (stage.replace(checkpoint_every=10,
                                                             checkpoint_minutes=0),
                                               {"checkpoint_root": os.path.join(tmp, "ck")}),
    }
    seconds = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (cfg, kwargs) in variants.items():
            t0 = time.perf_counter()
            train_stage(shards, os.path.join(tmp, f"m{r}-{len(seconds[name])}-{hash(name)}"), cfg,
                        preset="tiny", **kwargs)
            seconds[name].append(time.perf_counter() - t0)
    base = statistics.median(seconds["no live logging"])
    for name, values in seconds.items():
        med = statistics.median(values)
        print(f"{name:38s} {med:7.2f} s  x{med / base:.3f}")


if __name__ == "__main__":
    main()
