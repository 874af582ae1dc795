"""HTML reports of evaluations: per-benchmark tables, per-class accuracy, history trends."""
from __future__ import annotations

import base64
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be set first)

from clipa_model import html as H  # noqa: E402
from clipa_model.eval.benchmarks import HEADLINE  # noqa: E402

_BARS_UP_TO = 60  # classes; more get a histogram and best / worst tables


def per_class_figure(classnames: list[str], accuracy: list[float], title: str = ""):
    """Top-1 of each class: horizontal bars, or a histogram for many classes."""
    present = [(c, a) for c, a in zip(classnames, accuracy) if not math.isnan(a)]
    if len(classnames) <= _BARS_UP_TO:
        fig, ax = plt.subplots(figsize=(6, 0.28 * len(classnames) + 1))
        ax.barh(range(len(classnames)), [0 if math.isnan(a) else a for a in accuracy])
        ax.set_yticks(range(len(classnames)), classnames, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("top-1 accuracy")
    else:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist([a for _, a in present], bins=20, range=(0, 1))
        ax.set_xlabel("top-1 accuracy of a class")
        ax.set_ylabel("classes")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _zeroshot_section(r: dict) -> str:
    names, acc = r["classnames"], r["per_class_top1"]
    head = H.table(["top-1", "top-5", "images", "classes", "templates", "mean-colour baseline top-1",
                    "seconds"],
                   [[r["top1"], r["top5"], r["count"], r["num_classes"], r["templates"],
                     r.get("colour_baseline_top1"), r.get("seconds")]])
    ranked = sorted(((a, c) for c, a in zip(names, acc) if not math.isnan(a)), key=lambda t: t[0])
    if len(names) <= _BARS_UP_TO:
        classes = H.table(["class", "top-1"], [[c, a] for a, c in sorted(ranked, key=lambda t: t[1])])
    else:
        classes = ("<h4>Worst 10 classes</h4>" + H.table(["class", "top-1"], [[c, a] for a, c in ranked[:10]])
                   + "<h4>Best 10 classes</h4>" + H.table(["class", "top-1"], [[c, a] for a, c in ranked[-10:]]))
    fig = per_class_figure(names, acc, f"{r['benchmark']}: per-class top-1")
    return head + "<h3>Per class</h3>" + H.figure_png(fig) + classes


def _retrieval_section(r: dict) -> str:
    rows = [[direction.replace("_", " "), *(r[f"{direction}_R@{k}"] for k in (1, 5, 10))]
            for direction in ("image_to_text", "text_to_image")]
    return (H.table(["direction", "R@1", "R@5", "R@10"], rows)
            + f"<p class='note'>{r['count']} images, {r['captions']} captions, "
              f"{r.get('seconds')} s</p>")


def render_evaluation(model: dict, results: list[dict], curve_png: bytes | None = None) -> str:
    """One model on one or more benchmarks, as a self-contained page.

    Args:
        model: name, ref, source and facts (stage, image_size, ...) of the model.
        results: ``benchmarks.run_benchmark`` results.
        curve_png: the model's training curve, when it has one.
    """
    pp = results[0]["preprocess"] if results else {}
    facts = [[k, v] for k, v in {**model.get("info", {}), "source": model.get("source"),
                                 "reference": model.get("ref"), **{f"preprocess {k}": v for k, v in pp.items()
                                                                   if k in ("image_size", "interpolation", "resize_mode")}}.items()
             if v is not None]
    sections = ["<h2>Model</h2>" + H.table(["field", "value"], facts)]
    for r in results:
        body = _zeroshot_section(r) if r["task"] == "zeroshot" else _retrieval_section(r)
        sections.append(f"<h2>{H.esc(r['benchmark'])} ({r['task']})</h2>"
                        f"<p class='note'>{H.esc(r['path'])}</p>" + body)
    if curve_png:
        data = base64.b64encode(curve_png).decode("ascii")
        sections.append(f"<h2>Training curve</h2><img alt='training curve' src='data:image/png;base64,{data}'>")
    return H.page(f"Evaluation of {model.get('name')}", *sections)


def trend_figure(df):
    """Headline metric against time: one panel per benchmark, one line per model."""
    benchmarks = sorted(df["benchmark"].unique())
    fig, axes = plt.subplots(len(benchmarks), 1, figsize=(8, 2.8 * len(benchmarks)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benchmarks):
        sub = df[df["benchmark"] == bench]
        metric = HEADLINE[sub["task"].iloc[0]][0]
        sub = sub[sub["metric"] == metric]
        for model, rows in sub.groupby("model"):
            rows = rows.sort_values("time")
            ax.plot(rows["time"], rows["value"], marker="o", ms=3, label=model)
        ax.set_title(f"{bench}: {metric}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return fig


def render_history(df, run_id: str) -> str:
    """The history page: this run's rows, the latest value of each series, the trends."""
    this = df[df["run_id"] == run_id]
    latest = df.sort_values("time").groupby(["model", "benchmark", "metric"], as_index=False).last()
    cols = ["model", "benchmark", "metric", "value", "count"]
    return H.page(
        "Benchmark history",
        f"<p class='note'>{len(df)} rows from {df['run_id'].nunique()} runs; this run: {H.esc(run_id)}</p>",
        "<h2>This run</h2>" + H.table(cols, this[cols].itertuples(index=False)),
        "<h2>Trend</h2>" + (H.figure_png(trend_figure(df)) if len(df) else "<p>(empty)</p>"),
        "<h2>Latest value of every series</h2>" + H.table(cols + ["time"], latest[cols + ["time"]].itertuples(index=False)),
    )
