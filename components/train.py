"""Training steps: ``pretrain`` (84 px, 8 tokens) and ``finetune`` (224/336 px, 32 tokens).

The work is ``run_train_stage``, a plain function (tests and the CLI call it directly);
the two KFP components only turn their artifacts and parameters into a call to it.

    python -m components.train DATA_DIR OUT_DIR --stage pretrain [--init INIT_DIR]

No ``from __future__ import annotations`` here: KFP reads the artifact annotations as objects.
"""
import argparse
import json
import logging
import time

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from clipa_model.config import ConfigError, StageConfig
from components.base import TRAIN_IMAGE, clipa_component

log = logging.getLogger("clipa.train")


def _init_model(stage: StageConfig, preset: str | None, init_model_dir: str | None):
    """A fresh model (seeded) or the init checkpoint rebuilt at this stage's sizes."""
    import torch

    from clipa_model.checkpoint import load_model, read_model_config
    from clipa_model.model import build_model
    from clipa_model.presets import get_preset

    if init_model_dir is None:
        preset = preset or "tiny"
        stage.validate(get_preset(preset).patch_size)
        torch.manual_seed(stage.seed)
        return build_model(preset, stage.image_size, stage.text_len, stage.mask_ratio), preset
    init_preset = read_model_config(init_model_dir)["preset"]
    if preset is not None and preset != init_preset:
        raise ConfigError(f"preset={preset!r} differs from the init model's "
                          f"{init_preset!r} ({init_model_dir}); leave preset unset to finetune")
    stage.validate(get_preset(init_preset).patch_size)
    model, _ = load_model(init_model_dir, stage.image_size, stage.text_len, stage.mask_ratio)
    return model, init_preset


def run_train_stage(data_dir: str, output_dir: str, stage: StageConfig,
                    preset: str | None = None, init_model_dir: str | None = None) -> dict:
    """Train one stage on a ``filtered_shards`` artifact and write a ``model`` artifact.

    Args:
        data_dir: filtered_shards folder (shard-NNNNN.tar, manifest.json, marker).
        output_dir: Model artifact folder to create.
        stage: sizes, samples, batch size, optimizer settings.
        preset: model preset for a fresh model ("tiny" when unset); with
            ``init_model_dir`` the checkpoint's preset is used (a different one is an error).
        init_model_dir: Model artifact to start from (finetuning), rebuilt at the stage's
            image size and text length.

    Returns:
        The model marker plus "samples_per_s" and "data_count".
    """
    import torch

    from clipa_model.checkpoint import save_model_artifact
    from clipa_model.data import list_train_shards, train_batches
    from clipa_model.model import flops_per_sample, get_tokenizer
    from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
    from clipa_model.train import set_threads, summarize, train_loop

    _, data_count = list_train_shards(data_dir)  # fails early on a bad / empty artifact
    set_threads(stage)
    model, preset = _init_model(stage, preset, init_model_dir)
    torch.manual_seed(stage.seed)  # patch masks
    tokenizer = get_tokenizer(preset, stage.text_len)
    batches = train_batches(data_dir, stage.image_size, stage.batch_size, stage.steps, tokenizer,
                            stage.crop_scale, stage.seed, stage.num_workers)
    flops = flops_per_sample(preset, stage.image_size, stage.text_len, stage.mask_ratio)
    log.info("%s: %s at %d px, %d tokens, mask %.2f; %d samples in %d steps of %d "
             "(%.2f epochs of %d); %.2f GFLOP/sample", stage.stage, preset, stage.image_size,
             stage.text_len, stage.mask_ratio, stage.samples, stage.steps, stage.batch_size,
             stage.steps * stage.batch_size / data_count, data_count, flops / 1e9)
    t0 = time.perf_counter()
    history = train_loop(model, batches, stage, IMAGE_MEAN, IMAGE_STD, flops)
    summary = summarize(history, time.perf_counter() - t0)
    marker = save_model_artifact(output_dir, model, preset, stage, history, summary)
    return {**marker, "samples_per_s": summary["samples_per_s"], "data_count": data_count}


def _log_metrics(metrics, result: dict) -> None:
    for key in ("final_loss", "samples_seen", "samples_per_s", "seconds"):
        metrics.log_metric(key, float(result[key]))


# Component defaults are literals (KFP runs the function's source text alone in the
# container); tests/test_train.py checks that they equal the DEMO recipe.
@clipa_component(TRAIN_IMAGE)
def pretrain(data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             preset: str = "tiny", image_size: int = 84, text_len: int = 8,
             samples: int = 96_000, batch_size: int = 32, lr: float = 7e-4, seed: int = 0):
    """CLIPA pretraining at low resolution and few text tokens, from scratch.

    Outputs:
        model: Model artifact folder (checkpoint.pt, model_config.json, ...).
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import DEMO
    from components.train import _log_metrics, run_train_stage

    stage = DEMO["pretrain"].replace(image_size=image_size, text_len=text_len, samples=samples,
                                     batch_size=batch_size, lr=lr, seed=seed)
    _log_metrics(metrics, run_train_stage(data.path, model.path, stage, preset=preset))


@clipa_component(TRAIN_IMAGE)
def finetune(data: Input[Dataset], init_model: Input[Model], model: Output[Model],
             metrics: Output[Metrics], image_size: int = 224, text_len: int = 32,
             mask_ratio: float = 0.3, samples: int = 1_536, batch_size: int = 32,
             lr: float = 1e-4, seed: int = 0):
    """CLIPA finetuning at higher resolution with random patch masking.

    Outputs:
        model: Model artifact folder, same preset as ``init_model``.
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import finetune_stage
    from components.train import _log_metrics, run_train_stage

    stage = finetune_stage(image_size, text_len=text_len, mask_ratio=mask_ratio,
                           samples=samples, batch_size=batch_size, lr=lr, seed=seed)
    _log_metrics(metrics, run_train_stage(data.path, model.path, stage,
                                          init_model_dir=init_model.path))


def main(argv: list[str] | None = None) -> None:
    """Command line: run one stage of a recipe on local / gs:// folders."""
    from clipa_model.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--stage", default="pretrain", help="stage name in the recipe")
    ap.add_argument("--recipe", default="demo", choices=sorted(RECIPES))
    ap.add_argument("--init", default=None, help="Model artifact to finetune")
    ap.add_argument("--preset", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stage = RECIPES[args.recipe].stages[args.stage]
    print(json.dumps(run_train_stage(args.data_dir, args.output_dir, stage, args.preset,
                                     args.init), indent=2, default=str))


if __name__ == "__main__":
    main()
