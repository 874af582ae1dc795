"""Start from shards a user already has: find them, check them, describe them as an artifact.

A shards URI is a folder, a glob or a brace pattern of webdataset ``.tar`` files, local or
gs://, in img2dataset's layout (``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``)
or DataComp's (``shards/NNNNNNNN.tar``, uid in each ``KEY.json``, maybe a ``sizes.json``),
with or without the parquet and stats files:

    /data/laion/                       every *.tar of the folder (or of its shards/ folder)
    gs://b/datacomp/shards/*.tar       a glob
    gs://b/cc12m/{00000..00999}.tar    a brace pattern (every name must exist)

``import_shards`` writes a ``shards`` artifact that refers to the tars (marker field
``tars``) instead of copying them; ``filter_shard`` reads it like a download's. Before
that, every tar is opened and its first sample read: a missing file, a file that is not
a tar, or a tar whose samples are not image + caption is listed, all at once, in one
error naming the URI.
"""
# No `from __future__ import annotations`: kfp reads the component's annotations as types.
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import fsspec
from kfp.dsl import Dataset, Output

from clipa_model import artifacts
from components.clipa_component import DATA_IMAGE, clipa_component

log = logging.getLogger("clipa.import_shards")

_CHECK_THREADS = 16  # tars opened at once while checking (each read is one small range)


class ShardsError(ValueError):
    """Existing shards that cannot be used; the message names the URI and each problem."""


def _absolute(fs, path: str, uri: str) -> str:
    return fs.unstrip_protocol(path) if "://" in uri else path


def resolve_shards(uri: str) -> list[str]:
    """The ``.tar`` files a shards URI names, sorted by name (brace patterns: as given).

    Raises:
        ShardsError: the URI matches no ``.tar`` file.
    """
    uri = str(uri).rstrip("/")
    if "{" in uri:
        import braceexpand

        return list(braceexpand.braceexpand(uri))  # missing names: reported by check_shards
    fs, path = fsspec.core.url_to_fs(uri)
    if any(c in path for c in "*?["):
        found = [p for p in fs.glob(path) if p.endswith(".tar")]
    elif path.endswith(".tar"):
        found = [path] if fs.exists(path) else []
    elif fs.isdir(path):
        found = fs.glob(path + "/*.tar") or fs.glob(path + "/shards/*.tar")  # DataComp layout
    else:
        found = []
    if not found:
        raise ShardsError(f"--shards {uri}: matches no .tar file; expected a folder, glob or "
                          "brace pattern of webdataset shards (KEY.jpg + KEY.txt [+ KEY.json])")
    return sorted((_absolute(fs, p, uri) for p in found), key=lambda u: u.rsplit("/", 1)[-1])


def _first_sample_problem(url: str) -> str | None:
    """Why a tar cannot feed filter_shard (None when its first sample is image + caption)."""
    from components.filter_shard.samples import (TruncatedShardError, image_ext_of,
                                                 iter_tar_samples)

    try:
        with fsspec.open(url, "rb") as f:
            first = next(iter_tar_samples(f), None)
    except FileNotFoundError:
        return f"{url}: missing"
    except TruncatedShardError as e:
        return f"{url}: not a tar file ({e})"
    except OSError as e:
        return f"{url}: unreadable ({type(e).__name__}: {e})"
    if first is None:
        return f"{url}: an empty tar"
    if image_ext_of(first.members) is None or "txt" not in first.members:
        return (f"{url}: not a webdataset of image-text pairs: its first sample "
                f"{first.key!r} has {sorted(first.members) or 'no image/txt/json'} members; "
                "expected KEY.jpg (or png/webp) and KEY.txt")
    return None


def check_shards(uri: str, tars: list[str]) -> None:
    """Open every tar and read its first sample; raise one error listing every problem.

    Raises:
        ShardsError: naming the URI and each tar that is missing, unreadable, not a tar
            or not a webdataset of image-text samples.
    """
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        problems = [p for p in pool.map(_first_sample_problem, tars) if p]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ShardsError(f"--shards {uri}: {len(problems)} of {len(tars)} tars cannot be "
                          f"used:\n  {shown}{more}")


def _json_or_none(url: str):
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def known_sizes(tars: list[str]) -> dict[str, int]:
    """Samples per tar where the shards say so: ``sizes.json`` beside them (open_clip's,
    DataComp's resharder's), else img2dataset's ``NNNNN_stats.json`` (``successes``)."""
    sizes: dict[str, int] = {}
    folders = sorted({t.rsplit("/", 1)[0] for t in tars})
    listed = {}
    for folder in folders:
        listed.update({f"{folder}/{k}": v for k, v in
                       (_json_or_none(f"{folder}/sizes.json") or {}).items()})
    for tar in tars:
        if tar in listed:
            sizes[tar] = int(listed[tar])
            continue
        stats = _json_or_none(tar[: -len(".tar")] + "_stats.json")
        if isinstance(stats, dict) and "successes" in stats:
            sizes[tar] = int(stats["successes"])
    return sizes


def count_samples(tar: str) -> int:
    """Samples in one tar, counted by reading it (when no sizes file says)."""
    from components.filter_shard.samples import TruncatedShardError, iter_tar_samples

    n = 0
    with fsspec.open(tar, "rb") as f:
        try:
            for _ in iter_tar_samples(f):
                n += 1
        except TruncatedShardError:
            pass  # the complete samples before the cut count
    return n


def import_existing_shards(uri: str, output_dir: str) -> dict:
    """Check the shards ``uri`` names and write a ``shards`` artifact referring to them.

    Returns:
        The marker: ``tars`` (URLs), ``count`` / ``successes`` (samples, when the shards'
        sizes or stats files say; else None), ``source`` (the URI).
    Raises:
        ShardsError: nothing matched, or some tar is missing, unreadable or not a webdataset.
    """
    tars = resolve_shards(uri)
    check_shards(uri, tars)
    sizes = known_sizes(tars)
    count = sum(sizes.values()) if len(sizes) == len(tars) else None
    log.info("import_shards: %d tars from %s (%s samples)", len(tars), uri,
             count if count is not None else "unknown number of")
    return artifacts.write_marker(output_dir, "shards", tars=tars, source=str(uri),
                                  count=count, successes=count, failures={}, seconds=0.0)


def pass_through(input_dir: str, output_dir: str) -> dict:
    """``--no-filter``: a ``filtered_shards`` artifact that trains on the input tars as they
    are (no filter, dedup or reshard). Its manifest names each tar by its full URL with its
    size: from sizes.json or the stats files, else counted.

    Returns:
        The marker (``count``, ``input_count``, ``shards``: the tar URLs).
    """
    from clipa_model.artifacts import write_json_atomic
    from components.filter_shard.component import list_input_shards

    tars = list_input_shards(input_dir)
    sizes = known_sizes(tars)
    unknown = [t for t in tars if t not in sizes]
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        sizes.update(zip(unknown, pool.map(count_samples, unknown)))
    manifest = {"shards": [{"name": t, "count": sizes[t]} for t in tars],
                "total": sum(sizes.values()), "input_count": sum(sizes.values()), "dropped": {}}
    if manifest["total"] == 0:
        raise ShardsError(f"{input_dir}: its {len(tars)} tars hold no samples; expected "
                          "webdataset image-text samples")
    fs, root = fsspec.core.url_to_fs(str(output_dir))
    fs.makedirs(root, exist_ok=True)
    write_json_atomic(artifacts.join(output_dir, "manifest.json"), manifest)
    write_json_atomic(artifacts.join(output_dir, "sizes.json"), {t: sizes[t] for t in tars})
    log.info("no filter: training on %d tars as they are (%d samples)", len(tars),
             manifest["total"])
    return artifacts.write_marker(output_dir, "filtered_shards", count=manifest["total"],
                                  input_count=manifest["total"], dropped={}, shards=tars,
                                  seconds=0.0, settings={"no_filter": True})


@clipa_component(DATA_IMAGE)
def import_shards(uri: str, shards: Output[Dataset]):
    """Existing webdataset shards as a ``shards`` artifact (no copy), checked first.

    Args:
        uri: a folder, glob or brace pattern of .tar shards, local or gs://.

    Outputs: shards (a marker that lists the tars; filter_shard reads it).
    """
    from components.filter_shard.existing import import_existing_shards

    marker = import_existing_shards(uri, shards.path)
    shards.metadata.update(tars=len(marker["tars"]), source=uri)
