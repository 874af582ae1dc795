"""CLIP-score filtering for ``filter_shard``: image-text cosine similarity of a model.

The model is any reference ``clipa_model.eval.models.load_eval_model`` reads: a Model
artifact of this project, an exported open_clip folder, or ``open_clip:NAME:FILE``
(DataComp scores with OpenAI's ViT-L/14: ``open_clip:ViT-L-14:/weights/vit_l14.pt``).
Each is run with its own tokenizer and preprocessing, like ``components.evaluate``.
DataComp's CLIP-score filters keep pairs above a threshold or the top fraction; the
scores computed here feed the plan (``components.filter_shard.plan``), which applies
either rule over the whole dataset.
"""
from __future__ import annotations

import io
import math

import numpy as np

BATCH = 64  # image-text pairs per forward pass


class ClipScorer:
    """Scores (image bytes, caption) pairs with one model; built once per worker."""

    def __init__(self, model_ref: str):
        import torch

        from clipa_model.eval.models import load_eval_model

        self.torch = torch
        self.em = load_eval_model(model_ref)
        self.transform = self.em.preprocess.pil_transform()

    def _images(self, images: list[bytes]):
        """Image bytes -> (B, 3, S, S) float32, preprocessed as the model expects."""
        from PIL import Image

        from clipa_model.preprocess import normalize_on

        arrays = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                arrays.append(self.transform(im.convert("RGB")))  # (S, S, 3) uint8
        batch = self.torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
        return normalize_on(batch, self.em.preprocess, self.torch.device("cpu"))

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
        model = self.em.model
        img = self.torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)  # (B, D)
        txt = self.torch.nn.functional.normalize(
            model.encode_text(self.em.tokenizer(captions)), dim=-1)  # (B, D)
        return (img * txt).sum(dim=-1).tolist()
