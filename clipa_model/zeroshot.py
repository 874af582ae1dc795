"""Zero-shot classification of a labelled eval set, and a colour-only baseline.

Class embedding = normalised mean of the normalised embeddings of every prompt template
filled with the class name (open_clip's ``build_zero_shot_classifier``); an image is
assigned the class whose embedding is closest in cosine similarity.

The colour baseline classifies each image by its mean RGB alone (nearest class centroid,
cross-validated on the eval set itself). Near chance, it shows that the classes cannot be
told apart by colour, so zero-shot accuracy above it comes from shape.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from tqdm import tqdm

from clipa_model.data import eval_batches, list_eval_shards, normalize
from clipa_model.model import get_tokenizer


@torch.no_grad()
def encode_eval_images(model: torch.nn.Module, batches, mean: tuple, std: tuple,
                       total: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every image of the eval stream.

    Returns:
        (features (N, D) L2-normalised, labels (N,), mean RGB (N, 3) in [0, 255]).
    """
    model.eval()
    feats, labels, rgb = [], [], []
    for images, y in tqdm(batches, total=total, desc="zero-shot eval", unit="batch",
                          mininterval=5):
        feats.append(model.encode_image(normalize(images, mean, std), normalize=True))
        labels.append(y)
        rgb.append(images.float().mean(dim=(2, 3)))  # (B, 3)
    return torch.cat(feats), torch.cat(labels), torch.cat(rgb)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: is the label among the ``k`` highest logits (k capped at the classes)?"""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy of each class (nan for a class absent from the eval set)."""
    out = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else math.nan)
    return out


def colour_baseline_top1(mean_rgb: torch.Tensor, labels: torch.Tensor, folds: int = 2,
                         seed: int = 0) -> float:
    """Top-1 of a nearest-centroid classifier on mean RGB, ``folds``-fold cross-validated.

    Args:
        mean_rgb: (N, 3) mean colour of each image; labels: (N,) class indices.

    Returns:
        Fraction of images whose held-out prediction is right.
    """
    x, y = mean_rgb.double().numpy(), labels.numpy()
    order = np.random.default_rng(seed).permutation(len(y))
    correct = 0
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        classes = np.unique(y[train])
        centroids = np.stack([x[train][y[train] == c].mean(0) for c in classes])  # (C, 3)
        dist = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1)  # (n_test, C)
        correct += int((classes[dist.argmin(1)] == y[test]).sum())
    return correct / len(y)


def zero_shot_evaluate(model: torch.nn.Module, model_cfg: dict, eval_dir: str,
                       batch_size: int = 64) -> dict:
    """Zero-shot top-1/top-5 of ``model`` on an ``eval_set`` artifact.

    Args:
        model: open_clip CLIP; model_cfg: its model_config.json (preset, image_size,
            text_len, mean, std, interpolation: the checkpoint's own preprocessing).
        eval_dir: eval_set folder (classes.json has the class names and templates).
        batch_size: images per forward pass.

    Returns:
        {"top1", "top5", "count", "colour_baseline_top1", "per_class_top1": [...],
         "classnames": [...]}
    """
    urls, classes = list_eval_shards(eval_dir)
    classnames, templates = classes["classnames"], classes["templates"]
    tokenizer = get_tokenizer(model_cfg["preset"], model_cfg["text_len"])
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                         num_classes_per_batch=None)  # (D, C)
    batches = eval_batches(eval_dir, model_cfg["image_size"], batch_size,
                           model_cfg.get("interpolation", "bilinear"))
    feats, labels, rgb = encode_eval_images(model, batches, model_cfg["mean"], model_cfg["std"])
    logits = feats @ weights  # (N, C) cosine similarities
    return {
        "top1": float(topk_correct(logits, labels, 1).float().mean()),
        "top5": float(topk_correct(logits, labels, 5).float().mean()),
        "count": int(labels.numel()),
        "colour_baseline_top1": colour_baseline_top1(rgb, labels),
        "per_class_top1": per_class_accuracy(logits.argmax(1), labels, len(classnames)),
        "classnames": list(classnames),
    }
