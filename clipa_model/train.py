"""The training loop of one stage: AdamW, warmup + cosine, contrastive loss. Read top to bottom.

One step: uint8 images -> normalise -> image/text features -> open_clip's ``ClipLoss``
(symmetric InfoNCE over the batch, learnable temperature initialised at 1/0.07) -> AdamW
with decoupled weight decay on weight matrices only -> clamp the temperature like open_clip.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Iterable

import torch
from open_clip.loss import ClipLoss

from clipa_model.config import StageConfig
from clipa_model.data import normalize
from clipa_model.model import param_groups

log = logging.getLogger("clipa.train")

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps exp(logit_scale) to 100


def lr_at(step: int, steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from ~0 to ``peak_lr`` over ``warmup_steps``, then cosine to 0.

    Args:
        step: 0-based optimizer step; steps: total steps in the stage.

    Returns:
        The learning rate for ``step``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(precision: str):
    """Mixed-precision context for the forward pass: bf16 matmuls, fp32 weights and loss."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (decay on weight matrices only), betas from the stage."""
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in param_groups(model, stage.weight_decay)]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=1e-8)


def set_threads(stage: StageConfig) -> int:
    """torch intra-op threads: the stage's ``num_threads``, else one per core."""
    n = stage.num_threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def train_loop(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               stage: StageConfig, mean: tuple, std: tuple,
               flops_per_sample: float = 0.0,
               on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` in place on ``stage.steps`` batches.

    Args:
        model: open_clip CLIP (built or loaded at the stage's sizes and mask ratio).
        batches: (images (B, 3, S, S) uint8, tokens (B, T) int64), ``stage.steps`` of them.
        stage: lr, warmup, weight decay, betas, logging interval.
        mean, std: image normalisation stored with the model.
        flops_per_sample: training FLOPs per sample, to log GFLOP/s (0 = don't).
        on_log: called with every logged row (e.g. to print or stream metrics).

    Returns:
        History: one row per step, {"step", "samples_seen", "loss", "lr", "temperature",
        "samples_per_s", "seconds"}; samples_per_s is averaged over the last log window.
    """
    optimizer = make_optimizer(model, stage)
    loss_fn = ClipLoss()
    model.train()
    history, samples_seen = [], 0
    t_start = t_window = time.perf_counter()
    window_samples = 0
    for step, (images, tokens) in enumerate(batches):
        lr = lr_at(step, stage.steps, stage.warmup_steps, stage.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(stage.precision):
            image_f, text_f, scale = model(normalize(images, mean, std), tokens)  # (B, D) x2
            loss = loss_fn(image_f.float(), text_f.float(), scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

        samples_seen += images.shape[0]
        window_samples += images.shape[0]
        now = time.perf_counter()
        row = {"step": step + 1, "samples_seen": samples_seen, "loss": loss.item(), "lr": lr,
               "temperature": 1.0 / scale.item(), "seconds": now - t_start}
        if (step + 1) % stage.log_every == 0 or step + 1 == stage.steps:
            row["samples_per_s"] = window_samples / (now - t_window)
            if flops_per_sample:
                row["gflops_per_s"] = row["samples_per_s"] * flops_per_sample / 1e9
            t_window, window_samples = now, 0
            _log_row(stage, row)
            if on_log:
                on_log(row)
        history.append(row)
    return history


def _log_row(stage: StageConfig, row: dict) -> None:
    extra = f" {row['gflops_per_s']:.1f} GFLOP/s" if "gflops_per_s" in row else ""
    log.info("%s step %d/%d samples %d loss %.4f lr %.2e T %.4f %.1f samples/s%s",
             stage.stage, row["step"], stage.steps, row["samples_seen"], row["loss"], row["lr"],
             row["temperature"], row["samples_per_s"], extra)


def summarize(history: list[dict], seconds: float) -> dict:
    """Final numbers of a stage: mean loss over the last tenth of steps, throughput."""
    if not history:
        return {"final_loss": float("nan"), "samples_seen": 0, "steps": 0,
                "samples_per_s": 0.0, "seconds": seconds}
    tail = history[-max(1, len(history) // 10):]
    samples = history[-1]["samples_seen"]
    return {"final_loss": sum(r["loss"] for r in tail) / len(tail), "samples_seen": samples,
            "steps": history[-1]["step"], "samples_per_s": samples / max(seconds, 1e-9),
            "seconds": seconds}
