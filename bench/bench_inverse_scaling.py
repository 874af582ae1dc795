"""CLIPA's compute claim, measured fairly: 84 px pretraining + a short 224 px finetune against
a 224 px-only run with its own tuned schedule, trained until it stops improving.

CLIPA's claim: training mostly at low resolution (few image and text tokens) and finetuning
briefly at full resolution reaches about the accuracy of a *converged* full-resolution run
for a fraction of its compute. A baseline that never learns would make any comparison look
good, so the 224 px-only arm here gets:

1. a small sweep of its own peak LR (at the first warmup), then of warmup (at the best LR),
   each at ``--sweep-scale`` x the CLIPA arm's
   training FLOPs (reported as a table);
2. the best of those, trained for ``--max-scale`` x the CLIPA arm's FLOPs (issue: up to 8x),
   probed zero-shot ``--probes`` times along the way (``StageConfig.zeroshot_every``), so the
   curve shows where it stops improving. Probes before the end are taken at a high LR
   (cosine schedule of the whole run): a lower bound of what a run of that length reaches;
   the end point is a complete, annealed run.

The CLIPA arm (the demo recipe's stages: 84 px / 8 tokens, then 224 px / 16 tokens,
``--finetune-mask`` of the patches masked, 30% by default) is probed during pretraining too. FLOPs are the planner's counter
(``planner.plan_stage``: matmul FLOPs from the token counts, x3 for the backward pass).
Zero-shot top-1 / top-5 of every end point come from the evaluate step
(``components.evaluate.run_evaluate``) on a held-out labelled set. Prints every run, the
floor check (issue: CLIPA >= 95% of the best 224-only top-1 at <= 40% of the compute that
224-only needed to get there) and writes ``inverse_scaling.png`` (top-1 vs training FLOPs,
both arms) and ``inverse_scaling.json`` to ``--out``.

    python bench/bench_inverse_scaling.py --out bench-out        # 41 min on 2 cores, a CI run beside it
    python bench/bench_inverse_scaling.py --pretrain-samples 140000 --finetune-samples 4096 \
        --reuse-224 bench-out/inverse_scaling.json --out bench-out-long
                                      # the CLIPA arm at ~40% of the 224-only arm's compute
    python bench/bench_inverse_scaling.py --sweep-lr 7e-4 --sweep-warmup 0.05 --max-scale 2
                                                                  # a quick look (not timed)

Measured: see docs/SCIENCE.md (kept there, next to the plot, not here).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluate step's progress bars (read at import)
sys.path.insert(0, ROOT)

from clipa_model.checkpoint import read_training_history  # noqa: E402
from clipa_model.config import StageConfig  # noqa: E402
from clipa_model.planner import ACCELERATORS, plan_stage  # noqa: E402
from clipa_model.recipes import DEMO  # noqa: E402
from science import demo_data, top1_figure, zero_shot  # noqa: E402  (bench/science.py)

PRESET = "tiny"


def train_flops(stage: StageConfig, preset: str = PRESET) -> float:
    """Training FLOPs of a whole stage (the planner's counter; the accelerator is irrelevant)."""
    return plan_stage(preset, stage, ACCELERATORS["a100"], 1.0).train_flops


def per_sample_flops(stage: StageConfig, preset: str = PRESET) -> float:
    return plan_stage(preset, stage, ACCELERATORS["a100"], 1.0).train_flops_per_sample


def whole_batches(samples: float, batch: int) -> int:
    return max(1, round(samples / batch)) * batch


def clipa_stages(args) -> list[StageConfig]:
    """The demo recipe's pretrain and 224 px finetune at the bench's sample counts."""
    common = dict(batch_size=args.batch, num_threads=args.threads, num_workers=args.workers,
                  seed=args.seed, checkpoint_minutes=0)
    pretrain = DEMO["pretrain"].replace(
        samples=args.pretrain_samples, log_every=25,
        zeroshot_every=whole_batches(args.pretrain_samples / args.probes, args.batch), **common)
    finetune = DEMO["finetune_224"].replace(samples=args.finetune_samples, log_every=25,
                                            mask_ratio=args.finetune_mask, **common)
    return [pretrain, finetune]


def only_224(args, budget: float, scale: float, lr: float, warmup: float,
             probes: int = 0) -> StageConfig:
    """A 224 px-only stage from scratch with ``scale`` x ``budget`` FLOPs (whole batches).

    The pretraining's settings (frozen patch embedding included) but the finetune's crops:
    the pretraining crops from 10% of the image to show its 84 px model the textures at the
    scale 224 px shows them, which a 224 px run does not need.
    """
    stage = DEMO["pretrain"].replace(
        stage="train_224", image_size=224, text_len=DEMO["finetune_224"].text_len,
        crop_scale=DEMO["finetune_224"].crop_scale, mask_ratio=0.0, samples=1, batch_size=args.batch, lr=lr, warmup_frac=warmup,
        num_threads=args.threads, num_workers=args.workers, seed=args.seed,
        checkpoint_minutes=0, log_every=25)
    samples = whole_batches(scale * budget / per_sample_flops(stage), args.batch)
    every = whole_batches(samples / probes, args.batch) if probes else 0
    return stage.replace(samples=samples, zeroshot_every=every)


def train(stage: StageConfig, shards: str, eval_dir: str, out: str,
          init: str | None = None) -> tuple[dict, float]:
    """Train one stage (as the pipeline's step does); its marker and seconds."""
    from clipa_model.train_stage import train_stage

    t0 = time.perf_counter()
    marker = train_stage(shards, out, stage, preset=None if init else PRESET,
                         init_model_dir=init, eval_set=eval_dir if stage.zeroshot_every else None,
                         report_to=())
    return marker, time.perf_counter() - t0


def probes(model_dir: str, stage: StageConfig, flops_before: float) -> list[dict]:
    """(cumulative TFLOP, top-1) of each zero-shot probe taken during a stage."""
    per = per_sample_flops(stage)
    return [{"tflops": (flops_before + r["samples_seen"] * per) / 1e12,
             "top1": r["zeroshot_top1"], "top5": r["zeroshot_top5"], "probe": True}
            for r in read_training_history(model_dir) if "zeroshot_top1" in r]


def run_clipa(args, shards, eval_dir, root) -> list[dict]:
    points, init, flops = [], None, 0.0
    for stage in clipa_stages(args):
        out = os.path.join(root, "clipa", stage.stage)
        _, seconds = train(stage, shards, eval_dir, out, init)
        points += probes(out, stage, flops)
        flops += train_flops(stage)
        points.append({"tflops": flops / 1e12, "stage": stage.stage, "seconds": seconds,
                       "samples": stage.samples, **zero_shot(out, eval_dir)})
        print(f"clipa     {stage.stage:<13}{stage.image_size:>4} px {stage.samples:>7} samples "
              f"{flops / 1e12:7.2f} TFLOP {seconds:6.0f} s  top-1 {points[-1]['top1']:6.1%}  "
              f"top-5 {points[-1]['top5']:6.1%}", flush=True)
        init = out
    return points


def run_sweep(args, budget, shards, eval_dir, root) -> list[dict]:
    """Coordinate search: every ``--sweep-lr`` at the first warmup, then the other warmups
    at the best of those LRs (4 runs by default rather than a 6-run grid)."""
    rows = []

    def one(lr: float, warmup: float) -> None:
        stage = only_224(args, budget, args.sweep_scale, lr, warmup)
        out = os.path.join(root, "sweep", f"lr{lr:g}-wu{warmup:g}")
        _, seconds = train(stage, shards, eval_dir, out)
        rows.append({"lr": lr, "warmup": warmup, "samples": stage.samples,
                     "tflops": train_flops(stage) / 1e12, "seconds": seconds,
                     **zero_shot(out, eval_dir)})
        print(f"sweep     lr {lr:<8g} warmup {warmup:<5g}{stage.samples:>7} samples "
              f"{rows[-1]['tflops']:7.2f} TFLOP {seconds:6.0f} s  top-1 {rows[-1]['top1']:6.1%}  "
              f"top-5 {rows[-1]['top5']:6.1%}", flush=True)

    for lr in args.sweep_lr:
        one(lr, args.sweep_warmup[0])
    best_lr = max(rows, key=lambda r: r["top1"])["lr"]
    for warmup in args.sweep_warmup[1:]:
        one(best_lr, warmup)
    return rows


def run_long(args, budget, best, shards, eval_dir, root) -> list[dict]:
    stage = only_224(args, budget, args.max_scale, best["lr"], best["warmup"], args.probes)
    out = os.path.join(root, "224-only")
    _, seconds = train(stage, shards, eval_dir, out)
    points = probes(out, stage, 0.0)
    points.append({"tflops": train_flops(stage) / 1e12, "stage": "train_224", "seconds": seconds,
                   "samples": stage.samples, **zero_shot(out, eval_dir)})
    for p in points:
        print(f"224-only  {'probe' if p.get('probe') else 'end':<13} lr {best['lr']:g} "
              f"{p['tflops']:7.2f} TFLOP  top-1 {p['top1']:6.1%}", flush=True)
    return points


def floor_check(clipa: list[dict], only: list[dict]) -> dict:
    """The issue's floor: CLIPA's final top-1 against the best 224-only top-1, and the
    compute each needed (224-only: the first point that reached its best)."""
    final = clipa[-1]
    best = max(p["top1"] for p in only)
    first_best = min(p["tflops"] for p in only if p["top1"] >= best)
    return {"clipa_top1": final["top1"], "clipa_tflops": final["tflops"],
            "best_224_top1": best, "best_224_tflops": first_best,
            "accuracy_ratio": final["top1"] / best if best else float("inf"),
            "compute_ratio": final["tflops"] / first_best,
            "holds": final["top1"] >= 0.95 * best and final["tflops"] <= 0.4 * first_best}


def plot(clipa: list[dict], only: list[dict], sweep: list[dict], path: str,
         earlier_clipa: list[dict] | None = None) -> None:
    """Top-1 vs TFLOP of both arms (and, with ``--reuse-224``, the earlier run's CLIPA arm)."""
    def clipa_label(points: list[dict]) -> str:
        samples = [f"{p['samples']:,}" for p in points if "stage" in p]
        return f"CLIPA: {' + '.join(samples)} samples at 84 + 224 px"

    arms = [(clipa_label(clipa), clipa, "o-"),
            ("224 px only (tuned, best sweep setting)", only, "s-")]
    if earlier_clipa:
        arms.insert(1, (clipa_label(earlier_clipa), earlier_clipa, "o--"))
    with top1_figure(path, "Inverse scaling on the demo data (tiny ViT)",
                     "training compute (TFLOP, planner's counter)") as ax:
        for name, pts, style in arms:
            ax.plot([p["tflops"] for p in pts], [100 * p["top1"] for p in pts], style, label=name)
        if sweep:
            ax.scatter([r["tflops"] for r in sweep], [100 * r["top1"] for r in sweep],
                       marker="x", color="grey", label="224 px only, LR/warmup sweep")
        ax.axhline(100 * clipa[-1].get("chance", 0.1), color="lightgrey", ls=":", label="chance")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-samples", type=int, default=48_000, help="84 px samples")
    ap.add_argument("--finetune-samples", type=int, default=2_048, help="224 px finetune samples")
    ap.add_argument("--finetune-mask", type=float, default=DEMO["finetune_224"].mask_ratio,
                    help="fraction of 224 px patches masked in the finetune (fewer FLOPs a sample)")
    ap.add_argument("--sweep-lr", type=float, nargs="+", default=[3.5e-4, 7e-4, 1.4e-3])
    ap.add_argument("--sweep-warmup", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--sweep-scale", type=float, default=1.0,
                    help="sweep runs' compute, in CLIPA-arm budgets")
    ap.add_argument("--max-scale", type=float, default=8.0,
                    help="the long 224-only run's compute, in CLIPA-arm budgets")
    ap.add_argument("--probes", type=int, default=8, help="zero-shot probes per long run")
    ap.add_argument("--batch", type=int, default=DEMO["pretrain"].batch_size)
    ap.add_argument("--n-train", type=int, default=4_000, help="synthetic training images")
    ap.add_argument("--eval-per-class", type=int, default=30, help="held-out images per class")
    ap.add_argument("--image-px", type=int, default=256, help="side of the rendered images")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workers", type=int, default=1, help="data loader processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-224", default=None, metavar="JSON",
                    help="take the sweep and the 224 px-only curve from an earlier run's "
                         "inverse_scaling.json (same data, seed and eval set) and train only "
                         "the CLIPA arm, e.g. with another --pretrain-samples")
    ap.add_argument("--workdir", default=None, help="keep data and models here (default: temp)")
    ap.add_argument("--out", default=".", help="folder for inverse_scaling.png / .json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    reused = None
    if args.reuse_224:
        with open(args.reuse_224) as f:
            reused = json.load(f)
        same = ("seed", "n_train", "eval_per_class", "image_px", "batch")
        differ = [k for k in same if reused["args"].get(k) != getattr(args, k)]
        if differ:
            ap.error(f"--reuse-224 {args.reuse_224}: its run had other {differ}; expected the "
                     "same data, seed and batch as this one")

    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    budget = sum(train_flops(s) for s in clipa_stages(args))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        shards, eval_dir = demo_data(root, args.n_train, args.eval_per_class, args.image_px,
                                     args.seed)
        print(f"budget: the CLIPA arm's {budget / 1e12:.2f} TFLOP; a 224 px sample costs "
              f"{per_sample_flops(only_224(args, budget, 1, 1e-3, 0.1)) / per_sample_flops(clipa_stages(args)[0]):.1f}x "
              "an 84 px one", flush=True)
        clipa = run_clipa(args, shards, eval_dir, root)
        if reused:
            sweep, only = reused["sweep"], reused["224_only"]
            print(f"224-only: {len(sweep)} sweep runs and {len(only)} points from "
                  f"{args.reuse_224}", flush=True)
        else:
            sweep = run_sweep(args, budget, shards, eval_dir, root)
            best = max(sweep, key=lambda r: r["top1"])
            print(f"sweep: best lr {best['lr']:g}, warmup {best['warmup']:g} "
                  f"({best['top1']:.1%} at {args.sweep_scale:g}x)", flush=True)
            only = run_long(args, budget, best, shards, eval_dir, root)
    check = floor_check(clipa, only)
    os.makedirs(args.out, exist_ok=True)
    plot(clipa, only, sweep, os.path.join(args.out, "inverse_scaling.png"),
         reused["clipa"] if reused else None)
    result = {"args": vars(args), "clipa": clipa, "sweep": sweep, "224_only": only,
              "floor": check, "seconds": time.perf_counter() - t0}
    with open(os.path.join(args.out, "inverse_scaling.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nCLIPA {check['clipa_top1']:.1%} at {check['clipa_tflops']:.2f} TFLOP; best 224-only "
          f"{check['best_224_top1']:.1%}, first reached at {check['best_224_tflops']:.2f} TFLOP")
    print(f"accuracy ratio {check['accuracy_ratio']:.2f} (floor >= 0.95), compute ratio "
          f"{check['compute_ratio']:.2f} (floor <= 0.40): "
          f"{'holds' if check['holds'] else 'does not hold'}")
    print(f"total {result['seconds']:.0f} s; load average after: {os.getloadavg()}")
    return result


if __name__ == "__main__":
    main()
