"""Run the training pipeline on this machine with KFP's local runner.

The embedded default needs nothing from outside: it renders a synthetic image-caption
dataset, serves it from an HTTP server on 127.0.0.1 (started and stopped here), writes
the URL list (with realistic bad rows) that ``download`` consumes, and runs every stage
through ``kfp.local``'s SubprocessRunner in this Python environment, artifacts under a
local pipeline_root.
"""
from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TextIO

from clipa_model import recipes

log = logging.getLogger("clipa")

# The only private network the embedded demo's download may reach: its own server.
DEMO_ALLOW_NETWORKS = "127.0.0.1/32"


@dataclass
class LocalRun:
    """Where a local run put things, and what it reported."""
    workdir: str
    summary: dict
    summary_path: str
    report_path: str
    demo_counts: dict | None = None
    seconds: float = 0.0
    export_path: str = ""  # the open_clip / Hugging Face Hub folder (components/export.py)


def prepare_demo_data(workdir: str, recipe: recipes.Recipe, seed: int = 0) -> dict:
    """Render the synthetic training images and the held-out eval set under ``workdir``.

    Returns:
        {"www": folder to serve, "samples": training rows, "eval_set": eval folder}.
    """
    from pipelines.demo_data import write_demo_images, write_eval_set

    www = os.path.join(workdir, "www")
    samples = write_demo_images(www, recipe.n_train, seed=seed, size=recipe.image_px)
    eval_dir = os.path.join(workdir, "eval_set")
    # A different seed stream: no eval image is ever a training image.
    write_eval_set(eval_dir, recipe.eval_per_class, seed=seed + 10_000, size=recipe.image_px)
    return {"www": www, "samples": samples, "eval_set": eval_dir}


def run_pipeline_locally(pipeline_root: str, arguments: dict, view: TextIO | None = None,
                         source=None):
    """Run ``clipa_training`` (under data ``source``, if given) through kfp.local and return
    the summary artifact's path.

    Args:
        view: where kfp.local's output goes (a ``console.LiveView``); default: stdout.
    """
    from kfp import local

    from pipelines.data_source import with_data_source
    from pipelines.training_pipeline import clipa_training

    clipa_training = with_data_source(clipa_training, source)

    # use_venv=False: every task runs in this interpreter's environment, which already has
    # the package installed, exactly like the component images on Vertex.
    # enable_caching: a rerun of the same workdir (same pipeline_root, so the same cache
    # and checkpoint root) reuses the steps that finished, as a resubmitted Vertex job
    # does, and the training steps resume from PIPELINE_ROOT/checkpoints.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True, enable_caching=True)
    if hasattr(view, "display_names"):
        tasks = clipa_training.pipeline_spec.root.dag.tasks
        view.display_names.update({key: t.task_info.name for key, t in tasks.items()})
    with warnings.catch_warnings(), contextlib.redirect_stdout(view or sys.stdout):
        # kfp.local warns that our image names are not Python images (running them in this
        # environment is the point of the local runner) and that display names are unused.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task")
        warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
        print_ = builtins.print
        try:
            task = clipa_training(**arguments)
        finally:
            # kfp.local indents task output by swapping builtins.print; parallel tasks (a
            # ParallelFor) restore it out of order and can leave the indenting one behind.
            builtins.print = print_
    return task.output.path


def run_local(workdir: str, recipe_name: str = "demo", url_list: str | None = None,
              eval_set: str | None = None, overrides: dict | None = None,
              view: TextIO | None = None, force_long_run: bool = False,
              shards: str | None = None, no_filter: bool = False) -> LocalRun:
    """Run the whole pipeline locally, on the embedded default unless ``url_list`` is given.

    Args:
        workdir: folder for this run (demo data, pipeline_root, report).
        recipe_name: a built-in recipe (``demo``, ``smoke``, ...) or a YAML / JSON recipe file.
        url_list: a real URL list; then ``eval_set`` must name an eval set folder.
        overrides: pipeline parameters that replace the recipe's.
        view: where kfp.local's output goes (``console.LiveView``); default: stdout.
        force_long_run: run even when ``clipa plan`` prices it above a day of this machine.
        shards, no_filter: start from existing shards instead of a URL list (checked
            here, before any work; ``eval_set`` is then required), trained on as they are
            with ``no_filter``.
    Raises:
        UrlListError: the URL list is missing or malformed (checked before any work).
        ValueError: an unknown recipe or parameter, a URL list without eval set, a stage
            that cannot run here, or (LongRunError) a run of more than a day.
        PreflightError: a parameter, the URL list or the eval set would fail a step.
    """
    from components.download.component import read_url_list
    from pipelines.preflight import preflight
    from pipelines.process_guard import guarded_tasks
    from pipelines.training_args import check_local_budget, check_training_parameters, recipe_value
    from pipelines.training_pipeline import clipa_training, pipeline_arguments

    recipe = recipes.load_recipe(recipe_name)
    known = clipa_training.component_spec.inputs
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s) {unknown}; expected one of {sorted(known)}")
    arguments = {**pipeline_arguments(recipe, recipe_value(recipe_name)), **(overrides or {})}
    resolved = check_training_parameters(arguments, local=True)
    check_local_budget(resolved, force_long_run)
    source = _shards_source(shards, no_filter, url_list, eval_set)
    if source is not None:
        url_list = ""
    if url_list is None and recipe.n_train <= 0:
        raise ValueError(f"recipe {recipe_name!r} has no embedded demo data (it is a paper-scale "
                         "schedule): give --url-list and --eval-set")
    if url_list:
        read_url_list(url_list)  # fail fast, before anything is generated or started
        if eval_set is None:
            raise ValueError("--eval-set is required with --url-list: the zero-shot eval set "
                             "(a folder as described in docs/ARTIFACTS.md) to score the model on")
    if (overrides or {}).get("registry_serving_image"):
        raise ValueError("registry_serving_image: the Model Registry upload runs on Vertex AI only "
                         "(clipa submit); locally the export folder is the result")
    start = time.time()
    counts = None
    with contextlib.ExitStack() as stack:
        # Steps and their workers die with this run; temporary folders (this process's
        # too, from the imports on) go with it.
        stack.enter_context(guarded_tasks())
        # The whole run, checked before the first step (the demo's data is made below).
        preflight({**arguments, "url_list": url_list, "eval_set": eval_set})
        os.makedirs(workdir, exist_ok=True)
        if url_list is None:
            url_list, eval_set, counts = _start_embedded_default(
                stack, workdir, recipe, arguments.get("seed", 0))
            # The demo server is on loopback, which the download refuses unless allowed.
            arguments.setdefault("download_allow_networks", DEMO_ALLOW_NETWORKS)
        arguments.update(url_list=url_list, eval_set=eval_set)
        if source is not None:
            arguments.update(shards=shards, no_filter=no_filter)
        summary_path = run_pipeline_locally(os.path.join(workdir, "pipeline_root"), arguments,
                                            view, source)
    with open(summary_path) as f:
        summary = json.load(f)
    summary["demo_url_list"] = counts
    run_root = os.path.dirname(os.path.dirname(summary_path))
    report_path = os.path.join(run_root, "summarize", "report")
    return LocalRun(workdir, summary, summary_path, report_path, counts, time.time() - start,
                    os.path.join(run_root, "export", "exported"))


def _shards_source(shards: str | None, no_filter: bool, url_list: str | None,
                   eval_set: str | None):
    """The DataSource of --shards (None without), after checking every tar.

    Raises:
        ValueError: --no-filter without --shards, --shards with --url-list or without
            --eval-set; ShardsError: nothing matched, or a tar is missing or unreadable.
    """
    from components.filter_shard.existing import check_shards, resolve_shards
    from pipelines.data_source import DataSource

    if not shards:
        if no_filter:
            raise ValueError("--no-filter needs --shards: the existing shards to train on")
        return None
    if url_list is not None or eval_set is None:
        raise ValueError("--shards replaces --url-list and needs --eval-set (the zero-shot "
                         "eval set to score the model on)")
    check_shards(shards, resolve_shards(shards))
    return DataSource(from_shards=True)


def _start_embedded_default(stack: contextlib.ExitStack, workdir: str, recipe,
                            seed: int) -> tuple[str, str, dict]:
    """Generate the demo data and serve it; the server lives as long as ``stack``."""
    from pipelines.demo_server import serve_directory, write_url_list

    t0 = time.time()
    demo = prepare_demo_data(workdir, recipe, seed)
    base_url = stack.enter_context(serve_directory(demo["www"]))
    url_list = os.path.join(workdir, "urls.parquet")
    counts = write_url_list(demo["samples"], demo["www"], base_url, url_list, seed=seed)
    log.info("demo data: %d training images, url list %s (%s), served at %s, %.0fs",
             len(demo["samples"]), url_list, counts, base_url, time.time() - t0)
    return url_list, demo["eval_set"], counts
