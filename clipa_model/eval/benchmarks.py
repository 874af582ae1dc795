"""Benchmarks: a named evaluation (zero-shot or retrieval) of a dataset, and running them.

A benchmark is given as a string or a dict (what the eval pipeline's ``benchmarks`` list
parameter holds):

    "zeroshot:gs://bucket/imagenet-val"                 name = the last path component
    "imagenet-v2=zeroshot:gs://bucket/imagenetv2"       explicit name
    "coco=retrieval:gs://bucket/coco-5k"                image-text pairs
    {"name": "pets", "task": "zeroshot", "path": "...", "classes": "gs://.../pets.json"}
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from clipa_model.eval.data import EvalDataError

TASKS = ("zeroshot", "retrieval")
# The metrics of each task that go into the history table and the trend plot.
HEADLINE = {"zeroshot": ("top1", "top5"),
            "retrieval": tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                               for k in (1, 5, 10))}
_NAMED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


@dataclass(frozen=True)
class Benchmark:
    """One evaluation: ``task`` ("zeroshot" / "retrieval") of the data at ``path``.

    Attributes:
        name: row label in reports and the history table.
        classes: zero-shot class names / templates (None, "imagenet" or a JSON file).
    """
    name: str
    task: str
    path: str
    classes: str | None = None


def parse_benchmark(spec: str | dict) -> Benchmark:
    """A benchmark from its string or dict form (module docstring).

    Raises:
        EvalDataError: naming the spec, for an unknown task or a missing path.
    """
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "task", "path", "classes"}
        if unknown or not spec.get("path") or spec.get("task") not in TASKS:
            raise EvalDataError(f"benchmark {spec!r}: expected keys task (one of {TASKS}), "
                                "path, and optionally name and classes")
        path = str(spec["path"]).rstrip("/")
        return Benchmark(spec.get("name") or _default_name(path), spec["task"], path,
                         spec.get("classes") or None)
    text = str(spec).strip()
    name = None
    m = _NAMED.match(text)
    if m and m.group(2).split(":", 1)[0] in TASKS:
        name, text = m.group(1), m.group(2)
    task, sep, path = text.partition(":")
    if not sep or task not in TASKS or not path:
        raise EvalDataError(f"benchmark {spec!r}: expected [NAME=]TASK:PATH with TASK one of "
                            f"{TASKS}, e.g. imagenet=zeroshot:gs://bucket/imagenet-val")
    path = path.rstrip("/")
    return Benchmark(name or _default_name(path), task, path)


def _default_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def run_benchmark(em, bench: Benchmark, batch_size: int = 256, device: str = "auto",
                  num_workers: int = 0) -> dict:
    """Evaluate one loaded model (``eval_models.EvalModel``) on one benchmark.

    Returns:
        The task's result dict plus "benchmark", "task", "path", "seconds".
    """
    from clipa_model.eval.data import open_classification_set
    from clipa_model.eval.retrieval import evaluate_retrieval
    from clipa_model.eval.zeroshot import evaluate_zero_shot

    t0 = time.perf_counter()
    if bench.task == "zeroshot":
        ds = open_classification_set(bench.path, bench.classes)
        result = evaluate_zero_shot(em.model, em.tokenizer, em.preprocess, ds, batch_size,
                                    device, num_workers)
    else:
        result = evaluate_retrieval(em.model, em.tokenizer, em.preprocess, bench.path,
                                    batch_size, device, num_workers)
    result.update(benchmark=bench.name, task=bench.task, path=bench.path,
                  seconds=round(time.perf_counter() - t0, 3))
    return result


def history_rows(model_name: str, model_ref: str, results: list[dict], when) -> list[dict]:
    """One row per (model, benchmark, headline metric) for the history table."""
    rows = []
    for r in results:
        for metric in HEADLINE[r["task"]]:
            value = r.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            rows.append({"time": when, "model": model_name, "model_ref": model_ref,
                         "benchmark": r["benchmark"], "task": r["task"], "metric": metric,
                         "value": float(value), "count": int(r.get("count", 0))})
    return rows
