"""``make demo`` over several seeds: what each stage reaches, and whether the finetunes gain.

Runs the whole demo pipeline (``run_local``, what ``clipa run --param seed=N`` runs: ``make
demo`` with another seed, so other images, shard order, initialisation, crops and masks)
once per seed, each in its own process and work folder, and reads every run's summary.
Prints per seed: top-1 after each stage, the gain of the finetunes (final - pretraining)
and the pipeline's seconds; then the mean gain, the smallest final top-1 and the slowest
run against the issue's floors (every run gains, by >= 3 points on average; top-1 >= 70%;
<= 6 minutes of pipeline time on this 2-core machine). Writes ``demo_seeds.json`` to
``--out``.

    python bench/bench_demo_seeds.py --out bench-out        # 5 seeds, 38 min measured on 2 cores

Measured: see docs/SCIENCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(seed: int, workdir: str) -> None:
    """In a fresh process: the demo pipeline with ``seed`` (``clipa run``'s own call), then
    its summary as the last line of stdout."""
    sys.path.insert(0, ROOT)
    from pipelines.local import run_local

    with open(os.devnull, "w") as quiet:
        result = run_local(workdir, "demo", overrides={"seed": seed}, view=quiet)
    print(json.dumps({"summary": result.summary, "seconds": result.seconds}))


def run_seed(seed: int, workdir: str) -> dict:
    """One demo run with ``seed``: top-1 after each stage, final top-1 and seconds."""
    proc = subprocess.run([sys.executable, __file__, "--child", str(seed), workdir], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        raise RuntimeError(f"seed {seed}: the demo run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = out["summary"]
    top1 = {s["stage"]: s["top1"] for s in summary["stages"] if s.get("top1") is not None}
    return {"seed": seed, "top1": top1, "final": summary["final"]["top1"],
            "seconds": out["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--out", default=".", help="folder for demo_seeds.json")
    ap.add_argument("--keep", default=None, help="keep the run folders here (default: temp)")
    ap.add_argument("--child", nargs=2, metavar=("SEED", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(int(args.child[0]), args.child[1])
    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as tmp:
        for seed in args.seeds:
            r = run_seed(seed, os.path.join(args.keep or tmp, f"seed{seed}"))
            r["gain"] = r["final"] - r["top1"]["pretrain"]
            runs.append(r)
            stages = "  ".join(f"{k} {v:6.1%}" for k, v in r["top1"].items())
            print(f"seed {seed}: {stages}  gain {100 * r['gain']:+5.1f} pts  {r['seconds']:.0f} s",
                  flush=True)
    gains = [r["gain"] for r in runs]
    floors = {"every_run_gains": all(g > 0 for g in gains),
              "mean_gain_pts": 100 * statistics.mean(gains),
              "min_final_top1": min(r["final"] for r in runs),
              "max_seconds": max(r["seconds"] for r in runs)}
    print(f"finetunes gain in {sum(g > 0 for g in gains)} of {len(gains)} runs (floor: all), "
          f"mean {floors['mean_gain_pts']:+.1f} pts (floor: >= +3); final top-1 "
          f"{100 * statistics.mean(r['final'] for r in runs):.1f}% mean, "
          f"{100 * floors['min_final_top1']:.1f}% lowest (floor: >= 70%); pipeline "
          f"{floors['max_seconds']:.0f} s slowest (floor: <= 360 s)")
    print(f"load average after: {os.getloadavg()}")
    os.makedirs(args.out, exist_ok=True)
    result = {"runs": runs, "floors": floors}
    with open(os.path.join(args.out, "demo_seeds.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
