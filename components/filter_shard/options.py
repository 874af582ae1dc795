"""Runner settings and the command line of ``filter_shard``.

Local (default): Beam's FnApiRunner in the calling process, offline. Google Cloud:
``dataflow_options(...)`` gives the DataflowRunner options; the workers need this package,
shipped one of three ways: a worker container image with it installed (the pipeline's
data image: nothing is built or uploaded at submit time), a wheel of it
(``extra_packages``), or ``setup_file`` naming this project's ``pyproject.toml`` (Beam
builds an sdist with ``python -m build`` and the workers pip-install it). See
docs/DATA.md. From the command line::

    python -m components.filter_shard --input gs://b/shards --output gs://b/filtered \\
        --runner DataflowRunner --project P --region us-central1 \\
        --temp-location gs://b/tmp --machine-type n2-standard-4 --max-workers 50 \\
        --sdk-container-image us-docker.pkg.dev/P/clipa/clipa-data:0.1.0
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from components.cli_args import json_items, key_value
from components.filter_shard.samples import FILTER_PRESETS, FilterConfig


def dataflow_options(project: str, region: str, temp_location: str, *,
                     machine_type: str = "", max_num_workers: int = 0,
                     sdk_container_image: str = "", extra_packages: tuple = (),
                     setup_file: str = "", **more) -> dict:
    """Beam pipeline options that run ``filter_shard`` on Google Cloud Dataflow.

    The workers need this package: a worker container that has it installed
    (``sdk_container_image``, e.g. the pipeline's data image), a wheel of it
    (``extra_packages=["dist/clipa_pipeline-0.1.0-py3-none-any.whl"]``, built with
    ``pip wheel --no-deps -w dist .``), or ``setup_file="pyproject.toml"`` (Beam builds
    and stages an sdist of the project; the workers install it and its dependencies
    from PyPI at start-up, which is slower than an image).

    Args:
        project, region: the Google Cloud project and Dataflow region.
        temp_location: a ``gs://`` folder for Dataflow's temporary and staging files.
        machine_type: worker machine type, e.g. ``"n2-standard-4"`` ("" = Dataflow's).
        max_num_workers: autoscaling ceiling (0 = Dataflow's default).
        sdk_container_image, extra_packages, setup_file: how the workers get this
            package (at least one).
        more: any other Beam option, e.g. ``service_account_email``, ``network``.

    Returns:
        A dict for ``run_filter_shard(pipeline_options=...)``.

    Raises:
        ValueError: naming the option, when one is missing or not where it must be.
    """
    for name, value in (("project", project), ("region", region)):
        if not value:
            raise ValueError(f"Dataflow needs {name}=; expected a Google Cloud {name}")
    if not str(temp_location).startswith("gs://"):
        raise ValueError(f"temp_location={temp_location!r}; expected a gs:// folder for "
                         "Dataflow's temporary files")
    if not sdk_container_image and not extra_packages and not setup_file:
        raise ValueError("Dataflow workers need this package: give sdk_container_image "
                         "(an image with clipa-pipeline installed), extra_packages (a wheel) "
                         "or setup_file (this project's pyproject.toml)")
    for package in extra_packages:
        if not os.path.isfile(package) and "://" not in str(package):
            raise ValueError(f"extra_packages entry {package!r} does not exist; expected a "
                             "wheel built with `pip wheel --no-deps -w dist .`")
    if setup_file and (not os.path.isfile(setup_file) or os.path.basename(setup_file)
                       not in ("setup.py", "pyproject.toml")):
        raise ValueError(f"setup_file={setup_file!r}; expected the path of an existing "
                         "setup.py or pyproject.toml (this project's: pyproject.toml)")
    options = {"project": project, "region": region, "temp_location": temp_location,
               "save_main_session": False, **more}
    if machine_type:
        options["machine_type"] = machine_type
    if max_num_workers:
        options["max_num_workers"] = int(max_num_workers)
    if sdk_container_image:
        options["sdk_container_image"] = sdk_container_image
    if extra_packages:
        options["extra_packages"] = list(extra_packages)
    if setup_file:
        options["setup_file"] = os.path.abspath(setup_file)
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_filter_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per FilterConfig field, its help from the field (the one definition).

    A flag not given is left out (``argparse.SUPPRESS``), so the preset or FilterConfig's
    default applies; a True-by-default switch is turned off with ``--no-NAME``.
    """
    group = ap.add_argument_group("filters (FilterConfig; 0 turns a filter off)")
    group.add_argument("--preset", default="", choices=["", *sorted(FILTER_PRESETS)],
                       help="a filter preset; flags given override it")
    for f in dataclasses.fields(FilterConfig):
        kind = str(f.type).split("|")[0].strip()
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind == "bool" and f.default:
            group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name,
                               action="store_false", default=argparse.SUPPRESS, help=help_text)
        elif kind == "bool":
            group.add_argument(_flag(f.name), action="store_true", default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(_flag(f.name), type={"int": int, "float": float}.get(kind, str),
                               default=argparse.SUPPRESS, help=help_text)


def parse_args(argv: list[str] | None, description: str) -> dict:
    """The command line of ``python -m components.filter_shard`` -> run_filter_shard kwargs."""
    ap = argparse.ArgumentParser(prog="python -m components.filter_shard",
                                 description=description)
    ap.add_argument("--input", required=True, help="a shards artifact (download or import)")
    ap.add_argument("--output", required=True, help="folder for the filtered shards")
    add_filter_flags(ap)
    ap.add_argument("--runner", default="FnApiRunner", help="FnApiRunner or DataflowRunner")
    df = ap.add_argument_group("Dataflow (with --runner DataflowRunner)")
    for flag in ("--project", "--region", "--temp-location", "--machine-type",
                 "--sdk-container-image"):
        df.add_argument(flag, default="")
    df.add_argument("--max-workers", type=int, default=0)
    df.add_argument("--extra-package", action="append", default=[],
                    help="a wheel of this project for the workers (repeatable)")
    df.add_argument("--setup-file", default="",
                    help="pyproject.toml of this project: Beam builds and ships an sdist")
    ap.add_argument("--option", action="append", default=[], type=key_value("--option"),
                    metavar="KEY=VALUE",
                    help="a Beam pipeline option (repeatable), e.g. direct_num_workers=2")
    a = vars(ap.parse_args(argv))
    options = json_items(a["option"])
    if a["runner"] == "DataflowRunner":
        options = dataflow_options(a["project"], a["region"], a["temp_location"],
                                   machine_type=a["machine_type"], max_num_workers=a["max_workers"],
                                   sdk_container_image=a["sdk_container_image"],
                                   extra_packages=tuple(a["extra_package"]),
                                   setup_file=a["setup_file"], **options)
    settings = {f.name: a[f.name] for f in dataclasses.fields(FilterConfig) if f.name in a}
    return dict(input_dir=a["input"], output_dir=a["output"], runner=a["runner"],
                pipeline_options=options, preset=a["preset"], **settings)
