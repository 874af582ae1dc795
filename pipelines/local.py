"""Run the training pipeline on this machine with KFP's local runner.

The embedded default needs nothing from outside: it renders a synthetic image-caption
dataset, serves it from an HTTP server on 127.0.0.1 (started and stopped here), writes
the URL list (with realistic bad rows) that ``download`` consumes, and runs every stage
through ``kfp.local``'s SubprocessRunner in this Python environment, artifacts under a
local pipeline_root.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass

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


def run_pipeline_locally(pipeline_root: str, arguments: dict):
    """Run ``clipa_training`` through kfp.local and return the summary artifact's path."""
    from kfp import local

    from pipelines.training_pipeline import clipa_training

    # use_venv=False: every task runs in this interpreter's environment, which already has
    # the package installed, exactly like the component images on Vertex.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True)
    task = clipa_training(**arguments)
    return task.output.path


def run_local(workdir: str, recipe_name: str = "demo", url_list: str | None = None,
              eval_set: str | None = None, overrides: dict | None = None,
              force_long_run: bool = False) -> LocalRun:
    """Run the whole pipeline locally, on the embedded default unless ``url_list`` is given.

    Args:
        workdir: folder for this run (demo data, pipeline_root, report).
        recipe_name: a built-in recipe (``demo``, ``smoke``, ...) or a YAML / JSON recipe file.
        url_list: a real URL list; then ``eval_set`` must name an eval set folder.
        overrides: pipeline parameters that replace the recipe's.
        force_long_run: run even when ``clipa plan`` prices it above a day of this machine.
    Raises:
        UrlListError: the URL list is missing or malformed (checked before any work).
        ValueError: an unknown recipe or parameter, a URL list without eval set, a stage
            that cannot run here, or (LongRunError) a run of more than a day.
    """
    from components.download.component import read_url_list
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
    if url_list is None and recipe.n_train <= 0:
        raise ValueError(f"recipe {recipe_name!r} has no embedded demo data (it is a paper-scale "
                         "schedule): give --url-list and --eval-set")
    if url_list is not None:
        read_url_list(url_list)  # fail fast, before anything is generated or started
        if eval_set is None:
            raise ValueError("--eval-set is required with --url-list: the zero-shot eval set "
                             "(a folder as described in docs/ARTIFACTS.md) to score the model on")
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    counts = None
    with contextlib.ExitStack() as stack:
        if url_list is None:
            url_list, eval_set, counts = _start_embedded_default(
                stack, workdir, recipe, arguments.get("seed", 0))
            # The demo server is on loopback, which the download refuses unless allowed.
            arguments.setdefault("download_allow_networks", DEMO_ALLOW_NETWORKS)
        arguments.update(url_list=url_list, eval_set=eval_set)
        summary_path = run_pipeline_locally(os.path.join(workdir, "pipeline_root"), arguments)
    with open(summary_path) as f:
        summary = json.load(f)
    summary["demo_url_list"] = counts
    report_path = os.path.join(os.path.dirname(os.path.dirname(summary_path)), "summarize", "report")
    return LocalRun(workdir, summary, summary_path, report_path, counts, time.time() - start)


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
