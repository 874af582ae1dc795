"""Recipes: the stages of a CLIPA run and the demo data they expect, by name.

``DEMO`` trains the ``tiny`` preset on the synthetic texture data (pipelines/demo_data.py)
on a 2-core CPU in about 5 minutes of training (zero-shot top-1 on its 10 held-out
classes in ``make demo``, seed 1: 57.2% / 63.6% / 62.8% after pretraining / the 224 px / the
336 px finetune; how much the finetunes add varies with the seed, see the README);
``SMOKE`` is the same code path shrunk to run end to end in
about a minute (accuracy irrelevant). The paper's schedules (``PAPER_*``,
never run here) are typed stage configs built by ``paper_stage``: peak LR = base x batch /
256, warmup in steps; ``clipa plan RECIPE`` prices them.
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
        image_px: side of the synthetic images, rendered and downloaded at that size. The
            demo uses the largest finetune resolution (336): smaller sources would be
            upsampled for the last finetune, which then has no detail to learn from.
        preset: model preset the stages were tuned for.
        seed: the pipeline seed of the demo's reported numbers (demo data, shard order,
            model init, crops and masks); ``clipa run --param seed=N`` picks another.
        data: the training data the schedule was run on.
        expected_top1: zero-shot ImageNet-1K top-1 the paper reports (None: not a paper run).
    """

    stages: dict[str, StageConfig] = field(default_factory=dict)
    n_train: int = 0
    eval_per_class: int = 0
    image_px: int = 256
    preset: str = "tiny"
    seed: int = 0
    data: str = "synthetic shapes (pipelines/demo_data.py)"
    expected_top1: float | None = None

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
        # One torch thread and one loader process fill the 2-core demo machine: two threads
        # next to a busy decoder make OpenMP spin (measured several times slower).
        "pretrain": StageConfig(stage="pretrain", image_size=84, text_len=8, mask_ratio=0.0,
                                samples=40_000, batch_size=32, lr=7e-4, warmup_frac=0.05,
                                crop_scale=(0.5, 1.0), log_every=100, num_threads=1,
                                num_workers=1),
        # Finetunes: 16 tokens, not CLIPA's 32. The demo captions fit in 16, and the text
        # tower pools its last position, which at 32 is padding for every caption (measured
        # at 224 px: 55.0% top-1 with 16, 53.0% with 32). LRs and lengths from a sweep on
        # the demo data. Over 6 runs (seeds and shard orders) the 224 px finetune moved
        # top-1 by +6.2, +6.4, +7.4, +10.0, -4.4 and -5.8 points: at 224 px a texture
        # period spans 2.7x the patches it did at 84 px, and in some runs the tiny ViT's
        # 84 px features for a class (often checkerboard) do not carry over.
        "finetune_224": StageConfig(stage="finetune_224", image_size=224, text_len=16,
                                    mask_ratio=0.3, samples=6_000, batch_size=32, lr=3e-4,
                                    warmup_frac=0.1, crop_scale=(0.5, 1.0), log_every=20,
                                    num_threads=1, num_workers=1),
        "finetune_336": StageConfig(stage="finetune_336", image_size=336, text_len=16,
                                    mask_ratio=0.4, samples=2_000, batch_size=32, lr=1.5e-4,
                                    warmup_frac=0.2, crop_scale=(0.5, 1.0), log_every=10,
                                    num_threads=1, num_workers=1),
    },
    n_train=4000, eval_per_class=50, image_px=336, seed=1)

SMOKE = Recipe(
    stages={
        "pretrain": DEMO["pretrain"].replace(samples=1_024, batch_size=64, log_every=2),
        "finetune_224": DEMO["finetune_224"].replace(samples=128, batch_size=32, log_every=1),
        "finetune_336": DEMO["finetune_336"].replace(samples=64, batch_size=32, log_every=1),
    },
    n_train=256, eval_per_class=4, image_px=256)

def paper_stage(stage: str, image_size: int, text_len: int, samples: int, batch_size: int,
                base_lr: float, warmup_steps: int, mask_ratio: float = 0.0,
                text_reduction: str = "truncate") -> StageConfig:
    """A stage as the CLIPA papers state it: peak LR = ``base_lr`` x batch / 256, warmup in steps.

    Everything else is the CLIPA-v2 default: AdamW(0.9, 0.95), weight decay 0.2 on weight
    matrices, cosine to 0, inception crop 40-100%, bf16, random patch masking.
    """
    steps = -(-samples // batch_size)
    return StageConfig(stage=stage, image_size=image_size, text_len=text_len,
                       mask_ratio=mask_ratio, samples=samples, batch_size=batch_size,
                       lr=base_lr * batch_size / 256, warmup_frac=warmup_steps / steps,
                       crop_scale=(0.4, 1.0), text_reduction=text_reduction,
                       checkpoint_minutes=30.0, log_every=100)


def paper_schedule(pretrain_px: int = 84, finetune_336: bool = True) -> dict[str, StageConfig]:
    """CLIPA-v2's schedule: 12.8B@84 (8 tokens, syntax masking) + 512M@224 (30% masked) +
    128M@336 (40% masked) (docs/PAPER.md, recipe table)."""
    stages = {
        "pretrain": paper_stage("pretrain", pretrain_px, 8, 12_800_000_000, 65_536, 8e-6, 3_200,
                                text_reduction="syntax"),
        "finetune_224": paper_stage("finetune_224", 224, 32, 512_000_000, 32_768, 4e-7, 800,
                                    mask_ratio=0.3),
    }
    if finetune_336:
        stages["finetune_336"] = paper_stage("finetune_336", 336, 32, 128_000_000, 16_384,
                                             1e-7, 1_600, mask_ratio=0.4)
    return stages


# The paper's runs (never run here; ``clipa plan RECIPE`` prices them). expected_top1 is the
# zero-shot ImageNet-1K top-1 the paper reports for the finished schedule.
PAPER_H14 = Recipe(stages=paper_schedule(), preset="H/14", data="LAION-2B", expected_top1=79.1)
PAPER_H14_DATACOMP = Recipe(stages=paper_schedule(), preset="H/14", data="DataComp-1B",
                            expected_top1=81.8)
PAPER_H14_70PX = Recipe(stages=paper_schedule(pretrain_px=70, finetune_336=False), preset="H/14",
                        data="DataComp-1B", expected_top1=81.1)
PAPER_L14_DATACOMP = Recipe(stages=paper_schedule(), preset="L/14", data="DataComp-1B",
                            expected_top1=80.3)
PAPER_BIGG14_DATACOMP = Recipe(stages=paper_schedule(), preset="bigG/14", data="DataComp-1B",
                               expected_top1=83.0)

# Recipes the pipeline can run: pretrain, finetune_224, finetune_336.
RECIPES: dict[str, Recipe] = {
    "demo": DEMO, "smoke": SMOKE, "paper_h14": PAPER_H14,
    "paper_h14_datacomp": PAPER_H14_DATACOMP, "paper_l14_datacomp": PAPER_L14_DATACOMP,
    "paper_bigg14_datacomp": PAPER_BIGG14_DATACOMP,
}
# Everything ``clipa plan`` can price, including schedules with other stage lists.
PLAN_RECIPES: dict[str, Recipe] = {**RECIPES, "paper_h14_70px": PAPER_H14_70PX}


def finetune_stage(image_size: int, recipe: Recipe = DEMO, **overrides) -> StageConfig:
    """The recipe's finetune stage for ``image_size`` (e.g. "finetune_336") with overrides.

    An image size the recipe does not name starts from its 224 stage, renamed.
    """
    name = f"finetune_{image_size}"
    base = recipe.stages.get(name, recipe.stages["finetune_224"])
    return base.replace(stage=name, image_size=image_size, **overrides)
