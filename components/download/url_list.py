"""Reading and checking URL lists before any download work starts.

A URL list is one file or many: a folder of files, or a glob (``gs://b/laion/*.parquet``),
local or any fsspec URL. Each file is parquet, csv, tsv, jsonl or json (JSON lines, or
one array of records), optionally compressed (``.gz``, ``.bz2``, ``.zst``, ``.xz``). A
wrong path, format, column or encoding fails in a second, with a message naming the
file, not after workers were spawned.

The table handed on has the columns ``url`` and ``caption`` (renamed from the user's
``url_col`` / ``caption_col``) and every other column of the input (e.g. ``uid``), which
the download carries into each sample's ``KEY.json``.
"""
from __future__ import annotations

import io
import os

import fsspec
import pandas as pd

# Extension (after stripping a compression suffix) -> reader. ".json" is JSON lines (the
# usual url-list layout) unless it starts with "[" (one array of records).
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
           ".json": "json"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")


class UrlListError(ValueError):
    """The URL list is missing, unreadable, or lacks what the download needs."""


def url_list_format(path: str) -> str:
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


def _is_url_list(name: str) -> bool:
    try:
        url_list_format(name)
        return True
    except UrlListError:
        return False


def url_list_files(path: str) -> list[str]:
    """The files a URL list path names: itself, a folder's URL lists, or a glob's matches.

    Raises:
        UrlListError: nothing there, or a folder / glob without any URL list file.
    """
    path = str(path)
    fs, fpath = fsspec.core.url_to_fs(path)
    remote = "://" in path
    if any(c in fpath for c in "*?["):
        found = sorted(p for p in fs.glob(fpath) if fs.isfile(p))
        what = "matches"
    elif fs.isdir(fpath):
        found = sorted(p for p in fs.ls(fpath, detail=False)
                       if _is_url_list(p) and fs.isfile(p))
        what = "URL list files in the folder"
    elif fs.exists(fpath):
        return [path]
    else:
        raise UrlListError(f"{path}: URL list not found; expected a file, a folder of files "
                           f"or a glob ({', '.join(FORMATS)})")
    if not found:
        raise UrlListError(f"{path}: no {what}; expected {', '.join(FORMATS)} files "
                           f"(optionally {', '.join(COMPRESSIONS)})")
    return [fs.unstrip_protocol(p) if remote else p for p in found]


def _decode_utf8(data: bytes, path: str) -> str:
    """Bytes -> text, or an error naming the line and byte that are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UrlListError(
            f"{path}: not UTF-8 text: byte {data[e.start:e.start + 1]!r} at offset {e.start} "
            f"(line {line}); expected UTF-8 captions and URLs. Re-encode the file, e.g. "
            f"`iconv -f latin1 -t utf-8`") from None


def _read_table(path: str, fmt: str) -> pd.DataFrame:
    """Read ``path`` with the pandas reader for ``fmt``; errors propagate as they come."""
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            return pd.read_parquet(f)
        data = f.read()
    text = _decode_utf8(data, path)
    if fmt in ("csv", "tsv"):
        # dtype=str: a URL or caption column must not be coerced to numbers or NaN-floats.
        return pd.read_csv(io.StringIO(text), sep="," if fmt == "csv" else "\t", dtype=str,
                           keep_default_na=False)
    if fmt == "json" and text.lstrip().startswith("["):
        return pd.read_json(io.StringIO(text), orient="records")  # one array of records
    return pd.read_json(io.StringIO(text), lines=True)


def _describe_columns(columns) -> str:
    """Column names for an error message, truncated so binary junk stays readable."""
    shown = [repr(str(c)[:40]) for c in list(columns)[:12]]
    more = f" and {len(columns) - 12} more" if len(columns) > 12 else ""
    return "[" + ", ".join(shown) + "]" + more


def _as_text(column: pd.Series, path: str, name: str) -> pd.Series:
    """A column as str (None -> ""), with bytes decoded as UTF-8 or an error naming the row."""
    def one(i, value):
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if isinstance(value, (bytes, bytearray)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise UrlListError(f"{path}: row {i} of column {name!r} is not UTF-8 "
                                   f"({bytes(value)[:40]!r}); expected UTF-8 text") from None
        return str(value)
    return pd.Series([one(i, v) for i, v in enumerate(column)], index=column.index, dtype=object)


def read_one(path: str, url_col: str, caption_col: str) -> pd.DataFrame:
    """One URL list file, checked, with its URL/caption columns named ``url``/``caption``."""
    fmt = url_list_format(path)
    try:
        df = _read_table(path, fmt)
    except UrlListError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a readable <fmt>"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UrlListError(f"{path}: cannot read as {fmt} ({type(e).__name__}: {reason}); "
                           f"expected a {fmt} table with columns {url_col!r} and "
                           f"{caption_col!r}") from None
    for col, what in ((url_col, "image URLs"), (caption_col, "captions")):
        if col not in df.columns:
            raise UrlListError(
                f"{path}: no {col!r} column for {what}; found columns "
                f"{_describe_columns(df.columns)}. Rename them to 'url' and 'caption' (what "
                "clipa run reads), or name yours with --url-col/--caption-col of "
                "python -m components.download")
    df = df.rename(columns={url_col: "url", caption_col: "caption"})
    df["url"] = _as_text(df["url"], path, url_col)
    df["caption"] = _as_text(df["caption"], path, caption_col)
    return df


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows of all files. An extra column typed differently across files (a csv reads
    every column as text) or missing from some becomes text ("" where missing), so the
    table can be written as parquet and carried into KEY.json."""
    df = pd.concat(tables, ignore_index=True)
    for col in df.columns:
        kinds = {str(t[col].dtype) for t in tables if col in t.columns}
        if len(kinds) > 1 or any(col not in t.columns for t in tables):
            df[col] = [("" if v is None or v != v else str(v)) for v in df[col]]
    return df


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> pd.DataFrame:
    """Read and check a URL list (one file, a folder or a glob) before any work starts.

    Args:
        path: see the module docstring; local path or fsspec URL (``gs://...``).
        url_col: the column holding image URLs.
        caption_col: the column holding captions (CLIP trains on image-text pairs, so it
            is required).

    Returns:
        The rows of every file in name order, columns ``url``, ``caption`` and every
        other input column.

    Raises:
        UrlListError: naming the file at fault, when a path is missing, of an unknown or
            unreadable format, not UTF-8, lacks ``url_col`` or ``caption_col``, or when
            the list has no rows.
    """
    files = url_list_files(path)
    tables = [read_one(f, url_col, caption_col) for f in files]
    df = _concat(tables) if len(tables) > 1 else tables[0]
    if len(df) == 0:
        raise UrlListError(f"{path}: URL list is empty ({len(files)} file(s), columns "
                           f"{_describe_columns(df.columns)}, no rows); expected at least one URL")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Streaming: batches of a URL list, never the whole list in memory

BATCH_ROWS = 65_536  # rows per batch while streaming a list


def _first_line(path: str) -> str:
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
        return f.readline()


def _csv_reader(f, path: str, fmt: str):
    """A streaming pyarrow CSV reader whose every column is text (like ``dtype=str``)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    sep = "," if fmt == "csv" else "\t"
    header = pcsv.read_csv(io.BytesIO(_first_line(path).encode()),
                           parse_options=pcsv.ParseOptions(delimiter=sep)).column_names
    return pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=1 << 22),
                         parse_options=pcsv.ParseOptions(delimiter=sep),
                         convert_options=pcsv.ConvertOptions(
                             column_types={c: pa.string() for c in header}))


def iter_parquet(f, batch_rows: int):
    """RecordBatches of an open parquet file, one row group's data in memory at a time.

    ``pre_buffer=False``: pyarrow's default pre-buffering coalesces the reads of every
    row group that ``iter_batches`` will visit into a few large reads made up front, so
    the whole file (~16 bytes a row for a URL list) sat in memory during the stream;
    that was the split's growth with list length (bench/bench_filter_scale.py).
    """
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_rows)


def _arrow_batches(path: str, fmt: str, batch_rows: int):
    """pyarrow RecordBatches of one file, read as a stream (a JSON array: whole, as
    pandas does; it has no streaming form)."""
    import pyarrow as pa
    import pyarrow.json as pjson

    if fmt == "json" and _first_line(path).lstrip().startswith("["):
        yield from pa.Table.from_pandas(_read_table(path, fmt), preserve_index=False).to_batches(batch_rows)
        return
    with fsspec.open(path, "rb", compression=None if fmt == "parquet" else "infer") as f:
        if fmt == "parquet":
            yield from iter_parquet(f, batch_rows)
        elif fmt in ("csv", "tsv"):
            for batch in _csv_reader(f, path, fmt):
                yield from pa.Table.from_batches([batch]).to_batches(batch_rows)
        else:
            for batch in pjson.open_json(f, read_options=pjson.ReadOptions(block_size=1 << 22)):
                yield from pa.Table.from_batches([batch]).to_batches(batch_rows)


def _file_types(path: str, fmt: str) -> dict:
    """Column -> arrow type of one file, from its metadata (parquet), header (csv: text)
    or first batch (json)."""
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            schema = pq.read_schema(f)
    else:
        schema = next(_arrow_batches(path, fmt, 1024)).schema
    return {name: schema.field(name).type for name in schema.names}


def _unified_types(files: list[str], url_col: str, caption_col: str) -> dict:
    """Column -> arrow type over all files; a column typed differently across files or
    missing from some becomes text (as ``_concat`` does for a list read whole).

    Raises:
        UrlListError: naming the first file without ``url_col`` or ``caption_col``.
    """
    import pyarrow as pa

    per_file = []
    for file in files:
        try:
            types = _file_types(file, url_list_format(file))
        except (OSError, ValueError, StopIteration) as e:
            raise UrlListError(f"{file}: cannot read ({type(e).__name__}: {str(e)[:200]}); "
                               f"expected a {url_list_format(file)} table") from None
        for col, what in ((url_col, "image URLs"), (caption_col, "captions")):
            if col not in types:
                raise UrlListError(f"{file}: no {col!r} column for {what}; found columns "
                                   f"{_describe_columns(list(types))}. Pass url_col=/"
                                   "caption_col= to name yours")
        per_file.append(types)
    names = list(dict.fromkeys(n for types in per_file for n in types))
    return {n: (per_file[0][n] if all(t.get(n) == per_file[0].get(n) for t in per_file)
                else pa.string()) for n in names}


def _as_unified(df: pd.DataFrame, types: dict, renamed: dict) -> pd.DataFrame:
    """A batch with every column of the list, text columns as str ("" where missing)."""
    import pyarrow as pa

    for name, kind in types.items():
        col = renamed.get(name, name)
        if col in ("url", "caption"):
            continue
        if col not in df.columns:
            df[col] = ""
        elif kind == pa.string():
            df[col] = [("" if v is None or v != v else str(v)) for v in df[col]]
    return df


def iter_url_batches(path: str, url_col: str = "url", caption_col: str = "caption",
                     batch_rows: int = BATCH_ROWS):
    """The rows of a URL list as pandas batches of at most ``batch_rows``, streamed.

    Same checks and columns as ``read_url_list`` (``url``, ``caption`` and every other
    column, typed alike across files), but memory grows with ``batch_rows``, not with the
    list: parquet is read by row group, csv / tsv / JSON lines block by block (pyarrow).

    Raises:
        UrlListError: naming the file, as ``read_url_list`` does.
    """
    files = url_list_files(path)
    types = _unified_types(files, url_col, caption_col)  # every file checked before any row
    renamed = {url_col: "url", caption_col: "caption"}
    for file in files:
        fmt = url_list_format(file)
        try:
            for batch in _arrow_batches(file, fmt, batch_rows):
                df = batch.to_pandas().rename(columns=renamed)
                df["url"] = _as_text(df["url"], file, url_col)
                df["caption"] = _as_text(df["caption"], file, caption_col)
                yield _as_unified(df, types, renamed)
        except UrlListError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader failure means "not a readable <fmt>"
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UrlListError(f"{file}: cannot read as {fmt} ({type(e).__name__}: {reason}); "
                               f"expected a {fmt} table with UTF-8 text") from None
