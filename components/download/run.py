"""The download step's work, as plain functions: one folder, or split into parts.

One machine: ``run_download(url_list, out)`` screens the list, runs img2dataset into
``out`` and writes the ``shards`` marker. Many tasks (Vertex, or kfp.local with N > 1):

    split_url_list(url_list, plan_dir, parts=N)      # screen once, cut into N parts
    run_download_part(plan_dir, i, part_dir_i)       # N tasks in parallel
    merge_download_parts(plan_dir, [part_dir_i], out) # one ``shards`` artifact

Parts are cut on shard boundaries of the screened list and keep their global shard
numbers, so N parts give the same shard names and sample keys as one run, and the union
of the part folders is one namespace without collisions. The merged artifact refers to
the part folders (marker field ``parts``) instead of copying terabytes.

Every folder is resumable: shards whose ``NNNNN_stats.json`` exists are kept, the
unfinished one is redone; the marker is written last. A folder belongs to one job: its
fingerprint (``download_job.fingerprint``: the URL list, a hash of its rows and the settings
that shape the shards) is written before the first shard, and a rerun with anything
else stops with an error naming what differs, instead of mixing two jobs' shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter

import fsspec
import pandas as pd

from clipa_model import artifacts
from components.download.options import DownloadOptions
from components.download.stats import download_result, render_report, summarize_stats
from components.download.url_list import (BATCH_ROWS, UrlListError, iter_parquet, iter_url_batches,
                                          read_url_list)
from components.download.url_safety import parse_allow_list, screen_url

log = logging.getLogger("clipa.download")

PLAN = "plan.json"
REFUSED = "refused.parquet"
# The job a folder belongs to (JSON), written before any shard. Not *.json: img2dataset
# takes every *.json at the folder root for a shard's stats.
FINGERPRINT = "download_job.fingerprint"
SCREENED = "screened.parquet"  # split_url_list's temporary: the kept rows, in list order


def screen(df: pd.DataFrame, allow_networks: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the URL table into rows to fetch and rows refused (with reason and note)."""
    policy = parse_allow_list(allow_networks)
    verdicts = [screen_url(u, policy) for u in df["url"]]
    refused = pd.Series([v[0] is not None for v in verdicts], index=df.index)
    bad = df.loc[refused, ["url"]].assign(reason=[v[0] for v in verdicts if v[0]],
                                          note=[v[1] for v in verdicts if v[0]])
    if len(bad):
        log.warning("url screen: refused %d of %d rows: %s", len(bad), len(df),
                    dict(Counter(bad["reason"])))
    return df.loc[~refused].reset_index(drop=True), bad.reset_index(drop=True)


def _refusals(bad: pd.DataFrame) -> tuple[dict, dict]:
    counts = dict(Counter(bad["reason"])) if len(bad) else {}
    examples = {r: f"{g['note'].iloc[0]}: {g['url'].iloc[0][:200]}"
                for r, g in bad.groupby("reason")} if len(bad) else {}
    return counts, examples


def _write_parquet(df: pd.DataFrame, path: str) -> None:
    with fsspec.open(path, "wb") as f:
        df.to_parquet(f, index=False)


def _differences(was: dict, now: dict) -> dict:
    """{field: (was, now)} for the fields of ``now`` whose value differs in ``was``."""
    return {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}


def _refuse_other_job(output_dir: str, what: str, differ: dict) -> ValueError:
    return ValueError(
        f"{output_dir}: already holds {what} of another download (was -> now: {differ}); "
        "expected an empty folder or one from the same url list and settings. To start "
        "fresh, delete this folder or give another output folder")


def _reuse_finished(output_dir: str, fingerprint: dict) -> dict | None:
    """The marker of a finished download of the same input, or None if there is none.

    Raises:
        ValueError: when ``output_dir`` holds a finished download of another URL list or
            with other settings (reusing or silently overwriting it would both be wrong).
    """
    if not artifacts.has_marker(output_dir, "shards"):
        return None
    marker = artifacts.read_marker(output_dir, "shards")
    differ = _differences(marker, fingerprint)
    if differ:
        raise _refuse_other_job(output_dir, "finished shards", differ)
    log.info("%s: already holds this finished download (%d shards); nothing to do",
             output_dir, len(marker["shards"]))
    return {k: v for k, v in marker.items() if k not in ("kind", "format_version")}


def claim_folder(output_dir: str, fingerprint: dict) -> None:
    """Write the job's fingerprint before the first shard, or check the one there.

    A rerun into an unfinished folder continues only the same job: the fingerprint
    (URL list, its rows' hash, settings) written when the folder was first claimed must
    equal this one, so shards of two lists or two image sizes never mix.

    Raises:
        ValueError: the folder holds another job's fingerprint, or shards without one.
    """
    path = artifacts.join(output_dir, FINGERPRINT)
    fs, root = fsspec.core.url_to_fs(str(output_dir))
    if fs.exists(path):
        differ = _differences(artifacts.read_json(path), fingerprint)
        if differ:
            raise _refuse_other_job(output_dir, "unfinished shards", differ)
        log.info("%s: continuing the unfinished download there (same list and settings)",
                 output_dir)
        return
    leftovers = fs.glob(root.rstrip("/") + "/*.tar") if fs.exists(root) else []
    if leftovers:
        raise ValueError(
            f"{output_dir}: holds {len(leftovers)} .tar shards but no {FINGERPRINT}, so "
            "whether they come from this url list and settings is unknown; expected an "
            "empty folder. To start fresh, delete this folder or give another output folder")
    artifacts.write_json_atomic(path, fingerprint)


def _fingerprint(url_list: str, count: int, options: DownloadOptions, **more) -> dict:
    """What an output folder's job is: the list and the settings that shape its shards."""
    fp = {k: v for k, v in dataclasses.asdict(options).items()
          if k not in ("processes", "threads", "timeout", "retries")}
    return {"url_list": str(url_list), "count": count, **fp, **more}


def rows_digest(df: pd.DataFrame) -> str:
    """sha256 of the rows to fetch (every column, in order): the list's identity."""
    hashes = pd.util.hash_pandas_object(df.astype(str), index=False).to_numpy()
    return hashlib.sha256(hashes.tobytes() + ",".join(map(str, df.columns)).encode()).hexdigest()


def _download_folder(df: pd.DataFrame, output_dir: str, options: DownloadOptions,
                     fingerprint: dict, first_shard: int, allow_networks: str,
                     refused: pd.DataFrame, url_list: str, progress_seconds: float) -> dict:
    """img2dataset into one folder, then its result, report.html and marker (last)."""
    finished = _reuse_finished(output_dir, fingerprint)
    if finished is not None:
        return finished
    claim_folder(output_dir, fingerprint)  # before the first shard
    start = time.perf_counter()
    if len(refused):
        _write_parquet(refused, artifacts.join(output_dir, REFUSED))
    if len(df):
        from components.download.img2dataset_runner import run_img2dataset  # imports cv2: ~1 s

        run_img2dataset(df, output_dir, options, first_shard=first_shard,
                        allow_networks=allow_networks, progress_seconds=progress_seconds)
    else:
        fsspec.core.url_to_fs(str(output_dir))[0].makedirs(str(output_dir), exist_ok=True)
    counts, examples = _refusals(refused)
    result = download_result(summarize_stats([output_dir]), len(df) + len(refused), counts,
                             examples, time.perf_counter() - start)
    result.update(fingerprint)
    _write_text(artifacts.join(output_dir, "report.html"), render_report(result, url_list))
    log.info("downloaded %d of %d images (%.1f%%) in %.1f s, %.1f images/s; failures: %s",
             result["successes"], result["count"], 100 * result["success_rate"],
             result["seconds"], result["images_per_second"], result["failures"] or "none")
    artifacts.write_marker(output_dir, "shards", **result)  # last: the folder is now done
    return result


def _write_text(path: str, text: str) -> None:
    with fsspec.open(path, "w") as f:
        f.write(text)


def run_download(url_list: str, output_dir: str, *, url_col: str = "url",
                 caption_col: str = "caption", allow_networks: str = "",
                 progress_seconds: float = 30.0, **options) -> dict:
    """Download the images of ``url_list`` into webdataset shards in ``output_dir``.

    Images are resized with img2dataset's ``keep_ratio`` by default: the shorter side
    becomes ``image_size``, aspect ratio kept, never upscaled, so the filter stage sees
    their true size (``KEY.json`` also keeps ``original_width/height``).

    img2dataset starts its workers with multiprocessing's "spawn", which re-imports the
    ``__main__`` module in each: a script calling this must do so under
    ``if __name__ == "__main__":``. It also installs a SIGINT handler, so call it from
    the main thread.

    Args:
        url_list: a URL list file, folder or glob (``components.download.url_list``), local or gs://.
        output_dir: the artifact folder (local or fsspec URL). A finished download of the
            same list and settings there is returned as is; unfinished work is resumed.
        url_col, caption_col: column names in the URL list; other columns (e.g. uid) are
            carried into each sample's ``KEY.json``.
        allow_networks: networks exempt from the URL-safety refusal, e.g. "127.0.0.1/32"
            ("" = refuse every private, loopback, link-local and metadata address).
        progress_seconds: how often progress is logged.
        options: fields of ``DownloadOptions`` (image_size, resize_mode, encode_format,
            encode_quality, samples_per_shard, processes, threads, timeout, retries,
            min_image_size, max_aspect_ratio, max_image_pixels, compute_hash,
            disallowed_header_directives, user_agent_token).

    Returns:
        The marker fields: ``count`` (URLs in), ``successes``, ``failures`` (reason ->
        count; ``successes + sum(failures) == count``), ``failure_examples``, ``shards``,
        ``seconds``, ``success_rate``, ``images_per_second``, ``urls_per_second`` and the
        settings.

    Raises:
        UrlListError: before any work, when the URL list is unusable.
        ValueError: bad settings, or ``output_dir`` holds a finished download of another
            list or other settings.
    """
    opts = DownloadOptions(**options).validate()
    parse_allow_list(allow_networks)
    df = read_url_list(url_list, url_col=url_col, caption_col=caption_col)
    fingerprint = _fingerprint(url_list, len(df), opts, url_col=url_col,
                               caption_col=caption_col, allow_networks=allow_networks,
                               rows_sha256=rows_digest(df))
    kept, refused = screen(df, allow_networks)
    return _download_folder(kept, output_dir, opts, fingerprint, 0, allow_networks, refused,
                            str(url_list), progress_seconds)


# ---------------------------------------------------------------------------------------
# Parts: split, download each, merge


class _ParquetSink:
    """Rows appended batch by batch to one parquet file (opened at the first rows)."""

    def __init__(self, path: str):
        self.path, self.writer, self.file, self.rows = path, None, None, 0

    def write(self, rows) -> None:
        """Append a pandas DataFrame or a pyarrow RecordBatch."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(rows, pd.DataFrame):
            schema = self.writer.schema if self.writer is not None else None
            rows = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
        if self.writer is None:
            self.file = fsspec.open(self.path, "wb").open()
            self.writer = pq.ParquetWriter(self.file, rows.schema)
        self.writer.write(rows)
        self.rows += rows.num_rows

    def close(self, empty: pd.DataFrame | None = None) -> None:
        if self.writer is None and empty is not None:
            _write_parquet(empty, self.path)  # no rows: an empty table of these columns
        if self.writer is not None:
            self.writer.close()
            self.file.close()


def _screen_stream(url_list: str, plan_dir: str, url_col: str, caption_col: str,
                   allow_networks: str) -> tuple[int, int, Counter, dict]:
    """Pass 1: screen the list batch by batch into ``screened.parquet`` and ``refused.parquet``.

    Returns:
        (rows read, rows kept, refusals by reason, one example per reason).
    """
    kept_sink = _ParquetSink(artifacts.join(plan_dir, SCREENED))
    refused_sink = _ParquetSink(artifacts.join(plan_dir, REFUSED))
    count, counts, examples = 0, Counter(), {}
    for df in iter_url_batches(url_list, url_col=url_col, caption_col=caption_col,
                               batch_rows=BATCH_ROWS):
        count += len(df)
        kept, bad = screen(df, allow_networks)
        if len(kept):
            kept_sink.write(kept)
        if len(bad):
            refused_sink.write(bad)
            batch_counts, batch_examples = _refusals(bad)
            counts.update(batch_counts)
            examples = {**batch_examples, **examples}  # the first example of each reason
    kept_sink.close()
    refused_sink.close(empty=pd.DataFrame(columns=["url", "reason", "note"]))
    if count == 0:
        raise UrlListError(f"{url_list}: URL list is empty (no rows); expected at least one URL")
    return count, kept_sink.rows, counts, examples


def _cut_parts(plan_dir: str, kept_rows: int, parts: int, samples_per_shard: int) -> list[dict]:
    """Pass 2: stream ``screened.parquet`` into ``part-NNNNN.parquet`` on shard boundaries."""
    total_shards = -(-kept_rows // samples_per_shard)
    bounds = [total_shards * i // parts for i in range(parts + 1)]
    plan = [{"part": i, "first_shard": bounds[i], "shards": bounds[i + 1] - bounds[i],
             "rows": min(bounds[i + 1] * samples_per_shard, kept_rows) - bounds[i] * samples_per_shard}
            for i in range(parts) if bounds[i + 1] > bounds[i]]
    if not plan:
        return plan
    sinks = {p["part"]: _ParquetSink(artifacts.join(plan_dir, f"part-{p['part']:05d}.parquet"))
             for p in plan}
    starts = [(p["first_shard"] * samples_per_shard, p["part"]) for p in plan]
    row = 0
    with fsspec.open(artifacts.join(plan_dir, SCREENED), "rb") as f:
        for batch in iter_parquet(f, BATCH_ROWS):
            # split the batch where a part starts (a few cuts per batch at most)
            cuts = [s - row for s, _ in starts if row < s < row + batch.num_rows]
            for lo, hi in zip([0, *cuts], [*cuts, batch.num_rows]):
                part = max(p for s, p in starts if s <= row + lo)
                sinks[part].write(batch.slice(lo, hi - lo))
            row += batch.num_rows
    for sink in sinks.values():
        sink.close()
    return plan


def split_url_list(url_list: str, plan_dir: str, *, parts: int = 1,
                   samples_per_shard: int = 1000, url_col: str = "url",
                   caption_col: str = "caption", allow_networks: str = "") -> list[int]:
    """Screen a URL list once and cut it into ``parts`` on shard boundaries, streamed.

    The list is read batch by batch (``url_list.iter_url_batches``: pyarrow, by row group
    or block), screened into a temporary ``screened.parquet``, then cut into parts from
    that file: memory does not grow with the list (bench/bench_filter_scale.py).
    Writes ``part-NNNNN.parquet`` per part, ``refused.parquet``, ``plan.json`` and a
    ``url_list`` marker to ``plan_dir``.

    Returns:
        The indices of the parts that hold rows (fewer than ``parts`` for a short list).

    Raises:
        UrlListError, ValueError: before any download, for a bad list or settings.
    """
    if parts < 1 or samples_per_shard < 1:
        raise ValueError(f"parts={parts}, samples_per_shard={samples_per_shard}; expected >= 1")
    parse_allow_list(allow_networks)
    fs, root = fsspec.core.url_to_fs(str(plan_dir))
    fs.makedirs(root, exist_ok=True)
    count, kept_rows, counts, examples = _screen_stream(url_list, plan_dir, url_col,
                                                        caption_col, allow_networks)
    plan = _cut_parts(plan_dir, kept_rows, parts, samples_per_shard)
    screened = fsspec.core.url_to_fs(artifacts.join(plan_dir, SCREENED))[1]
    if fs.exists(screened):
        fs.rm(screened)
    info = {"url_list": str(url_list), "count": count, "refused": dict(counts),
            "refused_examples": examples, "parts": plan, "samples_per_shard": samples_per_shard,
            "url_col": url_col, "caption_col": caption_col, "allow_networks": allow_networks}
    artifacts.write_json_atomic(artifacts.join(plan_dir, PLAN), info)
    artifacts.write_marker(plan_dir, "url_list", count=count, refused=sum(counts.values()),
                           parts=len(plan))
    log.info("%s: %d rows, %d refused, %d parts of %d shards", url_list, count,
             sum(counts.values()), len(plan), sum(p["shards"] for p in plan))
    return [p["part"] for p in plan]


def read_plan(plan_dir: str) -> dict:
    """plan.json of a finished ``split_url_list`` folder."""
    artifacts.read_marker(plan_dir, "url_list")
    return artifacts.read_json(artifacts.join(plan_dir, PLAN))


def run_download_part(plan_dir: str, part: int, output_dir: str, *,
                      progress_seconds: float = 30.0, **options) -> dict:
    """Download one part of a split URL list into ``output_dir`` (a ``shards`` folder).

    Args:
        options: ``DownloadOptions`` fields; ``samples_per_shard`` comes from the plan.

    Raises:
        ValueError: ``part`` is not in the plan.
    """
    plan = read_plan(plan_dir)
    entry = next((p for p in plan["parts"] if p["part"] == part), None)
    if entry is None:
        raise ValueError(f"{plan_dir}: no part {part}; expected one of "
                         f"{[p['part'] for p in plan['parts']]}")
    opts = DownloadOptions(**{**options, "samples_per_shard": plan["samples_per_shard"]}).validate()
    with fsspec.open(artifacts.join(plan_dir, f"part-{part:05d}.parquet"), "rb") as f:
        df = pd.read_parquet(f)
    fingerprint = _fingerprint(plan["url_list"], len(df), opts, part=part,
                               first_shard=entry["first_shard"],
                               allow_networks=plan["allow_networks"], rows_sha256=rows_digest(df))
    result = _download_folder(df, output_dir, opts, fingerprint, entry["first_shard"],
                              plan["allow_networks"], pd.DataFrame(columns=["url", "reason", "note"]),
                              plan["url_list"], progress_seconds)
    return result


def merge_download_parts(plan_dir: str, part_dirs: list[str], output_dir: str) -> dict:
    """One ``shards`` artifact over the downloaded parts (marker ``parts``: their folders).

    Raises:
        ArtifactError: a part folder is not a finished ``shards`` artifact.
        ValueError: parts missing from the plan, or two parts with the same shard name.
    """
    plan = read_plan(plan_dir)
    markers = [artifacts.read_marker(d, "shards") for d in part_dirs]
    got = sorted(m.get("part") for m in markers)
    want = sorted(p["part"] for p in plan["parts"])
    if got != want:
        raise ValueError(f"{output_dir}: parts {got} downloaded; expected {want} from {plan_dir}")
    names = [s for m in markers for s in m["shards"]]
    if len(names) != len(set(names)):
        raise ValueError(f"{output_dir}: shard names repeat across parts; expected the global "
                         "numbering of split_url_list")
    summary = summarize_stats(part_dirs)
    result = download_result(summary, plan["count"], plan["refused"], plan["refused_examples"],
                             max((m["seconds"] for m in markers), default=0.0))
    parts = [{**m, "part": int(m["part"])} for m in sorted(markers, key=lambda m: m["part"])]
    result.update(url_list=plan["url_list"], allow_networks=plan["allow_networks"],
                  parts=[str(d) for _, d in sorted(zip([m["part"] for m in markers], part_dirs))],
                  settings={k: v for k, v in markers[0].items()
                            if k in DownloadOptions.__dataclass_fields__} if markers else {})
    fsspec.core.url_to_fs(str(output_dir))[0].makedirs(str(output_dir), exist_ok=True)
    _write_text(artifacts.join(output_dir, "report.html"),
                render_report(result, plan["url_list"], parts))
    artifacts.write_marker(output_dir, "shards", **result)
    return result
