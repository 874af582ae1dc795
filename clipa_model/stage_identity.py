"""What makes two runs of a training stage the same run: the key of its checkpoint folder.

A stage's checkpoints live in ``CHECKPOINT_ROOT/<stage>-<key>/`` where the key hashes
everything that decides its weights:

- the StageConfig, less the fields that do not change results (``resume.FREE_FIELDS``:
  log interval, threads, checkpoint timing, zero-shot interval ...); the seed is a field;
- the model preset;
- the data: ``manifest.json`` of the filtered_shards artifact plus the byte size of every
  shard it lists (cheap at any scale: no shard is read);
- the init model (finetunes): the sha256 of its weights (``weights_sha256`` in its marker,
  else hashed from checkpoint.pt).

The pipeline job id and the artifact URIs are deliberately not part of it: a resubmitted
job (new URIs) with the same inputs finds the folder of the run it continues, and a run
with any other input gets another folder, so it never picks up a foreign checkpoint.
"""
from __future__ import annotations

import hashlib
import json

import fsspec

from clipa_model.artifacts import join, read_json, read_marker
from clipa_model.config import StageConfig

IDENTITY_VERSION = 1


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_identity(data_dir: str) -> str:
    """sha256 of a filtered_shards artifact's manifest and the size of each listed shard.

    Raises:
        ArtifactError: not a finished filtered_shards folder.
    """
    read_marker(data_dir, "filtered_shards")
    manifest = read_json(join(data_dir, "manifest.json"))
    fs, root = fsspec.core.url_to_fs(data_dir)
    fs.invalidate_cache(root)
    # One listing, not a request per shard (thousands of shards on GCS, on every rank).
    listed = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e["size"]
              for e in fs.ls(root, detail=True)}
    sizes = {s["name"]: listed.get(s["name"]) for s in manifest.get("shards", [])}
    return _sha256_json({"manifest": manifest, "shard_bytes": sizes})


def init_model_identity(model_dir: str | None) -> str | None:
    """sha256 of the init model's weights (None: a stage trained from scratch).

    ``model_dir`` is a Model artifact or ``open_clip:NAME:FILE`` (the architecture name and
    the weights file's bytes).
    """
    if model_dir is None:
        return None
    if model_dir.startswith("open_clip:"):
        name, _, weights = model_dir[len("open_clip:"):].partition(":")
        return f"open_clip:{name}:{_file_sha256(weights)}"
    marker = read_marker(model_dir, "model")
    if marker.get("weights_sha256"):
        return marker["weights_sha256"]
    return _file_sha256(join(model_dir, "checkpoint.pt"))  # artifacts before the marker had it


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_identity(stage: StageConfig, preset: str, data_id: str, init_id: str | None) -> dict:
    """The inputs that decide a stage's weights, as a JSON-ready dict (identity.json)."""
    from clipa_model.resume import FREE_FIELDS

    config = {k: v for k, v in stage.to_dict().items() if k not in FREE_FIELDS}
    return {"version": IDENTITY_VERSION, "stage": config, "preset": preset, "data": data_id,
            "init_model": init_id}


def stage_key(identity: dict) -> str:
    """Folder name of a stage identity: ``<stage name>-<16 hex digits>``."""
    return f"{identity['stage']['stage']}-{_sha256_json(identity)[:16]}"
