"""Recipes: the stages of a CLIPA run and the demo data they expect, by name.

``DEMO`` trains the ``tiny`` preset on the synthetic shapes data (pipelines/demo_data.py)
on a 2-core CPU in about 6 minutes of training; ``SMOKE`` is the same code path shrunk to
run end to end in about a minute (accuracy irrelevant). The paper's schedule, for
reference, is ``PAPER_H14`` (never run here).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from clipa_model.config import StageConfig


@dataclass(frozen=True)
class Recipe(Mapping):
    """Stages in order (name -> StageConfig) plus the demo data sizes they were tuned on.

    A read-only mapping: ``DEMO["pretrain"]``, ``list(DEMO)``, ``DEMO.items()``.

    Attributes:
        stages: "pretrain", "finetune_224", "finetune_336" -> StageConfig.
        n_train: synthetic training images to generate.
        eval_per_class: held-out eval images per class.
        preset: model preset the stages were tuned for.
    """

    stages: dict[str, StageConfig] = field(default_factory=dict)
    n_train: int = 0
    eval_per_class: int = 0
    preset: str = "tiny"

    def __getitem__(self, name: str) -> StageConfig:
        return self.stages[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)


DEMO = Recipe(
    stages={
        # Small batches: with 10 classes a large contrastive batch is mostly same-class
        # negatives, and more optimiser steps per CPU second matter more than batch size.
        "pretrain": StageConfig(stage="pretrain", image_size=84, text_len=8, mask_ratio=0.0,
                                samples=96_000, batch_size=32, lr=7e-4, warmup_frac=0.05,
                                crop_scale=(0.5, 1.0), log_every=100),
        "finetune_224": StageConfig(stage="finetune_224", image_size=224, text_len=32,
                                    mask_ratio=0.3, samples=1_536, batch_size=32, lr=1e-4,
                                    warmup_frac=0.1, crop_scale=(0.5, 1.0)),
        "finetune_336": StageConfig(stage="finetune_336", image_size=336, text_len=32,
                                    mask_ratio=0.4, samples=768, batch_size=32, lr=5e-5,
                                    warmup_frac=0.2, crop_scale=(0.5, 1.0)),
    },
    n_train=4000, eval_per_class=50)

SMOKE = Recipe(
    stages={
        "pretrain": DEMO["pretrain"].replace(samples=1_024, batch_size=64, log_every=2),
        "finetune_224": DEMO["finetune_224"].replace(samples=128, batch_size=32, log_every=1),
        "finetune_336": DEMO["finetune_336"].replace(samples=64, batch_size=32, log_every=1),
    },
    n_train=256, eval_per_class=4)

# CLIPA-v2 H/14 on LAION-2B (CLIPA_REFERENCE.md): peak LR = base x batch / 256.
PAPER_H14 = Recipe(
    stages={
        "pretrain": StageConfig(stage="pretrain", image_size=84, text_len=8, mask_ratio=0.0,
                                samples=12_800_000_000, batch_size=65_536,
                                lr=8e-6 * 65_536 / 256, warmup_frac=3_200 / 195_313,
                                crop_scale=(0.4, 1.0)),
        "finetune_224": StageConfig(stage="finetune_224", image_size=224, text_len=32,
                                    mask_ratio=0.3, samples=512_000_000, batch_size=32_768,
                                    lr=4e-7 * 32_768 / 256, warmup_frac=800 / 15_625,
                                    crop_scale=(0.4, 1.0)),
        "finetune_336": StageConfig(stage="finetune_336", image_size=336, text_len=32,
                                    mask_ratio=0.4, samples=128_000_000, batch_size=16_384,
                                    lr=1e-7 * 16_384 / 256, warmup_frac=1_600 / 7_813,
                                    crop_scale=(0.4, 1.0)),
    },
    preset="H/14")

RECIPES: dict[str, Recipe] = {"demo": DEMO, "smoke": SMOKE, "paper_h14": PAPER_H14}


def finetune_stage(image_size: int, recipe: Recipe = DEMO, **overrides) -> StageConfig:
    """The recipe's finetune stage for ``image_size`` (e.g. "finetune_336") with overrides.

    An image size the recipe does not name starts from its 224 stage, renamed.
    """
    name = f"finetune_{image_size}"
    base = recipe.stages.get(name, recipe.stages["finetune_224"])
    return base.replace(stage=name, image_size=image_size, **overrides)
