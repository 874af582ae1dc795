"""The inverse scaling law in miniature: 84 px pretraining + a short 224 px finetune against
224 px-only training, on the synthetic demo data, each given the same training FLOPs.

CLIPA's claim: training mostly at low resolution (few image and text tokens) then finetuning
briefly at full resolution reaches similar or better zero-shot accuracy for a fraction of the
compute. Here both arms get one FLOPs budget, counted by the planner's counter
(``planner.plan_stage``: matmul FLOPs from the token counts, x3 for the backward pass):

- clipa:    pretrain at 84 px / 8 tokens, then finetune at 224 px / 16 tokens (the demo
            recipe's) / 30% masked; its FLOPs set the budget.
- 224-only: the same model from scratch at 224 px / 16 tokens, no masking, as many samples
            as the budget buys (``--baseline-scale`` multiplies its budget).

Hyper-parameters come from the demo recipe (``recipes.DEMO``: batch, LR, warmup, crops); the
224-only arm uses the pretrain LR and warmup, since it trains from scratch. Zero-shot top-1 /
top-5 come from the evaluate step (``components.evaluate.run_evaluate``) on a held-out
labelled set; the 84 px model before its finetune is evaluated too. Every stage runs through
``trainer.train_stage``, as the pipeline does.

    python bench/bench_inverse_scaling.py                      # ~10 min on a 2-core CPU
    python bench/bench_inverse_scaling.py --pretrain-samples 12000 --finetune-samples 1024 \
        --n-train 2000                                         # ~3 min (too short to learn)
    python bench/bench_inverse_scaling.py --baseline-scale 4 --arms 224-only   # how much
                                                               # compute 224 px alone needs

Measured on this project's 2-core CPU (defaults, idle) with the demo's fine textures (6 to
13 periods per side): clipa 12.95 TFLOP, 67.3% top-1 / 99.3% top-5 (72.3% after the 84 px
stage: this short 2,048-sample finetune lost 5 points, see the README on finetune variance);
224-only 12.93 TFLOP (7,296 samples), 8.0% / 50.3% (chance 10%); 383 s in all. On the
earlier, coarser textures (3.5 to 12 periods): 57.7% vs 10.7%, and 224-only with 4x the
budget (52.2 TFLOP, 724 s) still reached 11.3% / 52.3%, with 8 text tokens at 1x 11.3% /
50.3%: the image resolution, not the text length, makes the difference here. The 224-only
contrastive loss does fall (to ~2.3, below the 84 px run's at the same step): from scratch at
224 px the tiny model first matches captions by colour and background, which zero-shot
prompts never name, and learns no textures within these budgets.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluate step's progress bars (read at import)
sys.path.insert(0, ROOT)

from clipa_model.config import StageConfig  # noqa: E402
from clipa_model.planner import ACCELERATORS, plan_stage  # noqa: E402
from clipa_model.recipes import DEMO  # noqa: E402

PRESET = "tiny"


def train_flops(stage: StageConfig) -> float:
    """Training FLOPs of a whole stage (the planner's counter; the accelerator is irrelevant)."""
    return plan_stage(PRESET, stage, ACCELERATORS["a100"], 1.0).train_flops


def per_sample_flops(stage: StageConfig) -> float:
    return plan_stage(PRESET, stage, ACCELERATORS["a100"], 1.0).train_flops_per_sample


def arms(args) -> dict[str, list[StageConfig]]:
    """The two schedules, the 224-only one sized to the CLIPA one's FLOPs (whole batches)."""
    common = dict(batch_size=args.batch, num_threads=args.threads, num_workers=args.workers,
                  seed=args.seed, checkpoint_minutes=0, log_every=50)
    pretrain = DEMO["pretrain"].replace(samples=args.pretrain_samples, **common)
    finetune = DEMO["finetune_224"].replace(samples=args.finetune_samples,
                                            mask_ratio=args.finetune_mask, **common)
    budget = (train_flops(pretrain) + train_flops(finetune)) * args.baseline_scale
    only = DEMO["pretrain"].replace(stage="train_224", image_size=224,
                                    text_len=args.baseline_text_len or finetune.text_len,
                                    mask_ratio=0.0, samples=1, **common)
    batches = max(1, round(budget / per_sample_flops(only) / args.batch))
    return {"clipa": [pretrain, finetune],
            "224-only": [only.replace(samples=batches * args.batch)]}


def make_data(root: str, args) -> tuple[str, str]:
    """Demo training shards and a held-out eval set (pipelines/demo_data.py)."""
    from pipelines.demo_data import write_demo_shards, write_eval_set

    shards = write_demo_shards(root, args.n_train, seed=args.seed, size=args.image_px)
    write_eval_set(os.path.join(root, "eval"), args.eval_per_class, seed=args.seed,
                   size=args.image_px)
    return shards, os.path.join(root, "eval")


def zero_shot(model_dir: str, eval_dir: str, out_dir: str) -> dict:
    from components.evaluate import run_evaluate

    r = run_evaluate(model_dir, eval_dir, out_dir, num_workers=0, device="cpu")
    return {"top1": r["top1"], "top5": r["top5"], "chance": 1 / r["num_classes"]}


def run_arm(name: str, stages: list[StageConfig], shards: str, eval_dir: str,
            root: str) -> list[dict]:
    """Train the stages in order (each from the previous model); evaluate after each."""
    from clipa_model.train_stage import train_stage

    rows, init, flops = [], None, 0.0
    for stage in stages:
        out = os.path.join(root, name, stage.stage)
        t0 = time.perf_counter()
        marker = train_stage(shards, out, stage, preset=None if init else PRESET,
                             init_model_dir=init)
        seconds = time.perf_counter() - t0
        flops += train_flops(stage)
        acc = zero_shot(out, eval_dir, out + "-eval")
        rows.append({"arm": name, "stage": stage.stage, "px": stage.image_size,
                     "tokens": stage.text_len, "mask": stage.mask_ratio,
                     "samples": stage.samples, "stage_tflops": train_flops(stage) / 1e12,
                     "arm_tflops": flops / 1e12, "seconds": seconds,
                     "samples_per_s": marker["samples_per_s"], **acc})
        print(_row(rows[-1]), flush=True)
        init = out
    return rows


HEADER = (f"{'arm':<10}{'stage':<14}{'px':>4}{'tok':>4}{'mask':>5}{'samples':>9}"
          f"{'TFLOP':>8}{'cum.':>8}{'s':>6}{'smp/s':>7}{'top-1':>7}{'top-5':>7}")


def _row(r: dict) -> str:
    return (f"{r['arm']:<10}{r['stage']:<14}{r['px']:>4}{r['tokens']:>4}{r['mask']:>5.0%}"
            f"{r['samples']:>9}{r['stage_tflops']:>8.2f}{r['arm_tflops']:>8.2f}"
            f"{r['seconds']:>6.0f}{r['samples_per_s']:>7.1f}{r['top1']:>7.1%}{r['top5']:>7.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-samples", type=int, default=48_000, help="84 px samples")
    ap.add_argument("--finetune-samples", type=int, default=2_048, help="224 px finetune samples")
    ap.add_argument("--finetune-mask", type=float, default=DEMO["finetune_224"].mask_ratio)
    ap.add_argument("--baseline-scale", type=float, default=1.0,
                    help="the 224-only arm's budget as a multiple of the CLIPA arm's FLOPs")
    ap.add_argument("--baseline-text-len", type=int, default=0,
                    help="text tokens of the 224-only arm (default: the finetune's, 32)")
    ap.add_argument("--batch", type=int, default=DEMO["pretrain"].batch_size)
    ap.add_argument("--n-train", type=int, default=4_000, help="synthetic training images")
    ap.add_argument("--eval-per-class", type=int, default=30, help="held-out images per class")
    ap.add_argument("--image-px", type=int, default=256, help="side of the rendered images")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = all cores; 1 suits a shared CPU)")
    ap.add_argument("--workers", type=int, default=1, help="data loader processes")
    ap.add_argument("--arms", nargs="+", choices=["clipa", "224-only"],
                    default=["clipa", "224-only"], help="which arms to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep data and models here (default: temp)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    schedule = arms(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        shards, eval_dir = make_data(root, args)
        print(f"data: {args.n_train} training images, {args.eval_per_class * 10} held-out "
              f"({time.perf_counter() - t0:.0f} s)\n{HEADER}", flush=True)
        rows = {name: run_arm(name, stages, shards, eval_dir, root)
                for name, stages in schedule.items() if name in args.arms}
    budget = sum(train_flops(s) for s in schedule["clipa"])
    print(f"\nbudget: the clipa schedule's {budget / 1e12:.2f} TFLOP; 224-only gets "
          f"{args.baseline_scale:g}x that")
    if len(rows) < 2:
        print(f"load average after: {os.getloadavg()}")
        return
    clipa, only = rows["clipa"][-1], rows["224-only"][-1]
    pre = rows["clipa"][0]
    print(f"FLOPs: clipa {clipa['arm_tflops']:.2f} TFLOP vs 224-only "
          f"{only['arm_tflops']:.2f} TFLOP ({only['arm_tflops'] / clipa['arm_tflops']:.2f}x); "
          f"clipa saw {sum(r['samples'] for r in rows['clipa'])} samples, 224-only "
          f"{only['samples']}")
    print(f"zero-shot top-1: clipa {clipa['top1']:.1%} (84 px alone {pre['top1']:.1%}) vs "
          f"224-only {only['top1']:.1%}; top-5 {clipa['top5']:.1%} vs {only['top5']:.1%}; "
          f"chance {clipa['chance']:.1%}")
    cost = per_sample_flops(schedule["224-only"][0]) / per_sample_flops(schedule["clipa"][0])
    print(f"a 224 px sample costs {cost:.1f}x an 84 px one; total {time.perf_counter() - t0:.0f} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
