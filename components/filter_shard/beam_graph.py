"""The Beam transforms of ``filter_shard``: check, dedup by key, plan from counts, write.

    (index, tar path) -> Reshuffle (spread the input shards over workers)
      -> CheckShard: check every sample (header-only image checks, captions, language,
                     eval-set hashes, CLIP score) -> SampleInfo batches keyed by the
                     bucket of their image sha256 [with a uid list: of their uid]
     [uid list pieces (row groups / .npy row slices) -> Reshuffle -> ReadUids: each
                     piece's uids, one packed array per uid bucket
      -> CoGroupByKey(uid bucket) with the samples -> KeepListed: the samples whose uid
                     is in the bucket's share of the list -> keyed by sha256 bucket]
      -> GroupByKey(sha256 bucket) -> Dedup: first of each image  -> keyed by URL bucket
      -> GroupByKey(URL bucket)    -> Dedup: first of each URL    -> keyed by key bucket
      -> GroupByKey(key bucket)    -> Dedup: first of each key, CLIP min score
                                                                   -> keyed by input tar
      -> GroupByKey(input tar) -> the kept samples of each tar, in a seeded order
      [-> CLIP top fraction: four histogram passes (``plan.pass_histogram``) pick the
          exact threshold; each tar drops what falls below it]
      -> Place: kept count of every tar (a side input of one number per tar) -> the
                output shard and rank of each kept sample (``plan.output_positions``)
      -> GroupByKey(output shard) -> WriteShard: fetch each sample's bytes by one byte-range
                read of its input tar (concurrent ranged GETs on gs://), write the tar

No step holds the dataset on one worker: a dedup bucket holds about one input tar's
metadata (there are as many buckets as input tars), a uid bucket as much plus at most
``matching.UIDS_PER_BUCKET`` uids of the list, a tar's group its own kept samples,
the histogram passes 65,536 counts, the plan one count per tar. Elements are batches
(per tar and bucket, per tar, per tar and output shard), never single samples: Beam's
per-element cost would otherwise dominate (measured: ~4x slower). Every drop is a Beam
Metrics counter ``filter_shard/dropped_<reason>`` (live on Dataflow's job page);
``read_counters`` sums them after the run.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import time
import uuid
from collections import Counter, defaultdict
from typing import Iterator

import apache_beam as beam
import fsspec
from fsspec.asyn import AsyncFileSystem
import numpy as np
from apache_beam.metrics import Metrics, MetricsFilter

from clipa_model import artifacts
from components.filter_shard.matching import (
    UID_DTYPE, UidList, UidListSource, UidPiece, inspect_uid_list, read_uid_piece, uid_buckets,
    uid_pairs)
from components.filter_shard.plan import (
    DEDUP_LEVELS, HIST_BINS, PASSES, Pick, bucket_of, first_of_each, merge_counts, narrow,
    output_positions,
    pass_histogram, rank_value, start_pick)
from components.filter_shard.samples import (
    FilterConfig, SampleInfo, TruncatedShardError, check_sample, iter_tar_samples,
    output_members, sample_info, sample_range, shard_name, split_range, write_shard_tar)

log = logging.getLogger("clipa.filter_shard")

NAMESPACE = "filter_shard"  # Beam Metrics namespace of every counter below

# Tars are read front to back in small pieces (a 512-byte header, then one member);
# a readahead cache of this size turns that into a few large range reads on gs://
# (gcsfs's default cache would send one request per piece).
_READ_BLOCK = 16 * 2**20
_WRITE_BUFFER = 4 * 2**20
CLIP_BATCH = 64  # samples scored per forward pass


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


def _language_identifier():
    """py3langid's bundled model (offline); ``callable(text) -> language code``."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    return lambda text: identifier.classify(text)[0]


class CheckShard(beam.DoFn):
    """``(index, tar path)`` -> ``(sha256 bucket, [SampleInfo, ...])`` of the samples that
    pass, one batch per bucket; with ``n_uid_buckets`` (a uid list),
    ``(uid bucket, (uids, [SampleInfo, ...]))`` for ``KeepListed``: the list itself is
    not here, only the check that each uid is well-formed. (So with CLIP scoring, the
    samples the list lacks are scored too: the price of not holding the list.)

    One element per input tar, not per sample: the runner's per-element cost (pickling,
    counters, bundle bookkeeping) is paid once a shard. A corrupt sample or a truncated
    tar is counted (``decode_error``, ``truncated_shard``) and skipped; the complete
    samples before a cut go on.
    """

    def __init__(self, cfg: FilterConfig, buckets: int, eval_images=None,
                 n_uid_buckets: int = 0):
        self.cfg, self.buckets, self.eval_images = cfg, buckets, eval_images
        self.n_uid_buckets = n_uid_buckets

    def setup(self):
        self.language = _language_identifier() if self.cfg.english_only else None
        if self.cfg.clip_scoring:
            from components.filter_shard.clip_score import ClipScorer

            self.scorer = ClipScorer(self.cfg.clip_model)

    def process(self, element: tuple[int, str]) -> Iterator[tuple[int, list]]:
        source, tar_path = element
        start, read = time.perf_counter(), 0
        dropped: Counter = Counter()
        infos, uids, pending = [], [], []  # pending: (index in infos, image, caption)
        try:
            with _open_for_reading(tar_path) as f:
                for position, sample in enumerate(iter_tar_samples(f)):
                    read += 1
                    verdict = check_sample(sample.key, sample.members, self.cfg, self.language,
                                           eval_images=self.eval_images)
                    if verdict.reason:
                        dropped[verdict.reason] += 1
                        log.debug("%s: %s dropped (%s: %s)", tar_path, sample.key,
                                  verdict.reason, verdict.note)
                        continue
                    infos.append(sample_info(source, position, sample, verdict, self.cfg.seed))
                    uids.append(verdict.uid)
                    if self.cfg.clip_scoring:
                        pending.append((len(infos) - 1, sample.members[verdict.image_ext],
                                        sample.members["txt"].decode("utf-8")))
                        if len(pending) >= CLIP_BATCH:
                            self._score(infos, pending)
        except TruncatedShardError as e:
            lost = _lost_in_truncated(tar_path, read, e.partial)
            log.warning("%s: truncated shard (%s); read the %d samples before the cut, "
                        "%d lost", tar_path, e, read, lost)
            dropped["truncated_shard"] += lost
            read += lost
        self._score(infos, pending)
        _count(read, dropped)
        log.info("%s: %d samples checked, %d passed (%.0f samples/s)", tar_path, read,
                 len(infos), read / max(time.perf_counter() - start, 1e-9))
        if self.n_uid_buckets:
            yield from _by_uid_bucket(infos, uids, self.n_uid_buckets)
        else:
            yield from _by_bucket(infos, DEDUP_LEVELS[0][1], self.buckets)

    def _score(self, infos: list, pending: list) -> None:
        """CLIP-score the pending samples in place (``SampleInfo.score``)."""
        if not pending:
            return
        scores = self.scorer.score([p[1] for p in pending], [p[2] for p in pending])
        for (i, _, _), score in zip(pending, scores):
            infos[i] = infos[i]._replace(score=score)
        pending.clear()


def _count(read: int, dropped: Counter) -> None:
    """Add one tar's counts to the Beam counters (live on Dataflow's job page)."""
    Metrics.counter(NAMESPACE, "input").inc(read)
    for reason, n in dropped.items():
        Metrics.counter(NAMESPACE, f"dropped_{reason}").inc(n)


def _pack(value) -> bytes:
    """One pickle for a whole list: Beam's default coder would pickle each item apart."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack_all(chunks) -> list:
    """The items of every pickled batch of a group."""
    return [item for chunk in chunks for item in pickle.loads(chunk)]


def _by_bucket(infos: list[SampleInfo], field: str, buckets: int) -> Iterator[tuple[int, bytes]]:
    """Batches of ``infos`` keyed by the bucket of ``field`` (one element per bucket)."""
    groups = defaultdict(list)
    for info in infos:
        groups[bucket_of(getattr(info, field), buckets)].append(info)
    for bucket, group in sorted(groups.items()):
        yield bucket, _pack(group)


def _bucket_rows(of: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(bucket, row indices)`` of an array of bucket numbers, buckets in ascending order,
    rows in their original order (one stable sort, not one scan per bucket)."""
    order = np.argsort(of, kind="stable")
    cuts = np.flatnonzero(np.diff(of[order])) + 1
    for rows in np.split(order, cuts) if len(of) else []:
        yield int(of[rows[0]]), rows


def _by_uid_bucket(infos: list[SampleInfo], uids: list[str],
                   buckets: int) -> Iterator[tuple[int, bytes]]:
    """Batches ``(uid array, infos)`` keyed by the uid bucket (one element per bucket)."""
    if not infos:
        return
    pairs = uid_pairs(uids, "KEY.json uids")  # CheckShard let only well-formed uids through
    for bucket, rows in _bucket_rows(uid_buckets(pairs, buckets)):
        yield bucket, _pack((pairs[rows], [infos[i] for i in rows]))


def _read_uids(piece: UidPiece, buckets: int) -> Iterator[tuple[int, bytes]]:
    """One piece of the uid list -> ``(uid bucket, raw UID_DTYPE bytes)``, one per bucket.

    Raw bytes, not a pickle: 16 bytes a uid, the most compact form to shuffle.
    """
    pairs = read_uid_piece(piece)
    for bucket, rows in _bucket_rows(uid_buckets(pairs, buckets)):
        yield bucket, pairs[rows].tobytes()


class KeepListed(beam.DoFn):
    """``(uid bucket, {"uids": [raw uids], "samples": [batches]})`` -> the samples whose
    uid is listed, keyed by sha256 bucket for the first dedup level.

    Runs before dedup, as the per-sample check did: a listed sample must not lose to an
    unlisted duplicate. A worker holds one bucket's share of the list.
    """

    def __init__(self, buckets: int):
        self.buckets = buckets

    def process(self, element) -> Iterator[tuple[int, bytes]]:
        bucket, grouped = element
        batches = [pickle.loads(b) for b in grouped["samples"]]
        if not batches:  # uids no sample asked for
            return
        pairs = np.concatenate([b[0] for b in batches])
        infos = [info for b in batches for info in b[1]]
        listed = UidList(np.frombuffer(b"".join(grouped["uids"]), UID_DTYPE),
                         f"uid bucket {bucket}")
        keep = listed.contains(pairs)
        Metrics.counter(NAMESPACE, "dropped_uid_not_listed").inc(len(infos) - int(keep.sum()))
        yield from _by_bucket([info for info, k in zip(infos, keep) if k], DEDUP_LEVELS[0][1],
                              self.buckets)


def _keep_listed(p: beam.Pipeline, checked: beam.PCollection, source: UidListSource,
                 n: int, buckets: int) -> beam.PCollection:
    """The uid list read in pieces and joined, per uid bucket (``n`` of them), with the
    checked samples; the survivors keyed by sha256 bucket (``buckets`` of them)."""
    uids = (p
            | "UidPieces" >> beam.Create(source.pieces)
            | "SpreadUidReads" >> beam.Reshuffle()
            | "ReadUids" >> beam.FlatMap(_read_uids, n))
    return ({"uids": uids, "samples": checked}
            | "ByUid" >> beam.CoGroupByKey()
            | "KeepListed" >> beam.ParDo(KeepListed(buckets)))


class Dedup(beam.DoFn):
    """``(bucket, batches)`` of one dedup level -> survivors keyed for the next step.

    Level ``i`` of ``plan.DEDUP_LEVELS`` keeps the first sample of each value (when that
    dedup is on; duplicate keys are always dropped: webdataset would merge the samples).
    After the last level, the CLIP minimum score applies and the survivors go to their
    input tar: ``(source, batch)``.
    """

    def __init__(self, level: int, cfg: FilterConfig, buckets: int):
        self.level, self.cfg, self.buckets = level, cfg, buckets

    def _enabled(self) -> bool:
        field = DEDUP_LEVELS[self.level][1]
        return {"sha256": self.cfg.dedup_sha256, "url_hash": self.cfg.dedup_url}.get(field, True)

    def process(self, element) -> Iterator[tuple[int, bytes]]:
        reason, field = DEDUP_LEVELS[self.level]
        infos = _unpack_all(element[1])
        if self._enabled():
            infos, dropped = first_of_each(infos, field)
            Metrics.counter(NAMESPACE, f"dropped_{reason}").inc(dropped)
        if self.level + 1 < len(DEDUP_LEVELS):
            yield from _by_bucket(infos, DEDUP_LEVELS[self.level + 1][1], self.buckets)
            return
        if self.cfg.clip_scoring and self.cfg.clip_min_score is not None:
            passed = [i for i in infos if i.score >= self.cfg.clip_min_score]  # NaN fails
            Metrics.counter(NAMESPACE, "dropped_clip_score").inc(len(infos) - len(passed))
            infos = passed
        by_source = defaultdict(list)
        for info in infos:
            by_source[info.source].append(info)
        for source, group in sorted(by_source.items()):
            yield source, _pack(group)


def _tar_kept(element) -> tuple[int, int, bytes]:
    """``(source, batches)`` -> ``(source, n, kept SampleInfo in the seeded output order)``.

    The list travels pickled whole with its count beside it: as a plain list, Beam's
    default coder pickled each SampleInfo on its own, once per consumer of this
    PCollection (~10% of a run, bench/bench_filter.py), and the count per tar is read
    without unpickling.
    """
    infos = _unpack_all(element[1])
    infos.sort(key=lambda r: (r.order, r.key))
    return element[0], len(infos), _pack(infos)


class SumCounts(beam.CombineFn):
    """Adds histogram Counters; the accumulator holds at most ``plan.HIST_BINS`` entries
    (``bounded_accumulator``: what the graph test allows a global combine to hold)."""
    bounded_accumulator = HIST_BINS

    def create_accumulator(self):
        return Counter()

    def add_input(self, acc, counts):
        acc.update(counts)
        return acc

    def merge_accumulators(self, accs):
        return merge_counts(accs)

    def extract_output(self, acc):
        return acc


def _top_fraction(kept: beam.PCollection, fraction: float) -> beam.PCollection:
    """Keep the top ``fraction`` of all kept samples by CLIP score, exactly, per tar."""
    total = (kept | "CountKept" >> beam.Map(lambda e: Counter(n=e[1]))
             | "SumKept" >> beam.CombineGlobally(SumCounts()))
    pick = total | "StartPick" >> beam.Map(lambda c: start_pick(fraction, c["n"]))
    for i in range(PASSES):
        counts = (kept | f"Histogram{i}" >> beam.Map(
            lambda e, p: pass_histogram(pickle.loads(e[2]), p), beam.pvalue.AsSingleton(pick))
            | f"SumHistogram{i}" >> beam.CombineGlobally(SumCounts()))
        pick = pick | f"Narrow{i}" >> beam.Map(narrow, beam.pvalue.AsSingleton(counts))
    return kept | "CutScores" >> beam.Map(_cut_scores, beam.pvalue.AsSingleton(pick))


def _cut_scores(element, pick: Pick) -> tuple[int, int, bytes]:
    source, n, packed = element
    passed = [i for i in pickle.loads(packed) if rank_value(i) >= pick.threshold]
    Metrics.counter(NAMESPACE, "dropped_clip_score").inc(n - len(passed))
    return source, len(passed), _pack(passed)


def _place(element, counts: dict, cfg: FilterConfig) -> Iterator[tuple[int, bytes]]:
    """``(source, n, kept)`` -> ``(output shard, [(rank, SampleInfo), ...])`` of this tar,
    one element per shard it feeds, from the per-tar counts only. Metadata only: the
    writer fetches the bytes (``WriteShard``)."""
    source, n_kept, packed = element
    if not n_kept:
        return
    position = output_positions(counts, source, cfg.seed)
    by_shard = defaultdict(list)
    for r, info in enumerate(pickle.loads(packed)):
        shard, rank = divmod(position(r), cfg.samples_per_shard)
        by_shard[shard].append((rank, info))
    for shard, items in sorted(by_shard.items()):
        yield shard, _pack(items)


_FETCH_CHUNK = 256  # samples fetched at once: a writer holds this many images, not a shard's


def _fetch(tar_paths: list[str], infos: list[SampleInfo]) -> Iterator[dict]:
    """The members of each sample in ``infos`` (same order), one byte-range read a sample,
    ``_FETCH_CHUNK`` samples at a time (the tar writer consumes them as they come)."""
    for i in range(0, len(infos), _FETCH_CHUNK):
        yield from _fetch_chunk(tar_paths, infos[i:i + _FETCH_CHUNK])


def _fetch_chunk(tar_paths: list[str], infos: list[SampleInfo]) -> list[dict]:
    """On gs:// the ranges go out as concurrent ranged GETs (``cat_ranges`` of an async
    filesystem); locally each input tar is opened once and read in offset order."""
    ranges = [sample_range(info.spans) for info in infos]
    fs, _ = fsspec.core.url_to_fs(tar_paths[0])
    paths = [fs._strip_protocol(tar_paths[info.source]) for info in infos]
    if isinstance(fs, AsyncFileSystem):
        blobs = fs.cat_ranges(paths, [r[0] for r in ranges], [r[1] for r in ranges])
    else:
        blobs = [b""] * len(infos)
        by_path = defaultdict(list)
        for i, path in enumerate(paths):
            by_path[path].append(i)
        for path, rows in by_path.items():
            rows.sort(key=lambda i: ranges[i][0])
            with fs.open(path, "rb") as f:
                for i in rows:
                    f.seek(ranges[i][0])
                    blobs[i] = f.read(ranges[i][1] - ranges[i][0])
    return [output_members(split_range(blob, start, info.spans, info.image_ext), info.image_ext)
            for blob, (start, _), info in zip(blobs, ranges, infos)]


class WriteShard(beam.DoFn):
    """``(shard index, [[(rank, SampleInfo), ...], ...])`` -> ``shard-NNNNN.tar``.

    The writer reads its samples' bytes from the input tars by byte range: the image bytes
    never pass through a shuffle (they did, grouped by shard: ~20% of a run, measured
    with bench/bench_filter.py), only the plan's metadata does. The price on GCS: one ranged
    GET per kept sample (class-B operations: ~1.4 B for DataComp-1B) instead of shuffling
    every image byte (~40 TB) through Dataflow's shuffle. Written under a temporary
    name and renamed (local) or uploaded whole (gs://), so a retried bundle rewrites the
    same bytes and a reader never sees half a tar.
    """

    def __init__(self, tar_paths: list[str], output_dir: str):
        self.tar_paths, self.output_dir = tar_paths, output_dir

    def process(self, element: tuple[int, list]) -> Iterator[tuple[str, int]]:
        index, chunks = element
        items = sorted((item for chunk in chunks for item in pickle.loads(chunk)),
                       key=lambda it: it[0])
        infos = [info for _, info in items]
        samples = zip((info.key for info in infos), _fetch(self.tar_paths, infos))
        path = artifacts.join(self.output_dir, shard_name(index))
        if "://" in path:
            with fsspec.open(path, "wb") as f:
                n = write_shard_tar(f, samples)
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb", buffering=_WRITE_BUFFER) as f:
                n = write_shard_tar(f, samples)
            os.replace(tmp, path)
        Metrics.counter(NAMESPACE, "kept").inc(n)
        yield shard_name(index), n


def build_beam_graph(p: beam.Pipeline, tar_paths: list[str], output_dir: str,
                     cfg: FilterConfig, eval_images=None) -> beam.PCollection:
    """Add the filter_shard transforms to ``p``; returns the (shard name, count) written.

    Args:
        eval_images: a ``matching.EvalImages`` when ``cfg.decontaminate`` (hashed once,
            before the run; shipped with the check step: a few MB for an eval set).
    """
    buckets = max(1, len(tar_paths))  # ~one input tar's metadata per dedup bucket
    # the list's header or footer only; its uids are read by the workers, in pieces
    source = inspect_uid_list(cfg.uid_list) if cfg.uid_list else None
    # uid buckets: as many as dedup buckets, more for a list of over ~64 MB a bucket
    n_uid = source.buckets(buckets) if source else 0
    checked = (p
               | "TarPaths" >> beam.Create(list(enumerate(tar_paths)))
               | "SpreadChecks" >> beam.Reshuffle()
               | "CheckShard" >> beam.ParDo(CheckShard(cfg, buckets, eval_images, n_uid)))
    if source:
        checked = _keep_listed(p, checked, source, n_uid, buckets)
    for level, (reason, _) in enumerate(DEDUP_LEVELS):
        name = reason.split("_", 1)[1].capitalize()
        checked = (checked
                   | f"By{name}" >> beam.GroupByKey()
                   | f"Dedup{name}" >> beam.ParDo(Dedup(level, cfg, buckets)))
    kept = checked | "ByInputTar" >> beam.GroupByKey() | "TarKept" >> beam.Map(_tar_kept)
    if cfg.clip_scoring and cfg.clip_top_fraction:
        kept = _top_fraction(kept, cfg.clip_top_fraction)
    counts = kept | "KeptPerTar" >> beam.Map(lambda e: (e[0], e[1]))
    return (kept
            | "Place" >> beam.FlatMap(_place, beam.pvalue.AsDict(counts), cfg)
            | "ByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShard(tar_paths, output_dir)))


def read_counters(result) -> Counter:
    """Our Beam counters, summed over steps (committed values where the runner has them)."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: Counter = Counter()
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] += int(value or 0)
    return totals
