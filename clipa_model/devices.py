"""CPU, CUDA and TPU (torch_xla) behind one small interface used by the training loop.

- CPU: bf16 autocast of the matmuls (fp32 weights, loss and optimizer), fused AdamW.
- CUDA: bf16 autocast, fused AdamW, one GPU per process (``local_rank``).
- XLA (TPU through PJRT; ``PJRT_DEVICE=CPU`` runs it on a CPU for tests): the step is traced
  lazily and cut by ``step_end`` (``torch_xla.sync``); batches reach the device through
  ``MpDeviceLoader`` (background transfer); nothing in the step reads a value back to the
  host, and shapes are static (full batches, fixed token counts), so one graph is compiled
  and reused.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from clipa_model.config import ConfigError


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device for a ``StageConfig.device`` value.

    Raises:
        ConfigError: "cuda" without a GPU, or "xla" without torch_xla.
    """
    if name == "auto":  # xla on a TPU host (PJRT_DEVICE set), else cuda, else cpu
        from clipa_model.launch import device_type

        name = device_type(name)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': no CUDA GPU is visible; expected 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "xla":
        try:
            import torch_xla
        except ImportError:
            raise ConfigError("device='xla': torch_xla is not installed (see Makefile test-xla)") from None
        return torch_xla.device()
    return torch.device("cpu")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """Mixed precision for the forward pass: bf16 matmuls, fp32 weights and loss."""
    device_type = torch.device(device).type
    if precision != "bf16":
        return contextlib.nullcontext()
    if device_type == "xla":
        return torch.autocast("xla", dtype=torch.bfloat16)
    return torch.autocast(device_type, dtype=torch.bfloat16)


def to_device(batches: Iterable, device: torch.device) -> Iterator:
    """Move (images, tokens) batches to ``device``; XLA uses MpDeviceLoader's prefetch."""
    if device.type == "xla":
        import torch_xla.distributed.parallel_loader as pl

        yield from pl.MpDeviceLoader(batches, device)
        return
    non_blocking = device.type == "cuda"
    for images, tokens in batches:
        if non_blocking and images.device.type == "cpu":
            images, tokens = images.pin_memory(), tokens.pin_memory()
        yield images.to(device, non_blocking=non_blocking), tokens.to(device, non_blocking=non_blocking)


def step_end(device: torch.device) -> None:
    """Cut the lazy XLA graph after an optimizer step (no-op elsewhere)."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def rng_state(device: torch.device) -> dict:
    """RNG states that a resumed run must restore (tensors and plain values only)."""
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        state["xla"] = int(xm.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of ``rng_state``."""
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "xla" in state and device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(state["xla"], device)


def _as_tuple(x):
    """random.setstate wants tuples; a round trip may turn them into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak FLOP/s of one accelerator for MFU (0 when unknown, e.g. CPU)."""
    if device.type != "cuda":
        return 0.0
    from clipa_model.planner import ACCELERATORS

    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l4"):
        if key in name:
            return ACCELERATORS[key].peak_flops
    return 0.0
