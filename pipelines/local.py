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


def run_pipeline_locally(pipeline_root: str, arguments: dict, source=None):
    """Run ``clipa_training`` (under data ``source``, if given) through kfp.local and
    return the summary artifact's path."""
    from kfp import local

    from pipelines.data_source import with_data_source
    from pipelines.training_pipeline import clipa_training

    clipa_training = with_data_source(clipa_training, source)

    # use_venv=False: every task runs in this interpreter's environment, which already has
    # the package installed, exactly like the component images on Vertex.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True)
    task = clipa_training(**arguments)
    return task.output.path


def run_local(workdir: str, recipe_name: str = "demo", url_list: str | None = None,
              eval_set: str | None = None, overrides: dict | None = None,
              shards: str | None = None, no_filter: bool = False) -> LocalRun:
    """Run the whole pipeline locally, on the embedded default unless ``url_list`` is given.

    Args:
        workdir: folder for this run (demo data, pipeline_root, report).
        recipe_name: a recipe of ``clipa_model.recipes`` (``demo``, ``smoke``).
        url_list: a real URL list; then ``eval_set`` must name an eval set folder.
        overrides: pipeline parameters that replace the recipe's.
        shards, no_filter: start from existing shards instead of a URL list (checked
            here, before any work; ``eval_set`` is then required), trained on as they are
            with ``no_filter``.
    Raises:
        UrlListError: the URL list is missing or malformed (checked before any work).
        ValueError: an unknown recipe or parameter, or a URL list without eval set.
    """
    from components.download.component import read_url_list
    from pipelines.training_pipeline import pipeline_arguments

    if recipe_name not in recipes.RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}; expected one of {sorted(recipes.RECIPES)}")
    recipe = recipes.RECIPES[recipe_name]
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
    os.makedirs(workdir, exist_ok=True)
    arguments = pipeline_arguments(recipe)
    from pipelines.training_pipeline import clipa_training

    known = clipa_training.component_spec.inputs
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ValueError(f"unknown pipeline parameter(s) {unknown}; expected one of {sorted(known)}")
    arguments.update(overrides or {})
    start = time.time()
    counts = None
    with contextlib.ExitStack() as stack:
        if url_list is None:
            url_list, eval_set, counts = _start_embedded_default(
                stack, workdir, recipe, arguments.get("seed", 0))
            # The demo server is on loopback, which the download refuses unless allowed.
            arguments.setdefault("download_allow_networks", DEMO_ALLOW_NETWORKS)
        arguments.update(url_list=url_list, eval_set=eval_set)
        if source is not None:
            arguments.update(shards=shards, no_filter=no_filter)
        summary_path = run_pipeline_locally(os.path.join(workdir, "pipeline_root"), arguments,
                                            source)
    with open(summary_path) as f:
        summary = json.load(f)
    summary["demo_url_list"] = counts
    report_path = os.path.join(os.path.dirname(os.path.dirname(summary_path)), "summarize", "report")
    return LocalRun(workdir, summary, summary_path, report_path, counts, time.time() - start)


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
