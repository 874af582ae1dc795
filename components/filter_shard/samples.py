"""The per-sample work of ``filter_shard``, free of Beam: read, check, plan, write.

* ``iter_tar_samples`` groups the members of an img2dataset tar into samples (with where
  each member's bytes lie) and tells a complete tar from a truncated one;
* ``check_sample`` checks one sample (names, caption, JSON, image header) and returns why
  it is dropped (or None);
* ``sample_range`` / ``split_range``: a planned sample read back from its tar in one
  byte-range read, without parsing the tar again;
* ``write_shard_tar`` writes one output shard, byte-identical for the same samples.

Dedup, the CLIP-score cut and the output plan, which need more than one sample, live in
``components.filter_shard.plan``; the Beam pipeline (``components.filter_shard.beam_graph``)
moves these values around.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field, fields, replace
from typing import IO, Iterable, Iterator, NamedTuple

from clipa_model.artifacts import IMAGE_EXTS
from components.filter_shard.images import image_facts, to_jpeg
from components.filter_shard.matching import is_uid
from components.filter_shard.tar_io import TarFormatError, TarWriter, iter_members, safe_key

# Drop reasons, in the order a sample is checked; a sample counts under its first reason.
# With a uid list, a missing or malformed uid counts as uid_not_listed here, before the
# image checks; a well-formed uid the list lacks only after every per-sample check: the
# list is joined with the samples that pass them (``beam_graph.KeepListed``).
REASONS = ("truncated_shard", "unsafe_name", "decode_error", "uid_not_listed", "too_large",
           "caption_words", "caption_chars", "min_side", "aspect_ratio", "not_english",
           "eval_duplicate", "duplicate_sha256", "duplicate_url", "duplicate_key", "clip_score")

# The members written back, in this (sorted, as webdataset's TarWriter does) order. A
# sample's image member may be any of ``IMAGE_EXTS`` (img2dataset's encode_format); the
# output always holds KEY.jpg, what the training loader reads (others become JPEG).
MEMBERS = ("jpg", "json", "txt")

# (offset, size) of image, json and txt, packed: 48 bytes instead of ~400 as tuples.
_SPANS = struct.Struct("<6Q")


def _setting(default, doc: str):
    """A FilterConfig field with its help text (the command line's, the docs')."""
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class FilterConfig:
    """What ``filter_shard`` keeps: the one definition of its settings.

    The command line (``components.filter_shard.options``) derives its flags from these
    fields; the KFP component's parameters are checked against them by a test. A value
    of 0 / None / False / "" turns a filter off. ``FILTER_PRESETS["datacomp_basic"]`` is
    DataComp's basic filter; the defaults are laxer (64 px, any language).
    """
    min_caption_words: int | None = _setting(3, "drop captions of fewer words")
    min_caption_chars: int | None = _setting(6, "drop captions of fewer characters")
    min_image_side: int | None = _setting(
        64, "drop images whose shorter side (KEY.json original_width/height, as DataComp, "
        "else the stored image) is below this many pixels")
    max_aspect_ratio: float | None = _setting(3.0, "drop images longer than this ratio")
    dedup_sha256: bool = _setting(True, "drop repeated images (same sha256)")
    dedup_url: bool = _setting(True, "drop repeated URLs")
    english_only: bool = _setting(False, "keep English captions only (py3langid)")
    uid_list: str = _setting("", "keep only these uids: .npy (DataComp's \"u8,u8\" array) "
                             "or .parquet with a uid column; local or gs://")
    decontaminate: str = _setting("", "an eval set whose images (exact or re-encoded / "
                                  "resized) must not be in the training data")
    eval_phash_distance: int = _setting(
        4, "a training image within this many bits (of 64) of an eval image's perceptual "
        "hash is its copy; -1 = exact sha256 only")
    clip_model: str = _setting("", "the model that CLIP-scores pairs: a Model artifact, an "
                               "exported folder or open_clip:NAME:FILE")
    clip_min_score: float | None = _setting(None, "keep image-text cosine similarity >= this")
    clip_top_fraction: float | None = _setting(None, "keep this fraction, highest scores first")
    max_image_pixels: int = _setting(89_478_485, "drop images with more pixels (PIL's "
                                     "decompression-bomb limit, ~9459 px square)")
    full_decode: bool = _setting(False, "decode every image (1/8 scale) instead of "
                                 "checking its header")
    seed: int = _setting(0, "shuffle seed of the output order")
    samples_per_shard: int = _setting(256, "samples per output shard (the last may be short)")

    def validate(self) -> "FilterConfig":
        """Raise ValueError naming the first setting out of range."""
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}; expected at least 1")
        if self.clip_top_fraction is not None and not 0 < self.clip_top_fraction <= 1:
            raise ValueError(f"clip_top_fraction={self.clip_top_fraction}; expected a "
                             "fraction in (0, 1], or None to keep all")
        if (self.clip_min_score is not None or self.clip_top_fraction) and not self.clip_model:
            raise ValueError("clip_min_score / clip_top_fraction need clip_model: the model "
                             "that scores the image-text pairs")
        return self

    @property
    def clip_scoring(self) -> bool:
        return bool(self.clip_model) and (self.clip_min_score is not None
                                          or bool(self.clip_top_fraction))

    @classmethod
    def from_preset(cls, preset: str = "", **settings) -> "FilterConfig":
        """A preset's values, then every setting given that differs from the default.

        Args:
            preset: "" (the defaults) or a name of ``FILTER_PRESETS``.
            settings: FilterConfig fields; one left at its default keeps the preset's value.
        Raises:
            ValueError: an unknown preset; TypeError: an unknown setting.
        """
        if preset and preset not in FILTER_PRESETS:
            raise ValueError(f"filter preset {preset!r}; expected one of "
                             f"{sorted(FILTER_PRESETS)} or '' for the defaults")
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown filter settings {sorted(unknown)}; expected fields of "
                            "FilterConfig")
        defaults = cls()
        given = {k: v for k, v in settings.items() if v != getattr(defaults, k)}
        return replace(defaults, **{**FILTER_PRESETS.get(preset, {}), **given})


# DataComp's "basic" filter (Gadre et al. 2023, the filtering track's baseline): English
# captions of more than 2 words and more than 5 characters, images whose original shorter
# side is at least 200 px and aspect ratio at most 3.
FILTER_PRESETS = {
    "datacomp_basic": {"min_caption_words": 3, "min_caption_chars": 6, "english_only": True,
                       "min_image_side": 200, "max_aspect_ratio": 3.0},
}


class TarSample(NamedTuple):
    """One sample of an input tar: its members and where their bytes lie in the tar."""
    key: str
    members: dict  # ext -> bytes
    spans: dict  # ext -> (offset of the data in the tar, size)


class Verdict(NamedTuple):
    """What ``check_sample`` found: a drop reason or None, a note, and kept facts."""
    reason: str | None
    note: str
    url: str = ""
    image_ext: str = "jpg"
    uid: str = ""  # KEY.json's uid (32 hex digits) when ``cfg.uid_list`` is set


class SampleInfo(NamedTuple):
    """What the shard plan needs of a sample that passed the per-sample checks.

    ``(source, position)`` tells apart samples that share a key. About 0.4 kB in memory;
    a worker holds those of one dedup bucket or one input tar at a time.
    """
    source: int  # index of the input tar
    position: int  # sample number in that tar
    key: str
    sha256: bytes  # digest of the image bytes
    url_hash: bytes  # 8-byte digest of the URL (b"" when the sample has none)
    order: int  # 64-bit hash of (seed, key): the output order
    spans: bytes  # _SPANS-packed (offset, size) of image, json and txt
    image_ext: str = "jpg"
    score: float = math.nan  # CLIP image-text cosine similarity, when scored


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


def image_ext_of(members: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


def _is_complete(members: dict) -> bool:
    return image_ext_of(members) is not None and "json" in members and "txt" in members


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[TarSample]:
    """Yield a ``TarSample`` for each sample of a tar, in tar order.

    Members of one sample are consecutive (as webdataset writes them). Only the image
    (``IMAGE_EXTS``), ``json`` and ``txt`` members are kept. A sample missing one of them
    is yielded as is: the caller decides (it is a broken sample, not a broken tar).

    Raises:
        TruncatedShardError: after the last complete sample, when the tar is cut (a
            member's data ends early, or no end-of-archive block follows the last
            member). ``partial`` counts the sample cut in the middle (0 or 1).
    """
    key, members, spans = None, {}, {}
    try:
        for m in iter_members(fileobj):
            k, ext = split_member_name(m.name)
            if k != key and key is not None:
                yield TarSample(key, members, spans)
                members, spans = {}, {}
            key = k
            if ext in IMAGE_EXTS or ext in ("json", "txt"):
                members[ext] = m.data
                spans[ext] = (m.offset, len(m.data))
    except TarFormatError as e:
        # An OSError (a failed read from gs://) is not caught: the runner retries it.
        # The sample being read when the tar broke is lost only if it was incomplete.
        cut_key = split_member_name(e.name)[0] if e.name else key
        if key is not None and cut_key != key:  # the cut fell in the next sample's data
            yield TarSample(key, members, spans)  # (broken or not: check_sample decides)
            partial = 1
        elif key is not None and _is_complete(members):
            yield TarSample(key, members, spans)
            partial = 0
        else:
            partial = int(key is not None)
        raise TruncatedShardError(str(e), partial) from None
    if key is not None:
        yield TarSample(key, members, spans)


def pack_spans(spans: dict, image_ext: str = "jpg") -> bytes:
    """``{ext: (offset, size)}`` of a complete sample -> ``SampleInfo.spans``."""
    return _SPANS.pack(*spans[image_ext], *spans["json"], *spans["txt"])


def sample_range(spans: bytes) -> tuple[int, int]:
    """``(start, end)`` byte range of one sample's members in its tar: they are adjacent
    (only their headers between them), so one read fetches the whole sample."""
    numbers = _SPANS.unpack(spans)
    return min(numbers[0::2]), max(o + n for o, n in zip(numbers[0::2], numbers[1::2]))


def split_range(data: bytes, start: int, spans: bytes, image_ext: str = "jpg") -> dict:
    """The members of one sample out of the bytes read at its ``sample_range``."""
    numbers = _SPANS.unpack(spans)
    members = {}
    for ext, offset, size in zip((image_ext, "json", "txt"), numbers[0::2], numbers[1::2]):
        members[ext] = data[offset - start: offset - start + size]
        if len(members[ext]) != size:  # the tar changed since it was checked
            raise OSError(f"short read of {size} bytes at offset {offset}")
    return members


def sort_order(seed: int, key: str) -> int:
    """A 64-bit hash of (seed, key): shuffles samples across input shards, per seed."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def url_hash(url: str) -> bytes:
    """8 bytes standing for a URL in the dedup set (collisions: ~1 in 10^19 per pair)."""
    return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest() if url else b""


def _original_size(meta: dict, width: int, height: int) -> tuple[int, int]:
    """The source image's size from img2dataset's KEY.json (what DataComp's size rules
    read), else the stored image's."""
    try:
        w, h = int(meta["original_width"]), int(meta["original_height"])
    except (KeyError, TypeError, ValueError):
        return width, height
    return (w, h) if w > 0 and h > 0 else (width, height)


def _rule_verdict(caption: str, width: int, height: int, cfg: FilterConfig,
                  language) -> Verdict | None:
    """The caption, size and language rules, in ``REASONS`` order."""
    if cfg.min_caption_words and len(caption.split()) < cfg.min_caption_words:
        return Verdict("caption_words", caption[:80])
    if cfg.min_caption_chars and len(caption) < cfg.min_caption_chars:
        return Verdict("caption_chars", caption[:80])
    if cfg.min_image_side and min(width, height) < cfg.min_image_side:
        return Verdict("min_side", f"{width}x{height}")
    if cfg.max_aspect_ratio and max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return Verdict("aspect_ratio", f"{width}x{height}")
    if cfg.english_only and language(caption) != "en":
        return Verdict("not_english", caption[:80])
    return None


def check_sample(key: str, members: dict, cfg: FilterConfig, language=None, uids=None,
                 eval_images=None) -> Verdict:
    """Why one sample is dropped, or None if it passes the per-sample filters.

    Args:
        key: the sample's key (its member names without extension).
        members: ``{ext: bytes}`` of one sample (an image, ``txt``, ``json``).
        cfg: the filter settings.
        language: callable(text) -> language code, needed when ``cfg.english_only``.
        uids: a ``matching.UidList`` (or any container of uid strings): the sample's
            KEY.json ``uid`` must be in it. None with ``cfg.uid_list`` set: the uid must
            be 32 hex digits here; whether it is listed, the Beam graph's join decides.
        eval_images: a ``matching.EvalImages`` when ``cfg.decontaminate``.
    Returns:
        A ``Verdict``: reason is one of ``REASONS`` or None; note says what was wrong
        (for the debug log); url and image_ext describe a passing sample.
    """
    if not safe_key(key):
        return Verdict("unsafe_name", repr(key[:80]))
    ext = image_ext_of(members)
    missing = [m for m in ("json", "txt") if m not in members] + ([] if ext else ["image"])
    if missing:
        return Verdict("decode_error", f"missing {'/'.join(missing)} member")
    try:
        caption = members["txt"].decode("utf-8").strip()
        meta = json.loads(members["json"])
        meta = meta if isinstance(meta, dict) else {}
        uid = ""
        if cfg.uid_list or uids is not None:
            uid = str(meta.get("uid") or "")
            if not is_uid(uid) or (uids is not None and uid not in uids):
                return Verdict("uid_not_listed", str(meta.get("uid"))[:40])
        facts = image_facts(members[ext], cfg.max_image_pixels, cfg.full_decode)
    except Exception as e:  # noqa: BLE001 - decoders raise many types for bad data
        return Verdict("decode_error", f"{type(e).__name__}: {e}"[:200])
    if facts.too_large:
        return Verdict("too_large", f"{facts.width}x{facts.height}")
    width, height = _original_size(meta, facts.width, facts.height)
    verdict = _rule_verdict(caption, width, height, cfg, language)
    if verdict:
        return verdict
    if eval_images is not None:
        try:
            how = eval_images.match(members[ext])
        except Exception as e:  # noqa: BLE001 - a header that parsed, data that does not
            return Verdict("decode_error", f"{type(e).__name__}: {e}"[:200])
        if how:
            return Verdict("eval_duplicate", f"{how} match of an eval image")
    return Verdict(None, "", str(meta.get("url") or ""), ext, uid)


def sample_info(source: int, position: int, sample: TarSample, verdict: Verdict,
                seed: int) -> SampleInfo:
    """The plan's view of a sample that passed ``check_sample``."""
    ext = verdict.image_ext
    return SampleInfo(source, position, sample.key,
                      hashlib.sha256(sample.members[ext]).digest(), url_hash(verdict.url),
                      sort_order(seed, sample.key), pack_spans(sample.spans, ext), ext)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def shard_sizes(total: int, samples_per_shard: int) -> list[int]:
    """``[n, n, ..., remainder]``: how the plan cuts ``total`` samples into shards."""
    full, rest = divmod(total, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])


def output_members(members: dict, image_ext: str) -> dict:
    """The members to write for a kept sample: its image as ``jpg`` (re-encoded if not)."""
    if image_ext == "jpg":
        return members
    out = {k: v for k, v in members.items() if k != image_ext}
    out["jpg"] = members[image_ext] if image_ext == "jpeg" else to_jpeg(members[image_ext])
    return out


def write_shard_tar(fileobj: IO[bytes], samples: Iterable[tuple[str, dict]]) -> int:
    """Write ``(key, {ext: bytes})`` samples, in the given order, as one tar.

    Header fields that would vary between runs (mtime, owner) are fixed, so the same
    samples in the same order give byte-identical tars.

    Returns:
        The number of samples written.
    """
    count = 0
    tar = TarWriter(fileobj)
    for key, members in samples:
        for ext in MEMBERS:
            tar.add(f"{key}.{ext}", members[ext])
        count += 1
    tar.close()
    return count

