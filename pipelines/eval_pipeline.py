"""The eval-only pipeline: benchmark models, append to the history, plot the trend.

    for each model (in parallel):  benchmark(model, benchmarks)   -> evaluation + report
    record_history(all evaluations, history, run id)               -> history part + trend report

Compiled to ``eval_pipeline.yaml`` (a test checks that it is current); ``clipa schedule``
runs it periodically on Vertex AI (docs/VERTEX.md).
Models are reference strings (a Model artifact folder, an exported folder, or
open_clip:NAME:FILE), benchmarks are ``[NAME=]zeroshot|retrieval:PATH`` strings or dicts
(clipa_model/eval/benchmarks.py).
"""

from kfp import dsl

from components.benchmark import benchmark, record_history
from pipelines.placement import PlacedStep

# Machines and images follow the placement active at compile time (pipelines/placement.py).
benchmark = PlacedStep("benchmark", benchmark)
record_history = PlacedStep("record_history", record_history)

EVAL_PIPELINE_NAME = "clipa-benchmarks"


@dsl.pipeline(name=EVAL_PIPELINE_NAME,
              description="Evaluate models on zero-shot / retrieval benchmarks and append "
                          "the results to a parquet history with a trend report.")
def clipa_benchmarks(models: list, benchmarks: list, history: str, batch_size: int = 256,
                     device: str = "auto"):
    """Benchmark every model; one history part per run.

    Args:
        models: model references, e.g. ["ours=gs://b/runs/42/finetune-2/model",
            "open_clip:ViT-B-16-CLIPA:gs://b/weights/clipa_b16.bin"].
        benchmarks: e.g. ["imagenet=zeroshot:gs://b/imagenet-val", "coco=retrieval:gs://b/coco"].
        history: parquet history folder (local or gs://) that this run appends to.
        batch_size: images per forward pass; device: "auto", "cpu" or "cuda".
    """
    with dsl.ParallelFor(models, name="models") as model:
        ev = benchmark(model=model, benchmarks=benchmarks, batch_size=batch_size, device=device)
        ev.set_display_name("benchmark-model")
        ev.set_caching_options(False)  # a scheduled run re-reads whatever the paths hold now
    rec = record_history(evaluations=dsl.Collected(ev.outputs["evaluation"]), history=history,
                         run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    rec.set_caching_options(False)  # every scheduled run appends, even with the same inputs
