"""The run report: one summary of every stage (samples in/out, time, zero-shot accuracy).

``build_summary`` reads the markers the stages left in their artifact folders and the
evaluation metrics; ``render_report`` turns that into a self-contained HTML page with the
training curves of all stages on one axis and the accuracy each stage reached.
"""

import json
import os
from typing import Mapping, Sequence

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Dataset, Output

from clipa_model import html as H
from clipa_model.artifacts import join, read_marker
from components.clipa_component import DATA_IMAGE, clipa_component

TRAIN_STAGES = ("pretrain", "finetune_224", "finetune_336")


def build_summary(shards_dir: str, filtered_dir: str, model_dirs: Sequence[str],
                  evals: Sequence[Mapping[str, float]]) -> dict:
    """Collect what each stage did into one JSON-able dict.

    Args:
        shards_dir: the download stage's output folder (marker kind "shards").
        filtered_dir: the filter_shard output folder (marker kind "filtered_shards").
        model_dirs: Model folders of the training stages, in pipeline order.
        evals: zero-shot metrics (top1, top5, ...) of each model, same order.
    Returns:
        {"stages": [...], "final": {...}} with one row per stage.
    """
    dl = read_marker(shards_dir, "shards")
    fl = read_marker(filtered_dir, "filtered_shards")
    stages = [
        # Existing shards (import_shards) may not say their size: filter_shard counted them.
        {"stage": "import_shards" if dl.get("tars") else "download",
         "samples_in": fl["input_count"] if dl.get("count") is None else dl["count"],
         "samples_out": fl["input_count"] if dl.get("successes") is None else dl["successes"],
         "seconds": dl.get("seconds"), "failures": dl.get("failures", {})},
        {"stage": "filter_shard", "samples_in": fl["input_count"], "samples_out": fl["count"],
         "seconds": fl.get("seconds"), "dropped": fl.get("dropped", {})},
    ]
    for model_dir, ev in zip(model_dirs, evals):
        mk = read_marker(model_dir, "model")
        stages.append({
            "stage": mk["stage"], "samples_in": fl["count"], "samples_seen": mk["samples_seen"],
            "image_size": mk["image_size"], "text_len": mk["text_len"],
            "mask_ratio": mk.get("mask_ratio", 0.0), "seconds": mk.get("seconds"),
            "final_loss": mk.get("final_loss"), "top1": ev.get("top1"), "top5": ev.get("top5"),
            "eval_seconds": ev.get("seconds"), "model_dir": model_dir,
        })
    last = evals[-1] if evals else {}
    final = {"top1": last.get("top1"), "top5": last.get("top5"),
             "colour_baseline_top1": last.get("colour_baseline_top1"),
             "eval_count": last.get("count"), "num_classes": last.get("num_classes")}
    return {"stages": stages, "final": final}


def format_summary(summary: dict) -> str:
    """The summary as a fixed-width text table, for the terminal."""
    lines = [f"{'stage':<14}{'in':>8}{'out/seen':>10}{'seconds':>9}{'top-1':>8}{'top-5':>8}"]
    for s in summary["stages"]:
        out = s.get("samples_out", s.get("samples_seen"))
        top1 = f"{s['top1']:.1%}" if s.get("top1") is not None else ""
        top5 = f"{s['top5']:.1%}" if s.get("top5") is not None else ""
        secs = f"{s['seconds']:.0f}" if s.get("seconds") is not None else "?"
        lines.append(f"{s['stage']:<14}{int(s['samples_in']):>8}{int(out):>10}{secs:>9}{top1:>8}{top5:>8}")
    f = summary["final"]
    for s in summary["stages"][:2]:
        why = s.get("failures") or s.get("dropped") or {}
        if why:
            lines.append(f"  {s['stage']} lost: " + ", ".join(f"{k}={int(v)}" for k, v in sorted(why.items())))
    if f.get("top1") is not None:
        where = f" on {int(f['eval_count'])} held-out images" if f.get("eval_count") else ""
        if f.get("num_classes"):
            where += f" of {int(f['num_classes'])} classes (chance {1 / f['num_classes']:.1%})"
        lines.append(f"final zero-shot top-1 {f['top1']:.1%}, top-5 {f['top5']:.1%}{where}")
    if f.get("colour_baseline_top1") is not None:
        lines.append(f"mean-colour nearest-centroid baseline top-1 {f['colour_baseline_top1']:.1%}")
    return "\n".join(lines)


def _history(model_dir: str) -> list[dict]:
    path = join(model_dir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _curves_figure(summary: dict):
    """Loss against cumulative samples seen, all training stages on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    offset = 0
    for s in summary["stages"][2:]:
        hist = _history(s["model_dir"])
        if hist:
            ax.plot([offset + h["samples_seen"] for h in hist], [h["loss"] for h in hist],
                    label=f"{s['stage']} ({s['image_size']} px)")
        offset += s["samples_seen"]
    ax.set_xlabel("samples seen")
    ax.set_ylabel("contrastive loss")
    ax.legend()
    ax.grid(alpha=.3)
    return fig


def _accuracy_figure(summary: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary["stages"] if s.get("top1") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - .2 for i in x], [r["top1"] for r in rows], width=.4, label="top-1")
    ax.bar([i + .2 for i in x], [r["top5"] for r in rows], width=.4, label="top-5")
    base = summary["final"].get("colour_baseline_top1")
    if base is not None:
        ax.axhline(base, color="grey", ls="--", label="mean-colour baseline")
    if summary["final"].get("num_classes"):
        ax.axhline(1 / summary["final"]["num_classes"], color="black", ls=":", label="chance")
    ax.set_xticks(list(x), [r["stage"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("zero-shot accuracy")
    ax.legend(fontsize=8)
    return fig


def render_report(summary: dict) -> str:
    """A self-contained HTML page of the run."""
    stage_rows = [
        [s["stage"], s["samples_in"], s.get("samples_out", s.get("samples_seen")),
         s.get("seconds"), s.get("top1", ""), s.get("top5", "")] for s in summary["stages"]]
    lost = [[s["stage"], reason, n] for s in summary["stages"][:2]
            for reason, n in sorted((s.get("failures") or s.get("dropped") or {}).items())]
    train = [[s["stage"], s["image_size"], s["text_len"], s["mask_ratio"], s["samples_seen"],
              s.get("final_loss")] for s in summary["stages"][2:]]
    return H.page(
        "clipa-pipeline run report",
        "<h2>Stages</h2>" + H.table(["stage", "samples in", "out / seen", "seconds", "top-1", "top-5"], stage_rows),
        "<h2>Zero-shot accuracy after each stage</h2>" + H.figure_png(_accuracy_figure(summary)),
        "<h2>Training curves</h2>" + H.figure_png(_curves_figure(summary)),
        "<h2>Training stages</h2>" + H.table(["stage", "image px", "text tokens", "mask ratio", "samples seen", "final loss"], train),
        "<h2>Samples lost, by reason</h2>" + H.table(["stage", "reason", "samples"], lost),
    )


@clipa_component(DATA_IMAGE)
def summarize(shards: Input[Dataset], filtered: Input[Dataset],
           pretrain_model: Input[Model], finetune_224_model: Input[Model], finetune_336_model: Input[Model],
           pretrain_eval: Input[Metrics], finetune_224_eval: Input[Metrics], finetune_336_eval: Input[Metrics],
           report: Output[HTML], summary: Output[Artifact]):
    """Summarise the run. Outputs: report (HTML page), summary (JSON: one row per stage)."""
    import json

    from components.run_report import build_summary, render_report

    models = [pretrain_model.path, finetune_224_model.path, finetune_336_model.path]
    evals = [dict(m.metadata) for m in (pretrain_eval, finetune_224_eval, finetune_336_eval)]
    result = build_summary(shards.path, filtered.path, models, evals)
    with open(summary.path, "w") as f:
        json.dump(result, f, indent=2)
    with open(report.path, "w") as f:
        f.write(render_report(result))
