"""The shard plan of ``filter_shard`` from keyed groups and per-tar counts, never a global list.

Three pieces, each small enough for one worker whatever the dataset's size:

* ``first_of_each``: dedup inside one hash bucket (every sample sharing an image digest,
  a URL or a key lands in the same bucket, so the bucket decides alone);
* ``pass_histogram`` / ``narrow``: the exact CLIP-score threshold of a top fraction, by
  a radix select: four passes, each a 65,536-bin histogram of the next 16 bits of a 64-bit
  rank value (score, then a hash of the key). An exact count rather than Beam's
  ApproximateQuantiles: the kept count must be exactly ``ceil(fraction * n)`` and the cut
  must not depend on how a runner merges partial results, or the output would not be
  byte-identical for a seed across runners. The price: four cheap passes over the
  metadata instead of one;
* ``output_positions``: where each kept sample of one input tar goes, from the kept count
  of every input tar only: the tars deal their samples round-robin (in a seeded tar
  order, each tar's samples in a seeded order), and the dealt sequence is cut into
  shards of exactly ``samples_per_shard``.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Callable, Iterable, NamedTuple

import numpy as np

from components.filter_shard.samples import SampleInfo

# Dedup levels, in the order they apply: the drop reason and the field that must be unique.
DEDUP_LEVELS = (("duplicate_sha256", "sha256"), ("duplicate_url", "url_hash"),
                ("duplicate_key", "key"))
PASS_BITS = 16  # bits of the rank value each histogram pass resolves
PASSES = 64 // PASS_BITS
HIST_BINS = 1 << PASS_BITS


def bucket_of(value: bytes | str, buckets: int) -> int:
    """The bucket (0 .. buckets-1) of a dedup value: a stable hash, the same on every worker."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % buckets


def dedup_rank(info: SampleInfo) -> tuple:
    """Which of two duplicates stays: the smaller key, then the earlier input tar and sample."""
    return info.key, info.source, info.position


def first_of_each(records: list[SampleInfo], field: str) -> tuple[list[SampleInfo], int]:
    """Keep the first sample (by ``dedup_rank``) of each value of ``field``.

    Args:
        records: every sample of one bucket (all samples sharing a value share a bucket).
        field: ``"sha256"``, ``"url_hash"`` (an empty value is never a duplicate) or ``"key"``.
    Returns:
        ``(kept, dropped)``: the survivors in ``dedup_rank`` order, and how many were dropped.
    """
    best: dict = {}
    kept = []
    for info in records:
        value = getattr(info, field)
        if not value:
            kept.append(info)
        elif value not in best or dedup_rank(info) < dedup_rank(best[value]):
            best[value] = info
    kept += best.values()
    kept.sort(key=dedup_rank)
    return kept, len(records) - len(kept)


# ---------------------------------------------------------------------------------------
# CLIP-score top fraction: an exact radix select over 64-bit rank values


def score_bits(score: float) -> int:
    """A float32 score as a uint32 that sorts like the score (NaN: below every score)."""
    if score != score:  # NaN: not scored (undecodable), ranked last
        return 0
    bits = int(np.float32(score).view(np.uint32))
    return (~bits & 0xFFFFFFFF) if bits & 0x80000000 else bits | 0x80000000


def rank_value(info: SampleInfo) -> int:
    """64 bits that order samples for the top fraction: score first (high to low), then a
    32-bit hash of the key (so equal scores split deterministically, whatever the runner)."""
    key_hash = int.from_bytes(hashlib.blake2b(info.key.encode("utf-8", "surrogatepass"),
                                              digest_size=4).digest(), "big")
    return score_bits(info.score) << 32 | (0xFFFFFFFF - key_hash)


class Pick(NamedTuple):
    """A radix-select step: the wanted value's top ``bits`` bits are ``prefix``, and it is
    the ``rank``-th largest (1-based) of the values sharing that prefix."""
    prefix: int = 0
    bits: int = 0
    rank: int = 0

    @property
    def threshold(self) -> int:
        """After the last pass: keep samples whose ``rank_value`` is at least this."""
        return self.prefix if self.rank > 0 else 1 << 64  # rank 0: keep none


def start_pick(fraction: float, total: int) -> Pick:
    """The first step of selecting the top ``ceil(fraction * total)`` samples."""
    return Pick(0, 0, math.ceil(fraction * total))


def pass_histogram(infos: Iterable[SampleInfo], pick: Pick) -> Counter:
    """Counts of the next ``PASS_BITS`` bits of ``rank_value`` among samples matching
    ``pick``'s prefix: at most ``2**PASS_BITS`` entries whatever the number of samples."""
    counts: Counter = Counter()
    if pick.rank <= 0:
        return counts
    shift = 64 - pick.bits - PASS_BITS
    for info in infos:
        value = rank_value(info)
        if pick.bits == 0 or value >> (64 - pick.bits) == pick.prefix:
            counts[(value >> shift) & (HIST_BINS - 1)] += 1
    return counts


def merge_counts(parts: Iterable[Counter]) -> Counter:
    """The sum of partial histograms (what a runner's combine does with them)."""
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def narrow(pick: Pick, counts: Counter) -> Pick:
    """The next step: the bin holding the ``rank``-th largest value, rank within it."""
    if pick.rank <= 0:
        return Pick(pick.prefix << PASS_BITS, pick.bits + PASS_BITS, 0)
    above = 0
    for b in sorted(counts, reverse=True):
        if above + counts[b] >= pick.rank:
            return Pick(pick.prefix << PASS_BITS | b, pick.bits + PASS_BITS, pick.rank - above)
        above += counts[b]
    raise ValueError(f"rank {pick.rank} beyond the {above} samples counted")


def output_positions(counts: dict[int, int], source: int, seed: int) -> Callable[[int], int]:
    """``r -> position`` in the output of the ``r``-th kept sample of input tar ``source``.

    The tars deal their kept samples round-robin, tar order seeded (``tar_order``): in
    round ``r`` every tar with more than ``r`` kept samples gives its ``r``-th. So the
    position of ``(source, r)`` is ``sum_j min(c_j, r)`` (the earlier rounds) plus the
    tars before ``source`` in the tar order that still deal in round ``r``.

    Args:
        counts: kept samples per input tar (every tar, zeros allowed).
        source: the input tar asked about.
        seed: the shuffle seed.
    Returns:
        A function of ``r`` (0 <= r < counts[source]).
    """
    order = tar_order(list(counts), seed)
    before = np.sort(np.array([counts[s] for s in order[:order.index(source)]], dtype=np.int64))
    every = np.sort(np.array(list(counts.values()), dtype=np.int64))
    prefix = np.concatenate([[0], np.cumsum(every)])

    def position(r: int) -> int:
        below = int(np.searchsorted(every, r, side="left"))  # tars with c_j < r
        earlier_rounds = int(prefix[below]) + r * (len(every) - below)
        dealing_before = len(before) - int(np.searchsorted(before, r, side="right"))
        return earlier_rounds + dealing_before
    return position


def tar_order(sources: list[int], seed: int) -> list[int]:
    """The seeded order in which the input tars deal their samples each round."""
    return sorted(sources, key=lambda s: (hashlib.blake2b(f"{seed}\x00tar{s}".encode(),
                                                          digest_size=8).digest(), s))
