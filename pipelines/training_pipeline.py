"""The full CLIPA training pipeline: URL list -> zero-shot-evaluated model.

download -> filter_shard -> pretrain (84 px) -> finetune (224 px) -> finetune (336 px),
with a zero-shot evaluation after each training stage, a summary, and an ``export`` of the
final model (open_clip / Hugging Face Hub folder with a model card). Given a serving image
(``registry_serving_image``), the export is also uploaded to Vertex AI Model Registry with
google-cloud-pipeline-components' ``ModelUploadOp`` (Vertex AI only).

Per-step machines and images are chosen at compile time: ``place_pipeline(clipa_training,
get_placement("a3-highgpu-8g"))`` (pipelines/placement.py).

Every setting is an explicit pipeline parameter (what Vertex shows and what a rerun
changes); defaults come from the ``demo`` recipe, and ``pipeline_arguments(recipe)``
turns any recipe of ``clipa_model.recipes`` into these parameters.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset

from clipa_model import recipes
from components.download.pipeline import download
from components.evaluate import evaluate
from components.export import export
from components.filter_shard.component import filter_shard
from components.run_report import summarize
from components.train import finetune, pretrain
from pipelines.placement import PlacedStep
from pipelines.publish import register_model

# Steps follow the placement active at compile time (pipelines/placement.py); compiled as
# they are (pipeline.yaml, clipa run) each one is its plain component.
download = PlacedStep("download", download)
filter_shard = PlacedStep("filter_shard", filter_shard)
pretrain = PlacedStep("pretrain", pretrain)
finetune = PlacedStep("finetune", finetune)
evaluate = PlacedStep("evaluate", evaluate)
summarize = PlacedStep("summarize", summarize)
export = PlacedStep("export", export)

PIPELINE_NAME = "clipa-training"

# Parameter prefixes of the training stages, in order.
STAGE_PREFIX = {"pretrain": "pretrain", "finetune_224": "ft224", "finetune_336": "ft336"}
STAGE_FIELDS = ("image_size", "text_len", "mask_ratio", "samples", "batch_size", "lr")

_PRE = recipes.DEMO.stages["pretrain"]
_F224 = recipes.DEMO.stages["finetune_224"]
_F336 = recipes.DEMO.stages["finetune_336"]


def pipeline_arguments(recipe: recipes.Recipe) -> dict:
    """The pipeline parameters that run ``recipe``'s training stages."""
    args = {"preset": recipe.preset}
    # A demo recipe: download at the size its images were rendered, with the seed its
    # reported numbers came from.
    if recipe.n_train > 0:
        args.update(download_image_size=recipe.image_px, seed=recipe.seed)
    for stage, prefix in STAGE_PREFIX.items():
        cfg = recipe.stages[stage]
        for field in STAGE_FIELDS:
            if prefix == "pretrain" and field == "mask_ratio":
                continue  # CLIPA pretrains on resized images; masking is a finetune tool
            args[f"{prefix}_{field}"] = getattr(cfg, field)
    return args


@dsl.pipeline(name=PIPELINE_NAME,
              description="CLIPA: pretrain at low resolution, finetune at 224 and 336 px, zero-shot evaluate.")
def clipa_training(
    url_list: str,
    eval_set: str,
    preset: str = recipes.DEMO.preset,
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
    pretrain_image_size: int = _PRE.image_size,
    pretrain_text_len: int = _PRE.text_len,
    pretrain_samples: int = _PRE.samples,
    pretrain_batch_size: int = _PRE.batch_size,
    pretrain_lr: float = _PRE.lr,
    ft224_image_size: int = _F224.image_size,
    ft224_text_len: int = _F224.text_len,
    ft224_mask_ratio: float = _F224.mask_ratio,
    ft224_samples: int = _F224.samples,
    ft224_batch_size: int = _F224.batch_size,
    ft224_lr: float = _F224.lr,
    ft336_image_size: int = _F336.image_size,
    ft336_text_len: int = _F336.text_len,
    ft336_mask_ratio: float = _F336.mask_ratio,
    ft336_samples: int = _F336.samples,
    ft336_batch_size: int = _F336.batch_size,
    ft336_lr: float = _F336.lr,
    train_loader_workers: int = _PRE.num_workers,
    train_torch_threads: int = _PRE.num_threads,
    export_name: str = "",
    export_repo_id: str = "",
    registry_serving_image: str = "",
    checkpoint_root: str = "",
    checkpoint_every: int = _PRE.checkpoint_every,
    checkpoint_minutes: float = _PRE.checkpoint_minutes,
    zeroshot_every: int = 0,
    report_to: str = "tensorboard",
) -> Artifact:
    """Train a CLIPA model from ``url_list`` and evaluate it zero-shot on ``eval_set``.

    Args:
        url_list: URL list file (parquet, csv or jsonl with url and caption columns).
        eval_set: folder of a labelled zero-shot evaluation set (see docs/ARTIFACTS.md).
        train_loader_workers, train_torch_threads: data loader processes and torch threads
            (0 = all cores) of each training process; the defaults fit a 2-core CPU, a GPU
            machine wants e.g. 8 workers per GPU and 0 threads.
        export_name: the exported model's name (default clipa-PRESET-SIZE).
        export_repo_id: the Hugging Face Hub repo ("ORG/NAME") the export folder is for.
        registry_serving_image: a serving container image; when given, the export is
            uploaded to Vertex AI Model Registry with it (Vertex AI only).
        checkpoint_root: local or gs:// folder under which each training stage keeps its
            resumable checkpoints, keyed by the stage's inputs (not the job): a rerun or a
            resubmitted job with the same inputs resumes every unfinished stage. Default
            "": PIPELINE_ROOT/checkpoints.
        checkpoint_every, checkpoint_minutes: a checkpoint every N steps and / or M
            minutes of each training stage (0 = not by that measure).
        zeroshot_every: samples between zero-shot probes of eval_set while a stage
            trains (TensorBoard, history.jsonl); 0 = off.
        report_to: live metrics of the training stages: "tensorboard", "wandb", both
            comma-separated, or "none".
    Returns:
        The run summary (JSON); its HTML twin is the ``summarize`` task's report.
    """
    # download_parts parallel tasks; download_allow_networks lifts the URL-safety refusal
    # for given networks (the local demo passes its loopback server's 127.0.0.1/32).
    dl = download(url_list=url_list, image_size=download_image_size, parts=download_parts,
                  allow_networks=download_allow_networks,
                  processes=download_processes, threads=download_threads,
                  samples_per_shard=samples_per_shard)
    flt = filter_shard(shards=dl.outputs["shards"], samples_per_shard=samples_per_shard,
                       min_image_side=min_image_side, max_aspect_ratio=max_aspect_ratio,
                       min_caption_words=min_caption_words, seed=seed)
    evalset = dsl.importer(artifact_uri=eval_set, artifact_class=Dataset, reimport=False)
    evalset.set_display_name("eval-set")
    data = flt.outputs["filtered"]
    # Checkpoints that outlive the job, live metrics and zero-shot probes of every stage.
    live = dict(checkpoint_root=checkpoint_root, checkpoint_every=checkpoint_every,
                checkpoint_minutes=checkpoint_minutes, eval_set=evalset.output,
                zeroshot_every=zeroshot_every, report_to=report_to)

    pre = pretrain(data=data, preset=preset, image_size=pretrain_image_size,
                   text_len=pretrain_text_len, samples=pretrain_samples,
                   batch_size=pretrain_batch_size, lr=pretrain_lr, seed=seed,
                   loader_workers=train_loader_workers, torch_threads=train_torch_threads,
                   **live)
    pre.set_display_name("pretrain-84")
    f224 = finetune(data=data, init_model=pre.outputs["model"], image_size=ft224_image_size,
                    text_len=ft224_text_len, mask_ratio=ft224_mask_ratio, samples=ft224_samples,
                    batch_size=ft224_batch_size, lr=ft224_lr, seed=seed,
                    loader_workers=train_loader_workers, torch_threads=train_torch_threads,
                    **live)
    f224.set_display_name("finetune-224")
    f336 = finetune(data=data, init_model=f224.outputs["model"], image_size=ft336_image_size,
                    text_len=ft336_text_len, mask_ratio=ft336_mask_ratio, samples=ft336_samples,
                    batch_size=ft336_batch_size, lr=ft336_lr, seed=seed,
                    loader_workers=train_loader_workers, torch_threads=train_torch_threads,
                    **live)
    f336.set_display_name("finetune-336")

    evals = []
    for name, stage in (("pretrain", pre), ("finetune-224", f224), ("finetune-336", f336)):
        ev = evaluate(model=stage.outputs["model"], eval_set=evalset.output)
        ev.set_display_name(f"evaluate-{name}")
        evals.append(ev)

    summary = summarize(
        shards=dl.outputs["shards"], filtered=data,
        pretrain_model=pre.outputs["model"], finetune_224_model=f224.outputs["model"],
        finetune_336_model=f336.outputs["model"], pretrain_eval=evals[0].outputs["metrics"],
        finetune_224_eval=evals[1].outputs["metrics"], finetune_336_eval=evals[2].outputs["metrics"])
    exp = export(
        pretrain_model=pre.outputs["model"], finetune_224_model=f224.outputs["model"],
        finetune_336_model=f336.outputs["model"], pretrain_eval=evals[0].outputs["metrics"],
        finetune_224_eval=evals[1].outputs["metrics"], finetune_336_eval=evals[2].outputs["metrics"],
        shards=dl.outputs["shards"], filtered=data, eval_set=evalset.output, name=export_name,
        repo_id=export_repo_id)
    with dsl.If(registry_serving_image != "", name="register-model"):
        register_model(exp, registry_serving_image)
    return summary.outputs["summary"]
