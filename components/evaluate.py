"""Evaluation step: zero-shot top-1 / top-5 of a Model artifact on a labelled eval set.

The work is ``run_evaluate`` (a plain function); the KFP component ``evaluate`` only maps
its artifacts onto it and logs the headline numbers as metrics.

    python -m components.evaluate MODEL_DIR EVAL_DIR OUT_DIR

No ``from __future__ import annotations`` here: KFP reads the artifact annotations as objects.
"""
import argparse
import base64
import html
import json
import logging
import math
import time

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.base import TRAIN_IMAGE, clipa_component

log = logging.getLogger("clipa.evaluate")


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_report(result: dict, marker: dict, curve_png: bytes | None,
                  per_class_png: bytes) -> str:
    """The evaluation as a self-contained HTML page (images inlined).

    Args:
        result: from ``zero_shot_evaluate`` (top1, top5, per_class_top1, classnames, ...).
        marker: the evaluated model's marker (stage, preset, sizes, samples seen).
        curve_png: the model's training curve, if it has one; per_class_png: bar chart.

    Returns:
        HTML text.
    """
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{'-' if math.isnan(a) else f'{a:.1%}'}</td></tr>"
        for c, a in zip(result["classnames"], result["per_class_top1"]))
    model_desc = ", ".join(f"{k}={marker.get(k)}" for k in
                           ("stage", "preset", "image_size", "text_len", "samples_seen"))
    curve = (f"<h2>Training curve</h2>{_img_tag(curve_png, 'training curve')}"
             if curve_png else "<p>(no training curve in the model artifact)</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>zero-shot evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:left}}</style>
</head><body>
<h1>Zero-shot evaluation</h1>
<p>Model: {html.escape(model_desc)}</p>
<table><tr><th>top-1</th><td>{result['top1']:.1%}</td></tr>
<tr><th>top-5</th><td>{result['top5']:.1%}</td></tr>
<tr><th>images</th><td>{result['count']}</td></tr>
<tr><th>colour-only baseline top-1</th><td>{result['colour_baseline_top1']:.1%}
 (mean RGB, nearest centroid, 2-fold; chance {1 / len(result['classnames']):.1%})</td></tr></table>
<h2>Per class</h2>
<table><tr><th>class</th><th>top-1</th></tr>{rows}</table>
{_img_tag(per_class_png, 'per-class accuracy')}
{curve}
</body></html>"""


def run_evaluate(model_dir: str, eval_dir: str, output_dir: str, batch_size: int = 100) -> dict:
    """Zero-shot evaluation of a Model artifact; writes an ``evaluation`` artifact.

    The model is run at its own image size, text length and normalisation
    (model_config.json).

    Args:
        model_dir: Model artifact folder.
        eval_dir: eval_set artifact folder.
        output_dir: folder to create: metrics.json, report.html, marker (last).
        batch_size: images per forward pass.

    Returns:
        The metrics: top1, top5, count, colour_baseline_top1, per_class_top1,
        classnames, seconds, model (the model's marker).
    """
    import fsspec

    from clipa_model.artifacts import join, read_marker, write_json_atomic, write_marker
    from clipa_model.checkpoint import load_model
    from clipa_model.plots import plot_per_class
    from clipa_model.zeroshot import zero_shot_evaluate

    t0 = time.perf_counter()
    marker = read_marker(model_dir, "model")
    model, cfg = load_model(model_dir)
    result = zero_shot_evaluate(model, cfg, eval_dir, batch_size)
    result.update(seconds=time.perf_counter() - t0, model=marker)
    log.info("%s: top1 %.3f top5 %.3f colour baseline %.3f (%d images, %.1f s)",
             marker.get("stage"), result["top1"], result["top5"],
             result["colour_baseline_top1"], result["count"], result["seconds"])
    try:
        with fsspec.open(join(model_dir, "curve.png"), "rb") as f:
            curve = f.read()
    except FileNotFoundError:
        curve = None
    per_class = plot_per_class(result["classnames"], result["per_class_top1"],
                               f"{marker.get('stage')} at {cfg['image_size']} px")
    fs, _ = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(output_dir, exist_ok=True)
    write_json_atomic(join(output_dir, "metrics.json"), result)
    with fsspec.open(join(output_dir, "report.html"), "w") as f:
        f.write(render_report(result, marker, curve, per_class))
    write_marker(output_dir, "evaluation", top1=result["top1"], top5=result["top5"],
                 count=result["count"], colour_baseline_top1=result["colour_baseline_top1"],
                 seconds=round(result["seconds"], 3))
    return result


@clipa_component(TRAIN_IMAGE)
def evaluate(model: Input[Model], eval_set: Input[Dataset], metrics: Output[Metrics],
             report: Output[HTML]):
    """Zero-shot classification of ``eval_set`` with ``model``.

    Outputs:
        metrics: top1, top5, colour_baseline_top1, count, seconds, num_classes.
        report: HTML page (per-class accuracy table and plot, the model's training curve).
    """
    import os
    import shutil
    import tempfile

    from components.evaluate import run_evaluate

    out_dir = tempfile.mkdtemp(prefix="clipa-eval-")
    result = run_evaluate(model.path, eval_set.path, out_dir)
    for key in ("top1", "top5", "colour_baseline_top1", "count", "seconds"):
        metrics.log_metric(key, float(result[key]))
    metrics.log_metric("num_classes", float(len(result["classnames"])))
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(out_dir, "report.html"), report.path)


def main(argv: list[str] | None = None) -> None:
    """Command line: evaluate one model folder on one eval-set folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("eval_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_evaluate(args.model_dir, args.eval_dir, args.output_dir, args.batch_size)
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=2))


if __name__ == "__main__":
    main()
