"""Artifact folders and the small JSON marker at their root.

Every artifact that passes between stages is a folder. Its marker, ``clipa_artifact.json``,
says what the folder holds (kind, format version, counts, config) and is written *last*:
a step killed half-way leaves no marker, so a rerun redoes the work instead of taking a
half-written folder as done, and a consumer refuses a folder without one.

Paths may be local or any fsspec URL (``gs://...``).
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec

MARKER = "clipa_artifact.json"
FORMAT_VERSION = 1

# The kinds of artifact the pipeline passes around.
KINDS = ("url_list", "shards", "filtered_shards", "model", "eval_set", "evaluation",
         "open_clip_export")

# The extensions an image member of a webdataset sample may have (img2dataset's
# encode_format, DataComp's and eval sets' shards): every reader checks these, in order.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ArtifactError(ValueError):
    """An artifact folder is missing, incomplete, or not of the expected kind."""


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike."""
    base = str(base)
    if "://" in base:
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part.

    Local files go through a temporary name and ``os.replace``; object stores (gs://)
    publish an object only when its upload completes, which gives the same guarantee.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    fs, fpath = fsspec.core.url_to_fs(str(path))
    if "://" not in str(path):
        os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
        tmp = f"{fpath}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fpath)
    else:
        with fs.open(fpath, "w") as f:
            f.write(text)


def read_json(path: str) -> Any:
    with fsspec.open(str(path), "r") as f:
        return json.load(f)


def write_marker(folder: str, kind: str, **info: Any) -> dict:
    """Mark ``folder`` as a complete artifact of ``kind``; call after everything else is written."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {KINDS}")
    marker = {"kind": kind, "format_version": FORMAT_VERSION, **info}
    write_json_atomic(join(folder, MARKER), marker)
    return marker


def has_marker(folder: str, kind: str | None = None) -> bool:
    try:
        read_marker(folder, kind)
    except ArtifactError:
        return False
    return True


def read_marker(folder: str, kind: str | None = None) -> dict:
    """Read and check the marker of ``folder``.

    Raises:
        ArtifactError: naming the folder, when the marker is missing (the producing step
            did not finish), unreadable, of another kind, or of a newer format.
    """
    path = join(folder, MARKER)
    try:
        marker = read_json(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"{folder}: not a finished clipa artifact (no {MARKER}); expected the output "
            f"folder of a completed {kind or 'clipa'} step") from None
    except NotADirectoryError:  # a file given where the artifact folder belongs
        raise ArtifactError(
            f"{folder}: is a file; expected a folder (the output folder of a completed "
            f"{kind or 'clipa'} step)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable artifact marker ({e})") from None
    if not isinstance(marker, dict) or "kind" not in marker:
        raise ArtifactError(f"{path}: artifact marker has no 'kind' field")
    if kind is not None and marker["kind"] != kind:
        raise ArtifactError(
            f"{folder}: holds a {marker['kind']!r} artifact, expected {kind!r}")
    if marker.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{folder}: artifact format {marker['format_version']} is newer than this "
            f"clipa-pipeline understands ({FORMAT_VERSION}); upgrade clipa-pipeline")
    return marker
