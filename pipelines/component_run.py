"""`clipa component run NAME`: one pipeline step alone, locally or on Vertex AI.

    clipa component run evaluate --input model=runs/x/model --input eval_set=data/eval_set \\
        --output-uri runs/eval-only --local
    clipa component run pretrain --input data=gs://b/root/.../filtered --param samples=200000 \\
        --output-uri gs://b/reruns --project P --region us-central1 --placement a3-highgpu-8g

The step runs inside a one-step pipeline: each input artifact is a KFP importer of the
URI given with ``--input NAME=URI``, each parameter comes from ``--param KEY=VALUE``
(typed from the component's spec), and the output URI is that pipeline's root, under
which KFP writes ``<run>/<step>/<output>``. ``--local`` runs it through kfp.local in
this Python environment; otherwise it is submitted like ``clipa submit``.
"""
from __future__ import annotations

import argparse
import os
import time

# Component name -> (placement step, "module:attribute"); imported only when used.
COMPONENTS = {
    "download": ("download", "components.download.pipeline:download"),
    "filter_shard": ("filter_shard", "components.filter_shard.component:filter_shard"),
    "pretrain": ("pretrain", "components.train:pretrain"),
    "finetune": ("finetune", "components.train:finetune"),
    "evaluate": ("evaluate", "components.evaluate:evaluate"),
    "summarize": ("summarize", "components.run_report:summarize"),
    "benchmark": ("benchmark", "components.benchmark:benchmark"),
}


def get_component(name: str):
    """(placement step, component) by name; the error lists the known names."""
    import importlib

    if name not in COMPONENTS:
        raise ValueError(f"component {name!r}: unknown; expected one of {', '.join(sorted(COMPONENTS))}")
    step, ref = COMPONENTS[name]
    module, attr = ref.split(":")
    return step, getattr(importlib.import_module(module), attr)


def _artifact_class(type_name: str):
    from kfp.dsl.types import artifact_types

    return artifact_types._SCHEMA_TITLE_TO_TYPE.get(type_name.split("@")[0], artifact_types.Artifact)


def split_inputs(component) -> tuple[dict, dict]:
    """The component's inputs as (artifact name -> InputSpec, parameter name -> InputSpec)."""
    from kfp.dsl.types import type_utils

    artifacts, params = {}, {}
    for name, spec in (component.component_spec.inputs or {}).items():
        (params if type_utils.is_parameter_type(spec.type) else artifacts)[name] = spec
    return artifacts, params


def one_step_pipeline(name: str, inputs: dict[str, str], params: dict, placement=None):
    """A pipeline that imports ``inputs`` (name -> URI) and runs component ``name`` once.

    Raises:
        ValueError: an unknown or missing input artifact, or a list-of-artifacts input
            (an importer brings in one artifact).
    """
    from kfp import dsl

    from pipelines.placement import PlacedStep, place_pipeline

    step, component = get_component(name)
    artifacts, _ = split_inputs(component)
    unknown = sorted(set(inputs) - set(artifacts))
    if unknown:
        raise ValueError(f"component {name}: unknown input(s) {unknown}; its input artifacts are "
                         f"{sorted(artifacts) or 'none'}")
    missing = sorted(k for k, s in artifacts.items() if k not in inputs and not s.optional)
    if missing:
        raise ValueError(f"component {name}: give --input NAME=URI for {missing}")
    lists = [k for k in inputs if artifacts[k].is_artifact_list]
    if lists:
        raise ValueError(f"component {name}: input(s) {lists} take a list of artifacts, which "
                         "`clipa component run` cannot import; run it inside a pipeline")
    placed = PlacedStep(step, component)

    def run_one():
        kwargs = dict(params)
        for key, uri in inputs.items():
            imp = dsl.importer(artifact_uri=uri, artifact_class=_artifact_class(artifacts[key].type),
                               reimport=False)
            imp.set_display_name(f"import-{key}")
            kwargs[key] = imp.output
        placed(**kwargs)

    pipeline = dsl.pipeline(name=f"clipa-{name.replace('_', '-')}",
                            description=f"clipa component run {name}")(run_one)
    return pipeline if placement is None else place_pipeline(pipeline, placement)


def run_component_locally(name: str, inputs: dict, params: dict, output_uri: str) -> dict:
    """Run component ``name`` through kfp.local with ``output_uri`` as pipeline root.

    Returns:
        Output name -> its folder ``<output_uri>/<run>/<task>/<output>`` (Metrics have
        no folder locally: their values are in the task's ``executor_output.json``).
    """
    from kfp import local

    if "://" in output_uri:
        raise ValueError(f"--output-uri {output_uri!r}: --local writes to a local folder, "
                         "expected a path (gs:// roots are for Vertex AI runs)")
    output_uri = os.path.abspath(output_uri)
    os.makedirs(output_uri, exist_ok=True)
    before = set(os.listdir(output_uri))
    pipeline = one_step_pipeline(name, inputs, params)
    # use_venv=False: the step runs in this interpreter's environment, which has the
    # package installed, like the component images on Vertex (as in pipelines/local.py).
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=output_uri,
               raise_on_error=True)
    pipeline()
    (run,) = sorted(set(os.listdir(output_uri)) - before)
    task = name.replace("_", "-")
    outputs = get_component(name)[1].component_spec.outputs or {}
    return {out: os.path.join(output_uri, run, task, out) for out in outputs}


def add_component_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``component run NAME`` to an argparse ``subparsers`` object."""
    from components.cli_args import key_value
    from pipelines.placement import add_placement_args
    from pipelines.vertex import add_vertex_args

    comp = subparsers.add_parser("component", help="run one pipeline step alone (locally or on Vertex AI)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = comp.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run one component with inputs given as URIs")
    run.add_argument("name", help=f"component: one of {', '.join(sorted(COMPONENTS))}")
    run.add_argument("--input", action="append", default=[], type=key_value("--input", "URI"), metavar="NAME=URI",
                     help="an input artifact of the component, e.g. --input model=gs://b/.../model (repeatable)")
    run.add_argument("--param", action="append", default=[], type=key_value("--param"), metavar="KEY=VALUE",
                     help="a parameter of the component, typed from its spec (repeatable)")
    run.add_argument("--output-uri", required=True,
                     help="where the outputs go: the one-step run's pipeline root (a folder with "
                          "--local, gs:// on Vertex AI)")
    run.add_argument("--local", action="store_true",
                     help="run here through kfp.local (default: submit to Vertex AI)")
    run.add_argument("--dry-run", action="store_true",
                     help="Vertex AI: print the exact CreatePipelineJob request and send nothing")
    add_vertex_args(run, pipeline_root=False)
    add_placement_args(run)
    from pipelines.training_args import add_recipe_arg

    add_recipe_arg(run, default=None)
    return comp


def run_component_cli(args) -> int:
    """``clipa component run``: check the name, inputs and parameters, then run or submit."""
    import json
    import tempfile

    from components.cli_args import typed_params
    from pipelines.placement import placement_from_args

    _, component = get_component(args.name)
    _, param_specs = split_inputs(component)
    params = typed_params(args.param, param_specs, what=f"{args.name} parameter")
    if args.recipe:
        if "recipe" not in param_specs:
            raise ValueError(f"--recipe: component {args.name} takes no recipe")
        from pipelines.training_args import recipe_value

        # Vertex AI gets the recipe's JSON text: the job carries it whole.
        params["recipe"] = recipe_value(args.recipe, inline=not args.local)
    if "stage_overrides" in param_specs:  # a training step: its stage resolves before work
        from clipa_model.recipes import resolve_stage

        default_stage = param_specs["stage"].default if "stage" in param_specs else args.name
        resolve_stage(params.get("recipe", "demo"), params.get("stage_overrides", {}),
                      params.get("stage", default_stage))
    inputs = dict(args.input)
    if args.local:
        for out, path in run_component_locally(args.name, inputs, params, args.output_uri).items():
            print(f"{out}: {path}")
        return 0
    from kfp import compiler

    from pipelines.vertex import build_job, init_vertex, request_of, submit_job, target_from_args

    args.pipeline_root = args.output_uri
    target = target_from_args(args)
    pipeline = one_step_pipeline(args.name, inputs, params, placement_from_args(args))
    with tempfile.TemporaryDirectory(prefix="clipa-component-") as tmp:
        template = os.path.join(tmp, "component.yaml")
        compiler.Compiler().compile(pipeline, template)
        init_vertex(target, dry_run=args.dry_run)
        job = build_job(template, target, {}, pipeline.name,
                        f"{pipeline.name}-{time.strftime('%Y%m%d%H%M%S')}")
    if args.dry_run:
        print(json.dumps(request_of(job), indent=2, sort_keys=True))
        return 0
    print(submit_job(job, target))
    return 0
