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
    for key in ("final_loss", "samples_seen", "samples_per_s", "seconds", "resumed_from"):
        metrics.log_metric(key, float(result[key]))


def default_checkpoint_root(model_path: str) -> str:
    """PIPELINE_ROOT/checkpoints, from a step's output path (the root when none is given).

    An output artifact sits at ROOT/<run>/<task>/<output> under kfp.local and at
    ROOT/<project number>/<job>/<task>/<output> on Vertex AI: three levels up is a folder
    that a rerun or a resubmitted job shares (not the job's own folder). An output path
    with fewer levels keeps its checkpoints beside it.
    """
    parts = model_path.rstrip("/").split("/")
    if len(parts) < 5:
        return model_path.rstrip("/") + "-checkpoints"
    return "/".join(parts[:-3] + ["checkpoints"])


def _train_options(model, eval_set, checkpoint_root: str, report_to: str,
                   resume_from: str) -> dict:
    """The keyword arguments of ``train_stage`` that the two components share."""
    return {"checkpoint_root": checkpoint_root or default_checkpoint_root(model.path),
            "eval_set": eval_set.path if eval_set is not None else None,
            "report_to": report_to, "resume_from": resume_from or None}


# Component defaults are literals (KFP runs the function's source text alone in the
# container); tests/clipa_model/test_train.py checks that they equal the DEMO recipe.
@clipa_component(TRAIN_IMAGE)
def pretrain(data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             preset: str = "tiny", image_size: int = 84, text_len: int = 8,
             samples: int = 40_000, batch_size: int = 32, lr: float = 7e-4, seed: int = 0,
             loader_workers: int = 1, torch_threads: int = 1, checkpoint_root: str = "",
             checkpoint_every: int = 0, checkpoint_minutes: float = 10.0,
             eval_set: Input[Dataset] = None, zeroshot_every: int = 0,
             report_to: str = "tensorboard", resume_from: str = ""):
    """CLIPA pretraining at low resolution and few text tokens, from scratch.

    ``loader_workers`` / ``torch_threads``: data loader processes per training process and
    torch intra-op threads (0 = all cores); the defaults suit the 2-core demo machine, a
    GPU machine wants e.g. 8 workers per GPU.
    ``checkpoint_root``: resumable checkpoints go to CHECKPOINT_ROOT/<stage>-<identity key>
    (default: PIPELINE_ROOT/checkpoints), so a rerun or resubmission with the same inputs
    resumes, every ``checkpoint_every`` steps and / or ``checkpoint_minutes``; ``eval_set`` + ``zeroshot_every``: zero-shot probes during training;
    ``report_to``: "tensorboard" and/or "wandb"; ``resume_from``: a checkpoint folder to
    continue with a lower ``lr`` after a divergence.

    Outputs:
        model: Model artifact folder (checkpoint.pt, model_config.json, ...).
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import DEMO
    from clipa_model.train_stage import train_stage
    from components.train import _log_metrics

    from components.train import _train_options

    stage = DEMO["pretrain"].replace(image_size=image_size, text_len=text_len, samples=samples,
                                     batch_size=batch_size, lr=lr, seed=seed,
                                     num_workers=loader_workers, num_threads=torch_threads,
                                     zeroshot_every=zeroshot_every,
                                     checkpoint_every=checkpoint_every,
                                     checkpoint_minutes=checkpoint_minutes)
    _log_metrics(metrics, train_stage(data.path, model.path, stage, preset=preset,
                                      **_train_options(model, eval_set, checkpoint_root,
                                                       report_to, resume_from)))


@clipa_component(TRAIN_IMAGE)
def finetune(data: Input[Dataset], init_model: Input[Model], model: Output[Model],
             metrics: Output[Metrics], image_size: int = 224, text_len: int = 16,
             mask_ratio: float = 0.3, samples: int = 6_000, batch_size: int = 32,
             lr: float = 3e-4, seed: int = 0, loader_workers: int = 1, torch_threads: int = 1,
             checkpoint_root: str = "", checkpoint_every: int = 0,
             checkpoint_minutes: float = 10.0, eval_set: Input[Dataset] = None,
             zeroshot_every: int = 0, report_to: str = "tensorboard", resume_from: str = ""):
    """CLIPA finetuning at higher resolution with random patch masking.

    ``loader_workers``, ``torch_threads``, ``checkpoint_root``, ``checkpoint_every``,
    ``checkpoint_minutes``, ``eval_set``,
    ``zeroshot_every``, ``report_to``, ``resume_from``: as in ``pretrain``.

    Outputs:
        model: Model artifact folder, same preset as ``init_model``.
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from clipa_model.recipes import finetune_stage
    from clipa_model.train_stage import train_stage
    from components.train import _log_metrics

    from components.train import _train_options

    stage = finetune_stage(image_size, text_len=text_len, mask_ratio=mask_ratio,
                           samples=samples, batch_size=batch_size, lr=lr, seed=seed,
                           num_workers=loader_workers, num_threads=torch_threads,
                           zeroshot_every=zeroshot_every, checkpoint_every=checkpoint_every,
                           checkpoint_minutes=checkpoint_minutes)
    _log_metrics(metrics, train_stage(data.path, model.path, stage,
                                      init_model_dir=init_model.path,
                                      **_train_options(model, eval_set, checkpoint_root,
                                                       report_to, resume_from)))


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
                    help="resumable checkpoints, local or gs://, used as given")
    ap.add_argument("--checkpoint-root", default=None,
                    help="keep checkpoints in CHECKPOINT_ROOT/<stage>-<identity key>, so that a "
                         "rerun with the same inputs resumes (default: OUTPUT/checkpoints)")
    ap.add_argument("--resume-from", default=None,
                    help="checkpoint folder to continue with another lr (after a divergence)")
    ap.add_argument("--eval-set", default=None,
                    help="eval set for zero-shot probes every zeroshot_every samples (--set)")
    ap.add_argument("--report-to", default="tensorboard",
                    help="live metrics: tensorboard, wandb, both comma-separated, or none")
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
                         args.checkpoint_dir, checkpoint_root=args.checkpoint_root,
                         resume_from=args.resume_from, eval_set=args.eval_set,
                         report_to=args.report_to)
    if rank == 0:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.train"))
