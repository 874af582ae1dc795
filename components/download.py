"""The ``download`` step: fetch the images of a URL list into webdataset shards.

The work is done by img2dataset (in-process, multiprocessing distributor). Around it this
module adds what the pipeline needs:

* the URL list is checked *before* any work (``read_url_list``), so a wrong path, format or
  column fails in a second with a message naming the file, not after spawning workers;
* img2dataset's per-shard ``NNNNN_stats.json`` are summed into one result, with failures
  grouped by a short reason (``http_404``, ``decode_error``, ``timeout``...) instead of the
  raw exception text img2dataset records;
* the artifact marker (kind ``shards``) is written last, so a killed step leaves a folder
  that a rerun resumes (img2dataset skips shards whose stats file exists) and that no
  consumer accepts.

Output folder (see docs/ARTIFACTS.md): ``NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``,
``KEY.json``), ``NNNNN.parquet`` (one row per URL, with status and error), and
``NNNNN_stats.json``, plus ``clipa_artifact.json``.
"""
# No `from __future__ import annotations`: kfp reads the component's annotations as types.
import contextlib
import io
import json
import logging
import os
import re
import signal
import tempfile
import time
from collections import Counter
from typing import Any, Iterator

import fsspec
import pandas as pd
from kfp.dsl import Dataset, Metrics, Output

from clipa_model import artifacts
from components.base import DATA_IMAGE, clipa_component

log = logging.getLogger("clipa.download")

# Extension (after stripping a compression suffix) -> reader. ".json" is JSON lines (the
# usual url-list layout) unless it starts with "[" (one array of records).
FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "json",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")

# Column names img2dataset writes itself; an input column with one of these names cannot
# be passed through (img2dataset raises), so it is left out of save_additional_columns.
RESERVED_COLUMNS = frozenset({
    "key", "caption", "url", "width", "height", "original_width", "original_height",
    "status", "error_message", "exif", "md5", "sha256", "sha512",
})

# How img2dataset's free-text error messages (urllib / cv2 / its resizer) map to short
# reasons. First match wins; anything unmatched is "other" (its text kept in
# failure_examples).
_REASONS = (
    (re.compile(r"HTTP Error (\d{3})"), None),  # -> http_<code>
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"Image decoding error|cannot identify image|decod", re.I), "decode_error"),
    (re.compile(r"image too small"), "too_small"),
    (re.compile(r"image area too large"), "too_large"),
    (re.compile(r"aspect ratio too large"), "aspect_ratio"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
    (re.compile(r"X-Robots-Tag"), "robots_disallowed"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead",
                re.I), "connection_closed"),
    (re.compile(r"Name or service not known|name resolution|nodename nor servname|getaddrinfo",
                re.I), "dns_error"),
    (re.compile(r"SSL|certificate", re.I), "ssl_error"),
    (re.compile(r"unknown url type|no host given|URL can't contain|'NoneType'|Invalid URL",
                re.I), "bad_url"),
)


class UrlListError(ValueError):
    """The URL list is missing, unreadable, or lacks what the download needs."""


# ---------------------------------------------------------------------------------------
# URL list


def _url_list_format(path: str) -> str:
    """The reader for ``path``, from its extension (a compression suffix is looked through).

    Raises:
        UrlListError: for an extension that is not a supported URL list format.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise UrlListError(
        f"{path}: unknown URL list format {os.path.splitext(name)[1] or '(no extension)'!r}; "
        f"expected one of {', '.join(FORMATS)} (optionally compressed: "
        f"{', '.join(COMPRESSIONS)})")


def _read_table(path: str, fmt: str) -> pd.DataFrame:
    """Read ``path`` with the pandas reader for ``fmt``; errors propagate as they come."""
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            return pd.read_parquet(f)
        if fmt in ("csv", "tsv"):
            # dtype=str: a URL or caption column must not be coerced to numbers or NaN-floats.
            return pd.read_csv(f, sep="," if fmt == "csv" else "\t", dtype=str,
                               keep_default_na=False, encoding="utf-8")
        data = f.read()
    text = data.decode("utf-8")
    if fmt == "json" and text.lstrip().startswith("["):
        return pd.read_json(io.StringIO(text), orient="records")  # one array of records
    return pd.read_json(io.StringIO(text), lines=True)


def _describe_columns(columns) -> str:
    """Column names for an error message, truncated so binary junk stays readable."""
    shown = [repr(str(c)[:40]) for c in list(columns)[:12]]
    more = f" and {len(columns) - 12} more" if len(columns) > 12 else ""
    return "[" + ", ".join(shown) + "]" + more


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> pd.DataFrame:
    """Read and check a URL list before any download work starts.

    Args:
        path: a ``.parquet``, ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` (JSON lines or an
            array of records) file, optionally ``.gz``-compressed; a local path or any
            fsspec URL (``gs://...``).
        url_col: the column holding image URLs.
        caption_col: the column holding captions (CLIP trains on image-text pairs, so it
            is required).

    Returns:
        The table, one row per URL, with every column of the file.

    Raises:
        UrlListError: naming ``path``, when the file is missing, of an unknown or
            unreadable format, lacks ``url_col`` or ``caption_col``, or has no rows.
    """
    path = str(path)
    fmt = _url_list_format(path)
    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        raise UrlListError(f"{path}: URL list not found; expected a {fmt} file with columns "
                           f"{url_col!r} and {caption_col!r}")
    if fs.isdir(fpath):
        raise UrlListError(f"{path}: is a folder; expected one {fmt} URL list file")
    try:
        df = _read_table(path, fmt)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a readable <fmt>"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UrlListError(f"{path}: cannot read as {fmt} ({type(e).__name__}: {reason}); "
                           f"expected a {fmt} table with columns {url_col!r} and "
                           f"{caption_col!r}") from None
    for col, what in ((url_col, "image URLs"), (caption_col, "captions")):
        if col not in df.columns:
            raise UrlListError(
                f"{path}: no {col!r} column for {what}; found columns "
                f"{_describe_columns(df.columns)}. Pass url_col=/caption_col= to name yours")
    if len(df) == 0:
        raise UrlListError(f"{path}: URL list is empty (columns "
                           f"{_describe_columns(df.columns)}, no rows); expected at least one URL")
    return df


# ---------------------------------------------------------------------------------------
# Failure reasons and stats


def failure_reason(message: str) -> str:
    """A short, stable reason for one of img2dataset's error messages.

    Args:
        message: the text img2dataset stores in ``status_dict`` / ``error_message``, e.g.
            ``"HTTP Error 404: File not found"`` or ``"Image decoding error"``.

    Returns:
        e.g. ``"http_404"``, ``"decode_error"``, ``"timeout"``; ``"other"`` if unknown.
    """
    for pattern, reason in _REASONS:
        m = pattern.search(message)
        if m:
            return reason or f"http_{m.group(1)}"
    return "other"


def _stats_files(output_dir: str) -> list[str]:
    """Paths of img2dataset's ``NNNNN_stats.json`` in ``output_dir``, by shard id."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    paths = [p for p in fs.glob(root.rstrip("/") + "/*_stats.json")
             if re.fullmatch(r"\d+_stats\.json", p.rsplit("/", 1)[-1])]
    return sorted(paths)


def summarize_stats(output_dir: str) -> dict:
    """Sum the per-shard stats img2dataset wrote into one summary.

    Args:
        output_dir: an img2dataset output folder (webdataset format).

    Returns:
        ``{"stats_count", "successes", "failures": {reason: n}, "failure_examples":
        {reason: one raw message}, "shards": [NNNNN.tar, ...]}``. Only shards with a stats
        file count: img2dataset writes it after closing the tar, so it means "finished".
    """
    fs, _ = fsspec.core.url_to_fs(output_dir)
    count = successes = 0
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    shards = []
    for path in _stats_files(output_dir):
        with fs.open(path, "r") as f:
            stats = json.load(f)
        count += stats["count"]
        successes += stats["successes"]
        # status_dict counts "success" and every distinct error message together.
        for message, n in stats.get("status_dict", {}).items():
            if message == "success":
                continue
            reason = failure_reason(message)
            failures[reason] += n
            examples.setdefault(reason, message[:300])
        shards.append(path.rsplit("/", 1)[-1].replace("_stats.json", ".tar"))
    return {"stats_count": count, "successes": successes, "failures": dict(failures),
            "failure_examples": examples, "shards": shards}


# ---------------------------------------------------------------------------------------
# Running img2dataset


@contextlib.contextmanager
def _img2dataset_guard() -> Iterator[None]:
    """Run img2dataset quietly offline and undo what it changes in this process.

    img2dataset imports albumentations (which checks PyPI for updates unless told not to)
    and wandb; it also installs a SIGINT handler that exits with status 0, which would
    make an interrupted step look successful, so the handler is restored afterwards and
    its exit turned back into an interruption.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as e:
        raise KeyboardInterrupt("img2dataset was interrupted; its output is incomplete") from e
    finally:
        signal.signal(signal.SIGINT, previous)


def _fingerprint(url_list: str, count: int, **settings: Any) -> dict:
    """What a finished output folder must match to be reused instead of redone."""
    return {"url_list": str(url_list), "count": count, **settings}


def _reuse_finished(output_dir: str, fingerprint: dict) -> dict | None:
    """The marker of a finished download of the same input, or None if there is none.

    Raises:
        ValueError: when ``output_dir`` holds a finished download of another URL list or
            with other settings (reusing or silently overwriting it would both be wrong).
    """
    if not artifacts.has_marker(output_dir, "shards"):
        return None
    marker = artifacts.read_marker(output_dir, "shards")
    differ = {k: (marker.get(k), v) for k, v in fingerprint.items() if marker.get(k) != v}
    if differ:
        raise ValueError(
            f"{output_dir}: already holds finished shards of another download "
            f"(was -> now: {differ}); expected an empty folder or one from the same url "
            f"list and settings. Use a new output folder or delete this one")
    return marker


def _write_input_parquet(df: pd.DataFrame, folder: str) -> str:
    """Write the checked URL list where img2dataset reads it, as one parquet file.

    One format for img2dataset whatever the user gave (its json reader, for one, is not
    a JSON-lines reader), and a local file even when the list lives on gs://.
    """
    path = os.path.join(folder, "url_list.parquet")
    df.to_parquet(path, index=False)
    return path


def _extra_columns(df: pd.DataFrame, url_col: str, caption_col: str) -> list[str]:
    """Columns to carry into each sample's KEY.json (e.g. a class label)."""
    extra = [c for c in df.columns if c not in (url_col, caption_col)]
    dropped = [c for c in extra if c in RESERVED_COLUMNS]
    if dropped:
        log.warning("url list columns %s are not carried into the shards: img2dataset "
                    "writes columns of those names itself", dropped)
    return [str(c) for c in extra if c not in RESERVED_COLUMNS]


def run_download(
    url_list: str,
    output_dir: str,
    *,
    image_size: int = 256,
    resize_mode: str = "keep_ratio",
    processes: int = 1,
    threads: int = 16,
    samples_per_shard: int = 1000,
    timeout: int = 10,
    retries: int = 0,
    encode_quality: int = 95,
    url_col: str = "url",
    caption_col: str = "caption",
) -> dict:
    """Download the images of ``url_list`` into webdataset shards in ``output_dir``.

    Images are resized with img2dataset's ``keep_ratio`` by default: the shorter side
    becomes ``image_size``, aspect ratio kept, no padding and no crop (the training stages
    crop at their own resolution). Images already smaller are not upscaled, so the
    filter stage sees their true size (``KEY.json`` also keeps ``original_width/height``).

    img2dataset starts its workers with multiprocessing's "spawn", which re-imports the
    ``__main__`` module in each: a script calling this must do so under
    ``if __name__ == "__main__":``, or the workers recurse and the pool respawns forever.
    It also installs a SIGINT handler, so call it from the main thread.

    Args:
        url_list: URL list file (see ``read_url_list``), local or fsspec URL.
        output_dir: the artifact folder (local or fsspec URL). If it already holds a
            finished download of the same list and settings, that is returned as is; if it
            holds unfinished work (no marker), img2dataset resumes it, skipping shards
            whose ``NNNNN_stats.json`` exists.
        image_size, resize_mode, encode_quality: img2dataset's resizing and JPEG quality.
        processes, threads: worker processes, and download threads per process.
        samples_per_shard: URLs per shard (a shard's tar holds only the successes).
        timeout, retries: per-URL HTTP timeout in seconds, and retries after a failure.
        url_col, caption_col: column names in the URL list; any other column (e.g. a
            class label) is carried into each sample's ``KEY.json``.

    Returns:
        The marker fields: ``count`` (URLs in), ``successes``, ``failures`` (reason ->
        count; ``successes + sum(failures) == count``), ``failure_examples`` (reason -> one
        raw message), ``shards`` (tar names), ``seconds``, and the settings used.

    Raises:
        UrlListError: before any work, when the URL list is unusable.
        ValueError: when ``output_dir`` holds a finished download of something else.
    """
    df = read_url_list(url_list, url_col=url_col, caption_col=caption_col)
    fingerprint = _fingerprint(url_list, len(df), image_size=image_size,
                               resize_mode=resize_mode, samples_per_shard=samples_per_shard,
                               url_col=url_col, caption_col=caption_col)
    finished = _reuse_finished(output_dir, fingerprint)
    if finished is not None:
        log.info("%s: already holds the finished download of %s (%d shards); nothing to do",
                 output_dir, url_list, len(finished["shards"]))
        return {k: v for k, v in finished.items() if k not in ("kind", "format_version")}
    done_before = set(_stats_files(output_dir)) if _exists(output_dir) else set()
    if done_before:
        log.info("%s: resuming, %d shards already finished", output_dir, len(done_before))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipa-download-") as tmp, _img2dataset_guard():
        from img2dataset import download as img2dataset_download  # slow import (cv2, wandb)

        img2dataset_download(
            url_list=_write_input_parquet(df, tmp), input_format="parquet",
            url_col=url_col, caption_col=caption_col,
            save_additional_columns=_extra_columns(df, url_col, caption_col) or None,
            output_folder=str(output_dir), output_format="webdataset",
            image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=True,
            encode_quality=encode_quality, encode_format="jpg",
            processes_count=processes, thread_count=threads,
            number_sample_per_shard=samples_per_shard, timeout=timeout, retries=retries,
            compute_hash="sha256", distributor="multiprocessing",
            incremental_mode="incremental", enable_wandb=False)
    seconds = time.perf_counter() - start

    result = _result(summarize_stats(output_dir), len(df), seconds)
    result.update(fingerprint)
    _log_rate(output_dir, done_before, result)
    artifacts.write_marker(output_dir, "shards", **result)  # last: the folder is now done
    return result


def _log_rate(output_dir: str, done_before: set[str], result: dict) -> None:
    """Log the outcome and the download rate of the shards done by this run.

    The rate is over the shards' own working time (first start to last end in their
    stats): the ~10 s it takes to spawn img2dataset's worker and logger processes (each
    imports cv2, albumentations, wandb) would otherwise swamp it on small lists.
    """
    fs, _ = fsspec.core.url_to_fs(output_dir)
    count = successes = 0
    start, end = float("inf"), float("-inf")
    for path in set(_stats_files(output_dir)) - done_before:
        with fs.open(path, "r") as f:
            stats = json.load(f)
        count += stats["count"]
        successes += stats["successes"]
        start, end = min(start, stats["start_time"]), max(end, stats["end_time"])
    span = max(end - start, 1e-3)
    log.info("downloaded %d of %d images in %.1f s; this run's %d shards: %.1f images/s, "
             "%.1f urls/s over %.1f s; failures: %s", result["successes"], result["count"],
             result["seconds"], len(result["shards"]) - len(done_before), successes / span,
             count / span, span if count else 0.0, result["failures"] or "none")


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.exists(p)


def _result(summary: dict, count: int, seconds: float) -> dict:
    """Marker fields from the shard stats; rows of shards that never finished count as
    ``shard_failed`` so that successes and failures always add up to the rows in."""
    failures = dict(summary["failures"])
    missing = count - summary["stats_count"]
    if missing > 0:
        failures["shard_failed"] = failures.get("shard_failed", 0) + missing
    return {"count": count, "successes": summary["successes"],
            "failures": dict(sorted(failures.items())),
            "failure_examples": summary["failure_examples"],
            "shards": summary["shards"], "seconds": round(seconds, 3)}


# ---------------------------------------------------------------------------------------
# KFP component


@clipa_component(DATA_IMAGE)
def download(
    url_list: str,
    shards: Output[Dataset],
    stats: Output[Metrics],
    image_size: int = 256,
    processes: int = 1,
    threads: int = 16,
    samples_per_shard: int = 1000,
    timeout: int = 10,
):
    """Download the images of a URL list into webdataset shards (img2dataset).

    Args:
        url_list: parquet/csv/tsv/jsonl/json file with ``url`` and ``caption`` columns
            (local path, ``gs://`` or ``/gcs/`` path).
        image_size: shorter side of the stored images (aspect ratio kept, never upscaled).
        processes, threads: download processes, and threads per process.
        samples_per_shard: URLs per shard.
        timeout: per-URL HTTP timeout in seconds.

    Outputs:
        shards: folder of ``NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``),
            ``NNNNN.parquet``, ``NNNNN_stats.json`` and a ``shards`` marker; its metadata
            holds count, successes, failed and failures per reason.
        stats: metrics ``count``, ``successes``, ``failed``, ``success_rate``, ``seconds``
            and ``failed_<reason>`` for each failure reason.
    """
    import logging

    from components.download import run_download

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_download(url_list, shards.path, image_size=image_size, processes=processes,
                          threads=threads, samples_per_shard=samples_per_shard,
                          timeout=timeout)
    failed = sum(result["failures"].values())
    numbers = {"count": result["count"], "successes": result["successes"], "failed": failed,
               "success_rate": result["successes"] / max(result["count"], 1),
               "seconds": result["seconds"]}
    numbers.update({f"failed_{reason}": n for reason, n in result["failures"].items()})
    for name, value in numbers.items():
        stats.log_metric(name, value)
    shards.metadata.update(numbers)
    shards.metadata["failures"] = result["failures"]
    shards.metadata["shards"] = len(result["shards"])
