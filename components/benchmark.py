"""Eval-only pipeline steps: evaluate a model on benchmarks; record the run in the history.

``benchmark`` runs ``components.evaluate.run_benchmarks`` for one model (the pipeline fans
out over models); ``record_history`` appends every model's rows to the parquet history as
one part file of this run (clipa_model/eval/history.py) and renders the trend report.

    python -m components.benchmark HISTORY EVALUATION_DIR... [--run-id ID]

No ``from __future__ import annotations`` here: KFP reads the artifact annotations as objects.
"""
import argparse
import logging
from typing import List

from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from components.clipa_component import DATA_IMAGE, TRAIN_IMAGE, clipa_component

log = logging.getLogger("clipa.benchmark")


def run_record_history(history: str, evaluation_dirs: list[str], run_id: str = "",
                       report_path: str | None = None) -> dict:
    """Append the rows of finished evaluations to ``history``; render the trend page.

    Args:
        history: parquet history folder (local or gs://).
        evaluation_dirs: ``evaluation`` artifacts written by ``run_benchmarks``.
        run_id: this run's unique id (the pipeline job name); empty: time + random.
        report_path: where to write the HTML page (optional).

    Returns:
        {"part": part file, "rows": rows appended, "total_rows": rows in the history,
         "run_id": ...}.
    """
    from datetime import datetime, timezone

    from clipa_model.artifacts import join, read_json, read_marker
    from clipa_model.eval.benchmarks import history_rows
    from clipa_model.eval.report import render_history
    from clipa_model.eval.history import append_history, new_run_id, read_benchmark_history

    run_id = run_id or new_run_id()
    when = datetime.now(timezone.utc)
    rows = []
    for folder in evaluation_dirs:
        read_marker(folder, "evaluation")
        ev = read_json(join(folder, "results.json"))
        rows += history_rows(ev["model"]["name"], ev["model"]["ref"], ev["results"], when)
    part = append_history(history, rows, run_id)
    df = read_benchmark_history(history)
    log.info("history %s: +%d rows (run %s), %d in all", history, len(rows), run_id, len(df))
    if report_path:
        with open(report_path, "w") as f:
            f.write(render_history(df, run_id))
    return {"part": part, "rows": len(rows), "total_rows": len(df), "run_id": run_id}


@clipa_component(TRAIN_IMAGE)
def benchmark(model: str, benchmarks: list, evaluation: Output[Artifact], metrics: Output[Metrics],
              report: Output[HTML], batch_size: int = 256, device: str = "auto"):
    """Evaluate one model (reference string) on every benchmark.

    Outputs:
        evaluation: folder with results.json (every number), report.html, marker.
        metrics: BENCHMARK/METRIC for the headline metrics (top1, top5, recalls).
        report: HTML page (tables, per-class accuracy plot).
    """
    import shutil

    from clipa_model.eval.benchmarks import HEADLINE
    from components.evaluate import run_benchmarks

    out = run_benchmarks(model, benchmarks, evaluation.path, batch_size, device)
    for r in out["results"]:
        for key in HEADLINE[r["task"]]:
            metrics.log_metric(f"{r['benchmark']}/{key}", float(r[key]))
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)


@clipa_component(DATA_IMAGE)
def record_history(evaluations: Input[List[Artifact]], history: str, run_id: str,
                   report: Output[HTML]):
    """Append this run's rows to the parquet history and plot the trend.

    Outputs:
        report: HTML page (this run's rows, the trend of every benchmark, latest values).
    """
    from components.benchmark import run_record_history

    run_record_history(history, [e.path for e in evaluations], run_id, report.path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("history")
    ap.add_argument("evaluations", nargs="+")
    ap.add_argument("--run-id", default="")
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(run_record_history(args.history, args.evaluations, args.run_id, args.report))


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.benchmark"))
