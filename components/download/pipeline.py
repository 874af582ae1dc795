"""``download`` as one pipeline step: split the URL list, N parallel downloads, merge.

    split_url_list -> ParallelFor(parts, parallelism=N) download_part -> merge_download

A sub-pipeline, so the training pipeline sees one ``download`` task whose ``shards``
output feeds ``filter_shard``; Vertex draws it as a group to open. With ``parts=1`` it
is one download task; kfp.local runs the same graph on one machine (its ParallelFor runs
iterations as parallel subprocesses).

Each part task gets its own machine on Vertex (the component's resources), so the list's
throughput grows with ``parts`` until the sites or the bandwidth give out. This module is
not imported inside component containers (it defines a pipeline, not components).
"""
# No `from __future__ import annotations`: kfp reads the annotations as types.
import contextvars
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from components.download.component import download_part, merge_download, split_url_list
from components.download.options import DownloadOptions

# Most part tasks running at once by default; Vertex queues the rest. KFP fixes it at
# compile time: ``make_download(N)`` re-traces the sub-pipeline with another value
# (``clipa compile|submit --download-parallelism N``).
PARALLELISM = 16
_PARALLELISM: contextvars.ContextVar[int] = contextvars.ContextVar("download_parallelism",
                                                                   default=PARALLELISM)


class DownloadOutputs(NamedTuple):
    shards: Dataset


@dsl.pipeline(name="download", description="img2dataset download of a URL list, in parallel parts.")
def download(
    url_list: str,
    parts: int = 1,
    samples_per_shard: int = 1000,
    url_col: str = "url",
    caption_col: str = "caption",
    allow_networks: str = "",
    image_size: int = 256,
    resize_mode: str = "keep_ratio",
    encode_format: str = "jpg",
    encode_quality: int = 95,
    processes: int = 1,
    threads: int = 16,
    timeout: int = 10,
    retries: int = 0,
    min_image_size: int = 0,
    max_aspect_ratio: float = 0.0,
    max_image_pixels: int = 89478485,
    compute_hash: str = "sha256",
    disallowed_header_directives: str = "noai,noimageai,noindex,noimageindex",
    user_agent_token: str = "",
) -> DownloadOutputs:
    """Download ``url_list`` in ``parts`` parallel tasks into one ``shards`` artifact.

    The parameters from ``image_size`` on are ``DownloadOptions``' fields with its
    defaults (checked by tests/components/download/test_download_options.py).
    """
    split = split_url_list(url_list=url_list, parts=parts, samples_per_shard=samples_per_shard,
                           url_col=url_col, caption_col=caption_col,
                           allow_networks=allow_networks)
    split.set_display_name("split-url-list")
    # Every DownloadOptions field but samples_per_shard (the split fixed it) goes to the parts.
    options = {name: value for name, value in locals().items()
               if name in DownloadOptions.__dataclass_fields__ and name != "samples_per_shard"}
    with dsl.ParallelFor(split.outputs["Output"], parallelism=_PARALLELISM.get()) as part:
        task = download_part(url_parts=split.outputs["url_parts"], part=part, **options)
    merged = merge_download(url_parts=split.outputs["url_parts"],
                            parts=dsl.Collected(task.outputs["shards"]))
    return DownloadOutputs(shards=merged.outputs["shards"])


def make_download(parallelism: int = PARALLELISM):
    """The ``download`` sub-pipeline with at most ``parallelism`` parts running at once.

    Raises:
        ValueError: ``parallelism`` below 1.
    """
    if parallelism < 1:
        raise ValueError(f"download parallelism={parallelism}; expected at least 1")
    if parallelism == PARALLELISM:
        return download
    token = _PARALLELISM.set(parallelism)
    try:
        return dsl.pipeline(name=download.component_spec.name,
                            description=download.component_spec.description)(download.pipeline_func)
    finally:
        _PARALLELISM.reset(token)
