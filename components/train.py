"""Training steps: ``pretrain`` (84 px, 8 tokens) and ``finetune`` (224/336 px, 32 tokens).

The work is ``clipa_model.train_stage.train_stage``, a plain function (tests and the CLI call
it directly); the two KFP components only turn their artifacts and parameters into a call to it.

    python -m components.train DATA_DIR OUT_DIR --stage pretrain [--init INIT_DIR]
    torchrun --nproc_per_node 8 -m components.train DATA OUT --recipe paper_h14 --set device=cuda

No ``from __future__ import annotations`` here: KFP reads the artifact annotations as objects.
"""
import argparse
import json
import logging

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.clipa_component import TRAIN_IMAGE, clipa_component

log = logging.getLogger("clipa.train")


def _log_metrics(metrics, result: dict) -> None:
    for key in ("final_loss", "samples_seen", "samples_per_s", "seconds"):
        metrics.log_metric(key, float(result[key]))


# Component defaults are literals (KFP runs the function's source text alone in the
# container); tests/clipa_model/test_train.py checks that they equal the DEMO recipe.
@clipa_component(TRAIN_IMAGE)
def pretrain(data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             preset: str = "tiny", image_size: int = 84, text_len: int = 8,
             samples: int = 40_000, batch_size: int = 32, lr: float = 7e-4, seed: int = 0,
             loader_workers: int = 1, torch_threads: int = 1):
    """CLIPA pretraining at low resolution and few text tokens, from scratch.

    ``loader_workers`` / ``torch_threads``: data loader processes per training process and
    torch intra-op threads (0 = all cores); the defaults suit the 2-core demo machine, a
    GPU machine wants e.g. 8 workers per GPU.

    Outputs:
        model: Model artifact folder (checkpoint.pt, model_config.json, ...).
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import DEMO
    from clipa_model.train_stage import train_stage
    from components.train import _log_metrics

    stage = DEMO["pretrain"].replace(image_size=image_size, text_len=text_len, samples=samples,
                                     batch_size=batch_size, lr=lr, seed=seed,
                                     num_workers=loader_workers, num_threads=torch_threads)
    _log_metrics(metrics, train_stage(data.path, model.path, stage, preset=preset))


@clipa_component(TRAIN_IMAGE)
def finetune(data: Input[Dataset], init_model: Input[Model], model: Output[Model],
             metrics: Output[Metrics], image_size: int = 224, text_len: int = 16,
             mask_ratio: float = 0.3, samples: int = 6_000, batch_size: int = 32,
             lr: float = 3e-4, seed: int = 0, loader_workers: int = 1, torch_threads: int = 1):
    """CLIPA finetuning at higher resolution with random patch masking.

    ``loader_workers`` / ``torch_threads``: as in ``pretrain``.

    Outputs:
        model: Model artifact folder, same preset as ``init_model``.
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import finetune_stage
    from clipa_model.train_stage import train_stage
    from components.train import _log_metrics

    stage = finetune_stage(image_size, text_len=text_len, mask_ratio=mask_ratio,
                           samples=samples, batch_size=batch_size, lr=lr, seed=seed,
                           num_workers=loader_workers, num_threads=torch_threads)
    _log_metrics(metrics, train_stage(data.path, model.path, stage,
                                          init_model_dir=init_model.path))


def main(argv: list[str] | None = None) -> None:
    """Command line: run one stage of a recipe on local / gs:// folders (also under torchrun)."""
    from clipa_model.distributed import resolve_dist_env
    from components.cli_args import json_items, key_value
    from clipa_model.recipes import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--stage", default="pretrain", help="stage name in the recipe")
    ap.add_argument("--recipe", default="demo", choices=sorted(RECIPES))
    ap.add_argument("--init", default=None, help="Model artifact to finetune")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--checkpoint-dir", default=None,
                    help="resumable checkpoints, local or gs:// (default OUTPUT/checkpoints)")
    ap.add_argument("--set", action="append", default=[], type=key_value("--set", "VALUE"),
                    metavar="FIELD=VALUE",
                    help="override a StageConfig field, e.g. --set device=cuda (repeatable)")
    args = ap.parse_args(argv)
    from clipa_model.train_stage import train_stage

    rank = resolve_dist_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s")
    stage = RECIPES[args.recipe].stages[args.stage]
    stage = stage.replace(**json_items(args.set, stage.to_dict(), what="StageConfig field (--set)"))
    result = train_stage(args.data_dir, args.output_dir, stage, args.preset, args.init,
                             args.checkpoint_dir)
    if rank == 0:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.train"))
