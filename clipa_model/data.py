"""Input pipelines: webdataset shards -> uint8 image batches + token batches.

Training reads the ``filtered_shards`` artifact (``shard-NNNNN.tar`` with KEY.jpg / KEY.txt
/ KEY.json, manifest.json); evaluation sets are read by ``clipa_model/eval/data.py``.
JPEGs are decoded at reduced scale where PIL's draft mode allows (1/2, 1/4, 1/8), cropped
and resized in one PIL call, and kept uint8 until the training step, which normalises them
(``normalize``): 4x less memory traffic than float32 between loader and model.
"""
from __future__ import annotations

import io
import itertools
import math
import random
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clipa_model.artifacts import ArtifactError, join, read_json, read_marker


# ---------------------------------------------------------------- shard lists

def list_train_shards(data_dir: str) -> tuple[list[str], int]:
    """Shard paths and sample count of a ``filtered_shards`` artifact.

    Raises:
        ArtifactError: the folder is not a finished filtered_shards artifact, or it holds
            no samples (naming the folder and the manifest field).
    """
    read_marker(data_dir, "filtered_shards")
    manifest = read_json(join(data_dir, "manifest.json"))
    shards = [s for s in manifest.get("shards", []) if s.get("count", 0) > 0]
    total = sum(s["count"] for s in shards)
    if total == 0:
        raise ArtifactError(f"{data_dir}: empty dataset (manifest.json 'total' is "
                            f"{manifest.get('total', 0)}); expected at least one sample")
    # A name is a file of the folder, or (existing shards trained on unfiltered) a full URL.
    return [s["name"] if "://" in s["name"] or s["name"].startswith("/") else
            join(data_dir, s["name"]) for s in shards], total


# ---------------------------------------------------------------- image ops

def open_jpeg(data: bytes, min_side: int) -> Image.Image:
    """Decode at the smallest JPEG draft scale whose shorter side is still >= ``min_side``."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (min_side, min_side))
    return img.convert("RGB")


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        rng: random.Random, resample: int = Image.BILINEAR,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception crop: a random box of ``scale`` area and ``ratio`` aspect, resized.

    Returns:
        (size, size, 3) uint8.
    """
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (left, top, left + cw, top + ch)
            break
    else:  # fall back to the central square
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((size, size), resample, box=box))


def center_resize(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize the central square to ``size`` (the whole image when it is square).

    Returns:
        (size, size, 3) uint8.
    """
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((size, size), resample, box=box))


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W), scaled to [0, 1] then standardised."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def _to_chw(batch: list[np.ndarray]) -> torch.Tensor:
    """list of (H, W, 3) uint8 -> (B, 3, H, W) uint8."""
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- training stream
#
# The stream is a pure function of (seed, consumer, position), so a resumed run sees the
# very batches the interrupted one would have seen. A consumer is one (rank, loader worker)
# pair; consumers take turns over an endless sequence of shards (every epoch reshuffled),
# so each one always has data and every rank yields exactly the requested number of
# batches, however the shards divide. Skipped samples on resume are read but never decoded.

def consumer_shards(urls: list[str], seed: int, consumer: int, n_consumers: int) -> Iterator[dict]:
    """Endless {"url"} stream of one consumer: every ``n_consumers``-th shard of the
    concatenated per-epoch shuffles, starting at position ``consumer``."""
    position = 0
    for epoch in itertools.count():
        order = list(urls)
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for url in order:
            if position % n_consumers == consumer:
                yield {"url": url}
            position += 1


def consumer_samples(urls: list[str], seed: int, consumer: int, n_consumers: int,
                     shuffle_buffer: int) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg", "txt", ...}) of one consumer, shuffled in a buffer."""
    rng = random.Random(f"{seed}-{consumer}")
    return wds.DataPipeline(
        lambda: consumer_shards(urls, seed, consumer, n_consumers),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer // 2, rng=rng),
    ).iterator()


class _TrainDecoder:
    """sample {"jpg", "txt"} -> ((S, S, 3) uint8 crop, caption); picklable for workers."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float]):
        self.image_size, self.crop_scale = image_size, crop_scale
        # Decode big enough that the smallest crop still has ~image_size pixels per side.
        self.min_side = math.ceil(image_size / math.sqrt(crop_scale[0]))

    def __call__(self, sample: dict, rng: random.Random) -> tuple[np.ndarray, str]:
        img = open_jpeg(sample["jpg"], self.min_side)
        crop = random_resized_crop(img, self.image_size, self.crop_scale, rng)
        return crop, sample["txt"].decode("utf-8")


class TrainStream(torch.utils.data.IterableDataset):
    """Endless batches of one rank; with DataLoader workers, each worker is a consumer.

    Args:
        urls: shard paths; tokenizer: callable(list[str]) -> (B, T).
        rank, world_size: this process in the run; num_workers: its loader workers.
        skip_batches: batches of this rank already consumed (resume position).
    """

    def __init__(self, urls: list[str], image_size: int, batch_size: int, tokenizer: Callable,
                 crop_scale: tuple[float, float], seed: int, shuffle_buffer: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, skip_batches: int = 0):
        super().__init__()
        self.urls, self.batch_size, self.tokenizer = list(urls), batch_size, tokenizer
        self.decoder = _TrainDecoder(image_size, crop_scale)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        consumer = self.rank * self.workers + worker
        # The DataLoader takes batches from its workers in turn: batch b is worker b % W's.
        skip = max(0, -(-(self.skip_batches - worker) // self.workers))
        index = skip * self.batch_size  # samples of this consumer before the resume point
        samples = itertools.islice(
            consumer_samples(self.urls, self.seed, consumer, self.world_size * self.workers,
                             self.shuffle_buffer), index, None)  # skipped: read, not decoded
        for batch_index in itertools.count(skip):
            items = []
            for sample in itertools.islice(samples, self.batch_size):
                items.append(self.decoder(sample, random.Random(f"{self.seed}-{consumer}-{index}")))
                index += 1
            if hasattr(self.tokenizer, "rng"):  # random/block text reduction, resumable
                self.tokenizer.rng.seed(f"{self.seed}-{consumer}-b{batch_index}")
            images, captions = zip(*items)
            yield _to_chw(list(images)), self.tokenizer(list(captions))  # (B,3,S,S) u8, (B,T)


def train_batches(data_dir: str, image_size: int, batch_size: int, steps: int,
                  tokenizer: Callable, crop_scale: tuple[float, float] = (0.4, 1.0),
                  seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 1000,
                  rank: int = 0, world_size: int = 1,
                  start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start_step`` .. ``steps - 1`` of this rank, passing over the shards as often
    as needed.

    Args:
        data_dir: a ``filtered_shards`` artifact folder.
        image_size: crop side in pixels.
        batch_size: samples per batch of this rank (full batches only).
        steps: batches in the whole stage; start_step: batches already consumed (resume).
        tokenizer: callable(list[str]) -> (B, T) token ids, with the text reduction.
        crop_scale: area range of the random resized crop.
        seed: shard order, shuffle buffer, crops and text reduction choices.
        num_workers: 0 decodes in this process; n > 0 uses n DataLoader processes.
        shuffle_buffer: samples held for shuffling across shard boundaries.
        rank, world_size: this process's share of the data (distributed training).

    Yields:
        (images (B, 3, S, S) uint8, tokens (B, T) int64), ``steps - start_step`` of them.
    """
    urls, total = list_train_shards(data_dir)
    stream = TrainStream(urls, image_size, batch_size, tokenizer, crop_scale, seed,
                         min(shuffle_buffer, total), rank, world_size, num_workers, start_step)
    source = stream
    if num_workers > 0:
        source = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                             prefetch_factor=4, persistent_workers=False)
    yield from itertools.islice(source, max(0, steps - start_step))
