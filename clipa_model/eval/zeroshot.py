"""Zero-shot classification: top-1 / top-5 / per-class accuracy, and a colour-only baseline.

Class embedding = normalised mean of the normalised text embeddings of every prompt
template filled with the class name (CLIP's recipe, as open_clip's
``build_zero_shot_classifier``); an image is assigned the class whose embedding is closest
in cosine similarity. ``tests/components/test_evaluate.py`` checks the numbers against open_clip's
own classifier and accuracy code on the same model and images.

The colour baseline classifies each image by its mean RGB alone (nearest class centroid,
cross-validated on the eval set itself). Near chance, it shows that the classes cannot be
told apart by colour, so zero-shot accuracy above it comes from shape.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from clipa_model.eval.data import ClassificationSet, classification_batches, fill_template
from clipa_model.preprocess import Preprocess, normalize_on


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device):
    """bf16 autocast on accelerators (what open_clip's eval does with amp); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence, device: torch.device,
                         texts_per_batch: int = 1024) -> torch.Tensor:
    """Class embeddings from prompt templates.

    Returns:
        (D, C) float32, each column L2-normalised.
    """
    n_tpl = len(templates)
    per_batch = max(1, texts_per_batch // n_tpl)  # whole classes per text batch
    columns = []
    for start in range(0, len(classnames), per_batch):
        names = classnames[start:start + per_batch]
        tokens = tokenizer([fill_template(t, c) for c in names for t in templates]).to(device)
        with autocast_for(device):
            emb = model.encode_text(tokens, normalize=True).float()  # (n*T, D)
        emb = emb.reshape(len(names), n_tpl, -1).mean(dim=1)  # (n, D)
        columns.append((emb / emb.norm(dim=1, keepdim=True)).T)
    return torch.cat(columns, dim=1)


@torch.no_grad()
def encode_images(model: torch.nn.Module, batches: Iterable, pp: Preprocess, device: torch.device,
                  total: int | None = None, desc: str = "images") -> tuple[torch.Tensor, list, torch.Tensor]:
    """Embed every image of a stream of (uint8 images, targets) batches.

    Returns:
        (features (N, D) L2-normalised float32 on CPU, targets of every image in order,
         mean RGB (N, 3) in [0, 255]).
    """
    feats, targets, rgb = [], [], []
    with tqdm(total=total, desc=desc, unit="img", mininterval=5) as bar:
        for images, target in batches:
            x = normalize_on(images, pp, device)
            with autocast_for(device):
                f = model.encode_image(x, normalize=True)
            feats.append(f.float().cpu())
            rgb.append(images.float().mean(dim=(2, 3)))  # (B, 3)
            targets.extend(target.tolist() if torch.is_tensor(target) else target)
            bar.update(len(images))
    if not feats:
        raise ValueError("the evaluation set yielded no images")
    return torch.cat(feats), targets, torch.cat(rgb)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: is the label among the ``k`` highest logits (k capped at the classes)?"""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy of each class (nan for a class absent from the eval set)."""
    hits = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    return [float(h / n) if n else math.nan for h, n in zip(hits, counts)]


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
        if not len(classes):
            continue
        centroids = np.stack([x[train][y[train] == c].mean(0) for c in classes])  # (C, 3)
        dist = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1)  # (n_test, C)
        correct += int((classes[dist.argmin(1)] == y[test]).sum())
    return correct / len(y)


def evaluate_zero_shot(model: torch.nn.Module, tokenizer: Callable, pp: Preprocess,
                       ds: ClassificationSet, batch_size: int = 256, device: str = "auto",
                       num_workers: int = 0) -> dict:
    """Zero-shot top-1 / top-5 / per-class accuracy of ``model`` on a classification set.

    Args:
        model: open_clip-style model; tokenizer: its tokenizer; pp: its preprocessing.
        ds: from ``eval_data.open_classification_set``.
        batch_size: images per forward pass; num_workers: decoding processes.
        device: "auto", "cpu", "cuda", ...

    Returns:
        {"top1", "top5", "count", "num_classes", "colour_baseline_top1",
         "per_class_top1": [...], "classnames": [...], "templates": n, "preprocess": {...}}
    """
    dev = pick_device(device)
    model = model.to(dev).eval()
    weights = zero_shot_classifier(model, tokenizer, ds.classnames, ds.templates, dev)  # (D, C)
    batches = classification_batches(ds, pp, batch_size, num_workers)
    feats, labels, rgb = encode_images(model, batches, pp, dev, ds.count, "zero-shot")
    labels = torch.tensor(labels, dtype=torch.long)
    logits = feats @ weights.cpu()  # (N, C) cosine similarities
    return {
        "top1": int(topk_correct(logits, labels, 1).sum()) / labels.numel(),
        "top5": int(topk_correct(logits, labels, 5).sum()) / labels.numel(),
        "count": int(labels.numel()),
        "num_classes": len(ds.classnames),
        "colour_baseline_top1": colour_baseline_top1(rgb, labels),
        "per_class_top1": per_class_accuracy(logits.argmax(1), labels, len(ds.classnames)),
        "classnames": list(ds.classnames),
        "templates": len(ds.templates),
        "classes_source": ds.classes_source,
        "preprocess": pp.to_dict(),
    }
