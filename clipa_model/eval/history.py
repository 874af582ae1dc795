"""The benchmark history: a parquet dataset that every scheduled eval run appends to.

Layout: a folder (local or gs://) of immutable part files, one per run,

    HISTORY/part-<run id>.parquet     columns: time, run_id, model, model_ref, benchmark,
                                      task, metric, value, count

Appending never rewrites what is there: a run writes its own part, under a name derived
from its run id, in one atomic step (local: a temporary name, then ``os.replace``; gs://:
an object becomes visible only when its upload completes). Two runs finishing together
therefore write two different objects and neither row set can be lost; a retried run
replaces its own part instead of adding a second copy. Readers list ``part-*.parquet``
and concatenate; they also drop repeated (run_id, model, benchmark, metric) keys, keeping
the latest row. The folder is a plain parquet dataset (pandas, BigQuery external tables).
"""
from __future__ import annotations

import io
import os
import re
import uuid
from datetime import datetime, timezone

import fsspec
import pandas as pd

from clipa_model.artifacts import join

COLUMNS = ("time", "run_id", "model", "model_ref", "benchmark", "task", "metric", "value", "count")
KEY = ("run_id", "model", "benchmark", "metric")
PART_PREFIX = "part-"


class HistoryError(ValueError):
    """A history location or row set that cannot be used; the message names it."""


def part_name(run_id: str) -> str:
    """The part file of a run: its run id made safe for object names."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "-", run_id).strip("-.")
    if not safe:
        raise HistoryError(f"run id {run_id!r}: expected letters, digits, '-', '_' or '.'")
    return f"{PART_PREFIX}{safe}.parquet"


def new_run_id() -> str:
    """A run id for an append outside a pipeline run: UTC time + random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _frame(rows: list[dict], run_id: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c != "run_id" and any(c not in r for r in rows)]
    if missing:
        raise HistoryError(f"history rows lack column(s) {missing}; expected {COLUMNS}")
    df = pd.DataFrame([{**r, "run_id": run_id} for r in rows], columns=list(COLUMNS))
    df["time"] = pd.to_datetime(df["time"], utc=True)
    df["value"] = df["value"].astype("float64")
    df["count"] = df["count"].astype("int64")
    return df


def append_history(history: str, rows: list[dict], run_id: str | None = None) -> str:
    """Add one run's rows to the history as one immutable part file.

    Args:
        history: folder (local path or gs:// URL); created if absent.
        rows: dicts with every column of ``COLUMNS`` but run_id.
        run_id: the run's unique id (a pipeline job name); default: ``new_run_id()``.
            The same run id again replaces that run's part (a retried task).

    Returns:
        The part file's path.
    """
    if not rows:
        raise HistoryError(f"{history}: no rows to append")
    run_id = run_id or new_run_id()
    df = _frame(rows, run_id)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    path = join(history, part_name(run_id))
    fs, fpath = fsspec.core.url_to_fs(path)
    if "://" in history:
        fs.pipe_file(fpath, buf.getvalue())  # a single upload: published whole or not at all
        return path
    os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(fpath), f".tmp-{uuid.uuid4().hex}.parquet")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, fpath)
    return path


def read_benchmark_history(history: str) -> pd.DataFrame:
    """Every row of the history, oldest first (an empty frame for a new history).

    Returns:
        DataFrame with ``COLUMNS``; at most one row per (run_id, model, benchmark, metric).
    """
    fs, root = fsspec.core.url_to_fs(history)
    fs.invalidate_cache(root)  # gcsfs caches listings; other runs may have appended since
    try:
        names = sorted(p for p in fs.ls(root, detail=False)
                       if p.rsplit("/", 1)[-1].startswith(PART_PREFIX) and p.endswith(".parquet"))
    except FileNotFoundError:
        names = []
    if not names:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})
    frames = [pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in names]
    df = pd.concat(frames, ignore_index=True).sort_values("time", kind="stable")
    df = df.drop_duplicates(list(KEY), keep="last")
    return df.reset_index(drop=True)[list(COLUMNS)]
