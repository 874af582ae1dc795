"""The ``download`` step: fetch the images of a URL list into webdataset shards.

img2dataset does the fetching (``components.download.img2dataset_runner``); around it this
package adds what a web-scale list needs:

* the URL list is checked before any work (``components.download.url_list``): a file, folder or
  glob of parquet/csv/tsv/jsonl/json, optionally compressed, local or gs://;
* URLs that could reach private, loopback, link-local or metadata addresses are refused
  and counted (``components.download.url_safety``), unless ``allow_networks`` lets them through;
* per-shard stats are summed with failures by short reason, and reported as KFP
  Metrics and an HTML page (``components.download.stats``);
* the list can be split into parts downloaded by parallel tasks
  (``components.download.run``); the pipeline wires them as ``components.download.pipeline.download``.

Output folder (see docs/ARTIFACTS.md): ``NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``,
``KEY.json``), ``NNNNN.parquet``, ``NNNNN_stats.json``, ``report.html`` and
``clipa_artifact.json`` (kind ``shards``) written last.

Run it alone on one machine::

    python -m components.download --url-list urls.parquet --output shards/ --processes 4
"""
# No `from __future__ import annotations`: kfp reads the component's annotations as types.
import argparse
import json
import logging
from typing import List

from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.clipa_component import DATA_IMAGE, clipa_component
from components.download.run import run_download  # noqa: F401 - the step's entry point
from components.download.stats import failure_reason  # noqa: F401 - re-exported
from components.download.url_list import UrlListError, read_url_list  # noqa: F401 - re-exported


@clipa_component(DATA_IMAGE)
def split_url_list(url_list: str, url_parts: Output[Dataset], parts: int = 1,
                   samples_per_shard: int = 1000, url_col: str = "url",
                   caption_col: str = "caption", allow_networks: str = "") -> List[int]:
    """Check and screen a URL list, and cut it into ``parts`` on shard boundaries.

    Args:
        url_list: a parquet/csv/tsv/jsonl/json file (optionally .gz), a folder or a glob of
            them; local path, ``gs://`` or ``/gcs/`` path.
        parts: parallel download tasks.
        allow_networks: networks exempt from the URL-safety refusal ("" = none).

    Outputs:
        url_parts: part-NNNNN.parquet, refused.parquet, plan.json (kind ``url_list``).
    Returns:
        The part indices to download (those that hold rows).
    """
    from components.download.run import split_url_list as split

    return split(url_list, url_parts.path, parts=parts, samples_per_shard=samples_per_shard,
                 url_col=url_col, caption_col=caption_col, allow_networks=allow_networks)


@clipa_component(DATA_IMAGE)
def download_part(url_parts: Input[Dataset], part: int, shards: Output[Dataset],
                  image_size: int = 256, resize_mode: str = "keep_ratio",
                  encode_format: str = "jpg", encode_quality: int = 95,
                  processes: int = 1, threads: int = 16, timeout: int = 10, retries: int = 0,
                  min_image_size: int = 0, max_aspect_ratio: float = 0.0,
                  max_image_pixels: int = 89478485, compute_hash: str = "sha256",
                  disallowed_header_directives: str = "noai,noimageai,noindex,noimageindex",
                  user_agent_token: str = ""):
    """Download one part of a split URL list with img2dataset (options: DownloadOptions).

    The parameters after ``shards`` are ``DownloadOptions``' fields with its defaults
    (KFP needs them written out; tests/components/download/test_download_options.py
    checks that they match).

    Outputs:
        shards: NNNNN.tar (global shard numbers), NNNNN.parquet, NNNNN_stats.json,
            report.html; marker kind ``shards``.
    """
    options = {k: v for k, v in locals().items() if k not in ("url_parts", "part", "shards")}
    import logging

    from components.download.run import run_download_part

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_download_part(url_parts.path, part, shards.path, **options)
    shards.metadata.update(part=part, count=result["count"], successes=result["successes"])


@clipa_component(DATA_IMAGE)
def merge_download(url_parts: Input[Dataset], parts: Input[List[Dataset]],
                   shards: Output[Dataset], stats: Output[Metrics], report: Output[HTML]):
    """Gather the downloaded parts into one ``shards`` artifact (no data is copied).

    Outputs:
        shards: marker kind ``shards`` whose ``parts`` lists the part folders.
        stats: count, successes, failed, success_rate, images_per_second,
            urls_per_second, seconds, shards and failed_<reason> for each reason.
        report: HTML page of outcome by reason (with an example message) and parts.
    """
    import os
    import shutil

    from components.download.run import merge_download_parts
    from components.download.stats import metrics

    result = merge_download_parts(url_parts.path, [p.uri for p in parts], shards.path)
    numbers = metrics(result)
    for name, value in numbers.items():
        stats.log_metric(name, value)
    shards.metadata.update(numbers)
    shards.metadata["failures"] = result["failures"]
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(shards.path, "report.html"), report.path)


def main(argv: List[str] = None) -> dict:
    """Command line: ``run_download`` on one machine; prints the marker as JSON."""
    from components.download.options import DownloadOptions

    ap = argparse.ArgumentParser(prog="python -m components.download",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--url-list", required=True, help="file, folder or glob; local or gs://")
    ap.add_argument("--output", required=True, help="folder for the shards (local or gs://)")
    ap.add_argument("--url-col", default="url")
    ap.add_argument("--caption-col", default="caption")
    ap.add_argument("--allow-networks", default="",
                    help="networks exempt from the URL-safety refusal, e.g. 127.0.0.1/32")
    for field in DownloadOptions.__dataclass_fields__.values():
        ap.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                        default=field.default)
    args = vars(ap.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run_download(args.pop("url_list"), args.pop("output"), **args)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.download"))
