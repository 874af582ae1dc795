"""Training steps: ``pretrain`` (84 px, 8 tokens) and ``finetune`` (224/336 px, 32 tokens).

The work is ``clipa_model.train_stage.train_stage``, a plain function (tests and the CLI call
it directly). The two KFP components resolve their stage from the recipe and
``stage_overrides`` and launch it on every process of every node (``launch_training_step``,
``clipa_model/launch.py``): the same component locally and as a Vertex AI custom job.

    python -m components.train DATA_DIR OUT_DIR --stage pretrain [--init INIT_DIR]
    python -m components.train DATA OUT --recipe paper_h14 --procs-per-node 8 --set device=cuda

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


def launch_training_step(stage_name: str, data_dir: str, output_dir: str, metrics, recipe: str,
                         stage_overrides, preset: str = "", seed: int = -1,
                         loader_workers: int = -1, torch_threads: int = -1,
                         procs_per_node: int = 0, init: str = "", checkpoint_root: str = "",
                         checkpoint_every: int = -1, checkpoint_minutes: float = -1.0,
                         eval_set=None, zeroshot_every: int = -1,
                         report_to: str = "tensorboard", resume_from: str = "") -> dict | None:
    """What both training components do: resolve the stage, launch its processes, report.

    Everything is checked before any process starts: the data artifact, the recipe and overrides
    (``recipes.resolve_stage``), the process count against the accelerators present and
    the batch against world size x accum_steps. On a multi-node job only global rank 0
    writes the Model artifact and the metrics. The parameters follow the components' own
    order, so both pass theirs through unchanged and the settings are converted here once.

    Args:
        stage_name: the recipe's stage ("pretrain", "finetune_224", ...).
        recipe, stage_overrides: as the pipeline parameters (``recipes.load_recipe``).
        preset: a fresh model's preset ("" = the recipe's); ignored when starting from ``init``.
        seed, loader_workers, torch_threads: run-level settings of every stage (-1 = the
            recipe's).
        procs_per_node: training processes per node (0 = one per accelerator).
        init: the model to start from: a Model artifact folder or ``open_clip:NAME:FILE``.
        checkpoint_every, checkpoint_minutes, zeroshot_every: more run-level StageConfig
            fields (negative = the recipe's).
        checkpoint_root, report_to, resume_from: ``train_stage``'s options as the components
            take them; checkpoint_root "" = PIPELINE_ROOT/checkpoints, resume_from "" = none.
        eval_set: the eval-set Dataset artifact for zero-shot probes, or None.
    Returns:
        Rank 0's ``train_stage`` result (None on nodes other than the primary).
    """
    from clipa_model.data import list_train_shards
    from clipa_model.launch import launch, node_layout
    from clipa_model.recipes import load_recipe, resolve_stage
    from clipa_model.train_stage import check_batch, stage_worker

    list_train_shards(data_dir)  # a bad / empty data artifact fails here, not in every rank

    def given(v):
        return None if v < 0 else v

    stage = resolve_stage(recipe, stage_overrides, stage_name, seed=given(seed),
                          num_workers=given(loader_workers), num_threads=given(torch_threads),
                          checkpoint_every=given(checkpoint_every),
                          checkpoint_minutes=given(checkpoint_minutes),
                          zeroshot_every=given(zeroshot_every))
    options = dict(checkpoint_root=checkpoint_root or default_checkpoint_root(output_dir),
                   report_to=report_to, resume_from=resume_from or None,
                   eval_set=eval_set.path if eval_set is not None else None)
    layout = node_layout(procs_per_node, stage.device)
    check_batch(stage, layout.world_size)
    preset = None if init else (preset or load_recipe(recipe).preset)
    log.info("%s: %s", stage_name, json.dumps({"stage": stage.to_dict(), **layout.to_dict()}))
    result = launch(stage_worker, (data_dir, output_dir, stage, preset, init or None, None,
                                   layout, options), layout)
    if result is not None:  # None on other nodes: the primary writes the outputs (and kfp's
        _log_metrics(metrics, result)  # executor writes its output file on workerpool0 only)
    return result


# Component defaults are literals (KFP runs the function's source text alone in the
# container). recipe + stage_overrides carry every StageConfig field (recipes.py);
# -1 / "" mean "the recipe's".
@clipa_component(TRAIN_IMAGE)
def pretrain(data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             recipe: str = "demo", stage_overrides: dict = {}, preset: str = "",
             seed: int = -1, loader_workers: int = -1, torch_threads: int = -1,
             procs_per_node: int = 0, init: str = "", checkpoint_root: str = "",
             checkpoint_every: int = -1, checkpoint_minutes: float = -1.0,
             eval_set: Input[Dataset] = None, zeroshot_every: int = -1,
             report_to: str = "tensorboard", resume_from: str = ""):
    """CLIPA pretraining at low resolution and few text tokens (the recipe's "pretrain").

    ``recipe``: a built-in name, a YAML/JSON file (local or gs://) or its JSON text;
    ``stage_overrides``: {"pretrain": {"samples": 2000}}. ``procs_per_node``: training
    processes per node (0 = one per accelerator; on a CPU, N gloo processes); the nodes of a
    multi-replica custom job come from CLUSTER_SPEC. ``init``: start from a Model artifact
    or ``open_clip:NAME:FILE`` instead of a fresh ``preset`` model.
    ``checkpoint_root``: resumable checkpoints go to CHECKPOINT_ROOT/<stage>-<identity key>
    (default: PIPELINE_ROOT/checkpoints), so a rerun or resubmission with the same inputs
    resumes; ``checkpoint_every`` steps / ``checkpoint_minutes`` (-1 = the recipe's);
    ``eval_set`` + ``zeroshot_every`` samples: zero-shot probes during training;
    ``report_to``: "tensorboard" and/or "wandb"; ``resume_from``: a checkpoint folder to
    continue with a lower lr after a divergence.

    Outputs:
        model: Model artifact folder (checkpoint.pt, resolved_config.json, ...), rank 0's.
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from components.train import launch_training_step

    launch_training_step("pretrain", data.path, model.path, metrics, recipe, stage_overrides,
                         preset, seed, loader_workers, torch_threads, procs_per_node, init,
                         checkpoint_root, checkpoint_every, checkpoint_minutes, eval_set,
                         zeroshot_every, report_to, resume_from)


@clipa_component(TRAIN_IMAGE)
def finetune(data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             init_model: Input[Model] = None, stage: str = "finetune_224",
             recipe: str = "demo", stage_overrides: dict = {}, seed: int = -1,
             loader_workers: int = -1, torch_threads: int = -1, procs_per_node: int = 0,
             init: str = "", checkpoint_root: str = "", checkpoint_every: int = -1,
             checkpoint_minutes: float = -1.0, eval_set: Input[Dataset] = None,
             zeroshot_every: int = -1, report_to: str = "tensorboard", resume_from: str = ""):
    """CLIPA finetuning at higher resolution with random patch masking (the recipe's ``stage``).

    Starts from ``init_model`` (a Model artifact) or, without one, from ``init``
    (``open_clip:NAME:FILE``, e.g. a released CLIPA-v2 checkpoint). Other parameters as in
    ``pretrain``.

    Outputs:
        model: Model artifact folder, same preset as the init model.
        metrics: final_loss, samples_seen, samples_per_s, seconds.
    """
    from components.train import launch_training_step

    start = init_model.path if init_model is not None else init
    if not start:
        raise ValueError(f"finetune {stage}: give init_model (a Model artifact) or init "
                         "(open_clip:NAME:FILE); a finetune starts from a trained model")
    launch_training_step(stage, data.path, model.path, metrics, recipe, stage_overrides, "", seed,
                         loader_workers, torch_threads, procs_per_node, start, checkpoint_root,
                         checkpoint_every, checkpoint_minutes, eval_set, zeroshot_every,
                         report_to, resume_from)


def main(argv: list[str] | None = None) -> None:
    """Command line: run one stage of a recipe on local / gs:// folders, on every process of
    this node (``--procs-per-node``) and of the job's nodes (CLUSTER_SPEC)."""
    from clipa_model.launch import launch, node_layout
    from clipa_model.recipes import load_recipe, resolve_stage
    from clipa_model.train_stage import check_batch, stage_worker
    from components.cli_args import json_items, key_value

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--stage", default="pretrain", help="stage name in the recipe")
    ap.add_argument("--recipe", default="demo",
                    help="built-in recipe name or a .yaml/.json recipe file (local or gs://)")
    ap.add_argument("--init", default=None,
                    help="Model artifact or open_clip:NAME:FILE to start from")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--procs-per-node", type=int, default=0,
                    help="training processes on this node (0 = one per accelerator)")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from clipa_model.data import list_train_shards

    list_train_shards(args.data_dir)  # before any process starts
    stage = resolve_stage(args.recipe, {args.stage: json_items(args.set)}, args.stage)
    layout = node_layout(args.procs_per_node, stage.device)
    check_batch(stage, layout.world_size)
    preset = args.preset or (None if args.init else load_recipe(args.recipe).preset)
    options = dict(checkpoint_root=args.checkpoint_root, resume_from=args.resume_from,
                   eval_set=args.eval_set, report_to=args.report_to)
    result = launch(stage_worker, (args.data_dir, args.output_dir, stage, preset, args.init,
                                   args.checkpoint_dir, layout, options), layout)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.train"))
