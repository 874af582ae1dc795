"""Recipes: the stages of a CLIPA run and the demo data they expect, by name.

``DEMO`` trains the ``tiny`` preset on the synthetic texture data (pipelines/demo_data.py)
on a 2-core CPU in about 5 minutes of training (its measured accuracy, and how much the
finetunes add across seeds: README);
``SMOKE`` is the same code path shrunk to run end to end in
about a minute (accuracy irrelevant). The paper's schedules (``PAPER_*``,
never run here) are typed stage configs built by ``paper_stage``: peak LR = base x batch /
256, warmup in steps; ``clipa plan RECIPE`` prices them.

A recipe is data and travels whole: ``load_recipe`` takes a built-in name, the path or
gs:// URI of a YAML / JSON file, or the JSON text itself (what ``clipa submit`` sends), with
the fields of ``Recipe`` and, per stage, of ``StageConfig``:

    base: paper_l14_datacomp        # optional: start from a built-in recipe
    preset: L/14
    stages:
      pretrain: {samples: 2560000000, accum_steps: 4}
      finetune_224: {batch_size: 16384}

``apply_stage_overrides`` applies ``stage_overrides`` (stage -> field -> value) on top, and
``resolve_stage`` gives a training step its whole StageConfig from both.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from clipa_model.config import ConfigError, StageConfig


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
    data: str = "synthetic textures (pipelines/demo_data.py)"
    expected_top1: float | None = None

    def __getitem__(self, name: str) -> StageConfig:
        return self.stages[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def to_dict(self) -> dict:
        """JSON-ready: the recipe fields, stages as StageConfig dicts (``recipe_from_dict``'s input)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stages"}
        return {**out, "stages": {name: cfg.to_dict() for name, cfg in self.stages.items()}}


DEMO = Recipe(
    stages={
        # Small batches: with 10 classes a large contrastive batch is mostly same-class
        # negatives, and more optimiser steps per CPU second matter more than batch size.
        # One torch thread and one loader process fill the 2-core demo machine: two threads
        # next to a busy decoder make OpenMP spin (measured several times slower).
        # The patch embedding stays at its random init in every stage
        # (``patch_embed_lr_scale=0``): trained, it stalled the tiny ViT (at 84 px, 35% top-1
        # after 24,000 samples against 56% frozen; at 224 px from scratch, chance), because
        # AdamW moves it too far per step on smooth images (docs/SCIENCE.md). Crops down to
        # 10% of the image (Inception's usual range starts at 8%): a 10% crop at 84 px
        # magnifies 3.2x, about what the move to 224 px does (2.7x), so the pretraining
        # also learns the textures at the scale the 224 px finetune sees them (measured,
        # 30,000 + 4,096 samples, seed 1: 56.3% -> 73.0% with crops from 10%, 66.7% ->
        # 66.7% from 50%).
        "pretrain": StageConfig(stage="pretrain", image_size=84, text_len=8, mask_ratio=0.0,
                                samples=36_000, batch_size=32, lr=7e-4, warmup_frac=0.05,
                                patch_embed_lr_scale=0.0, crop_scale=(0.1, 1.0),
                                log_every=100, num_threads=1, num_workers=1),
        # Finetunes: 16 tokens, not CLIPA's 32. The demo captions fit in 16, and the text
        # tower pools its last position, which at 32 is padding for every caption (measured
        # at 224 px: 55.0% top-1 with 16, 53.0% with 32). The 224 px finetune's LR from a
        # sweep on the demo data. The 336 px finetune takes a small step: with integer
        # positions every LR tried cost top-1 (seed 2, from 73.0%: 1.5e-4 64.2%, 5e-5 66.2%,
        # 2e-5 67.4%); with interpolated positions (``pos_interpolation``, the default) it
        # gains in 3 seeds of 5, and a larger step is worse (seed 1: 2e-5 68.6%, 6e-5 67.0%;
        # docs/SCIENCE.md, sections 3 and 4).
        "finetune_224": StageConfig(stage="finetune_224", image_size=224, text_len=16,
                                    mask_ratio=0.3, samples=6_016, batch_size=32, lr=3e-4,
                                    warmup_frac=0.1, patch_embed_lr_scale=0.0,
                                    crop_scale=(0.5, 1.0), log_every=20,
                                    num_threads=1, num_workers=1),
        "finetune_336": StageConfig(stage="finetune_336", image_size=336, text_len=16,
                                    mask_ratio=0.4, samples=1_024, batch_size=32, lr=2e-5,
                                    warmup_frac=0.2, patch_embed_lr_scale=0.0,
                                    crop_scale=(0.5, 1.0), log_every=10,
                                    num_threads=1, num_workers=1),
    },
    n_train=4000, eval_per_class=50, image_px=336, seed=1)
# A stage's seed is its recipe's (the pipeline's ``seed`` parameter carries it to every step).
DEMO = dataclasses.replace(DEMO, stages={k: v.replace(seed=DEMO.seed) for k, v in DEMO.items()})

SMOKE = Recipe(
    stages={
        "pretrain": DEMO["pretrain"].replace(samples=1_024, batch_size=64, log_every=2, seed=0),
        "finetune_224": DEMO["finetune_224"].replace(samples=128, batch_size=32, log_every=1,
                                                     seed=0),
        "finetune_336": DEMO["finetune_336"].replace(samples=64, batch_size=32, log_every=1,
                                                     seed=0),
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


# ---------------------------------------------------------------- recipes as data

PIPELINE_STAGES = ("pretrain", "finetune_224", "finetune_336")


def recipe_from_dict(d: Mapping, source: str = "recipe") -> Recipe:
    """A Recipe from its ``to_dict`` form; ``base`` names a built-in recipe to start from.

    Raises:
        ConfigError: an unknown recipe or stage field, or a stage that does not validate,
            naming ``source``.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping with the fields of Recipe, got "
                          f"{type(d).__name__}")
    d = dict(d)
    base = get_recipe(d.pop("base")) if "base" in d else Recipe()
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown Recipe field(s) {unknown}; expected some of "
                          f"{sorted(known | {'base'})}")
    stages = {name: dict(cfg) if isinstance(cfg, Mapping) else cfg
              for name, cfg in (d.pop("stages", None) or {}).items()}
    recipe = dataclasses.replace(base, **d)
    out = dict(recipe.stages)
    for name, fields in stages.items():
        start = out[name].to_dict() if name in out else {"stage": name}
        out[name] = _stage_with(start, fields, f"{source} stages.{name}")
    return dataclasses.replace(recipe, stages=out)


def _stage_with(start: dict, changes, where: str) -> StageConfig:
    """``start`` (a StageConfig dict) with ``changes`` applied, each value type-checked."""
    if not isinstance(changes, Mapping):
        raise ConfigError(f"{where}: expected a mapping of StageConfig fields, got {changes!r}")
    defaults = StageConfig().to_dict()
    unknown = sorted(set(changes) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown StageConfig field(s) {unknown}; known: "
                          f"{sorted(defaults)}")
    typed = {k: _typed(f"{where}.{k}", v, defaults[k]) for k, v in changes.items()}
    try:
        return StageConfig(**{**start, **typed})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _typed(where: str, value, default):
    """``value`` as the type of ``default`` (ints for floats are fine), else ConfigError.

    A whole float for an int field is taken as the int: KFP passes dict parameters through
    protobuf's Struct, whose numbers are all floats.
    """
    kind = type(default)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (list, tuple)) and len(value) == len(default) if kind is tuple
          else isinstance(value, kind))
    if not ok:
        raise ConfigError(f"{where}={value!r}: expected a {kind.__name__} like {default!r}")
    return float(value) if kind is float else value


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name; the error lists them."""
    if name not in PLAN_RECIPES:
        raise ConfigError(f"recipe {name!r}: unknown; expected a built-in name "
                          f"({', '.join(sorted(PLAN_RECIPES))}) or a .yaml/.json recipe file")
    return PLAN_RECIPES[name]


def load_recipe(ref: str) -> Recipe:
    """The recipe ``ref`` names: a built-in name, JSON text, or a YAML / JSON file (local or gs://).

    Raises:
        ConfigError: an unknown name, a file that cannot be read or parsed, or content
            that is not a valid recipe; the message names ``ref``.
    """
    ref = ref.strip()
    if ref in PLAN_RECIPES:
        return PLAN_RECIPES[ref]
    if ref.startswith("{"):
        try:
            return recipe_from_dict(json.loads(ref), "recipe (JSON)")
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"recipe JSON text: cannot parse ({e})") from None
    if not ref.endswith((".yaml", ".yml", ".json")) and "/" not in ref:
        get_recipe(ref)  # raises: an unknown name
    return recipe_from_dict(_read_recipe_file(ref), f"recipe file {ref}")


def _read_recipe_file(path: str):
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "r") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise ConfigError(f"recipe file {path}: cannot read it ({type(e).__name__}: {e}); "
                          "expected a readable .yaml or .json file") from None
    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {path}: not YAML or JSON ({e})") from None


def parse_stage_overrides(overrides) -> dict:
    """``stage_overrides`` as a dict: a mapping, JSON text, or empty ("" / None -> {})."""
    if not overrides:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except ValueError as e:
            raise ConfigError(f"stage_overrides {overrides!r}: not JSON ({e}); expected "
                              '{"STAGE": {"FIELD": VALUE}}') from None
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"stage_overrides={overrides!r}: expected a mapping stage -> field -> value")
    return dict(overrides)


def apply_stage_overrides(recipe: Recipe, overrides) -> Recipe:
    """``recipe`` with ``stage_overrides`` (stage -> field -> value, or its JSON text) applied.

    Raises:
        ConfigError: a stage the recipe does not have, an unknown field, a value of the
            wrong type, or a stage that no longer validates.
    """
    overrides = parse_stage_overrides(overrides)
    unknown = sorted(set(overrides) - set(recipe.stages))
    if unknown:
        raise ConfigError(f"stage_overrides: unknown stage(s) {unknown}; the recipe has "
                          f"{list(recipe.stages)}")
    stages = {name: _stage_with(cfg.to_dict(), overrides.get(name, {}), f"stage_overrides {name}")
              for name, cfg in recipe.stages.items()}
    return dataclasses.replace(recipe, stages=stages)


def check_pipeline_recipe(recipe: Recipe, ref: str = "recipe") -> Recipe:
    """Raise ConfigError unless ``recipe`` has the stages the training pipeline runs."""
    missing = [s for s in PIPELINE_STAGES if s not in recipe.stages]
    if missing:
        raise ConfigError(f"{ref}: no stage(s) {missing}; the training pipeline runs "
                          f"{list(PIPELINE_STAGES)}")
    return recipe


def resolve_stage(recipe_ref: str, stage_overrides, stage: str, **run_fields) -> StageConfig:
    """The whole StageConfig a training step runs: recipe, then ``run_fields``, then overrides.

    Args:
        recipe_ref: a ``load_recipe`` reference; stage: e.g. "finetune_224".
        stage_overrides: stage -> field -> value (or its JSON text); it wins over all.
        run_fields: run-level settings that apply to every stage (e.g. the pipeline's
            ``seed``, loader workers); None values are skipped.
    """
    recipe = load_recipe(recipe_ref)
    if stage not in recipe.stages:
        raise ConfigError(f"stage {stage!r}: not in recipe {recipe_ref[:80]!r} "
                          f"(its stages: {list(recipe.stages)})")
    cfg = recipe.stages[stage].replace(**{k: v for k, v in run_fields.items() if v is not None})
    recipe = dataclasses.replace(recipe, stages={**recipe.stages, stage: cfg})
    return apply_stage_overrides(recipe, stage_overrides).stages[stage]
