"""Models to evaluate: our checkpoints, exported models and open_clip name + pretrained file.

A model reference is one string (what a pipeline parameter or a flag holds):

    PATH                         a clipa Model artifact folder (clipa_artifact.json, kind model)
    PATH                         an exported model folder: open_clip_config.json + weights
                                 (*.safetensors / *.bin), loaded with open_clip's local-dir:
    open_clip:NAME:FILE          an open_clip architecture and a weights file, e.g.
                                 open_clip:ViT-L-14-CLIPA-336:gs://bucket/clipa_l14_336.bin
    LABEL=REF                    any of the above, shown as LABEL in reports and history

PATH and FILE may be local or gs://. Each comes back with its tokenizer and its own
preprocessing (image size, mean/std, interpolation, resize mode).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import fsspec
import torch

from clipa_model.artifacts import ArtifactError, has_marker, join
from clipa_model.preprocess import Preprocess

OPEN_CLIP_PREFIX = "open_clip:"
_LABEL = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


class ModelRefError(ValueError):
    """A model reference that does not name a loadable model; the message says why."""


@dataclass
class EvalModel:
    """A model ready to evaluate.

    Attributes:
        name: label for reports / history rows; ref: the reference it was loaded from.
        model: open_clip-style module (encode_image / encode_text), eval mode, on CPU.
        tokenizer: callable(list[str]) -> (N, T) token ids.
        preprocess: the checkpoint's own image preprocessing.
        source: "clipa", "export" or "open_clip"; info: marker / config facts for reports.
    """
    name: str
    ref: str
    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Preprocess
    source: str
    info: dict = field(default_factory=dict)


def split_label(ref: str) -> tuple[str | None, str]:
    """"LABEL=REF" -> (LABEL, REF); a bare reference -> (None, REF)."""
    m = _LABEL.match(ref)
    if m and not ref.startswith(OPEN_CLIP_PREFIX) and "://" not in m.group(1):
        return m.group(1), m.group(2)
    return None, ref


def load_eval_model(ref: str) -> EvalModel:
    """Load the model a reference names (see the module docstring).

    Raises:
        ModelRefError: the reference names nothing loadable: a folder without a marker or
            open_clip config, a weights file that is not a checkpoint, an unknown
            open_clip architecture, or weights of another architecture.
    """
    label, ref = split_label(ref.strip())
    if ref.startswith(OPEN_CLIP_PREFIX):
        em = _load_open_clip(ref)
    elif has_marker(ref, "model"):
        em = _load_clipa(ref)
    elif _exists(join(ref, "open_clip_config.json")):
        em = _load_export(ref)
    else:
        raise ModelRefError(
            f"{ref}: not a model; expected a clipa Model artifact folder (with "
            "clipa_artifact.json), an exported folder (open_clip_config.json + weights) or "
            "open_clip:NAME:FILE")
    em.name = label or em.name
    return em


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _not_a_checkpoint(path: str, error: Exception) -> ModelRefError:
    return ModelRefError(f"{path}: not a checkpoint ({type(error).__name__}: {error}); "
                         "expected a state dict saved by torch.save or a .safetensors file")


# What torch.load / safetensors raise on a file that is not a checkpoint (torch's
# weights-only unpickler fails in many ways on arbitrary bytes).
_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError,
                ValueError, KeyError, AttributeError, IndexError, TypeError, OSError)


def _load_clipa(model_dir: str) -> EvalModel:
    from clipa_model.artifacts import read_marker
    from clipa_model.checkpoint import load_model
    from clipa_model.model import get_tokenizer

    from clipa_model.config import ConfigError

    marker = read_marker(model_dir, "model")
    try:
        model, cfg = load_model(model_dir)
    except ArtifactError:
        raise
    except ConfigError as e:  # weights of another preset: its message names both
        raise ModelRefError(str(e)) from None
    except _LOAD_ERRORS as e:
        raise _not_a_checkpoint(join(model_dir, "checkpoint.pt"), e) from None
    name = f"{marker.get('stage', 'model')}@{cfg['image_size']}px"
    return EvalModel(name, model_dir, model, get_tokenizer(cfg["preset"], cfg["text_len"]),
                     Preprocess.from_model_config(cfg), "clipa",
                     {k: marker.get(k) for k in ("stage", "preset", "image_size", "text_len",
                                                 "samples_seen")})


def _local_copy(url: str, tmp: str) -> str:
    """A local path for ``url`` (downloaded into ``tmp`` when remote)."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    fs, p = fsspec.core.url_to_fs(url)
    dest = os.path.join(tmp, p.rstrip("/").rsplit("/", 1)[-1])
    fs.get(p, dest, recursive=fs.isdir(p))
    return dest


def _check_weights_file(path: str) -> None:
    """Open the weights the way open_clip will, so a wrong file fails with a clear message."""
    if not os.path.isfile(path):
        raise ModelRefError(f"{path}: weights file not found; expected a checkpoint file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                list(f.keys())
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError(f"holds a {type(sd).__name__}, not a dict of tensors")
    except _LOAD_ERRORS as e:
        raise _not_a_checkpoint(path, e) from None


def _from_open_clip(name: str, pretrained: str | None, ref: str, source: str) -> EvalModel:
    import open_clip

    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as e:
        if "not found" in str(e) and "config" in str(e).lower():
            raise ModelRefError(f"{ref}: unknown open_clip architecture {name!r}") from None
        raise ModelRefError(f"{ref}: weights do not fit {name!r} ({str(e)[:300]})") from None
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        raise ModelRefError(f"{ref}: cannot load ({str(e)[:300]})") from None
    model.eval()
    pp = Preprocess.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    label = name.removeprefix("local-dir:").rstrip("/").rsplit("/", 1)[-1]
    return EvalModel(label, ref, model, open_clip.get_tokenizer(name), pp, source,
                     {"architecture": name, "image_size": pp.image_size})


def _load_export(folder: str) -> EvalModel:
    with tempfile.TemporaryDirectory(prefix="clipa-export-") as tmp:
        local = _local_copy(folder, tmp)
        weights = [f for f in os.listdir(local) if f.endswith((".safetensors", ".bin", ".pt", ".pth"))]
        if not weights:
            raise ModelRefError(f"{folder}: open_clip_config.json but no weights file "
                                "(*.safetensors, *.bin)")
        for w in weights:
            _check_weights_file(os.path.join(local, w))
        return _from_open_clip(f"local-dir:{local}", None, folder, "export")


def _load_open_clip(ref: str) -> EvalModel:
    body = ref[len(OPEN_CLIP_PREFIX):]
    name, sep, file = body.partition(":")
    if not sep or not name or not file:
        raise ModelRefError(f"{ref}: expected open_clip:NAME:FILE, e.g. "
                            "open_clip:ViT-B-16-CLIPA:/models/clipa_b16.bin")
    import open_clip

    if name not in open_clip.list_models():
        raise ModelRefError(f"{ref}: unknown open_clip architecture {name!r}; see "
                            "open_clip.list_models()")
    with tempfile.TemporaryDirectory(prefix="clipa-weights-") as tmp:
        path = _local_copy(file, tmp)
        _check_weights_file(path)
        return _from_open_clip(name, path, ref, "open_clip")


def open_clip_state_dict(ref: str) -> tuple[dict, dict]:
    """The architecture config and weights an ``open_clip:NAME:FILE`` reference names, for
    training to start from (evaluation loads whole models with ``load_eval_model``).

    Returns:
        (open_clip model config {"embed_dim", "vision_cfg", "text_cfg"}, state dict).

    Raises:
        ModelRefError: a malformed reference, an unknown architecture, or a file that is
            not a checkpoint.
    """
    import open_clip
    from open_clip.factory import load_state_dict

    name, sep, file = ref[len(OPEN_CLIP_PREFIX):].partition(":")
    if not ref.startswith(OPEN_CLIP_PREFIX) or not sep or not name or not file:
        raise ModelRefError(f"{ref}: expected open_clip:NAME:FILE, e.g. "
                            "open_clip:ViT-H-14-CLIPA-336:/models/clipa_h14_336.bin")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelRefError(f"{ref}: unknown open_clip architecture {name!r}; see "
                            "open_clip.list_models()")
    with tempfile.TemporaryDirectory(prefix="clipa-weights-") as tmp:
        path = _local_copy(file, tmp)
        _check_weights_file(path)
        return config, load_state_dict(path)
