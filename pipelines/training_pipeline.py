"""The full CLIPA training pipeline: URL list -> zero-shot-evaluated model.

download -> filter_shard -> pretrain (84 px) -> finetune (224 px) -> finetune (336 px),
with a zero-shot evaluation after each training stage, a summary, and an ``export`` of the
final model (open_clip / Hugging Face Hub folder with a model card). Given a serving image
(``registry_serving_image``), the export is also uploaded to Vertex AI Model Registry with
google-cloud-pipeline-components' ``ModelUploadOp`` (Vertex AI only).

Per-step machines and images are chosen at compile time: ``place_pipeline(clipa_training,
get_placement("a3-highgpu-8g"))`` (pipelines/placement.py).

The training stages' settings travel whole as data: ``recipe`` (a built-in name, a YAML /
JSON file or its JSON text) and ``stage_overrides`` (stage -> field -> value); each training
step resolves its whole StageConfig from them (``recipes.resolve_stage``) and records it in
its Model artifact's resolved_config.json. ``pipeline_arguments(recipe, ref)`` gives the
parameters that run a recipe.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset

from clipa_model import recipes
from components import evaluate as evaluate_module, export as export_module, run_report, train
from components.filter_shard import component as filter_module
from components.filter_shard.existing import import_shards
from pipelines import data_source
from pipelines.placement import PlacedStep
from pipelines.publish import register_model

# Steps follow the placement active at compile time (pipelines/placement.py); compiled as
# they are (pipeline.yaml, clipa run) each one is its plain component. The data source
# step (download or import_shards) is placed as "download" where the pipeline is traced.
filter_shard = PlacedStep("filter_shard", filter_module.filter_shard)
pretrain = PlacedStep("pretrain", train.pretrain)
finetune = PlacedStep("finetune", train.finetune)
evaluate = PlacedStep("evaluate", evaluate_module.evaluate)
summarize = PlacedStep("summarize", run_report.summarize)
export = PlacedStep("export", export_module.export)

PIPELINE_NAME = "clipa-training"


def pipeline_arguments(recipe: recipes.Recipe, ref: str) -> dict:
    """The pipeline parameters that run ``recipe`` (loaded from ``ref``: what ``recipe`` gets).

    The recipe travels whole in ``recipe``; its seed goes to ``seed`` (data order and every
    stage). A demo recipe also downloads at the size its images were rendered.
    """
    args = {"recipe": ref, "seed": recipe.seed}
    if recipe.n_train > 0:
        args.update(download_image_size=recipe.image_px)
    return args


@dsl.pipeline(name=PIPELINE_NAME,
              description="CLIPA: pretrain at low resolution, finetune at 224 and 336 px, zero-shot evaluate.")
def clipa_training(
    url_list: str,
    eval_set: str,
    preset: str = "",
    seed: int = 0,
    download_image_size: int = recipes.DEMO.image_px,
    download_processes: int = 1,
    download_threads: int = 16,
    download_parts: int = 1,
    download_allow_networks: str = "",
    samples_per_shard: int = 256,
    min_image_side: int = 64,
    max_aspect_ratio: float = 3.0,
    min_caption_words: int = 3,
    filter_preset: str = "",
    uid_list: str = "",
    decontaminate: str = "",
    shards: str = "",
    no_filter: bool = False,
    recipe: str = "demo",
    stage_overrides: dict = {},
    init_model: str = "",
    train_loader_workers: int = -1,
    train_torch_threads: int = -1,
    train_procs_per_node: int = 0,
    export_name: str = "",
    export_repo_id: str = "",
    registry_serving_image: str = "",
    checkpoint_root: str = "",
    checkpoint_every: int = -1,
    checkpoint_minutes: float = -1.0,
    zeroshot_every: int = -1,
    report_to: str = "tensorboard",
) -> Artifact:
    """Train a CLIPA model from ``url_list`` and evaluate it zero-shot on ``eval_set``.

    Args:
        url_list: URL list file (parquet, csv or jsonl with url and caption columns).
        eval_set: folder of a labelled zero-shot evaluation set (see docs/ARTIFACTS.md).
        preset: a fresh model's preset ("" = the recipe's).
        seed: data order and every training stage's seed (``pipeline_arguments`` passes
            the recipe's).
        recipe: the training stages: a built-in name (clipa_model/recipes.py), the path or
            gs:// URI of a YAML / JSON recipe file, or its JSON text.
        stage_overrides: stage -> StageConfig field -> value, applied on top of the recipe,
            e.g. {"pretrain": {"samples": 2000, "accum_steps": 4}}.
        init_model: start pretraining from this model instead of a fresh one: a Model
            artifact folder or open_clip:NAME:FILE ("" = a fresh ``preset`` model).
        samples_per_shard ... decontaminate: filter_shard's settings (FilterConfig);
            filter_preset "datacomp_basic" is DataComp's basic filter, uid_list keeps the
            uids of a DataComp subset, decontaminate names an eval set to keep out.
        shards, no_filter: in a pipeline compiled from shards (``clipa run|submit
            --shards``; ``pipelines/data_source.py``), the existing shards used instead of
            url_list, and whether to train on them as they are.
        train_loader_workers, train_torch_threads: data loader processes and torch threads
            (0 = all cores) of each training process (-1 = the recipe's); a GPU machine
            wants e.g. 8 workers per GPU and 0 threads.
        train_procs_per_node: training processes per node (0 = one per accelerator; on a
            CPU, N runs N gloo processes); the nodes are the placement's.
        export_name: the exported model's name (default clipa-PRESET-SIZE).
        export_repo_id: the Hugging Face Hub repo ("ORG/NAME") the export folder is for.
        registry_serving_image: a serving container image; when given, the export is
            uploaded to Vertex AI Model Registry with it (Vertex AI only).
        checkpoint_root: local or gs:// folder under which each training stage keeps its
            resumable checkpoints, keyed by the stage's inputs (not the job): a rerun or a
            resubmitted job with the same inputs resumes every unfinished stage. Default
            "": PIPELINE_ROOT/checkpoints.
        checkpoint_every, checkpoint_minutes: a checkpoint every N steps and / or M
            minutes of each training stage (0 = not by that measure; -1 = the recipe's).
        zeroshot_every: samples between zero-shot probes of eval_set while a stage
            trains (TensorBoard, history.jsonl); 0 = off, -1 = the recipe's.
        report_to: live metrics of the training stages: "tensorboard", "wandb", both
            comma-separated, or "none".
    Returns:
        The run summary (JSON); its HTML twin is the ``summarize`` task's report.
    """
    source = data_source.active()  # a compile-time choice (pipelines/data_source.py)
    if source.from_shards:
        src = PlacedStep("download", import_shards)(uri=shards)
        src.set_display_name("import-shards")
    else:
        # download_parts parallel tasks; download_allow_networks lifts the URL-safety refusal
        # for given networks (the local demo passes its loopback server's 127.0.0.1/32).
        src = PlacedStep("download", data_source.download_step())(
            url_list=url_list, image_size=download_image_size, parts=download_parts,
            allow_networks=download_allow_networks, processes=download_processes,
            threads=download_threads, samples_per_shard=samples_per_shard)
    flt = filter_shard(shards=src.outputs["shards"], samples_per_shard=samples_per_shard,
                       min_image_side=min_image_side, max_aspect_ratio=max_aspect_ratio,
                       min_caption_words=min_caption_words, seed=seed,
                       filter_preset=filter_preset, uid_list=uid_list,
                       decontaminate=decontaminate, no_filter=no_filter)
    evalset = dsl.importer(artifact_uri=eval_set, artifact_class=Dataset, reimport=False)
    evalset.set_display_name("eval-set")
    data = flt.outputs["filtered"]
    # Checkpoints that outlive the job, live metrics and zero-shot probes of every stage.
    live = dict(checkpoint_root=checkpoint_root, checkpoint_every=checkpoint_every,
                checkpoint_minutes=checkpoint_minutes, eval_set=evalset.output,
                zeroshot_every=zeroshot_every, report_to=report_to)

    # Every training step gets the whole recipe and resolves its own stage from it.
    train_args = dict(recipe=recipe, stage_overrides=stage_overrides, seed=seed,
                      loader_workers=train_loader_workers, torch_threads=train_torch_threads,
                      procs_per_node=train_procs_per_node, **live)
    pre = pretrain(data=data, preset=preset, init=init_model, **train_args)
    pre.set_display_name("pretrain-84")
    f224 = finetune(data=data, init_model=pre.outputs["model"], stage="finetune_224",
                    **train_args)
    f224.set_display_name("finetune-224")
    f336 = finetune(data=data, init_model=f224.outputs["model"], stage="finetune_336",
                    **train_args)
    f336.set_display_name("finetune-336")

    evals = []
    for name, stage in (("pretrain", pre), ("finetune-224", f224), ("finetune-336", f336)):
        ev = evaluate(model=stage.outputs["model"], eval_set=evalset.output)
        ev.set_display_name(f"evaluate-{name}")
        evals.append(ev)

    summary = summarize(
        shards=src.outputs["shards"], filtered=data,
        pretrain_model=pre.outputs["model"], finetune_224_model=f224.outputs["model"],
        finetune_336_model=f336.outputs["model"], pretrain_eval=evals[0].outputs["metrics"],
        finetune_224_eval=evals[1].outputs["metrics"], finetune_336_eval=evals[2].outputs["metrics"])
    exp = export(
        pretrain_model=pre.outputs["model"], finetune_224_model=f224.outputs["model"],
        finetune_336_model=f336.outputs["model"], pretrain_eval=evals[0].outputs["metrics"],
        finetune_224_eval=evals[1].outputs["metrics"], finetune_336_eval=evals[2].outputs["metrics"],
        shards=src.outputs["shards"], filtered=data, eval_set=evalset.output, name=export_name,
        repo_id=export_repo_id)
    with dsl.If(registry_serving_image != "", name="register-model"):
        register_model(exp, registry_serving_image)
    return summary.outputs["summary"]
