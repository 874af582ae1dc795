"""The preprocessing a checkpoint asks for, applied exactly as open_clip applies it.

Like timm's pretrained cfg, the preprocessing travels with the weights (clipa's
model_config.json, open_clip's ``preprocess_cfg``), so a 336 px model is never evaluated
with 224 px settings. Resizing and cropping use open_clip's own eval transform (same PIL
calls, same rounding); the image stays uint8 until the device, where ``normalize_on``
scales and standardises it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocess:
    """What a checkpoint expects of an image (open_clip's ``PreprocessCfg`` fields).

    Attributes:
        image_size: side in pixels; mean, std: per-channel, on the [0, 1] scale.
        interpolation: "bicubic" or "bilinear"; resize_mode: "shortest" (resize the short
            side, centre crop), "longest" (resize the long side, pad), "squash".
        fill_color: padding value for "longest".
    """
    image_size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict) -> "Preprocess":
        """From ``open_clip.get_model_preprocess_cfg(model)``."""
        size = cfg["size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return cls(int(size), tuple(cfg["mean"]), tuple(cfg["std"]),
                   cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"),
                   int(cfg.get("fill_color", 0)))

    @classmethod
    def from_model_config(cls, cfg: dict) -> "Preprocess":
        """From a clipa Model artifact's model_config.json."""
        return cls(int(cfg["image_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                   cfg.get("interpolation", "bilinear"), cfg.get("resize_mode", "shortest"),
                   int(cfg.get("fill_color", 0)))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}

    def pil_transform(self) -> Callable[[Image.Image], np.ndarray]:
        """open_clip's eval transform up to (not including) ToTensor + Normalize.

        Returns:
            callable(RGB PIL image) -> (S, S, 3) uint8.
        """
        from open_clip.transform import image_transform

        full = image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std,
                               resize_mode=self.resize_mode, interpolation=self.interpolation,
                               fill_color=self.fill_color)
        ops = full.transforms[:-2]  # drop MaybeToTensor and Normalize (done on the device)
        return _PilOps(ops)


class _PilOps:
    """Picklable chain of PIL ops (DataLoader workers get a copy)."""

    def __init__(self, ops):
        self.ops = ops

    def __call__(self, img: Image.Image) -> np.ndarray:
        for op in self.ops:
            img = op(img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def normalize_on(images: torch.Tensor, pp: Preprocess, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> standardised float (B, 3, S, S) on ``device``."""
    mean = torch.tensor(pp.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, device=device).view(1, 3, 1, 1)
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return ((x - mean) / std).to(dtype)
