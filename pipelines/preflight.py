"""Check a whole pipeline run before its first step (``clipa run``, ``clipa submit``).

Before this, a finetune mask ratio of 1.5 or a missing eval set failed inside a step
after download, filter and the earlier training stages had run, as a generic "Inner task
failed" among hundreds of log lines. ``preflight`` checks, in a few seconds:

* every training stage's config, resolved as its step will resolve it, against the
  preset (``check_stage_configs``: patch size, image sizes, mask ratios, samples...);
* the download options (``DownloadOptions.validate``) and the parts / allow-list;
* the URL list: it exists, its first file reads, it has the url and caption columns;
* the eval set: it exists, holds images, and every label is within its class list.

A failure raises ``PreflightError``: one line naming the parameter and what was
expected; the CLI prints it and exits with status 2.

The stage check takes a list of resolved ``StageConfig`` and a preset name;
``stages_from_parameters`` resolves them from ``recipe`` + ``stage_overrides`` exactly as
the training steps do.
"""
from __future__ import annotations

import re
import tarfile

import fsspec

from clipa_model.config import ConfigError, StageConfig

# StageConfig fields that come from pipeline parameters shared by every stage.
SHARED_FIELDS = {"num_workers": "train_loader_workers", "num_threads": "train_torch_threads",
                 "seed": "seed"}
# Pipeline parameter -> DownloadOptions field (the rest of download's settings are fixed).
DOWNLOAD_PARAMETERS = {"download_image_size": "image_size", "download_processes": "processes",
                       "download_threads": "threads", "samples_per_shard": "samples_per_shard"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class PreflightError(ValueError):
    """A run that would fail in a step; the message names the parameter at fault."""


def _parameter_error(error: Exception, name_of) -> PreflightError:
    """``ConfigError`` ("StageConfig.mask_ratio=1.5 for stage 'x': expected ...") -> one
    line naming the pipeline parameter ``name_of(stage, field)``."""
    m = re.match(r"StageConfig\.(\w+)=(.*) for stage '([^']*)': (expected .*)", str(error))
    if not m:
        return PreflightError(str(error))
    field, value, stage, expected = m.groups()
    return PreflightError(f"{name_of(stage, field)}={value}: {expected} (stage {stage})")


def parameter_names(stages: list[StageConfig]):
    """(stage, field) -> how the user sets it: a run-level parameter, else stage_overrides."""
    def name_of(stage: str, field: str) -> str:
        if field in SHARED_FIELDS:
            return f"pipeline parameter {SHARED_FIELDS[field]}"
        return f"stage_overrides {stage}.{field} (or the recipe's)"
    return name_of


def check_stage_configs(stages: list[StageConfig], preset: str, name_of=None) -> None:
    """Check that every stage can run with ``preset``.

    Args:
        stages: the resolved config of each training stage, in order.
        preset: the model preset name (clipa_model/presets.py).
        name_of: (stage, field) -> the name the user set it by, for the message.

    Raises:
        PreflightError: naming the preset or the first parameter out of range.
    """
    from clipa_model.presets import PRESETS

    name_of = name_of or (lambda stage, field: f"{stage}.{field}")  # the stage's own field
    if preset not in PRESETS:
        raise PreflightError(f"pipeline parameter preset={preset!r}: expected one of "
                             f"{sorted(PRESETS)}")
    for stage in stages:
        try:
            stage.validate(patch_size=PRESETS[preset].patch_size)
        except ConfigError as e:
            raise _parameter_error(e, name_of) from None


def stages_from_parameters(arguments: dict) -> tuple[list[StageConfig], str]:
    """The StageConfigs the training steps resolve from ``recipe`` + ``stage_overrides`` and
    the run-level parameters (``pipelines/training_args.py``), and the recipe's preset.

    Raises:
        PreflightError: an unknown recipe, stage or field, or a value no StageConfig
            accepts, naming where it was set.
    """
    from pipelines.training_args import check_training_parameters

    try:
        recipe = check_training_parameters(arguments)
    except ConfigError as e:
        raise _parameter_error(e, parameter_names([])) from None
    except TypeError as e:  # e.g. a text where a number belongs
        raise PreflightError(f"pipeline parameter stage_overrides: {e}") from None
    return list(recipe.stages.values()), recipe.preset


def pipeline_defaults() -> dict:
    """The training pipeline's parameters with their default values."""
    from pipelines.training_pipeline import clipa_training

    return {name: spec.default for name, spec in clipa_training.component_spec.inputs.items()
            if spec.default is not None}


def check_download(arguments: dict) -> None:
    """The pipeline's download settings, as the download step will check them."""
    from components.download.options import DownloadOptions
    from components.download.url_safety import parse_allow_list

    args = {**pipeline_defaults(), **arguments}
    options = {field: args[name] for name, field in DOWNLOAD_PARAMETERS.items() if name in args}
    try:
        DownloadOptions(**options).validate()
    except ValueError as e:
        m = re.match(r"download option (\w+)=(.*) is out of range; (expected .*)", str(e))
        if not m:
            raise PreflightError(str(e)) from None
        name = {f: n for n, f in DOWNLOAD_PARAMETERS.items()}[m.group(1)]
        raise PreflightError(f"pipeline parameter {name}={m.group(2)}: {m.group(3)}") from None
    if int(args.get("download_parts", 1)) < 1:
        raise PreflightError(f"pipeline parameter download_parts={args['download_parts']}: "
                             "expected at least 1")
    try:
        parse_allow_list(args.get("download_allow_networks", ""))
    except ValueError as e:
        raise PreflightError(f"pipeline parameter download_allow_networks: {e}") from None


def check_url_list(url_list: str) -> None:
    """The URL list exists and its first file reads with url and caption columns."""
    from components.download.url_list import UrlListError, read_one, url_list_files

    try:
        read_one(url_list_files(url_list)[0], "url", "caption")
    except UrlListError as e:
        raise PreflightError(f"url_list: {e}") from None


def check_eval_set(eval_set: str) -> int:
    """The eval set exists, holds images and every label is within its class list.

    Only tar headers and the small ``KEY.cls`` members are read, no image.

    Returns:
        The number of images.
    """
    from clipa_model.artifacts import ArtifactError
    from clipa_model.eval.data import EvalDataError, open_classification_set

    fs, path = fsspec.core.url_to_fs(str(eval_set))
    if not str(eval_set).endswith(".tar") and "{" not in str(eval_set) and fs.isfile(path):
        raise PreflightError(f"eval_set: {eval_set} is a file; expected a folder (an eval_set "
                             "artifact, webdataset shards or an ImageFolder tree) or a .tar shard")
    try:
        ds = open_classification_set(eval_set)
        images = len(ds.items) + sum(_check_labels(s, len(ds.classnames)) for s in ds.shards)
    except (EvalDataError, ArtifactError, OSError) as e:
        raise PreflightError(f"eval_set: {e}") from None
    if images == 0:
        raise PreflightError(f"eval_set: {eval_set} holds no images; expected an eval_set "
                             "artifact, webdataset shards or an ImageFolder tree (docs/ARTIFACTS.md)")
    return images


def _check_labels(shard: str, num_classes: int) -> int:
    """Images in one shard; raises EvalDataError for a label outside the class list."""
    from clipa_model.eval.data import EvalDataError

    images = 0
    with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            images += ext.lower() in IMAGE_EXTS
            if ext != "cls":
                continue
            raw = tar.extractfile(member).read().decode(errors="replace").strip()
            if not raw.isdigit() or int(raw) >= num_classes:
                raise EvalDataError(
                    f"{shard}: sample {key!r} has label {raw!r}; expected an integer in "
                    f"0..{num_classes - 1} (the {num_classes} classes of the class list)")
    return images


def preflight(arguments: dict, check_data: bool = True) -> list[StageConfig]:
    """Check a training pipeline run's parameters (and its data) before any step.

    Args:
        arguments: pipeline parameters (missing ones take their defaults).
        check_data: also read the URL list and the eval set (when given).

    Returns:
        The resolved training stages.

    Raises:
        PreflightError: one line naming the parameter and what was expected.
    """
    args = {**pipeline_defaults(), **arguments}
    stages, recipe_preset = stages_from_parameters(args)
    check_stage_configs(stages, args.get("preset") or recipe_preset, parameter_names(stages))
    check_download(args)
    if check_data and args.get("url_list"):
        check_url_list(args["url_list"])
    if check_data and args.get("eval_set"):
        check_eval_set(args["eval_set"])
    return stages
