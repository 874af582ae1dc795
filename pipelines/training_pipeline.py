"""The full CLIPA training pipeline: URL list -> zero-shot-evaluated model.

download -> filter_shard -> pretrain (84 px) -> finetune (224 px) -> finetune (336 px),
with a zero-shot evaluation after each training stage and a summary at the end.

Per-step machines and images are chosen at compile time: ``place_pipeline(clipa_training,
get_placement("a3-highgpu-8g"))`` (pipelines/placement.py).

Every setting is an explicit pipeline parameter (what Vertex shows and what a rerun
changes); defaults come from the ``demo`` recipe, and ``pipeline_arguments(recipe)``
turns any recipe of ``clipa_model.recipes`` into these parameters.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset

from clipa_model import recipes
from components.evaluate import evaluate
from components.filter_shard.component import filter_shard
from components.filter_shard.existing import import_shards
from components.run_report import summarize
from components.train import finetune, pretrain
from pipelines import data_source
from pipelines.placement import PlacedStep

# Steps follow the placement active at compile time (pipelines/placement.py); compiled as
# they are (pipeline.yaml, clipa run) each one is its plain component. The data source
# step (download or import_shards) is placed as "download" where the pipeline is traced.
filter_shard = PlacedStep("filter_shard", filter_shard)
pretrain = PlacedStep("pretrain", pretrain)
finetune = PlacedStep("finetune", finetune)
evaluate = PlacedStep("evaluate", evaluate)
summarize = PlacedStep("summarize", summarize)

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
    filter_preset: str = "",
    uid_list: str = "",
    decontaminate: str = "",
    shards: str = "",
    no_filter: bool = False,
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
) -> Artifact:
    """Train a CLIPA model from ``url_list`` and evaluate it zero-shot on ``eval_set``.

    Args:
        url_list: URL list file (parquet, csv or jsonl with url and caption columns).
        eval_set: folder of a labelled zero-shot evaluation set (see docs/ARTIFACTS.md).
        samples_per_shard ... decontaminate: filter_shard's settings (FilterConfig);
            filter_preset "datacomp_basic" is DataComp's basic filter, uid_list keeps the
            uids of a DataComp subset, decontaminate names an eval set to keep out.
        shards, no_filter: in a pipeline compiled from shards (``clipa run|submit
            --shards``; ``pipelines/data_source.py``), the existing shards used instead of
            url_list, and whether to train on them as they are.
        train_loader_workers, train_torch_threads: data loader processes and torch threads
            (0 = all cores) of each training process; the defaults fit a 2-core CPU, a GPU
            machine wants e.g. 8 workers per GPU and 0 threads.
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

    pre = pretrain(data=data, preset=preset, image_size=pretrain_image_size,
                   text_len=pretrain_text_len, samples=pretrain_samples,
                   batch_size=pretrain_batch_size, lr=pretrain_lr, seed=seed,
                   loader_workers=train_loader_workers, torch_threads=train_torch_threads)
    pre.set_display_name("pretrain-84")
    f224 = finetune(data=data, init_model=pre.outputs["model"], image_size=ft224_image_size,
                    text_len=ft224_text_len, mask_ratio=ft224_mask_ratio, samples=ft224_samples,
                    batch_size=ft224_batch_size, lr=ft224_lr, seed=seed,
                    loader_workers=train_loader_workers, torch_threads=train_torch_threads)
    f224.set_display_name("finetune-224")
    f336 = finetune(data=data, init_model=f224.outputs["model"], image_size=ft336_image_size,
                    text_len=ft336_text_len, mask_ratio=ft336_mask_ratio, samples=ft336_samples,
                    batch_size=ft336_batch_size, lr=ft336_lr, seed=seed,
                    loader_workers=train_loader_workers, torch_threads=train_torch_threads)
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
    return summary.outputs["summary"]
