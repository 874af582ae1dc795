"""Run img2dataset on a checked URL table, with this project's guards around it.

img2dataset (in-process, multiprocessing distributor) does the fetching, resizing and
webdataset writing. Four of its classes are replaced by subclasses for one call:

* ``GuardedDownloader`` installs the URL-safety guard (``components.download.url_guard``) in each
  worker process before it fetches, so a host name that resolves to a private address
  or a redirect to one is refused at connect time;
* ``CheckedResizer`` reads the image header before OpenCV decodes anything: an image
  claiming more than ``max_image_pixels`` (a decompression bomb) or a JPEG without its
  end marker (cut in transit; OpenCV would fill the rest with grey) is refused;
* its worker and logger processes die with the process that started them
  (``components.parent_death``), so a killed download leaves none behind;
* its Reader numbers shards from ``first_shard``, so parts of one URL list
  downloaded by parallel tasks get globally unique shard names and sample keys (the
  keys img2dataset derives from shard ids), the same as a single run would give.

Workers are started with "spawn" and unpickle these classes by module path, so this
module must stay importable without kfp or Beam.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Iterator

import fsspec
import pandas as pd

# Before img2dataset is imported: albumentations would check PyPI for updates, wandb log in.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from components.download.options import DownloadOptions  # noqa: E402
from components.download.stats import stats_files  # noqa: E402
from components.filter_shard.images import image_facts  # noqa: E402
from components.download.url_guard import install_guard  # noqa: E402
from components.parent_death import die_with_parent  # noqa: E402

log = logging.getLogger("clipa.download")

# Column names img2dataset writes itself; an input column with one of these names cannot
# be passed through (img2dataset raises), so it is left out of save_additional_columns.
RESERVED_COLUMNS = frozenset({
    "key", "caption", "url", "width", "height", "original_width", "original_height",
    "status", "error_message", "exif", "md5", "sha256", "sha512",
})


# ---------------------------------------------------------------------------------------
# The replaced classes


def _checked_classes():
    """The subclasses, built on first use (img2dataset imports cv2: ~1 s)."""
    from img2dataset.downloader import Downloader
    from img2dataset.logger import LoggerProcess
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    return Downloader, LoggerProcess, Reader, Resizer


try:  # defined at import when img2dataset is there (workers unpickle them by name)
    _Downloader, _LoggerProcess, _Reader, _Resizer = _checked_classes()
except ImportError:  # pragma: no cover - the data image always has img2dataset
    _Downloader = _LoggerProcess = _Reader = _Resizer = object


class GuardedDownloader(_Downloader):
    """img2dataset's Downloader with the URL-safety guard installed in its process,
    which dies with the process that started it (a killed download leaves no worker)."""

    allow_networks = ""

    def __call__(self, row):
        _die_with_parent_once()
        install_guard(self.allow_networks)
        return super().__call__(row)


class GuardedLoggerProcess(_LoggerProcess):
    """img2dataset's stats logger process, which dies with the process that started it."""

    def run(self):
        die_with_parent()
        return super().run()


@functools.lru_cache(maxsize=1)
def _die_with_parent_once() -> None:
    die_with_parent()


class CheckedResizer(_Resizer):
    """img2dataset's Resizer that refuses bombs and cut JPEGs before OpenCV decodes."""

    max_image_pixels = DownloadOptions.max_image_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.getvalue() if isinstance(img_stream, io.BytesIO) else None
        if data:
            error = _header_problem(data, self.max_image_pixels)
            if error:
                return None, None, None, None, None, error
        return super().__call__(img_stream, blurring_bbox_list)


def _header_problem(data: bytes, max_pixels: int) -> str | None:
    """An error message for an image header that must not be decoded, else None.

    Bytes that are no image at all (an HTML page) are left to OpenCV, which reports them
    as a decoding error like any other.
    """
    try:
        facts = image_facts(data, max_pixels)
    except ValueError as e:
        return f"image is cut: {e}" if "is cut" in str(e) else None
    except Exception:  # noqa: BLE001 - not an image PIL knows: OpenCV decides
        return None
    if facts.too_large:
        return (f"image has more pixels than max_image_pixels={max_pixels} "
                f"({facts.width}x{facts.height}); not decoded")
    return None


@contextlib.contextmanager
def _patched(options: DownloadOptions, first_shard: int, allow_networks: str) -> Iterator[None]:
    """Swap the subclasses, configured for this call, into img2dataset.main.

    The settings go on the instances, not the classes: the downloader and its resizer
    are pickled to spawned workers, which re-import the classes with their defaults.
    """
    # img2dataset's package exports a function named ``main`` that hides the module.
    main = importlib.import_module("img2dataset.main")

    def downloader(*args, **kwargs):
        instance = GuardedDownloader(*args, **kwargs)
        instance.allow_networks = allow_networks
        return instance

    def resizer(*args, **kwargs):
        instance = CheckedResizer(*args, **kwargs)
        instance.max_image_pixels = options.max_image_pixels
        return instance

    def reader(*args, **kwargs):
        instance = _Reader(*args, **kwargs)  # runs in this process only
        instance.start_shard_id += first_shard
        return instance

    saved = (main.Downloader, main.Resizer, main.Reader, main.LoggerProcess)
    main.Downloader, main.Resizer, main.Reader = downloader, resizer, reader
    main.LoggerProcess = GuardedLoggerProcess
    try:
        yield
    finally:
        main.Downloader, main.Resizer, main.Reader, main.LoggerProcess = saved


@contextlib.contextmanager
def _img2dataset_env() -> Iterator[None]:
    """Undo the SIGINT handler img2dataset installs in this process.

    Its handler exits with status 0, which would make an interrupted step look
    successful, so it is restored afterwards and its exit turned back into an
    interruption.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as e:
        raise KeyboardInterrupt("img2dataset was interrupted; its output is incomplete") from e
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _progress(output_dir: str, total_shards: int, every: float) -> Iterator[None]:
    """Log finished shards and the download rate every ``every`` seconds meanwhile."""
    stop = threading.Event()
    before = len(stats_files(output_dir)) if _exists(output_dir) else 0
    start = time.monotonic()

    def report_once():
        try:
            done = len(stats_files(output_dir)) - before
        except Exception:  # noqa: BLE001 - a listing hiccup must not end the download
            return
        log.info("download progress: %d of %d shards finished (%.1f shards/min)",
                 done, total_shards, 60 * done / max(time.monotonic() - start, 1e-9))

    def report():
        while not stop.wait(every):
            report_once()

    thread = threading.Thread(target=report, name="download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        report_once()  # the final count, however short the run was


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.exists(p)


def extra_columns(df: pd.DataFrame) -> list[str]:
    """Columns to carry into each sample's KEY.json (e.g. uid, a class label)."""
    extra = [c for c in df.columns if c not in ("url", "caption")]
    dropped = [c for c in extra if c in RESERVED_COLUMNS]
    if dropped:
        log.warning("url list columns %s are not carried into the shards: img2dataset "
                    "writes columns of those names itself", dropped)
    return [str(c) for c in extra if c not in RESERVED_COLUMNS]


def run_img2dataset(df: pd.DataFrame, output_dir: str, options: DownloadOptions, *,
                    first_shard: int = 0, allow_networks: str = "",
                    progress_seconds: float = 30.0) -> None:
    """Download the rows of ``df`` (columns url, caption, extras) into ``output_dir``.

    Shards are numbered from ``first_shard``; shards whose ``NNNNN_stats.json`` exists
    in ``output_dir`` are skipped (img2dataset's incremental mode), so a rerun after a
    kill redoes only the unfinished ones. Call it from the main thread, under
    ``if __name__ == "__main__":`` in scripts (img2dataset spawns workers).
    """
    total = -(-len(df) // options.samples_per_shard)
    with tempfile.TemporaryDirectory(prefix="clipa-download-") as tmp, _img2dataset_env(), \
            _patched(options, first_shard, allow_networks), \
            _progress(str(output_dir), total, progress_seconds):
        from img2dataset import download as img2dataset_download  # slow import (cv2, wandb)

        # One local parquet whatever the user gave: img2dataset's json reader is not a
        # JSON-lines reader, and gs:// lists would be read again by each worker.
        url_parquet = os.path.join(tmp, "url_list.parquet")
        df.to_parquet(url_parquet, index=False)
        if "://" in str(output_dir):
            # Object stores have no empty folders: img2dataset's final rm of its emptied
            # _tmp "folder" would raise FileNotFoundError after a finished download.
            with fsspec.open(str(output_dir).rstrip("/") + "/_tmp/.keep", "wb") as f:
                f.write(b"")
        directives = [d for d in options.disallowed_header_directives.split(",") if d.strip()]
        img2dataset_download(
            url_list=url_parquet, input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=extra_columns(df) or None,
            output_folder=str(output_dir), output_format="webdataset",
            image_size=options.image_size, resize_mode=options.resize_mode,
            resize_only_if_bigger=True, encode_quality=options.encode_quality,
            encode_format=options.encode_format, processes_count=options.processes,
            thread_count=options.threads, number_sample_per_shard=options.samples_per_shard,
            timeout=options.timeout, retries=options.retries,
            min_image_size=options.min_image_size,
            max_aspect_ratio=options.max_aspect_ratio or float("inf"),
            compute_hash=options.compute_hash or None,
            disallowed_header_directives=directives,
            user_agent_token=options.user_agent_token or None,
            distributor="multiprocessing", incremental_mode="incremental", enable_wandb=False)
