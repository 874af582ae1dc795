"""The Model artifact: a folder with weights, the preprocessing they expect, and history.

    checkpoint.pt        state dict (tensors only: ``torch.load(weights_only=True)``)
    model_config.json    preset + image_size, text_len, mean, std, interpolation, and pos_grid
                         (the grid its sin-cos positions are measured in) when it has one
    stage_config.json    the StageConfig that produced it
    resolved_config.json the run as resolved: derived steps / LR / FLOPs, world size, device
    history.jsonl        one row per step
    curve.png            loss vs samples seen
    clipa_artifact.json  marker, kind "model", written last

The preprocessing travels with the weights (like timm's pretrained cfg), so evaluation
uses the checkpoint's own image size and normalisation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import uuid

import fsspec
import torch
from open_clip.model import CLIP

from clipa_model.artifacts import join, read_json, read_marker, write_json_atomic, write_marker
from clipa_model.config import StageConfig
from clipa_model.model import build_model, load_weights, pos_grid_of
from clipa_model.plots import plot_curve
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD, INTERPOLATION, get_preset


def model_config(preset: str, image_size: int, text_len: int,
                 pos_grid: int | None = None) -> dict:
    """What model_config.json holds: the architecture name and its preprocessing, and the
    grid its sin-cos positions are measured in (``pos_grid``) when it has one."""
    cfg = {"preset": preset, "image_size": image_size, "text_len": text_len,
           "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": INTERPOLATION,
           "architecture": dataclasses.asdict(get_preset(preset))}
    if pos_grid is not None:
        cfg["pos_grid"] = pos_grid
    return cfg


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: str, data: bytes) -> None:
    """Write a file atomically (temporary name + rename locally; object stores publish whole).

    Locally the bytes are fsynced before the rename (else a machine crash can leave the
    new name pointing at an empty file) and a failed write removes its temporary file.
    """
    if "://" in path:
        with fsspec.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))  # the rename itself, durably
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_model_artifact(out_dir: str, model: CLIP, preset: str, stage: StageConfig,
                        history: list[dict], summary: dict, resolved: dict | None = None) -> dict:
    """Write the Model artifact; the marker goes last.

    Args:
        out_dir: folder to create (local path or fsspec URL).
        model: trained model; preset: its preset name.
        stage: the stage config that trained it (its image_size / text_len are the model's).
        history: rows from ``train_loop``; summary: from ``train.training_summary``.
        resolved: the run's resolved config (``planner.resolved_config``), saved as
            resolved_config.json.

    Returns:
        The marker dict.
    """
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    weights = buf.getvalue()
    _write_bytes(join(out_dir, "checkpoint.pt"), weights)
    write_json_atomic(join(out_dir, "model_config.json"),
                      model_config(preset, stage.image_size, stage.text_len, pos_grid_of(model)))
    write_json_atomic(join(out_dir, "stage_config.json"), stage.to_dict())
    if resolved is not None:
        write_json_atomic(join(out_dir, "resolved_config.json"), resolved)
    lines = "".join(json.dumps(r) + "\n" for r in history)
    _write_bytes(join(out_dir, "history.jsonl"), lines.encode())
    _write_bytes(join(out_dir, "curve.png"), plot_curve(history, title=f"{stage.stage} ({preset})"))
    return write_marker(out_dir, "model", stage=stage.stage, preset=preset,
                        image_size=stage.image_size, text_len=stage.text_len,
                        mask_ratio=stage.mask_ratio, samples_seen=summary["samples_seen"],
                        steps=summary["steps"], seconds=round(summary["seconds"], 3),
                        final_loss=summary["final_loss"],
                        # the init-model identity of the stages that finetune it
                        weights_sha256=hashlib.sha256(weights).hexdigest())


def read_model_config(model_dir: str) -> dict:
    """model_config.json of a finished Model artifact (checks the marker first)."""
    read_marker(model_dir, "model")
    return read_json(join(model_dir, "model_config.json"))


def read_training_history(model_dir: str) -> list[dict]:
    """history.jsonl rows of a Model artifact ([] if the file is absent)."""
    try:
        with fsspec.open(join(model_dir, "history.jsonl"), "r") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def load_model(model_dir: str, image_size: int | None = None, text_len: int | None = None,
               mask_ratio: float = 0.0, image_mask: str = "random") -> tuple[CLIP, dict]:
    """Build a model at the requested token counts and load a Model artifact into it.

    Args:
        model_dir: Model artifact folder.
        image_size, text_len: sizes to build at; default: the checkpoint's own.
        mask_ratio, image_mask: patch masking of the rebuilt model (train mode only).

    Returns:
        (model in eval mode, model_config dict updated to the new sizes).

    Raises:
        ConfigError: the weights do not fit the preset named in model_config.json.
    """
    cfg = read_model_config(model_dir)
    image_size = image_size or cfg["image_size"]
    text_len = text_len or cfg["text_len"]
    model = build_model(cfg["preset"], image_size, text_len, mask_ratio, image_mask,
                        cfg.get("pos_grid"))
    with fsspec.open(join(model_dir, "checkpoint.pt"), "rb") as f:
        state_dict = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    load_weights(model, state_dict, source=f"{model_dir}/checkpoint.pt")
    model.eval()
    return model, {**cfg, "image_size": image_size, "text_len": text_len}
