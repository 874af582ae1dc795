"""The training pipeline's recipe parameters, shared by `clipa run|compile|submit|component run`.

- ``--recipe`` (``add_recipe_arg``): a built-in name or a YAML / JSON recipe file.
- ``recipe_value``: what the ``recipe`` pipeline parameter gets. Locally the name or the
  file's absolute path; for Vertex AI the recipe's JSON text, so the job carries the whole
  recipe (a local file is not readable there, and a built-in name would follow whatever a
  later image defines).
- ``check_training_parameters``: every training stage resolved from the parameters before
  any work (unknown recipe, unreadable file, unknown stage or field in ``stage_overrides``,
  a batch that world size x accum_steps does not divide, more processes than accelerators).
- ``check_local_budget``: a local run that ``clipa plan`` prices above a day of this
  machine stops, prints the plan and names the flag that runs it anyway.
"""
from __future__ import annotations

import dataclasses
import json
import os

from clipa_model import recipes

LOCAL_BUDGET_HOURS = 24.0
FORCE_FLAG = "--force-long-run"


class LongRunError(ValueError):
    """A local run priced above LOCAL_BUDGET_HOURS; the message holds the plan."""


def add_recipe_arg(parser, default: str | None = "demo") -> None:
    """--recipe NAME|FILE."""
    parser.add_argument("--recipe", default=default,
                        help="training recipe: a built-in name "
                             f"({', '.join(sorted(recipes.RECIPES))}) or a .yaml/.json recipe "
                             f"file, local or gs:// (default: {default or 'the pipeline default'})")


def recipe_value(ref: str, inline: bool = False) -> str:
    """The ``recipe`` parameter for ``ref``: a name / absolute path, or (``inline``) its JSON."""
    recipe = recipes.load_recipe(ref)
    if inline:
        return json.dumps(recipe.to_dict(), sort_keys=True)
    if ref in recipes.PLAN_RECIPES or "://" in ref or ref.lstrip().startswith("{"):
        return ref
    return os.path.abspath(ref)


def check_training_parameters(values: dict, local: bool = False) -> recipes.Recipe:
    """Resolve every training stage from pipeline parameter ``values`` (defaults: the
    pipeline's); ``local``: also check processes and batch against this machine.

    Returns:
        The recipe with overrides and run-level settings applied (what the steps will run).
    Raises:
        ConfigError: naming the parameter, stage or field at fault.
    """
    from clipa_model.launch import node_layout
    from clipa_model.train_stage import check_batch

    ref = values.get("recipe", "demo")
    recipe = recipes.check_pipeline_recipe(recipes.load_recipe(ref), f"recipe {ref[:80]!r}")
    run = {"seed": values.get("seed"), "num_workers": values.get("train_loader_workers"),
           "num_threads": values.get("train_torch_threads")}
    run = {k: v for k, v in run.items() if v is not None and v >= 0}
    overrides = values.get("stage_overrides", {})
    stages = {name: recipes.resolve_stage(ref, overrides, name, **run) for name in recipe.stages}
    if local:
        procs = values.get("train_procs_per_node", 0)
        for stage in stages.values():
            check_batch(stage, node_layout(procs, stage.device).world_size)
    return dataclasses.replace(recipe, stages=stages)


def check_local_budget(recipe: recipes.Recipe, force: bool = False) -> dict:
    """Price ``recipe`` on this machine; raise LongRunError above a day unless ``force``.

    Returns:
        The plan (``planner.plan_recipe`` on ``planner.local_cpu()``).
    """
    from clipa_model.planner import local_cpu, plan_recipe
    from pipelines.plan_cli import format_plan

    plan = plan_recipe(recipe, local_cpu(), utilization=1.0)
    hours = plan["total"]["accelerator_hours"]
    if hours > LOCAL_BUDGET_HOURS and not force:
        raise LongRunError(
            f"this recipe would train for about {hours:,.0f} hours on this machine "
            f"({local_cpu().name}), more than {LOCAL_BUDGET_HOURS:.0f}; nothing was started.\n\n"
            f"{format_plan(plan)}\n\nRun it on Vertex AI (`clipa submit --recipe ...`), shrink "
            f"it (--param stage_overrides=...), or pass {FORCE_FLAG} to run it here anyway.")
    return plan


def recipe_parameters(values: dict, recipe_ref: str | None) -> dict:
    """Pipeline parameters for a Vertex AI job: the recipe (``--recipe``, else
    ``values["recipe"]``, else the demo) inlined as JSON, its seed and demo download size
    unless ``values`` set them, every stage checked.

    Raises:
        ConfigError: as ``check_training_parameters``.
    """
    from pipelines.training_pipeline import pipeline_arguments

    ref = recipe_ref or values.get("recipe") or "demo"
    recipe = recipes.load_recipe(ref)
    out = {**pipeline_arguments(recipe, recipe_value(ref, inline=True)), **values}
    out["recipe"] = recipe_value(ref, inline=True)
    check_training_parameters(out)
    return out
