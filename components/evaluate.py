"""Evaluation step: a model on zero-shot classification and image-text retrieval benchmarks.

The work is ``run_evaluate`` (one model, one labelled set: what the training pipeline runs
after each stage) and ``run_benchmarks`` (one model, several benchmarks: what the eval-only
pipeline runs), plain functions; the KFP component ``evaluate`` only maps its artifacts
onto ``run_evaluate`` and logs the headline numbers as metrics.

    python -m components.evaluate MODEL EVAL_SET OUT_DIR [--classes FILE]
    python -m components.evaluate MODEL --benchmark imagenet=zeroshot:gs://b/val OUT_DIR

MODEL is a Model artifact folder, an exported folder or open_clip:NAME:FILE
(clipa_model/eval/models.py). No ``from __future__ import annotations`` here: KFP reads
the artifact annotations as objects.
"""
import argparse
import json
import logging
import os

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.clipa_component import TRAIN_IMAGE, clipa_component

log = logging.getLogger("clipa.evaluate")


def auto_workers(num_workers: int) -> int:
    """-1 -> decoding processes for this machine (cores - 1, at most 8); else as given."""
    if num_workers >= 0:
        return num_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _curve_png(model_ref: str) -> bytes | None:
    import fsspec

    from clipa_model.artifacts import has_marker, join

    if not has_marker(model_ref, "model"):
        return None
    try:
        with fsspec.open(join(model_ref, "curve.png"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _model_facts(em) -> dict:
    return {"name": em.name, "ref": em.ref, "source": em.source, "info": em.info}


def _write_evaluation(output_dir: str, model: dict, results: list[dict], curve: bytes | None,
                      **marker) -> None:
    """results.json, metrics.json (first result), report.html; the marker last."""
    import fsspec

    from clipa_model.artifacts import join, write_json_atomic, write_marker
    from clipa_model.eval.report import render_evaluation

    fs, _ = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(output_dir, exist_ok=True)
    write_json_atomic(join(output_dir, "results.json"), {"model": model, "results": results})
    write_json_atomic(join(output_dir, "metrics.json"), {**results[0], "model": model})
    with fsspec.open(join(output_dir, "report.html"), "w") as f:
        f.write(render_evaluation(model, results, curve))
    write_marker(output_dir, "evaluation", model=model["name"], **marker)


def run_benchmarks(model: str, benchmarks: list, output_dir: str, batch_size: int = 256,
                   device: str = "auto", num_workers: int = -1) -> dict:
    """Evaluate one model on several benchmarks; writes an ``evaluation`` artifact.

    Every benchmark is parsed and every dataset layout resolved before the model runs, and
    nothing is written before every benchmark has finished.

    Args:
        model: model reference (eval/models.py); benchmarks: specs (eval/benchmarks.py).
        output_dir: folder to create: results.json, metrics.json, report.html, marker.
        batch_size: images per forward pass; device: "auto", "cpu", "cuda".
        num_workers: decoding processes (-1: cores - 1, at most 8).

    Returns:
        {"model": {name, ref, source, info}, "results": [one dict per benchmark]}.
    """
    from clipa_model.eval.benchmarks import parse_benchmark, run_benchmark
    from clipa_model.eval.data import open_classification_set, open_pair_set
    from clipa_model.eval.models import load_eval_model

    parsed = [parse_benchmark(b) for b in benchmarks]
    if not parsed:
        raise ValueError("benchmarks: expected at least one benchmark")
    for b in parsed:  # layouts and class lists checked before the model loads
        if b.task == "zeroshot":
            open_classification_set(b.path, b.classes)
        else:
            open_pair_set(b.path)
    em = load_eval_model(model)
    results = []
    for b in parsed:
        r = run_benchmark(em, b, batch_size, device, auto_workers(num_workers))
        log.info("%s on %s: %s", em.name, b.name, {k: round(v, 4) for k, v in r.items()
                                                   if isinstance(v, float) and k != "seconds"})
        results.append(r)
    facts = _model_facts(em)
    _write_evaluation(output_dir, facts, results, _curve_png(em.ref),
                      benchmarks=[r["benchmark"] for r in results])
    return {"model": facts, "results": results}


def run_evaluate(model: str, eval_dir: str, output_dir: str, batch_size: int = 100,
                 classes: str | None = None, device: str = "auto", num_workers: int = -1) -> dict:
    """Zero-shot evaluation of one model on one labelled set; writes an ``evaluation`` artifact.

    The model runs at its own image size, normalisation, interpolation and resize mode.

    Args:
        model: Model artifact folder, exported folder or open_clip:NAME:FILE.
        eval_dir: eval_set artifact, webdataset shards or ImageFolder tree.
        output_dir: folder to create (results.json, metrics.json, report.html, marker).
        classes: class names / templates (default: the set's own, else ImageNet's).

    Returns:
        top1, top5, count, num_classes, colour_baseline_top1, per_class_top1, classnames,
        seconds, model (name, ref, source, info).
    """
    from clipa_model.eval.benchmarks import Benchmark, run_benchmark
    from clipa_model.eval.data import open_classification_set
    from clipa_model.eval.models import load_eval_model

    open_classification_set(eval_dir, classes)  # a bad set fails before the model loads
    em = load_eval_model(model)
    bench = Benchmark(os.path.basename(eval_dir.rstrip("/")) or "eval_set", "zeroshot", eval_dir, classes)
    result = run_benchmark(em, bench, batch_size, device, auto_workers(num_workers))
    log.info("%s: top1 %.3f top5 %.3f colour baseline %.3f (%d images, %.1f s)", em.name,
             result["top1"], result["top5"], result["colour_baseline_top1"], result["count"],
             result["seconds"])
    facts = _model_facts(em)
    _write_evaluation(output_dir, facts, [result], _curve_png(em.ref), top1=result["top1"],
                      top5=result["top5"], count=result["count"],
                      colour_baseline_top1=result["colour_baseline_top1"],
                      seconds=result["seconds"], num_classes=result["num_classes"])
    return {**result, "model": facts}


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

    # Removed on success and failure (a kill of the whole run: the run's reaper).
    with tempfile.TemporaryDirectory(prefix="clipa-eval-") as out_dir:
        result = run_evaluate(model.path, eval_set.path, out_dir)
        for key in ("top1", "top5", "colour_baseline_top1", "count", "seconds", "num_classes"):
            metrics.log_metric(key, float(result[key]))
        os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
        shutil.copyfile(os.path.join(out_dir, "report.html"), report.path)


def main(argv: list[str] | None = None) -> None:
    """Command line: one model on one labelled set, or on --benchmark specs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="Model artifact folder, exported folder or open_clip:NAME:FILE")
    ap.add_argument("paths", nargs="+", metavar="[EVAL_SET] OUT_DIR")
    ap.add_argument("--benchmark", action="append", default=[],
                    help="[NAME=]zeroshot|retrieval:PATH (repeatable; replaces EVAL_SET)")
    ap.add_argument("--classes", default=None, help="class names / templates JSON, or 'imagenet'")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-workers", type=int, default=-1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.benchmark:
        if len(args.paths) != 1:
            ap.error("with --benchmark give only OUT_DIR")
        out = run_benchmarks(args.model, args.benchmark, args.paths[0], args.batch_size,
                             args.device, args.num_workers)
        summary = [{k: v for k, v in r.items() if k not in ("per_class_top1", "classnames")}
                   for r in out["results"]]
    else:
        if len(args.paths) != 2:
            ap.error("expected EVAL_SET OUT_DIR")
        r = run_evaluate(args.model, args.paths[0], args.paths[1], args.batch_size, args.classes,
                         args.device, args.num_workers)
        summary = {k: v for k, v in r.items() if k not in ("per_class_top1", "classnames")}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.evaluate"))
