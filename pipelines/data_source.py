"""Where the training pipeline's data comes from: chosen when the pipeline is compiled.

    DataSource()                          url_list -> download (parts in parallel) -> filter_shard
    DataSource(from_shards=True)          shards (existing .tar) -> import_shards -> filter_shard
    DataSource(download_parallelism=64)   at most 64 download parts at once

KFP fixes a ParallelFor's parallelism at compile time, and kfp.local runs neither a
condition's ``OneOf`` nor an empty ParallelFor, so the source is a compile-time choice,
made like a placement (``pipelines/placement.py``): the pipeline function reads
``active()`` while it is traced, and ``with_data_source`` re-traces it. The URI of the
shards and ``no_filter`` stay run-time parameters (``shards``, ``no_filter``).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from components.download.pipeline import PARALLELISM, download, make_download


@dataclass(frozen=True)
class DataSource:
    """Compile-time choices of the data steps.

    Attributes:
        from_shards: start from existing shards (pipeline parameter ``shards``) instead
            of downloading ``url_list``.
        download_parallelism: most download parts running at once (Vertex queues the rest).
    """
    from_shards: bool = False
    download_parallelism: int = PARALLELISM

    def __post_init__(self):
        if self.download_parallelism < 1:
            raise ValueError(f"download_parallelism={self.download_parallelism}; expected "
                             "at least 1 part at a time")


# (source, its download sub-pipeline): KFP cannot trace a sub-pipeline while tracing the
# pipeline that calls it, so ``sourcing`` builds it first.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "clipa_data_source", default=(DataSource(), download))


def active() -> DataSource:
    """The data source the pipeline being traced uses."""
    return _ACTIVE.get()[0]


def download_step():
    """The download sub-pipeline of the active source (its parallelism compiled in)."""
    return _ACTIVE.get()[1]


@contextlib.contextmanager
def sourcing(source: DataSource):
    """Trace pipelines under ``source`` inside this block (enter it outside any tracing)."""
    token = _ACTIVE.set((source, make_download(source.download_parallelism)))
    try:
        yield source
    finally:
        _ACTIVE.reset(token)


def with_data_source(pipeline, source: DataSource | None):
    """``pipeline`` re-traced under ``source`` (itself when ``source`` is None or the default)."""
    from kfp import dsl

    if source is None or source == DataSource():
        return pipeline
    with sourcing(source):
        return dsl.pipeline(name=pipeline.component_spec.name,
                            description=pipeline.component_spec.description)(pipeline.pipeline_func)


def add_download_parallelism_arg(parser) -> None:
    parser.add_argument("--download-parallelism", type=int, default=PARALLELISM, metavar="N",
                        help=f"most download parts running at once (default: {PARALLELISM})")


def add_shards_args(parser) -> None:
    """--shards URI and --no-filter (clipa run, clipa submit)."""
    parser.add_argument("--shards", default=None, metavar="URI",
                        help="start from existing webdataset shards (a folder, glob or brace "
                             "pattern of .tar, local or gs://; img2dataset or DataComp layout) "
                             "instead of downloading a URL list")
    parser.add_argument("--no-filter", action="store_true",
                        help="with --shards: train on them as they are (no filter_shard)")


def source_from_args(args) -> DataSource:
    """The DataSource that --shards / --from-shards / --download-parallelism describe.

    Raises:
        ValueError: --no-filter without --shards, or a parallelism below 1.
    """
    shards = getattr(args, "shards", None)
    if getattr(args, "no_filter", False) and not shards:
        raise ValueError("--no-filter needs --shards: the existing shards to train on as they are")
    return DataSource(from_shards=bool(shards or getattr(args, "from_shards", False)),
                      download_parallelism=getattr(args, "download_parallelism", PARALLELISM))


def shards_arguments(args) -> dict:
    """The pipeline parameters of --shards / --no-filter (none without --shards)."""
    if not getattr(args, "shards", None):
        return {}
    return {"shards": args.shards, "no_filter": bool(args.no_filter), "url_list": ""}
