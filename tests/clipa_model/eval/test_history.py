"""The benchmark history: concurrent appends lose nothing, locally and on gs://; the trend page."""
import multiprocessing as mp
import os
from datetime import datetime, timedelta, timezone

import pytest

from clipa_model.eval.history import KEY, HistoryError, append_history, read_benchmark_history
from gcs_emulator import start_emulator, use_emulator_in_child

RUNS_PER_WRITER, ROWS_PER_RUN = 12, 6


def _rows(writer: str, run: int) -> list[dict]:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=run)
    return [{"time": when, "model": f"m{i % 2}", "model_ref": f"/models/m{i % 2}",
             "benchmark": f"b{i // 2}", "task": "zeroshot", "metric": "top1",
             "value": run / 100 + i / 1000, "count": 50} for i in range(ROWS_PER_RUN)]


def _writer(history: str, name: str, barrier, endpoint: str | None) -> None:
    """One scheduled-eval run after another, all racing the other writer."""
    if endpoint:
        use_emulator_in_child(endpoint)
    barrier.wait(timeout=60)
    for run in range(RUNS_PER_WRITER):
        append_history(history, _rows(name, run), run_id=f"{name}-run{run}")


def _race(history: str, endpoint: str | None = None) -> None:
    ctx = mp.get_context("spawn")  # no inherited gcsfs event loop threads
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(history, name, barrier, endpoint))
             for name in ("alpha", "beta")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def _check_complete(df) -> None:
    assert len(df) == 2 * RUNS_PER_WRITER * ROWS_PER_RUN
    assert not df.duplicated(list(KEY)).any()
    assert sorted(df["run_id"].unique()) == sorted(
        f"{n}-run{r}" for n in ("alpha", "beta") for r in range(RUNS_PER_WRITER))


def test_two_concurrent_appenders_lose_and_duplicate_nothing(tmp_path):
    history = str(tmp_path / "history")
    _race(history)
    _check_complete(read_benchmark_history(history))
    assert not [f for f in os.listdir(history) if not f.startswith("part-")]  # no temp left


def test_two_concurrent_appenders_on_gcs():
    with start_emulator() as (gcs, endpoint):
        history = "gs://bkt/history"
        _race(history, endpoint)
        _check_complete(read_benchmark_history(history))


def test_retried_run_replaces_its_own_part_and_rows_round_trip(tmp_path):
    history = str(tmp_path / "h")
    assert read_benchmark_history(history).empty
    append_history(history, _rows("a", 0), run_id="job-1")
    append_history(history, _rows("a", 1), run_id="job-1")  # a retried task of the same run
    append_history(history, _rows("a", 2), run_id="job 2/x")
    df = read_benchmark_history(history)
    assert len(df) == 2 * ROWS_PER_RUN and set(df["run_id"]) == {"job-1", "job 2/x"}
    assert df[df["run_id"] == "job-1"]["value"].min() == pytest.approx(0.01)  # the retry's rows
    assert str(df["time"].dtype).startswith("datetime64") and df["time"].is_monotonic_increasing
    with pytest.raises(HistoryError, match="lack column"):
        append_history(history, [{"model": "x"}], run_id="bad")


def test_eval_and_history_on_gcs_with_trend_report(tmp_path):
    """A model and an eval set on gs://, the evaluation and the history written there too."""
    from components.benchmark import run_record_history
    from components.evaluate import run_benchmarks
    from pipelines.demo_data import write_eval_set
    from support import make_model_artifact

    write_eval_set(str(tmp_path / "eval_set"), n_per_class=1, seed=3, size=48)
    make_model_artifact(tmp_path / "model")
    with start_emulator() as (gcs, _):
        for name in ("eval_set", "model"):
            gcs.put(str(tmp_path / name) + "/", f"bkt/{name}/", recursive=True)
        gcs.invalidate_cache()
        evals = []
        for label in ("ours", "again"):
            out = f"gs://bkt/evaluations/{label}"
            run_benchmarks(f"{label}=gs://bkt/model", ["shapes=zeroshot:gs://bkt/eval_set"], out,
                           batch_size=8, device="cpu", num_workers=0)
            evals.append(out)
        report = tmp_path / "report.html"
        info = run_record_history("gs://bkt/history", evals, "run-1", str(report))
        assert info["rows"] == 4 and info["total_rows"] == 4  # 2 models x top1, top5
        info = run_record_history("gs://bkt/history", evals[:1], "run-2", str(report))
        assert info["total_rows"] == 6
        df = read_benchmark_history("gs://bkt/history")
    assert set(df["model"]) == {"ours", "again"} and set(df["benchmark"]) == {"shapes"}
    html = report.read_text()
    assert "top5" in html and "ours" in html
    assert "data:image/png;base64" in html and "run-2" in html and "Trend" in html
