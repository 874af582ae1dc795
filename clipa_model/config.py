"""One training stage as a typed config (pretrain, finetune_224, finetune_336).

Defaults follow the CLIPA-v2 recipe (docs/PAPER.md): AdamW with
betas (0.9, 0.95), decoupled weight decay 0.2 on weight matrices, linear warmup then cosine
decay to zero. The sample counts and batch sizes are the caller's (see ``recipes.py``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field at fault."""


# Kept here (not imported) so that the config module stays free of torch.
IMAGE_MASKS = ("random", "grid", "block")
TEXT_REDUCTIONS = ("truncate", "random", "block", "syntax")
DEVICES = ("auto", "cpu", "cuda", "xla")


@dataclass
class StageConfig:
    """Everything one training stage needs besides the data and the model preset.

    Attributes:
        stage: name, e.g. "pretrain", "finetune_224", "finetune_336".
        image_size: input side in pixels; a multiple of the preset's patch size.
        text_len: text tokens per caption, start/end tokens included (truncation).
        mask_ratio: fraction of image patches dropped in training (0 = none), chosen by
            ``image_mask``.
        samples: samples seen in this stage (several epochs over the shards if needed).
        batch_size: contrastive batch (the negatives each sample sees).
        lr: peak learning rate.
        patch_embed_lr_scale: the image patch embedding's learning rate as a fraction of
            ``lr`` (0 = frozen at its random init). AdamW moves every weight about ``lr`` a
            step whatever its fan-in, and a patch's pixels are strongly correlated, so the
            embedding's output moves far more per step than a hidden layer's; the more
            pixels a patch holds of a smooth image (higher resolution, larger patches), the
            more. On the demo data at 224 px this alone kept a tiny ViT at chance
            (docs/SCIENCE.md); MoCo v3 freezes the embedding for the same instability.
        pos_interpolation: measure the fixed sin-cos image positions in cells of the grid
            the model was first trained at (``pos_grid`` in model_config.json), so a
            finetune at a finer grid sees the positions it learned, spaced closer, as a
            learned table resampled to the new grid does. Off, positions are integer patch
            indices and a larger grid reaches positions never trained (CLIPA-v2's big_vision
            code). The demo's 84 px model scores 56.0% at 224 px with integer positions and
            82.0% interpolated, before any finetune (docs/SCIENCE.md). Only a stage that
            creates the model, or finetunes one saved without ``pos_grid``, decides; a
            model keeps its ``pos_grid`` through later stages.
        warmup_frac: linear warmup length as a fraction of ``samples`` (CLIPA-v2: about
            0.016 pretrain, 0.05 finetune 224, 0.2 finetune 336).
        weight_decay: decoupled weight decay on weight matrices only.
        betas: AdamW betas.
        seed: seeds model init (pretrain), shard order, crops and patch masks.
        crop_scale: (min, max) area fraction of the random resized crop.
        log_every: steps between log lines / history rows.
        num_threads: torch intra-op threads (0 = all cores).
        num_workers: data loader processes (0 = decode in the training process).
        precision: "bf16" (autocast matmuls to bfloat16; ~1.5x faster on AVX-512 CPUs)
            or "fp32".
        image_mask: which patches ``mask_ratio`` drops: "random" (CLIPA-v2), "grid" or
            "block" (token_reduction.py); resizing to ``image_size`` is always applied.
        text_reduction: how captions fit ``text_len`` in training: "truncate", "random",
            "block" or "syntax" (CLIPA's best); evaluation always truncates.
        device: "auto" (xla on a TPU host, i.e. PJRT_DEVICE set and torch_xla installed;
            else cuda if available; else cpu), "cpu", "cuda" or "xla" (TPU, PJRT).
        grad_checkpointing: recompute activations in the backward pass (less memory).
        compile: wrap the model in ``torch.compile``.
        checkpoint_every: steps between resumable checkpoints (0 = by time only).
        checkpoint_minutes: minutes between resumable checkpoints (0 = by steps only).
        keep_checkpoints: resumable checkpoints kept (older ones are deleted).
        zeroshot_every: samples between zero-shot probes of the eval set during training
            (0 = off; checked at log steps, so a probe runs at the first log step at or
            after each multiple); results go to TensorBoard and history.jsonl.
        accum_steps: micro-batches per optimizer step. The loss still covers the whole
            global batch (features of every micro-batch and rank; gradients by
            recomputation, train_loop.py), so a paper batch fits fewer accelerators.
    """

    stage: str = "pretrain"
    image_size: int = 84
    text_len: int = 8
    mask_ratio: float = 0.0
    samples: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    patch_embed_lr_scale: float = 1.0
    pos_interpolation: bool = True
    warmup_frac: float = 0.05
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    crop_scale: tuple[float, float] = (0.4, 1.0)
    log_every: int = 10
    num_threads: int = 0
    num_workers: int = 0
    precision: str = "bf16"
    image_mask: str = "random"
    text_reduction: str = "truncate"
    device: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    zeroshot_every: int = 0
    accum_steps: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.crop_scale = tuple(self.crop_scale)
        self.validate()

    @property
    def steps(self) -> int:
        """Optimizer steps: ceil(samples / batch_size)."""
        return -(-self.samples // self.batch_size)

    @property
    def warmup_steps(self) -> int:
        """Linear warmup steps: ``warmup_frac`` of ``steps``, rounded up."""
        return math.ceil(self.warmup_frac * self.steps)

    def validate(self, patch_size: int | None = None) -> "StageConfig":
        """Raise ``ConfigError`` naming the field if this stage cannot run.

        Args:
            patch_size: the model's patch size, when known, to check ``image_size``.
        """
        checks = [
            ("mask_ratio", 0.0 <= self.mask_ratio < 1.0, "in [0, 1)"),
            ("text_len", self.text_len > 1, "at least 2 (start and end tokens)"),
            ("image_size", self.image_size > 0, "positive"),
            ("samples", self.samples > 0, "positive"),
            ("batch_size", self.batch_size > 1, "at least 2 (a contrastive batch)"),
            ("lr", self.lr > 0, "positive"),
            ("patch_embed_lr_scale", 0.0 <= self.patch_embed_lr_scale <= 1.0,
             "a fraction of lr in [0, 1] (0 = frozen)"),
            ("warmup_frac", 0.0 <= self.warmup_frac < 1.0, "a fraction in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("precision", self.precision in ("bf16", "fp32"), '"bf16" or "fp32"'),
            ("crop_scale", 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
             "(min, max) with 0 < min <= max <= 1"),
            ("image_mask", self.image_mask in IMAGE_MASKS, f"one of {IMAGE_MASKS}"),
            ("text_reduction", self.text_reduction in TEXT_REDUCTIONS,
             f"one of {TEXT_REDUCTIONS}"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("checkpoint_minutes", self.checkpoint_minutes >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("zeroshot_every", self.zeroshot_every >= 0, ">= 0 (0 = off)"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("accum_steps", self.accum_steps >= 1, ">= 1"),
            ("accum_steps", self.batch_size % max(1, self.accum_steps) == 0,
             f"a divisor of batch_size={self.batch_size} (micro-batches of equal size)"),
        ]
        if patch_size is not None:
            checks.append(("image_size", self.image_size % patch_size == 0,
                           f"a multiple of the patch size {patch_size}"))
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"StageConfig.{name}={getattr(self, name)!r} for stage "
                                  f"{self.stage!r}: expected {expected}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"StageConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "StageConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
