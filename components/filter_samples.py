"""The per-sample work of ``filter_shard``, free of Beam: read, check, plan, write.

* ``iter_tar_samples`` groups the members of an img2dataset tar into samples (with where
  each member's bytes lie) and tells a complete tar from a truncated one;
* ``check_sample`` decodes one sample and returns why it is dropped (or None);
* ``plan_shards`` drops exact duplicates and orders the survivors into output shards;
* ``read_spans`` reads a planned sample back from its tar without parsing the tar again;
* ``write_shard_tar`` writes one output shard, byte-identical for the same samples.

The Beam pipeline (``components.filter_beam``) only moves these values around.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, NamedTuple

from PIL import Image

# Drop reasons, in the order a sample is checked; a sample counts under its first reason.
REASONS = ("truncated_shard", "decode_error", "caption_words", "caption_chars", "min_side",
           "aspect_ratio", "duplicate_sha256", "duplicate_key")

# The members every sample must have, written back in this (sorted, as webdataset's
# TarWriter does) order.
MEMBERS = ("jpg", "json", "txt")

_BLOCK = 512  # tar block size: an archive ends with zero blocks

# (offset, size) of each of the MEMBERS, packed: 81 bytes instead of ~400 as tuples.
_SPANS = struct.Struct("<6Q")

# Fixed tar header fields, so the same samples give the same bytes on any machine.
_MTIME = 0
_MODE = 0o444


@dataclass(frozen=True)
class FilterConfig:
    """What ``filter_shard`` keeps. A value of 0 / None / False turns a filter off.

    Defaults follow DataComp's "basic" filtering (captions of more than 2 words and
    more than 5 characters) and drop images too small or too elongated to crop.
    """
    min_caption_words: int | None = 3
    min_caption_chars: int | None = 6
    min_image_side: int | None = 64
    max_aspect_ratio: float | None = 3.0
    dedup_sha256: bool = True
    seed: int = 0
    samples_per_shard: int = 256


class TarSample(NamedTuple):
    """One sample of an input tar: its members and where their bytes lie in the tar."""
    key: str
    members: dict  # ext -> bytes
    spans: dict  # ext -> (offset of the data in the tar, size)


class SampleInfo(NamedTuple):
    """What the shard plan needs of a sample that passed the per-sample checks.

    ``(source, position)`` tells apart samples that share a key. About 0.4 kB in memory
    (the plan holds one per kept sample on one worker: ~4 GB per 10 M samples).
    """
    source: int  # index of the input tar
    position: int  # sample number in that tar
    key: str
    sha256: bytes  # digest of the image bytes
    order: int  # 64-bit hash of (seed, key): the output order
    spans: bytes  # _SPANS-packed (offset, size) of each member, in MEMBERS order


class Placement(NamedTuple):
    """Where ``plan_shards`` puts a kept sample."""
    shard: int
    rank: int  # position in the output shard
    info: SampleInfo


class TruncatedShardError(Exception):
    """A tar ended before its end-of-archive blocks; ``partial`` samples were cut."""

    def __init__(self, message: str, partial: int):
        super().__init__(message)
        self.partial = partial


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000012.jpg" -> ("dir/000012", "jpg")``: webdataset's key/extension rule.

    The extension starts at the first dot of the file name, as in webdataset.
    """
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _is_complete(members: dict) -> bool:
    return all(ext in members for ext in MEMBERS)


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[TarSample]:
    """Yield a ``TarSample`` for each sample of a tar, in tar order.

    Members of one sample are consecutive (as webdataset writes them). Only members
    named in ``MEMBERS`` are kept. A sample missing one of them is yielded as is: the
    caller decides (it is a broken sample, not a broken tar).

    Raises:
        TruncatedShardError: after the last complete sample, when the tar is cut (a
            member's data ends early, or no end-of-archive block follows the last
            member). ``partial`` counts the sample cut in the middle (0 or 1).
    """
    key, members, spans = None, {}, {}
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")
        for info in tf:
            if not info.isfile():
                continue
            k, ext = split_member_name(info.name)
            if k != key and key is not None:
                yield TarSample(key, members, spans)
                members, spans = {}, {}
            key = k
            if ext in MEMBERS:
                members[ext] = tf.extractfile(info).read()
                spans[ext] = (info.offset_data, info.size)
        # tarfile stops quietly at a cut header; a finished tar has a zero block here.
        fileobj.seek(tf.offset)
        tail = fileobj.read(_BLOCK)
        if len(tail) < _BLOCK or tail.count(0) != _BLOCK:
            raise tarfile.ReadError(f"no end-of-archive block at offset {tf.offset}")
    except (tarfile.TarError, EOFError) as e:
        # An OSError (a failed read from gs://) is not caught: the runner retries it.
        # The sample being read when the tar broke is lost only if it was incomplete.
        if key is not None and _is_complete(members):
            yield TarSample(key, members, spans)
            partial = 0
        else:
            partial = int(key is not None)
        raise TruncatedShardError(str(e), partial) from None
    if key is not None:
        yield TarSample(key, members, spans)


def pack_spans(spans: dict) -> bytes:
    """``{ext: (offset, size)}`` of a complete sample -> ``SampleInfo.spans``."""
    return _SPANS.pack(*(n for ext in MEMBERS for n in spans[ext]))


def read_spans(fileobj: IO[bytes], spans: bytes) -> dict:
    """The members of one sample, read at the ``SampleInfo.spans`` the first pass found."""
    members = {}
    numbers = _SPANS.unpack(spans)
    for ext, offset, size in zip(MEMBERS, numbers[0::2], numbers[1::2]):
        fileobj.seek(offset)
        data = fileobj.read(size)
        if len(data) != size:  # the tar changed since it was checked
            raise OSError(f"short read of {size} bytes at offset {offset}")
        members[ext] = data
    return members


def sort_order(seed: int, key: str) -> int:
    """A 64-bit hash of (seed, key): shuffles samples across input shards, per seed."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def image_size(data: bytes) -> tuple[int, int]:
    """Decode an image (to check it is whole) and return its (width, height).

    JPEGs decode in draft mode at 1/8 scale: libjpeg still reads every byte of the
    entropy-coded data, so corruption is caught, at a fraction of the full cost.
    """
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        im.load()
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    return width, height


def check_sample(members: dict, cfg: FilterConfig) -> tuple[str | None, str]:
    """Why one sample is dropped, or None if it passes the per-sample filters.

    Args:
        members: ``{ext: bytes}`` of one sample (``jpg``, ``txt``, ``json``).
        cfg: the filter settings.
    Returns:
        ``(reason, note)``: reason is one of ``REASONS`` or None; note says what was
        wrong (for the debug log).
    """
    missing = [ext for ext in MEMBERS if ext not in members]
    if missing:
        return "decode_error", f"missing {'/'.join(missing)} member"
    try:
        caption = members["txt"].decode("utf-8").strip()
        json.loads(members["json"])
        width, height = image_size(members["jpg"])
    except Exception as e:  # noqa: BLE001 - PIL and json raise many types for bad data
        return "decode_error", f"{type(e).__name__}: {e}"[:200]
    if cfg.min_caption_words and len(caption.split()) < cfg.min_caption_words:
        return "caption_words", caption[:80]
    if cfg.min_caption_chars and len(caption) < cfg.min_caption_chars:
        return "caption_chars", caption[:80]
    if cfg.min_image_side and min(width, height) < cfg.min_image_side:
        return "min_side", f"{width}x{height}"
    if cfg.max_aspect_ratio and max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return "aspect_ratio", f"{width}x{height}"
    return None, ""


def sample_info(source: int, position: int, sample: TarSample, seed: int) -> SampleInfo:
    """The plan's view of a sample that passed ``check_sample``."""
    return SampleInfo(source, position, sample.key, hashlib.sha256(sample.members["jpg"]).digest(),
                      sort_order(seed, sample.key), pack_spans(sample.spans))


def plan_shards(records: Iterable[SampleInfo], cfg: FilterConfig
                ) -> tuple[list[Placement], dict[str, int]]:
    """Drop duplicates and place every remaining sample in an output shard.

    Runs on metadata only (no image bytes), on all samples at once, so the result does
    not depend on how the runner split the work.

    Args:
        records: one ``SampleInfo`` per sample that passed ``check_sample``.
        cfg: ``dedup_sha256``, ``samples_per_shard``.
    Returns:
        ``(placements, dropped)``: one ``Placement`` per kept sample, samples sorted by
        ``order`` (then key) and cut into shards of exactly ``samples_per_shard`` (the
        last one may be short); ``dropped`` counts ``duplicate_sha256`` (same image
        bytes: the smallest key stays) and ``duplicate_key`` (same key, other bytes:
        the first input tar's stays).
    """
    records = sorted(records, key=lambda r: (r.key, r.source, r.position))
    dropped = {"duplicate_sha256": 0, "duplicate_key": 0}
    seen_sha, seen_key, kept = set(), set(), []
    for info in records:
        if cfg.dedup_sha256 and info.sha256 in seen_sha:
            dropped["duplicate_sha256"] += 1
        elif info.key in seen_key:
            # Output keys must be unique: webdataset would merge the two samples.
            dropped["duplicate_key"] += 1
        else:
            seen_sha.add(info.sha256)
            seen_key.add(info.key)
            kept.append(info)
    kept.sort(key=lambda r: (r.order, r.key))
    n = cfg.samples_per_shard
    return [Placement(*divmod(i, n), info) for i, info in enumerate(kept)], dropped


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def shard_sizes(total: int, samples_per_shard: int) -> list[int]:
    """``[n, n, ..., remainder]``: how ``plan_shards`` cuts ``total`` samples."""
    full, rest = divmod(total, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])


def write_shard_tar(fileobj: IO[bytes], samples: Iterable[tuple[str, dict]]) -> int:
    """Write ``(key, {ext: bytes})`` samples, in the given order, as one tar.

    Header fields that would vary between runs (mtime, owner) are fixed, so the same
    samples in the same order give byte-identical tars.

    Returns:
        The number of samples written.
    """
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, members in samples:
            for ext in MEMBERS:
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
            count += 1
    return count
