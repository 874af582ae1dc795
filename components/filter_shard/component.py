"""The ``filter_shard`` step: filter, deduplicate and reshard img2dataset shards with Beam.

Input: the ``download`` step's folder (marker kind ``shards``): ``NNNNN.tar`` holding
``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample. Output (marker kind
``filtered_shards``, see docs/ARTIFACTS.md): ``shard-NNNNN.tar`` of exactly
``samples_per_shard`` samples each (the last may be short), ``manifest.json``,
``sizes.json`` (what open_clip reads) and ``report.html``.

The pipeline (``components.filter_shard.beam_graph``) reads the tars on many workers, drops samples
by reason (Beam Metrics counters), deduplicates and orders all kept samples by a hash of
(seed, key), and writes them back in shards. This module prepares the folders, runs it,
and writes manifest, sizes, report and, last, the marker.

Run it alone: ``python -m components.filter_shard --input DIR --output DIR``.
"""
# No `from __future__ import annotations`: kfp reads the component's annotations as types.
import dataclasses
import json
import logging
import time
from collections import Counter

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from clipa_model import artifacts
from components.clipa_component import DATA_IMAGE, clipa_component
from components.filter_shard.beam_graph import build_beam_graph, read_counters
from components.filter_shard.report import build_manifest, render_report, write_outputs
from components.filter_shard.samples import REASONS, FilterConfig, shard_name, shard_sizes

log = logging.getLogger("clipa.filter_shard")

# The Python FnApiRunner runs offline and is what Beam's DirectRunner picks for a batch
# pipeline anyway; DirectRunner itself first tries to download the Prism binary.
DEFAULT_RUNNER = "FnApiRunner"

# Files this step writes in its output folder (cleared before a run).
_OUTPUTS = ("manifest.json", "sizes.json", "report.html")


# ---------------------------------------------------------------------------------------
# Folders in and out


def _part_folders(input_dir: str, marker: dict) -> list[str]:
    """The folders holding the tars: the artifact itself, or its download parts."""
    return [str(p) for p in marker.get("parts") or []] or [str(input_dir)]


def list_input_shards(input_dir: str) -> list[str]:
    """The ``*.tar`` shards of a ``shards`` artifact, sorted, as paths or URLs.

    Existing shards (marker field ``tars``, from ``import_shards``) are listed as they are.
    A download split into parts (marker field ``parts``: the part folders) has its
    shards in those folders; their names are unique across parts (global shard ids).

    Raises:
        ArtifactError: when ``input_dir`` is not a finished ``shards`` artifact.
        ValueError: when it holds no ``.tar`` shard, or two parts hold the same name.
    """
    marker = artifacts.read_marker(input_dir, "shards")
    if marker.get("tars"):  # existing shards (import_shards): checked when imported
        return [str(t) for t in marker["tars"]]
    found, seen = [], {}
    for folder in _part_folders(input_dir, marker):
        fs, root = fsspec.core.url_to_fs(folder)
        for path in sorted(fs.glob(root.rstrip("/") + "/*.tar")):
            name = path.rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"{input_dir}: shard {name} is in two parts ({seen[name]} "
                                 f"and {folder}); expected unique shard names across parts")
            seen[name] = folder
            found.append(fs.unstrip_protocol(path) if "://" in folder else path)
    if not found:
        raise ValueError(f"{input_dir}: no .tar shards; expected img2dataset webdataset "
                         "output (NNNNN.tar with KEY.jpg, KEY.txt, KEY.json)")
    return sorted(found, key=lambda p: p.rsplit("/", 1)[-1])


def _prepare_output(output_dir: str, input_dir: str) -> None:
    """Empty ``output_dir`` of a previous run, marker first, so no stale file survives.

    Raises:
        ValueError: when ``output_dir`` is the input folder or another kind of artifact.
    """
    fs, root = fsspec.core.url_to_fs(str(output_dir))
    if root.rstrip("/") == fsspec.core.url_to_fs(str(input_dir))[1].rstrip("/"):
        raise ValueError(f"{output_dir}: output folder is the input folder; expected a "
                         "separate folder for the filtered shards")
    if not fs.exists(root):
        fs.makedirs(root, exist_ok=True)
        return
    marker = artifacts.join(root, artifacts.MARKER)
    if fs.exists(marker):
        kind = artifacts.read_json(artifacts.join(output_dir, artifacts.MARKER)).get("kind")
        if kind != "filtered_shards":
            raise ValueError(f"{output_dir}: holds a {kind!r} artifact; expected an empty "
                             "folder or a previous filter_shard output to overwrite")
        fs.rm(marker)  # first: from here on the folder is unfinished
    stale = fs.glob(root.rstrip("/") + "/shard-*")
    stale += [p for p in (artifacts.join(root, n) for n in _OUTPUTS) if fs.exists(p)]
    if stale:
        fs.rm(stale)


def _settings(cfg: FilterConfig, runner: str) -> dict:
    return {**dataclasses.asdict(cfg), "runner": runner}


# ---------------------------------------------------------------------------------------
# The step


def make_pipeline(tar_paths: list[str], output_dir: str, cfg: FilterConfig,
                  runner: str = DEFAULT_RUNNER, pipeline_options: dict | None = None,
                  eval_images=None) -> beam.Pipeline:
    """The Beam pipeline of ``filter_shard``, built but not run.

    Args:
        tar_paths: the input shards (``list_input_shards``).
        output_dir: where the output shards go.
        cfg: the filter settings.
        runner: a Beam runner name, e.g. ``"FnApiRunner"`` or ``"DataflowRunner"``.
        pipeline_options: Beam pipeline options as keywords (``filter_options.
            dataflow_options`` for Dataflow); Beam checks them here.
        eval_images: the hashed eval set when ``cfg.decontaminate``.
    """
    options = PipelineOptions(flags=[], **(pipeline_options or {}))
    p = beam.Pipeline(runner=runner, options=options)
    build_beam_graph(p, tar_paths, output_dir, cfg, eval_images)
    return p


def check_clip_model(ref: str) -> None:
    """Fail now, not on a worker, when ``ref`` cannot name a model ``ClipScorer`` loads.

    Raises:
        ModelRefError: naming the reference and the three forms expected.
    """
    from clipa_model.eval.models import OPEN_CLIP_PREFIX, ModelRefError, split_label

    ref = split_label(ref.strip())[1]
    if ref.startswith(OPEN_CLIP_PREFIX):
        name, sep, file = ref[len(OPEN_CLIP_PREFIX):].partition(":")
        fs, path = fsspec.core.url_to_fs(file or ".")
        if not (sep and name and file) or not fs.isfile(path):
            raise ModelRefError(f"clip_model={ref!r}: expected open_clip:NAME:FILE with an "
                                "existing weights FILE, e.g. open_clip:ViT-L-14:/w/l14.pt")
        return
    if not (artifacts.has_marker(ref, "model")
            or fsspec.core.url_to_fs(artifacts.join(ref, "open_clip_config.json"))[0].exists(
                artifacts.join(ref, "open_clip_config.json"))):
        raise ModelRefError(f"clip_model={ref!r}: not a model; expected a Model artifact "
                            "folder, an exported open_clip folder or open_clip:NAME:FILE")


def _prepare_inputs(cfg: FilterConfig):
    """Check every setting that names a file and hash the eval set, before any work.

    Returns:
        The ``matching.EvalImages`` of ``cfg.decontaminate`` (None when off).
    """
    from components.filter_shard.matching import EvalImages, eval_set_images, inspect_uid_list

    if cfg.clip_model:
        check_clip_model(cfg.clip_model)
    if cfg.uid_list:  # its header or footer: the workers read the uids, in pieces
        source = inspect_uid_list(cfg.uid_list)
        log.info("filter_shard: keeping only the %d uids of %s (%d pieces)", source.count,
                 cfg.uid_list, len(source.pieces))
    if not cfg.decontaminate:
        return None
    images = EvalImages.from_images(eval_set_images(cfg.decontaminate), cfg.eval_phash_distance)
    if not images.sha256:
        raise ValueError(f"decontaminate={cfg.decontaminate!r}: no images; expected an "
                         "eval set (eval_set artifact, webdataset shards or ImageFolder)")
    log.info("filter_shard: %d eval images hashed for decontamination", len(images.sha256))
    return images


def run_filter_shard(input_dir: str, output_dir: str, *, runner: str = DEFAULT_RUNNER,
                     pipeline_options: dict | None = None, preset: str = "",
                     **settings) -> dict:
    """Filter, deduplicate and reshard the webdataset shards of ``input_dir``.

    Args:
        input_dir: a ``shards`` artifact: the download step's folder or
            ``import_shards``' (existing shards); local or gs://.
        output_dir: the artifact folder to write; a previous filter_shard output there
            is replaced.
        runner: the Beam runner, ``"FnApiRunner"`` (local, offline) or
            ``"DataflowRunner"`` (with ``components.filter_shard.options.dataflow_options(...)``
            as ``pipeline_options``).
        pipeline_options: more Beam pipeline options, e.g. ``{"direct_num_workers": 2}``
            (on a 2-core machine two threads were slower than one: the checks hold the GIL).
        preset: "" or a name of ``FILTER_PRESETS`` (e.g. ``"datacomp_basic"``); settings
            that differ from the defaults override it.
        settings: fields of ``FilterConfig`` (0 / None / False turns a filter off).

    Returns:
        The marker fields: ``count`` (kept), ``input_count`` (samples read, plus those a
        truncated tar lost by its ``NNNNN_stats.json``), ``dropped`` (reason -> samples;
        ``count + sum(dropped) == input_count``), ``shards`` (names), ``seconds``,
        ``samples_per_second`` and the settings.

    Raises:
        ArtifactError: ``input_dir`` is not a finished ``shards`` artifact.
        ValueError: no ``.tar`` in ``input_dir``, bad settings, a uid list or eval set that
            cannot be read, or every sample dropped.
    """
    cfg = FilterConfig.from_preset(preset, **settings).validate()
    eval_images = _prepare_inputs(cfg)
    tar_paths = list_input_shards(input_dir)
    _prepare_output(output_dir, input_dir)

    start = time.perf_counter()
    p = make_pipeline(tar_paths, str(output_dir), cfg, runner, pipeline_options, eval_images)
    result = p.run()
    result.wait_until_finish()  # raises if the pipeline failed
    counts = read_counters(result)
    seconds = time.perf_counter() - start
    return _finish(input_dir, output_dir, cfg, runner, counts, seconds, len(tar_paths))


def _finish(input_dir: str, output_dir: str, cfg: FilterConfig, runner: str,
            counts: Counter, seconds: float, n_inputs: int) -> dict:
    """Check the counts, write manifest, sizes, report and, last, the marker."""
    input_count, kept = counts["input"], counts["kept"]
    dropped = {r: counts[f"dropped_{r}"] for r in REASONS if counts[f"dropped_{r}"]}
    if input_count == 0:
        raise ValueError(f"{input_dir}: its {n_inputs} .tar shards hold no samples; expected "
                         "img2dataset samples (KEY.jpg, KEY.txt, KEY.json)")
    if kept == 0:
        raise ValueError(
            f"{input_dir}: every sample was dropped ({input_count} read from {n_inputs} "
            f"shards; dropped by reason: {dropped or 'none'}); expected at least one sample "
            "to pass the filters. Check the shards or loosen the filter settings")
    if kept + sum(dropped.values()) != input_count:
        raise RuntimeError(f"{input_dir}: counts do not add up: kept {kept} + dropped "
                           f"{dropped} != read {input_count}; the runner lost samples")
    sizes = shard_sizes(kept, cfg.samples_per_shard)
    names = [shard_name(i) for i in range(len(sizes))]
    manifest = build_manifest(list(zip(names, sizes)), input_count, dropped)
    settings = _settings(cfg, runner)
    write_outputs(output_dir, manifest,
                  render_report(manifest, str(input_dir), seconds, settings, REASONS))
    rate = input_count / max(seconds, 1e-9)
    log.info("filter_shard: kept %d of %d samples in %d shards; dropped %s; %.1f s, "
             "%.0f samples/s", kept, input_count, len(names), dropped or "none", seconds, rate)
    return artifacts.write_marker(  # last: the folder is now a finished artifact
        output_dir, "filtered_shards", count=kept, input_count=input_count,
        dropped=manifest["dropped"], shards=names, seconds=round(seconds, 3),
        samples_per_second=round(rate, 1), settings=settings)


def log_metrics(stats, result: dict) -> None:
    """KFP Metrics of a run: input, kept, samples/s and ``dropped_<reason>`` for every
    reason (0 included, so runs compare column by column)."""
    stats.log_metric("input", result["input_count"])
    stats.log_metric("kept", result["count"])
    stats.log_metric("kept_fraction", result["count"] / max(result["input_count"], 1))
    stats.log_metric("samples_per_second", result["samples_per_second"])
    for reason in REASONS:
        stats.log_metric(f"dropped_{reason}", result["dropped"].get(reason, 0))


# ---------------------------------------------------------------------------------------
# KFP component and command line


# The component's values that stand for None (KFP parameters cannot be None).
COMPONENT_OFF = {"clip_min_score": -2.0, "clip_top_fraction": 1.0}


def config_from_parameters(filter_preset: str = "", **params) -> FilterConfig:
    """The FilterConfig the filter_shard component's parameters describe (``COMPONENT_OFF``
    values mean None); a test checks that the component's defaults give ``FilterConfig()``."""
    settings = {k: (None if k in COMPONENT_OFF and v == COMPONENT_OFF[k] else v)
                for k, v in params.items()}
    return FilterConfig.from_preset(filter_preset, **settings)


def pass_through_outputs(input_dir: str, filtered, stats, report) -> None:
    """``no_filter``: the KFP outputs of ``existing.pass_through`` (input = kept)."""
    import os

    from components.filter_shard.existing import pass_through

    result = pass_through(input_dir, filtered.path)
    for name in ("input", "kept"):
        stats.log_metric(name, result["count"])
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(f"<p>no_filter: {result['count']} samples in {len(result['shards'])} "
                "existing shards, trained on as they are.</p>")
    filtered.metadata.update(count=result["count"], shards=len(result["shards"]))


@clipa_component(DATA_IMAGE)
def filter_shard(shards: Input[Dataset], filtered: Output[Dataset],
                 stats: Output[Metrics], report: Output[HTML],
                 samples_per_shard: int = 256, min_image_side: int = 64,
                 max_aspect_ratio: float = 3.0, min_caption_words: int = 3,
                 dedup_sha256: bool = True, seed: int = 0, min_caption_chars: int = 6,
                 dedup_url: bool = True, english_only: bool = False,
                 clip_model: str = "", clip_min_score: float = -2.0,
                 clip_top_fraction: float = 1.0, filter_preset: str = "", uid_list: str = "",
                 decontaminate: str = "", eval_phash_distance: int = 4,
                 max_image_pixels: int = 89478485, full_decode: bool = False,
                 no_filter: bool = False, runner: str = "FnApiRunner",
                 dataflow_project: str = "", dataflow_region: str = "",
                 dataflow_temp_location: str = "", dataflow_machine_type: str = "",
                 dataflow_max_workers: int = 0, dataflow_container_image: str = ""):
    """Filter, deduplicate and reshard shards (Beam: local or Dataflow).

    Args:
        samples_per_shard ... full_decode: the fields of FilterConfig
            (components/filter_shard/samples.py, where each is documented);
            clip_min_score -2 and clip_top_fraction 1 mean off.
        filter_preset: "" or "datacomp_basic"; settings left at their defaults take the
            preset's values.
        no_filter: train on the input shards as they are (no filter, dedup or reshard).
        runner: "FnApiRunner" (in this task) or "DataflowRunner" (with the dataflow_*
            settings; dataflow_container_image defaults to this component's image).

    Outputs: filtered (shard-NNNNN.tar, manifest.json, sizes.json), stats (input, kept,
    dropped_<reason> for every reason), report (HTML page of kept/dropped per reason).
    """
    import dataclasses
    import os
    import shutil

    from components.clipa_component import DATA_IMAGE
    from components.filter_shard.component import (config_from_parameters, log_metrics,
                                                    pass_through_outputs, run_filter_shard)
    from components.filter_shard.options import dataflow_options

    if no_filter:
        return pass_through_outputs(shards.path, filtered, stats, report)
    cfg = config_from_parameters(
        filter_preset, samples_per_shard=samples_per_shard, min_image_side=min_image_side,
        max_aspect_ratio=max_aspect_ratio, min_caption_words=min_caption_words,
        dedup_sha256=dedup_sha256, seed=seed, min_caption_chars=min_caption_chars,
        dedup_url=dedup_url, english_only=english_only, clip_model=clip_model,
        clip_min_score=clip_min_score, clip_top_fraction=clip_top_fraction,
        uid_list=uid_list, decontaminate=decontaminate,
        eval_phash_distance=eval_phash_distance, max_image_pixels=max_image_pixels,
        full_decode=full_decode)
    options = None
    if runner == "DataflowRunner":
        options = dataflow_options(
            dataflow_project, dataflow_region, dataflow_temp_location,
            machine_type=dataflow_machine_type, max_num_workers=dataflow_max_workers,
            sdk_container_image=dataflow_container_image or DATA_IMAGE)
    result = run_filter_shard(shards.path, filtered.path, runner=runner,
                              pipeline_options=options, **dataclasses.asdict(cfg))
    log_metrics(stats, result)
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(filtered.path, "report.html"), report.path)
    filtered.metadata.update(count=result["count"], input_count=result["input_count"],
                             shards=len(result["shards"]), samples_per_shard=cfg.samples_per_shard)


def main(argv: list[str] | None = None) -> dict:
    """Command line: run_filter_shard on two folders; prints the marker as JSON."""
    from components.filter_shard.options import parse_args

    kwargs = parse_args(argv, __doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_filter_shard(**kwargs)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.filter_shard"))
