"""The Beam transforms of ``filter_shard``: check, plan, read the kept samples, write.

    (index, tar path) -> Reshuffle (spread the input shards over workers)
      -> CheckShard: decode and check every sample -> SampleInfo of those that pass
      -> ToList -> Plan: dedup, order by hash(seed, key), cut into output shards;
                         one element per input tar: the samples kept from it
      -> Reshuffle -> ReadKept: seek to each kept sample's bytes (no decoding, no
                                tar parsing), key them by output shard
      -> GroupByKey(output shard) -> WriteShard

Image bytes never wait while the plan is made: the first pass emits metadata only
(``SampleInfo``, ~0.4 kB a sample in memory, so the single-worker Plan step holds ~4 GB
per 10 M samples), and the second pass reads each kept sample's bytes once, at the offsets
the first pass recorded, and sends them through one shuffle to their output shard. Every
drop is a Beam Metrics counter ``filter_shard/dropped_<reason>`` (live on Dataflow's job
page); ``read_counters`` sums them after the run.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from typing import Iterator

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics, MetricsFilter

from clipa_model import artifacts
from components.filter_samples import (
    REASONS, FilterConfig, SampleInfo, TruncatedShardError, check_sample, iter_tar_samples,
    plan_shards, read_spans, sample_info, shard_name, write_shard_tar)

log = logging.getLogger("clipa.filter_shard")

NAMESPACE = "filter_shard"  # Beam Metrics namespace of every counter below

# Tars are read front to back in small pieces (a 512-byte header, then one member);
# a readahead cache of this size turns that into a few large range reads on gs://
# (gcsfs's default cache would send one request per piece).
_READ_BLOCK = 16 * 2**20


def _open_for_reading(tar_path: str):
    """A file object for sequential reading, local or gs://, with a large readahead."""
    fs, path = fsspec.core.url_to_fs(tar_path)
    # fs.open, not fsspec.open: fsspec.open would take the cache settings as options of
    # the filesystem, not of the file.
    return fs.open(path, "rb", cache_type="readahead", block_size=_READ_BLOCK)


def _lost_in_truncated(tar_path: str, read: int, partial: int) -> int:
    """Samples a truncated tar lost: what img2dataset says it wrote, less what was read.

    img2dataset's ``NNNNN_stats.json`` beside the tar counts the samples written
    (``successes``). Without it, the loss is unknown; it counts as at least one.
    """
    stats_path = tar_path[: -len(".tar")] + "_stats.json"
    try:
        with fsspec.open(stats_path, "r") as f:
            expected = int(json.load(f)["successes"])
        return max(expected - read, partial)
    except (OSError, ValueError, KeyError, TypeError):
        return max(partial, 1)


class CheckShard(beam.DoFn):
    """``(index, tar path)`` -> a ``SampleInfo`` per sample that passes the per-sample filters.

    A corrupt sample or a truncated tar is counted (``decode_error``,
    ``truncated_shard``) and skipped; the complete samples before a cut go on.
    """

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def setup(self):
        self.read = Metrics.counter(NAMESPACE, "input")
        self.dropped = {r: Metrics.counter(NAMESPACE, f"dropped_{r}") for r in REASONS}

    def process(self, element: tuple[int, str]) -> Iterator[SampleInfo]:
        source, tar_path = element
        start, read, passed = time.perf_counter(), 0, 0
        try:
            with _open_for_reading(tar_path) as f:
                for position, sample in enumerate(iter_tar_samples(f)):
                    read += 1
                    reason, note = check_sample(sample.members, self.cfg)
                    if reason:
                        self.dropped[reason].inc()
                        log.debug("%s: %s dropped (%s: %s)", tar_path, sample.key, reason, note)
                        continue
                    passed += 1
                    yield sample_info(source, position, sample, self.cfg.seed)
        except TruncatedShardError as e:
            lost = _lost_in_truncated(tar_path, read, e.partial)
            log.warning("%s: truncated shard (%s); read the %d samples before the cut, "
                        "%d lost", tar_path, e, read, lost)
            self.dropped["truncated_shard"].inc(lost)
            self.read.inc(lost)
        self.read.inc(read)
        seconds = time.perf_counter() - start
        log.info("%s: %d samples checked, %d passed (%.0f samples/s)", tar_path, read, passed,
                 read / max(seconds, 1e-9))


def _plan(records: list[SampleInfo], cfg: FilterConfig) -> Iterator[tuple[int, list]]:
    """All passing samples' metadata -> ``(input tar index, [Placement, ...])`` per tar."""
    placements, dropped = plan_shards(records, cfg)
    for reason, n in dropped.items():
        Metrics.counter(NAMESPACE, f"dropped_{reason}").inc(n)
    by_source = defaultdict(list)
    for placement in placements:
        by_source[placement.info.source].append(placement)
    yield from sorted(by_source.items())


class ReadKept(beam.DoFn):
    """``(input tar index, placements)`` -> ``(shard, (rank, key, members))`` per sample."""

    def __init__(self, tar_paths: list[str]):
        self.tar_paths = tar_paths

    def process(self, element: tuple[int, list]) -> Iterator[tuple[int, tuple]]:
        source, placements = element
        # In file order, so the readahead cache serves one forward sweep of the tar.
        placements = sorted(placements, key=lambda pl: pl.info.position)
        with _open_for_reading(self.tar_paths[source]) as f:
            for pl in placements:
                yield pl.shard, (pl.rank, pl.info.key, read_spans(f, pl.info.spans))


class WriteShard(beam.DoFn):
    """``(shard index, samples)`` -> ``shard-NNNNN.tar`` in the output folder.

    Written under a temporary name and renamed (local) or uploaded whole (gs://), so a
    retried bundle rewrites the same bytes and a reader never sees half a tar.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def setup(self):
        self.kept = Metrics.counter(NAMESPACE, "kept")

    def process(self, element: tuple[int, list]) -> Iterator[tuple[str, int]]:
        index, items = element
        items = sorted(items, key=lambda item: item[0])  # by rank
        samples = ((key, members) for _, key, members in items)
        path = artifacts.join(self.output_dir, shard_name(index))
        if "://" in path:
            with fsspec.open(path, "wb") as f:
                n = write_shard_tar(f, samples)
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                n = write_shard_tar(f, samples)
            os.replace(tmp, path)
        self.kept.inc(n)
        yield shard_name(index), n


def build_pipeline(p: beam.Pipeline, tar_paths: list[str], output_dir: str,
                   cfg: FilterConfig) -> beam.PCollection:
    """Add the filter_shard transforms to ``p``; returns the (shard name, count) written."""
    return (p
            | "TarPaths" >> beam.Create(list(enumerate(tar_paths)))
            | "SpreadChecks" >> beam.Reshuffle()
            | "CheckShard" >> beam.ParDo(CheckShard(cfg))
            | "AllInfo" >> beam.combiners.ToList()
            | "Plan" >> beam.FlatMap(_plan, cfg)
            | "SpreadReads" >> beam.Reshuffle()  # the plan comes from one worker
            | "ReadKept" >> beam.ParDo(ReadKept(tar_paths))
            | "ByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShard(output_dir)))


def read_counters(result) -> Counter:
    """Our Beam counters, summed over steps (committed values where the runner has them)."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: Counter = Counter()
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] += int(value or 0)
    return totals
