"""Compile the pipelines to KFP IR YAML, the files Vertex AI Pipelines runs.

The checked-in ``pipeline.yaml`` (training) and ``eval_pipeline.yaml`` (benchmarks) at the
repository root are this module's output for the current code, without a placement (a
test recompiles and compares). Under a placement (``--placement a3-highgpu-8g``) each step
gets its machine and image (pipelines/placement.py).
"""
from __future__ import annotations

from kfp import compiler

from pipelines.data_source import DataSource, sourcing, with_data_source
from pipelines.placement import Placement, place_pipeline

PIPELINES = ("training", "eval")
DEFAULT_OUTPUT = {"training": "pipeline.yaml", "eval": "eval_pipeline.yaml"}


def get_pipeline(name: str = "training"):
    """The ``@dsl.pipeline`` object by name: "training" (clipa_training) or "eval" (clipa_benchmarks)."""
    if name == "training":
        from pipelines.training_pipeline import clipa_training
        return clipa_training
    if name == "eval":
        from pipelines.eval_pipeline import clipa_benchmarks
        return clipa_benchmarks
    raise ValueError(f"pipeline {name!r}: unknown; expected one of {PIPELINES}")


def placed_pipeline(name: str = "training", placement: Placement | None = None,
                    source: DataSource | None = None):
    """Pipeline ``name``, re-traced under ``placement`` and (training) the data ``source``
    when given."""
    pipeline = get_pipeline(name)
    if name == "training" and source is not None and source != DataSource():
        if placement is None:
            return with_data_source(pipeline, source)
        with sourcing(source):
            return place_pipeline(pipeline, placement)
    return pipeline if placement is None else place_pipeline(pipeline, placement)


def compile_pipeline(output: str | None = None, pipeline: str = "training",
                     placement: Placement | None = None, source: DataSource | None = None,
                     defaults: dict | None = None) -> str:
    """Compile pipeline ``pipeline`` (under ``placement`` and data ``source``, if any) to
    ``output``, with parameter ``defaults`` (e.g. a recipe's) written in; return the path.

    ``output`` defaults to the checked-in file of that pipeline (``DEFAULT_OUTPUT``);
    ``defaults`` replace the compiled default values of those pipeline parameters (e.g. a
    recipe's, ``training_args``).
    """
    output = output or DEFAULT_OUTPUT[pipeline]
    compiler.Compiler().compile(pipeline_func=placed_pipeline(pipeline, placement, source),
                                package_path=output)
    if defaults:
        set_parameter_defaults(output, defaults)
    return output


def set_parameter_defaults(path: str, defaults: dict) -> None:
    """Rewrite the default values of the compiled pipeline's parameters in ``path``.

    Raises:
        ValueError: a name that is not a parameter of the pipeline.
    """
    import yaml

    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    unknown = sorted(set(defaults) - set(params))
    if unknown:
        raise ValueError(f"pipeline parameter(s) {unknown}: unknown; expected some of {sorted(params)}")
    for name, value in defaults.items():
        params[name]["defaultValue"] = value
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=True)
