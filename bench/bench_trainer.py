"""Training throughput: our loop vs open_clip's own training loop (open_clip_train), on CPU.

Same model (the tiny preset at 84 px / 8 tokens, given to open_clip_train as a model config
JSON), same batch, precision (bf16 autocast), optimizer settings, threads, loader workers and
the same webdataset shards (demo data). Each side runs in its own process; the first log
window (warm-up) is dropped. Prints samples/s of both and the ratio (target: >= 1.0).

    OMP_NUM_THREADS=1 python bench/bench_trainer.py [--steps 120] [--batch 32] [--workers 1]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL_NAME = "clipa-bench-tiny"


def make_shards(root: str, n: int) -> tuple[str, int]:
    """Demo images (256 px JPEGs, like the download step makes) as filtered shards."""
    from pipelines.demo_data import write_demo_shards

    folder = write_demo_shards(root, n, seed=0, size=256, shard_size=256)
    return folder, sum(f.endswith(".tar") for f in os.listdir(folder))


def run_ours(args) -> float:
    """samples/s of ``train_stage`` (after the first log window)."""
    from clipa_model.recipes import DEMO
    from clipa_model.train_stage import train_stage

    stage = DEMO["pretrain"].replace(samples=args.steps * args.batch, batch_size=args.batch,
                                     num_threads=args.threads, num_workers=args.workers,
                                     log_every=args.log_every, checkpoint_minutes=0)
    out = tempfile.mkdtemp()
    train_stage(args.data, os.path.join(out, "m"), stage, preset="tiny")
    rows = [json.loads(line) for line in open(os.path.join(out, "m", "history.jsonl"))]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return sum(rates) / len(rates)


def run_open_clip(args) -> float:
    """samples/s of open_clip_train.main (its per-window 'Batch (t)' average)."""
    import open_clip
    import torch
    from open_clip_train.main import main as oc_main

    from clipa_model.export import open_clip_config
    from clipa_model.checkpoint import model_config

    cfg_dir = tempfile.mkdtemp()
    with open(os.path.join(cfg_dir, f"{MODEL_NAME}.json"), "w") as f:
        json.dump(open_clip_config(model_config("tiny", 84, 8))["model_cfg"], f)
    open_clip.add_model_config(cfg_dir)
    torch.set_num_threads(args.threads)
    logs = tempfile.mkdtemp()
    last = f"{args.shard_count - 1:05d}"
    oc_main([
        "--train-data", os.path.join(args.data, f"shard-{{00000..{last}}}.tar"),
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(args.steps * args.batch), "--epochs", "1",
        "--batch-size", str(args.batch), "--workers", str(args.workers),
        "--model", MODEL_NAME, "--precision", "amp_bf16", "--lr", "7e-4", "--wd", "0.2",
        "--beta1", "0.9", "--beta2", "0.95", "--eps", "1e-8", "--warmup", "5",
        "--log-every-n-steps", str(args.log_every), "--logs", logs, "--name", "bench",
        "--save-frequency", "0", "--report-to", "", "--seed", "0"])
    text = open(os.path.join(logs, "bench", "out.log")).read()
    batch_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)][1:]
    return args.batch / (sum(batch_times) / len(batch_times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each trainer")
    ap.add_argument("--workers", type=int, default=1, help="data loader processes")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--role", choices=["ours", "open_clip"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shard-count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:  # one side, in its own process
        rate = run_ours(args) if args.role == "ours" else run_open_clip(args)
        print(json.dumps({"samples_per_s": rate}))
        return
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        data, count = make_shards(root, args.images)
        rates = {}
        for role in ("open_clip", "ours"):
            cmd = [sys.executable, __file__, "--role", role, "--data", data,
                   "--shard-count", str(count), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--threads", str(args.threads),
                   "--workers", str(args.workers), "--log-every", str(args.log_every)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            rates[role] = json.loads(out.strip().splitlines()[-1])["samples_per_s"]
    print(f"model tiny @ 84 px / 8 tokens, batch {args.batch}, bf16, {args.threads} thread(s), "
          f"{args.workers} loader worker(s), {args.steps} steps")
    print(f"open_clip_train: {rates['open_clip']:8.1f} samples/s")
    print(f"ours:            {rates['ours']:8.1f} samples/s")
    print(f"ratio ours / open_clip_train: {rates['ours'] / rates['open_clip']:.2f}x (target >= 1.0)")
    print(f"load average after: {os.getloadavg()} on {os.cpu_count()} cores (a shared CPU skews "
          "both sides; they run one after the other)")


if __name__ == "__main__":
    main()
