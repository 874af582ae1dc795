"""CLIP-score filtering for ``filter_shard``: image-text cosine similarity of a checkpoint.

The model is a Model artifact of this project (``clipa_model.checkpoint.load_model``),
run at its own image size, text length and normalisation, like ``components.evaluate``.
DataComp's CLIP-score filters keep pairs above a threshold or the top fraction; the
scores computed here feed the plan (``components.filter_shard.plan``), which applies
either rule over the whole dataset.
"""
from __future__ import annotations

import math

import numpy as np

BATCH = 64  # image-text pairs per forward pass


class ClipScorer:
    """Scores (image bytes, caption) pairs with one checkpoint; built once per worker."""

    def __init__(self, model_dir: str):
        import torch

        from clipa_model.checkpoint import load_model
        from clipa_model.model import get_tokenizer

        self.torch = torch
        self.model, self.cfg = load_model(model_dir)
        self.tokenizer = get_tokenizer(self.cfg["preset"], self.cfg["text_len"])

    def _images(self, images: list[bytes]):
        """JPEG/PNG bytes -> (B, 3, S, S) float32, normalised as the model was trained."""
        from clipa_model.data import center_resize, normalize, open_jpeg

        size = self.cfg["image_size"]
        arrays = [center_resize(open_jpeg(b, size), size) for b in images]  # (S, S, 3) u8
        batch = self.torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
        return normalize(batch, self.cfg["mean"], self.cfg["std"])

    def score(self, images: list[bytes], captions: list[str]) -> list[float]:
        """Cosine similarity of each image with its caption (NaN where decoding failed)."""
        out: list[float] = []
        with self.torch.no_grad():
            for i in range(0, len(images), BATCH):
                out += self._score_batch(images[i:i + BATCH], captions[i:i + BATCH])
        return out

    def _score_batch(self, images: list[bytes], captions: list[str]) -> list[float]:
        try:
            pixels = self._images(images)
        except Exception:  # noqa: BLE001 - one bad image: score the batch one by one
            if len(images) == 1:
                return [math.nan]
            return [s for im, c in zip(images, captions) for s in self._score_batch([im], [c])]
        img = self.model.encode_image(pixels, normalize=True)  # (B, D)
        txt = self.model.encode_text(self.tokenizer(captions), normalize=True)  # (B, D)
        return (img * txt).sum(dim=-1).tolist()
