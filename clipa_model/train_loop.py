"""The training loop of one stage: AdamW, warmup + cosine, contrastive loss. Read top to bottom.

One step: uint8 images -> normalise on the device -> image/text features -> open_clip's
``ClipLoss`` (symmetric InfoNCE over the global batch, learnable temperature initialised at
1/0.07; with several processes the features are all-gathered and each rank scores its own
rows) -> AdamW with decoupled weight decay on weight matrices only -> clamp the temperature
like open_clip. No gradient clipping (CLIPA).

The step never reads a value back to the host: losses stay on the device until a log or
checkpoint step reads a whole window at once (one sync per window on CUDA, a static graph
on XLA).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Callable, Iterable

import torch
from open_clip.loss import ClipLoss

from clipa_model import devices
from clipa_model.config import StageConfig
from clipa_model.data import normalize
from clipa_model.distributed import DistEnv
from clipa_model.model import param_groups

log = logging.getLogger("clipa.train")

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps exp(logit_scale) to 100


class DivergenceError(RuntimeError):
    """The loss became non-finite; ``step`` is the first (1-based) step whose loss was."""

    def __init__(self, stage: str, step: int, loss: float):
        super().__init__(f"{stage}: the loss diverged: loss={loss} at step {step}")
        self.stage, self.step, self.loss = stage, step, loss


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


def make_optimizer(model: torch.nn.Module, stage: StageConfig,
                   device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (decay on weight matrices only).

    Fused kernels on CUDA and on the CPU (one pass over each tensor instead of a dozen
    elementwise ops: on the tiny preset, whose 49,408-row token table is updated densely
    every step, the CPU step drops from ~150 ms to ~35 ms); torch_xla keeps the plain one.
    """
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in param_groups(model, stage.weight_decay, stage.patch_embed_lr_scale)]
    device = device if device is not None else next(model.parameters()).device
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=1e-8, **fused)


def set_threads(stage: StageConfig) -> int:
    """torch intra-op threads: the stage's ``num_threads``, else the cores shared among this
    node's training processes (LOCAL_WORLD_SIZE, set by the launcher)."""
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = stage.num_threads or max(1, (os.cpu_count() or 1) // procs)
    torch.set_num_threads(n)
    return n


def prepare_model(model: torch.nn.Module, stage: StageConfig, device: torch.device,
                  dist_env: DistEnv) -> torch.nn.Module:
    """Move ``model`` to ``device`` and return the module to call in the step.

    Gradient checkpointing, DistributedDataParallel (several processes) and torch.compile
    wrap it as the stage asks; ``model`` itself keeps the plain parameter names.
    """
    model.to(device)
    model.set_grad_checkpointing(stage.grad_checkpointing)
    forward = model
    if dist_env.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if stage.compile:
        forward = torch.compile(forward)
    return forward


def make_loss(dist_env: DistEnv) -> ClipLoss:
    """Contrastive loss over the global batch (gradients to the local shard)."""
    many = dist_env.world_size > 1
    return ClipLoss(local_loss=many, gather_with_grad=many, cache_labels=True,
                    rank=dist_env.rank, world_size=dist_env.world_size)


def train_step(forward, model, loss_fn, optimizer, images: torch.Tensor, tokens: torch.Tensor,
               lr: float, stage: StageConfig, mean: tuple, std: tuple,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a (B, 3, S, S) uint8 / (B, T) int64 batch of this rank.

    With ``stage.accum_steps`` = K > 1 the batch is K micro-batches (``accumulate_gradients``);
    the loss and gradients are those of the whole batch either way.

    Returns:
        (loss, logit scale) as detached device tensors (no host sync).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    if stage.accum_steps > 1:
        loss, scale = accumulate_gradients(forward, model, loss_fn, images, tokens,
                                           stage.accum_steps, stage.precision, mean, std, device)
    else:
        with devices.autocast(stage.precision, device):
            image_f, text_f, scale = forward(normalize(images, mean, std), tokens)  # (B, D) x2
            loss = loss_fn(image_f.float(), text_f.float(), scale)
        loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    devices.step_end(device)
    return loss.detach(), scale.detach()


def accumulate_gradients(forward, model, loss_fn, images: torch.Tensor, tokens: torch.Tensor,
                         accum_steps: int, precision: str, mean: tuple, std: tuple,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the contrastive loss over the whole batch, K micro-batches at a time.

    As GradCache / open_clip's ``accum_freq``: (1) features of every micro-batch without a
    graph; (2) for each micro-batch, recompute its features with a graph, put them among the
    cached ones, take the full-batch loss (all ranks' features through ``loss_fn``) and
    backpropagate into that micro-batch only. Summed over micro-batches these are exactly the
    full-batch gradients: the loss is the same each time, and each feature's gradient
    reaches the parameters once. Two details make it exact rather than approximate:

    - the RNG state before each micro-batch's first pass is restored for its second, so
      random patch masks are the same in both passes;
    - the temperature enters the graph in one pass only (the last), so its gradient is
      counted once, not K times (open_clip counts it K times).

    DDP reduces gradients once, on the last micro-batch (``no_sync`` before). Costs one
    extra forward per sample; memory is that of one micro-batch plus (B, D) features.

    Returns:
        (full-batch loss, logit scale), detached.
    """
    micro_images, micro_tokens = images.chunk(accum_steps), tokens.chunk(accum_steps)
    rng_states, cached = [], []
    with torch.no_grad(), devices.autocast(precision, device):
        for im, tok in zip(micro_images, micro_tokens):
            rng_states.append(_rng_state(device))
            image_f, text_f, _ = forward(normalize(im, mean, std), tok)  # (B/K, D) x2
            cached.append((image_f.float(), text_f.float()))
    after = _rng_state(device)
    no_sync = getattr(forward, "no_sync", contextlib.nullcontext)
    for j, (im, tok) in enumerate(zip(micro_images, micro_tokens)):
        last = j == accum_steps - 1
        _set_rng_state(rng_states[j], device)
        with (contextlib.nullcontext() if last else no_sync()):
            with devices.autocast(precision, device):
                image_f, text_f, scale = forward(normalize(im, mean, std), tok)
                all_image = torch.cat([c[0] for c in cached[:j]] + [image_f.float()]
                                      + [c[0] for c in cached[j + 1:]])  # (B, D)
                all_text = torch.cat([c[1] for c in cached[:j]] + [text_f.float()]
                                     + [c[1] for c in cached[j + 1:]])
                loss = loss_fn(all_image, all_text, scale if last else scale.detach())
            loss.backward()
    _set_rng_state(after, device)
    return loss.detach(), scale.detach()


def _rng_state(device: torch.device):
    """The RNG that draws patch masks: the CPU generator, plus the device's (CUDA, XLA)."""
    own = None
    if device.type == "cuda":
        own = torch.cuda.get_rng_state(device)
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        own = xm.get_rng_state(device)
    return torch.get_rng_state(), own


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(state[1], device)


def train_loop(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               stage: StageConfig, mean: tuple, std: tuple,
               flops_per_sample: float = 0.0,
               on_log: Callable[[dict], None] | None = None, *,
               device: torch.device | None = None, dist_env: DistEnv | None = None,
               optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
               history: list[dict] | None = None,
               checkpoint: Callable[[int, torch.optim.Optimizer, list], None] | None = None,
               checkpoint_due: Callable[[int], bool] | None = None) -> list[dict]:
    """Train ``model`` in place on batches ``start_step`` .. ``stage.steps - 1``.

    Args:
        model: open_clip CLIP (built or loaded at the stage's sizes and mask ratio).
        batches: (images (B, 3, S, S) uint8, tokens (B, T) int64) of this rank, on the CPU.
        stage: lr, warmup, weight decay, betas, precision, logging interval.
        mean, std: image normalisation stored with the model.
        flops_per_sample: training FLOPs per sample, to log GFLOP/s and MFU (0 = don't).
        on_log: called with every logged row (e.g. to print or stream metrics).
        device: where to train (default: the model's device); dist_env: rank layout.
        optimizer: resumed optimizer (default: a fresh ``make_optimizer``).
        start_step, history: resume position and the rows logged before it.
        checkpoint: called as (steps done, optimizer, history) when ``checkpoint_due``.

    Returns:
        History: one row per step, {"step", "samples_seen", "loss", "lr", "temperature",
        "seconds"}; rows at log steps add "samples_per_s" (window average), "gflops_per_s"
        and, on known accelerators, "mfu".
    """
    device = device or next(model.parameters()).device
    dist_env = dist_env or DistEnv()
    forward = prepare_model(model, stage, device, dist_env)
    optimizer = optimizer or make_optimizer(model, stage, device)
    loss_fn = make_loss(dist_env)
    model.train()
    meter = _Meter(stage, dist_env, flops_per_sample, devices.peak_flops(device), on_log,
                   list(history or []), start_step)
    for step, (images, tokens) in enumerate(devices.to_device(batches, device), start=start_step):
        lr = lr_at(step, stage.steps, stage.warmup_steps, stage.lr)
        loss, scale = train_step(forward, model, loss_fn, optimizer, images, tokens, lr, stage,
                                 mean, std, device)
        meter.add(step, images.shape[0] * dist_env.world_size, lr, loss, scale)
        done = step + 1
        due = checkpoint is not None and checkpoint_due is not None and checkpoint_due(done)
        if done % stage.log_every == 0 or done == stage.steps or due:
            meter.flush(log_row=done % stage.log_every == 0 or done == stage.steps)
        if due:
            checkpoint(done, optimizer, meter.history)
    meter.flush(log_row=False)
    return meter.history


class _Meter:
    """Per-step rows whose device values are read back a window at a time."""

    def __init__(self, stage, dist_env, flops, peak, on_log, history, start_step):
        self.stage, self.dist_env, self.flops, self.peak = stage, dist_env, flops, peak
        self.on_log, self.history, self.pending = on_log, history, []
        self.samples_seen = history[-1]["samples_seen"] if history else 0
        self.t_start = self.t_window = time.perf_counter()
        self.offset = history[-1]["seconds"] if history else 0.0
        self.window_samples = 0

    def add(self, step, samples, lr, loss, scale) -> None:
        self.samples_seen += samples
        self.window_samples += samples
        self.pending.append(({"step": step + 1, "samples_seen": self.samples_seen, "lr": lr,
                              "seconds": self.offset + time.perf_counter() - self.t_start},
                             loss, scale))

    def flush(self, log_row: bool) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[1] for p in self.pending]).float()
        scales = torch.stack([p[2] for p in self.pending]).float()
        if self.dist_env.world_size > 1:  # global loss = mean of the ranks' local losses
            import torch.distributed as dist

            dist.all_reduce(losses)
            losses /= self.dist_env.world_size
        for (row, _, _), loss, scale in zip(self.pending, losses.tolist(), scales.tolist()):
            if not math.isfinite(loss):  # divergence guard: before any checkpoint of it
                raise DivergenceError(self.stage.stage, row["step"], loss)
            self.history.append({**row, "loss": loss, "temperature": 1.0 / scale})
        self.pending = []
        if log_row:
            self._rate(self.history[-1])

    def _rate(self, row: dict) -> None:
        now = time.perf_counter()
        row["samples_per_s"] = self.window_samples / max(now - self.t_window, 1e-9)
        if self.flops:
            row["gflops_per_s"] = row["samples_per_s"] * self.flops / 1e9
            if self.peak:
                row["mfu"] = row["gflops_per_s"] * 1e9 / (self.peak * self.dist_env.world_size)
        self.t_window, self.window_samples = now, 0
        if self.dist_env.is_main:
            _log_row(self.stage, row)
        if self.on_log:
            self.on_log(row)


def _log_row(stage: StageConfig, row: dict) -> None:
    extra = f" {row['gflops_per_s']:.1f} GFLOP/s" if "gflops_per_s" in row else ""
    extra += f" MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""
    log.info("%s step %d/%d samples %d loss %.4f lr %.2e T %.4f %.1f samples/s%s",
             stage.stage, row["step"], stage.steps, row["samples_seen"], row["loss"], row["lr"],
             row["temperature"], row["samples_per_s"], extra)


def training_summary(history: list[dict], seconds: float, start_samples: int = 0) -> dict:
    """Final numbers of a stage: mean loss over the last tenth of steps, throughput.

    Args:
        history: the stage's rows; seconds: wall time of this run.
        start_samples: samples seen before this run (a resumed stage), for samples_per_s.
    """
    if not history:
        return {"final_loss": float("nan"), "samples_seen": 0, "steps": 0,
                "samples_per_s": 0.0, "seconds": seconds}
    tail = history[-max(1, len(history) // 10):]
    samples = history[-1]["samples_seen"]
    return {"final_loss": sum(r["loss"] for r in tail) / len(tail), "samples_seen": samples,
            "steps": history[-1]["step"],
            "samples_per_s": (samples - start_samples) / max(seconds, 1e-9),
            "seconds": seconds}
