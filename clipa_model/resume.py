"""Resumable training state: atomic checkpoints of a running stage, local or gs://.

    CHECKPOINT_DIR/               CHECKPOINT_ROOT/<stage>-<key> (stage_identity.py) or OUTPUT/checkpoints
        identity.json             what the key hashes: stage config, preset, data, init model
        resolved_config.json      the stage as run (derived values included)
        step-000000120.pt         model, optimizer, schedule position, data position,
                                  history, RNG of every rank; newest ``keep`` kept

Each file is written whole under a temporary name and renamed (object stores publish an
object only once its upload completes), so a process killed at any instant leaves either
the previous checkpoint or the new one. A rerun of the stage loads the newest one and
continues from the next step: the data stream and all RNG are restored, so the final
weights equal those of an uninterrupted run (tests/clipa_model/test_checkpoint.py kills with SIGKILL).
Loading uses ``torch.load(weights_only=True)``: tensors and plain Python values only.
"""
from __future__ import annotations

import io
import re
import time

import fsspec
import torch

from clipa_model.artifacts import join, write_json_atomic
from clipa_model.checkpoint import _write_bytes
from clipa_model.config import ConfigError, StageConfig

_NAME = re.compile(r"step-(\d{9})\.pt$")
_TMP = re.compile(r"step-\d{9}\.pt\.tmp-[0-9a-f]+$")
# Fields that may change between an interrupted run and its rerun without changing results.
FREE_FIELDS = {"log_every", "num_threads", "checkpoint_every", "checkpoint_minutes",
               "keep_checkpoints", "compile", "zeroshot_every"}
_FREE_FIELDS = FREE_FIELDS


def checkpoint_path(ckpt_dir: str, step: int) -> str:
    return join(ckpt_dir, f"step-{step:09d}.pt")


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in ``ckpt_dir``, oldest first."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    fs.invalidate_cache(root)  # object stores: another process may have written since
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.search(str(name))
        if m:
            found.append((int(m.group(1)), join(ckpt_dir, f"step-{m.group(1)}.pt")))
    return sorted(found)


def save_state(ckpt_dir: str, state: dict, keep: int = 2) -> str:
    """Write ``state`` (its "step" names the file) atomically; drop all but the newest ``keep``.

    Returns:
        The checkpoint's path.
    """
    if "://" not in ckpt_dir:
        import os

        os.makedirs(ckpt_dir, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = checkpoint_path(ckpt_dir, state["step"])
    _write_bytes(path, buf.getvalue())
    fs, _ = fsspec.core.url_to_fs(ckpt_dir)
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        fs.rm(fsspec.core.url_to_fs(old)[1])
    return path


def load_latest(ckpt_dir: str) -> dict | None:
    """The newest checkpoint in ``ckpt_dir`` (None when there is none)."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        return None
    with fsspec.open(found[-1][1], "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def check_resumable(state: dict, stage: StageConfig, model_cfg: dict, world_size: int,
                    ckpt_dir: str, identity: dict | None = None,
                    may_change: frozenset = frozenset()) -> None:
    """Raise ``ConfigError`` naming the field when ``state`` cannot continue this run.

    Args:
        identity: this run's ``stage_identity`` (its data and init model are compared
            with those the checkpoint was trained on, when the checkpoint records them).
        may_change: StageConfig fields allowed to differ (a resume with a lower ``lr``
            after a divergence).
    """
    _check_inputs(state, identity or {}, ckpt_dir)
    saved, now = state["stage"], stage.to_dict()
    changed = sorted(k for k in now if k not in FREE_FIELDS | may_change and saved.get(k) != now[k]
                     and not (isinstance(now[k], tuple) and list(now[k]) == saved.get(k)))
    if changed:
        k = changed[0]
        raise ConfigError(f"StageConfig.{k}={now[k]!r} differs from the checkpoint's "
                          f"{saved.get(k)!r} in {ckpt_dir}; resume with the same stage "
                          f"config or use a new output / checkpoint folder")
    for key in ("preset", "architecture"):
        if state["model_config"].get(key) != model_cfg.get(key):
            raise ConfigError(f"{ckpt_dir}: checkpoint {key}={state['model_config'].get(key)!r} "
                              f"is another architecture than {model_cfg.get(key)!r}")
    if state["world_size"] != world_size:
        raise ConfigError(f"world_size={world_size}: the checkpoint in {ckpt_dir} was written "
                          f"by {state['world_size']} processes; resume with the same number")


def _check_inputs(state: dict, identity: dict, ckpt_dir: str) -> None:
    """The data and init model of the checkpoint must be this run's (issue: a rerun on
    other data into the same output resumed the old run's weights without a word)."""
    saved = state.get("identity") or {}
    for key, what in (("data", "training data"), ("init_model", "init model")):
        if key in saved and key in identity and saved[key] != identity[key]:
            raise ConfigError(
                f"{ckpt_dir}: its checkpoint was trained on another {what} "
                f"({saved.get(key + '_ref') or saved[key]}, sha256 {str(saved[key])[:12]}) than "
                f"this run's ({identity.get(key + '_ref') or identity[key]}, sha256 "
                f"{str(identity[key])[:12]}); give another output / checkpoint folder to start "
                f"fresh, or the {what} it was trained on to continue it")


def write_identity(ckpt_dir: str, identity: dict) -> None:
    """identity.json next to the checkpoints: what the folder's key was computed from."""
    write_json_atomic(join(ckpt_dir, "identity.json"), identity)


def write_resolved_config(ckpt_dir: str, resolved: dict) -> None:
    """resolved_config.json next to the checkpoints (what this run actually ran with)."""
    write_json_atomic(join(ckpt_dir, "resolved_config.json"), resolved)


class Checkpointer:
    """Decides when to checkpoint (every N steps and/or every M minutes) and keeps time.

    Args:
        ckpt_dir: folder (local or gs://); stage: its checkpoint_* fields.
    """

    def __init__(self, ckpt_dir: str, stage: StageConfig):
        self.ckpt_dir, self.stage = ckpt_dir, stage
        self.last_time = time.monotonic()

    def due(self, step: int) -> bool:
        """Is a checkpoint due after ``step`` batches (not after the last one)?"""
        if step >= self.stage.steps:
            return False
        every, minutes = self.stage.checkpoint_every, self.stage.checkpoint_minutes
        by_steps = every > 0 and step % every == 0
        by_time = minutes > 0 and time.monotonic() - self.last_time >= 60 * minutes
        return by_steps or by_time

    def save(self, state: dict) -> str:
        self.last_time = time.monotonic()
        return save_state(self.ckpt_dir, state, self.stage.keep_checkpoints)


def remove_checkpoints_from(ckpt_dir: str, step: int) -> None:
    """Delete the checkpoints of ``step`` and later (weights a divergence came from)."""
    fs, _ = fsspec.core.url_to_fs(ckpt_dir)
    for s, path in list_checkpoints(ckpt_dir):
        if s >= step:
            fs.rm(fsspec.core.url_to_fs(path)[1])


def remove_checkpoints(ckpt_dir: str) -> None:
    """Delete the step files once the stage's Model artifact is complete, and the
    ``step-N.pt.tmp-*`` halves of saves that a kill interrupted."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    for _, path in list_checkpoints(ckpt_dir):
        fs.rm(fsspec.core.url_to_fs(path)[1])
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    for name in names:
        if _TMP.search(str(name)):
            fs.rm(name)
