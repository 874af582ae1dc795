"""filter_shard on small img2dataset-style shards, with Beam's local FnApiRunner.

The input (built once per module) mixes good samples with one of each kind of bad one:

    00000.tar  7 good + short caption + 5-char caption + 32 px image + 4:1 image
               + a good PNG image (written back as JPEG)
    00001.tar  7 good + a duplicate of a 00000 image under another key
               + an undecodable jpg + an unparsable json + a non-UTF-8 caption
               + a new image under a 00000 sample's URL
               + members named ../../x.* and /etc/x.* + a 100000x100000 PNG header
    00002.tar  6 good, then cut inside the 7th sample (its stats file says 8 were written)
"""
# No `from __future__ import annotations`: kfp reads the test pipeline's annotations as types.
import io
import json
import os
import resource
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from clipa_model.artifacts import ArtifactError, read_marker, write_marker
from components.filter_shard.samples import (
    REASONS, FilterConfig, SampleInfo, TruncatedShardError, check_sample, iter_tar_samples, pack_spans,
    sample_range, sort_order, split_range, write_shard_tar)
from components.filter_shard.component import filter_shard, main, run_filter_shard

SPS = 8  # samples per output shard
GOOD = 7 + 1 + 7 + 6
EXPECTED_DROPPED = {"caption_words": 1, "caption_chars": 1, "min_side": 1, "aspect_ratio": 1,
                    "duplicate_sha256": 1, "duplicate_url": 1, "decode_error": 3,
                    "unsafe_name": 2, "too_large": 1, "truncated_shard": 2}


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A small JPEG whose bytes differ per seed (a gradient with a seed-dependent colour)."""
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    im = Image.merge("RGB", (im.getchannel(0), im.getchannel(1).point(lambda v: (v + 37 * seed) % 256),
                             Image.new("L", (width, height), (seed * 11) % 256)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (seed, 255 - seed, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (3e10 bytes decoded), 100 bytes long."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + b"\0\0\0\0IEND\xaeB`\x82")


def _sample(key: str, caption: str, jpg: bytes, width: int = 0, height: int = 0, url: str = "",
            ext: str = "jpg") -> dict:
    meta = {"key": key, "url": url or f"http://example.com/{key}.jpg", "caption": caption,
            "status": "success", "width": width, "height": height, "original_width": width,
            "original_height": height}
    return {"key": key, ext: jpg, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}


def _good(shard: int, i: int) -> dict:
    key = f"{shard:05d}{i:04d}"
    w, h = 64 + 3 * i, 72 + 5 * shard
    return _sample(key, f"a photo of thing {shard} {i}", _jpeg(w, h, 10 * shard + i), w, h)


def _write_tar(path: Path, samples: list[dict], cut: int | None = None) -> None:
    """Write samples the way img2dataset does (webdataset: members sorted by extension)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "key"):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(s[ext])
                tf.addfile(info, io.BytesIO(s[ext]))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)


def _write_stats(folder: Path, shard: int, successes: int) -> None:
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": successes, "successes": successes}))


def _tar_offset_of(samples: list[dict], index: int) -> int:
    """Byte offset in the tar where sample ``index``'s jpg data starts (+100 bytes)."""
    offset = 0
    for s in samples[:index]:
        for ext in ("jpg", "json", "txt"):
            offset += 512 + -(-len(s[ext]) // 512) * 512
    return offset + 512 + 100


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    shard0 = [_good(0, i) for i in range(7)] + [
        _sample("000000100", "a cat", _jpeg(80, 80, 100), 80, 80),          # caption_words
        _sample("000000101", "a b c", _jpeg(80, 80, 101), 80, 80),          # caption_chars
        _sample("000000102", "a tiny little image", _jpeg(32, 32, 102), 32, 32),   # min_side
        _sample("000000103", "a wide panorama here", _jpeg(256, 64, 103), 256, 64),  # 4:1
        _sample("000000104", "a lossless png picture", _png(80, 90, 104), 80, 90, ext="png")]
    shard1 = [_good(1, i) for i in range(7)] + [
        _sample("000010100", "the same image again", shard0[2]["jpg"]),     # duplicate_sha256
        _sample("000010101", "a broken jpeg file", b"\xff\xd8 not really a jpeg"),  # decode_error
        {**_sample("000010102", "a broken json file", _jpeg(80, 80, 104)), "json": b"{not json"},
        {**_sample("000010103", "caption", _jpeg(80, 80, 105)), "txt": b"caf\xe9 au lait \xff"},
        _sample("000010104", "the same url, new bytes", _jpeg(80, 80, 106),
                url="http://example.com/000000003.jpg"),                    # duplicate_url
        _sample("../../x", "escaping the output folder", _jpeg(80, 80, 107)),  # unsafe_name
        _sample("/etc/x", "an absolute member name", _jpeg(80, 80, 108)),      # unsafe_name
        _sample("000010105", "a decompression bomb header", _bomb_png())]     # too_large
    shard2 = [_good(2, i) for i in range(8)]
    for n, samples in enumerate((shard0, shard1)):
        _write_tar(folder / f"{n:05d}.tar", samples)
        _write_stats(folder, n, len(samples))
    _write_tar(folder / "00002.tar", shard2, cut=_tar_offset_of(shard2, 6))
    _write_stats(folder, 2, len(shard2))
    write_marker(str(folder), "shards", count=36, successes=36, failures={}, shards=3, seconds=1.0)
    return str(folder)


def _read_tar(path: str) -> list[tuple[str, str]]:
    with tarfile.open(path) as tf:
        return [(m.name, m.uname) for m in tf.getmembers()]


def _samples_of(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one output tar, checking keys are not repeated."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            assert ext not in out.setdefault(key, {}), f"{m.name} twice in {path}"
            out[key][ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def filtered(input_dir, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("filtered"))
    return out, run_filter_shard(input_dir, out, samples_per_shard=SPS, seed=0)


def test_counts_per_reason_are_exact(filtered):
    out, result = filtered
    assert result["dropped"] == EXPECTED_DROPPED
    assert (result["count"], result["input_count"]) == (GOOD, GOOD + sum(EXPECTED_DROPPED.values()))
    marker = read_marker(out, "filtered_shards")
    assert marker["count"] == GOOD and marker["dropped"] == EXPECTED_DROPPED
    assert marker["shards"] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]


def test_shards_are_full_but_the_last_and_match_manifest(filtered, input_dir):
    out, _ = filtered
    manifest = json.loads(Path(out, "manifest.json").read_text())
    sizes = json.loads(Path(out, "sizes.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [SPS, SPS, GOOD - 2 * SPS]
    assert sizes == {s["name"]: s["count"] for s in manifest["shards"]}
    assert manifest["total"] == GOOD and manifest["dropped"] == EXPECTED_DROPPED
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == sorted(sizes)
    keys = []
    for name, count in sizes.items():
        samples = _samples_of(os.path.join(out, name))
        assert len(samples) == count
        assert all(set(m) == {"jpg", "json", "txt"} for m in samples.values())
        keys += samples
    assert len(keys) == len(set(keys)) == GOOD
    # The duplicate's smaller key stays; the cut sample of 00002.tar is gone.
    assert "000000002" in keys and "000010100" not in keys and "000020006" not in keys


def test_output_samples_keep_the_original_bytes(filtered, input_dir):
    out, _ = filtered
    original = _samples_of(os.path.join(input_dir, "00001.tar"))
    written = {}
    for name in json.loads(Path(out, "sizes.json").read_text()):
        written.update(_samples_of(os.path.join(out, name)))
    for key in ("000010000", "000010006"):
        assert written[key] == original[key]


def test_output_is_byte_identical_for_a_seed_and_shuffled_across_inputs(filtered, input_dir, tmp_path):
    out, _ = filtered
    again = run_filter_shard(input_dir, str(tmp_path / "again"), samples_per_shard=SPS, seed=0)
    for name in again["shards"]:
        assert Path(out, name).read_bytes() == Path(tmp_path / "again", name).read_bytes()
    first = [n for n, _ in _read_tar(os.path.join(out, "shard-00000.tar"))]
    assert {n[:5] for n in first} >= {"00000", "00001", "00002"}  # mixed across input shards
    assert {uname for n in again["shards"] for _, uname in _read_tar(os.path.join(out, n))} == {""}

    other = run_filter_shard(input_dir, str(tmp_path / "seed1"), samples_per_shard=SPS, seed=1)
    order0 = [n for s in again["shards"] for n, _ in _read_tar(os.path.join(out, s))]
    order1 = [n for s in other["shards"] for n, _ in _read_tar(str(tmp_path / "seed1" / s))]
    assert order0 != order1 and sorted(order0) == sorted(order1)


def test_filters_switch_off_and_rerun_overwrites(input_dir, tmp_path):
    out = str(tmp_path)  # as a killed earlier run with other settings would leave it
    for stale in ("shard-00009.tar", "shard-00000.tar.tmp-1234", "manifest.json"):
        Path(out, stale).write_bytes(b"old")
    write_marker(out, "filtered_shards", count=1)
    result = run_filter_shard(input_dir, out, samples_per_shard=4, min_caption_words=0,
                              min_caption_chars=None, min_image_side=0, max_aspect_ratio=None,
                              dedup_sha256=False)
    assert result["dropped"] == {"decode_error": 3, "truncated_shard": 2, "unsafe_name": 2,
                                 "too_large": 1, "duplicate_url": 1}
    assert result["count"] == GOOD + 5
    assert sorted(os.listdir(out)) == sorted(
        [f"shard-{i:05d}.tar" for i in range(7)]
        + ["manifest.json", "sizes.json", "report.html", "clipa_artifact.json"])
    html = Path(out, "report.html").read_text()
    assert "<svg" in html and "decode_error" in html and "truncated_shard" in html


def test_every_sample_dropped_is_an_error_naming_folder_and_reasons(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "00000.tar", [_sample(f"00000000{i}", "two words", _jpeg(80, 80, i)) for i in range(3)])
    write_marker(str(folder), "shards", count=3, successes=3, failures={}, shards=1, seconds=1.0)
    write_marker(str(tmp_path / "out"), "filtered_shards", count=1)  # from an earlier run
    with pytest.raises(ValueError, match=r"every sample was dropped") as err:
        run_filter_shard(str(folder), str(tmp_path / "out"))
    assert str(folder) in str(err.value) and "'caption_words': 3" in str(err.value)
    assert not (tmp_path / "out" / "clipa_artifact.json").exists()  # a failed rerun leaves none


def test_folder_without_tars_is_an_error_naming_it(tmp_path):
    write_marker(str(tmp_path), "shards", count=0, successes=0, failures={}, shards=0, seconds=0.0)
    with pytest.raises(ValueError, match=r"no \.tar shards") as err:
        run_filter_shard(str(tmp_path), str(tmp_path / "out"))
    assert str(tmp_path) in str(err.value)


def test_folder_without_marker_is_refused(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ArtifactError, match="not a finished clipa artifact"):
        run_filter_shard(str(tmp_path), str(tmp_path / "out"))


def test_output_folder_of_another_artifact_is_not_overwritten(input_dir, tmp_path):
    write_marker(str(tmp_path), "model", stage="pretrain")
    with pytest.raises(ValueError, match="holds a 'model' artifact"):
        run_filter_shard(input_dir, str(tmp_path))


@pytest.mark.parametrize("cut, yielded, partial", [(None, 2, None), ("tail", 2, 0), ("data", 1, 1)])
def test_tar_reader_tells_truncated_from_complete(tmp_path, cut, yielded, partial):
    samples = [_good(0, 0), _good(0, 1)]
    _write_tar(tmp_path / "a.tar", samples)
    cuts = {None: None, "tail": _tar_offset_of(samples, 2) - 612, "data": _tar_offset_of(samples, 1)}
    if cuts[cut]:
        (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:cuts[cut]])
    got, error = [], None
    with open(tmp_path / "a.tar", "rb") as f:
        try:
            for sample in iter_tar_samples(f):
                got.append(sample.key)
                # The writer reads a sample back at the byte range the first pass found.
                spans = pack_spans(sample.spans)
                start, end = sample_range(spans)
                f.seek(start)
                assert split_range(f.read(end - start), start, spans) == sample.members
        except TruncatedShardError as e:
            error = e
    assert got == [s["key"] for s in samples[:yielded]]
    assert (error.partial if error else None) == partial


def _check(sample: dict, cfg: FilterConfig = FilterConfig(), language=None):
    members = {k: v for k, v in sample.items() if k != "key"}
    return check_sample(sample["key"], members, cfg, language)


def test_check_sample_reasons():
    cfg = FilterConfig()
    ok = _good(0, 0)
    assert _check(ok).reason is None and _check(ok).url == "http://example.com/000000000.jpg"
    assert _check({**ok, "txt": b"hi there"}).reason == "caption_words"
    assert _check({**ok, "jpg": ok["jpg"][: len(ok["jpg"]) // 2]}).reason == "decode_error"
    assert _check({**ok, "jpg": ok["jpg"][:300]}).reason == "decode_error"  # cut in the header
    assert _check({**ok, "jpg": b"<!DOCTYPE html><html>gone</html>"}).reason == "decode_error"
    assert _check({**ok, "txt": b"caf\xe9 \xff\xfe latin-1 bytes"}).reason == "decode_error"
    assert _check({k: v for k, v in ok.items() if k != "txt"}).reason == "decode_error"
    tall = _sample("k", "a tall image here", _jpeg(64, 200, 1))
    assert _check(tall).reason == "aspect_ratio"
    assert _check(tall, FilterConfig(max_aspect_ratio=0)).reason is None
    for key in ("../../x", "/etc/x", "a/../../b", "c:\\x", "a\nb"):
        assert _check({**ok, "key": key}).reason == "unsafe_name", key
    assert _check({**ok, "key": "folder/000001"}).reason is None  # webdataset folder keys
    assert _check(ok, FilterConfig(full_decode=True)).reason is None
    assert _check({**ok, "jpg": ok["jpg"][:-2]}, cfg).reason == "decode_error"  # no EOI


def test_english_detection_uses_the_bundled_detector():
    from components.filter_shard.beam_graph import _language_identifier

    language = _language_identifier()
    cfg = FilterConfig(english_only=True)
    english = _sample("k", "a photo of a dog running on the beach", _jpeg(80, 80, 1))
    german = _sample("k", "ein Hund rennt am Strand entlang", _jpeg(80, 80, 1))
    assert _check(english, cfg, language).reason is None
    assert _check(german, cfg, language).reason == "not_english"


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim width x height."""
    data = bytearray(_jpeg(64, 64, 1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("image", [_bomb_png(), _jpeg_claiming(65000, 65000)],
                         ids=["png-100000x100000", "jpeg-65000x65000"])
@pytest.mark.parametrize("full_decode", [False, True])
def test_decompression_bomb_is_refused_with_bounded_memory(image, full_decode):
    sample = _sample("k", "a picture that is far too large", image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark
    verdict = _check(sample, FilterConfig(full_decode=full_decode))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert verdict.reason == "too_large" and "x" in verdict.note
    assert grown_mib < 100  # decoding would need ~12 GB (65000^2 x 3 bytes)


def test_tar_writer_matches_tarfile_and_keeps_long_names(tmp_path):
    samples = [("000000001", {"jpg": b"\xff" * 700, "json": b"{}", "txt": b"a cat"}),
               ("x" * 120, {"jpg": b"j", "json": b"{}", "txt": b"long name"}),
               ("caf\u00e9/1", {"jpg": b"j", "json": b"{}", "txt": b"unicode name"})]
    ours = io.BytesIO()
    write_shard_tar(ours, samples)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, members in samples:
            for ext in ("jpg", "json", "txt"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(members[ext]))
    assert ours.getvalue() == ref.getvalue()
    ours.seek(0)
    got = [(s.key, s.members) for s in iter_tar_samples(ours)]
    assert got == samples


def _info(source, position, key, sha, url=b"", score=float("nan")):
    return SampleInfo(source, position, key, sha, url, sort_order(0, key), b"", "jpg", score)


def _dedup_in_buckets(records, cfg, buckets=3):
    """The Beam graph's dedup levels, run bucket by bucket in plain Python."""
    from components.filter_shard.plan import DEDUP_LEVELS, bucket_of, first_of_each

    dropped = {}
    for reason, field in DEDUP_LEVELS:
        on = {"sha256": cfg.dedup_sha256, "url_hash": cfg.dedup_url}.get(field, True)
        groups = {}
        for r in records:
            groups.setdefault(bucket_of(getattr(r, field), buckets), []).append(r)
        records, dropped[reason] = [], 0
        for group in groups.values():
            kept, n = first_of_each(group, field) if on else (group, 0)
            records += kept
            dropped[reason] += n
    return sorted(records, key=lambda r: (r.key, r.source)), dropped


def test_dedup_keeps_smallest_key_of_duplicates_and_one_sample_per_key():
    records = [_info(1, 0, "b", b"same"), _info(0, 5, "a", b"same"),  # same bytes: "a" stays
               _info(0, 1, "c", b"x"), _info(1, 1, "c", b"y"),        # same key: tar 0's stays
               _info(0, 2, "d", b"z", b"u1"), _info(1, 2, "e", b"w", b"u1")]  # same URL: "d"
    kept, dropped = _dedup_in_buckets(records, FilterConfig())
    assert dropped == {"duplicate_sha256": 1, "duplicate_url": 1, "duplicate_key": 1}
    assert [(r.key, r.source) for r in kept] == [("a", 0), ("c", 0), ("d", 0)]
    for buckets in (1, 2, 7):  # the bucketing and the input order do not matter
        assert _dedup_in_buckets(records[::-1], FilterConfig(), buckets) == (kept, dropped)
    assert _dedup_in_buckets(records, FilterConfig(dedup_url=False))[1]["duplicate_url"] == 0


def _top_fraction(records, fraction):
    """The Beam graph's radix select, pass by pass, on records split over two 'tars'."""
    from components.filter_shard.plan import (PASSES, merge_counts, narrow, pass_histogram,
                                              rank_value, start_pick)

    tars = [records[::2], records[1::2]]
    pick = start_pick(fraction, len(records))
    for _ in range(PASSES):
        pick = narrow(pick, merge_counts(pass_histogram(t, pick) for t in tars))
    return sorted(r.key for r in records if rank_value(r) >= pick.threshold)


def test_top_fraction_is_exact_with_ties_and_unscored_samples():
    scores = [0.9, 0.1, 0.5, float("nan"), 0.7, 0.3, 0.5, 0.5, -0.2, 0.5]
    records = [_info(0, i, f"k{i}", bytes([i]), score=s) for i, s in enumerate(scores)]
    top = _top_fraction(records, 0.5)
    assert len(top) == 5 and {"k0", "k4"} <= set(top)  # 0.9, 0.7, then 3 of the four 0.5s
    assert set(top) - {"k0", "k4"} < {"k2", "k6", "k7", "k9"}
    assert _top_fraction(records, 0.1) == ["k0"]
    assert len(_top_fraction(records, 1.0)) == 10  # NaN ranks last but a fraction of 1 keeps it
    assert "k3" not in _top_fraction(records, 0.9)
    with pytest.raises(ValueError, match="clip_model"):
        FilterConfig(clip_top_fraction=0.5).validate()
    with pytest.raises(ValueError, match="clip_top_fraction=1.5"):
        FilterConfig(clip_model="m", clip_top_fraction=1.5).validate()


def test_output_positions_deal_the_tars_round_robin():
    from components.filter_shard.plan import output_positions, tar_order

    counts = {0: 3, 1: 0, 2: 5, 3: 1, 7: 2}
    order = tar_order(list(counts), seed=4)
    dealt = [(s, r) for r in range(max(counts.values())) for s in order if r < counts[s]]
    got = {(s, r): output_positions(counts, s, 4)(r) for s in counts for r in range(counts[s])}
    assert sorted(got.values()) == list(range(sum(counts.values())))  # a permutation
    assert [k for k, _ in sorted(got.items(), key=lambda kv: kv[1])] == dealt


def test_component_logs_metrics_and_copies_report(input_dir, tmp_path):
    from kfp.dsl import HTML, Dataset, Metrics

    shards, out = Dataset(uri=input_dir), Dataset(uri=str(tmp_path / "filtered"))
    stats, report = Metrics(uri=str(tmp_path / "stats")), HTML(uri=str(tmp_path / "report" / "page.html"))
    filter_shard.python_func(shards=shards, filtered=out, stats=stats, report=report, samples_per_shard=SPS)
    assert stats.metadata["kept"] == GOOD and stats.metadata["dropped_decode_error"] == 3
    # every reason is a metric, 0 included, and is a row of the report
    assert {f"dropped_{r}" for r in REASONS} <= set(stats.metadata)
    assert stats.metadata["dropped_not_english"] == 0 and stats.metadata["dropped_clip_score"] == 0
    page = Path(report.path).read_text()
    assert all(f"<td>{r}</td>" in page for r in REASONS)
    assert out.metadata["count"] == GOOD and out.metadata["shards"] == 3
    assert "<svg" in Path(report.path).read_text()


def test_command_line(input_dir, tmp_path, capsys):
    main(["--input", input_dir, "--output", str(tmp_path), "--samples-per-shard", "8",
          "--no-dedup-sha256", "--option", "direct_num_workers=1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == GOOD + 1 and printed["settings"]["dedup_sha256"] is False


def test_reads_and_writes_gs_urls(gcs, input_dir):
    gcs.put(input_dir.rstrip("/") + "/", "bkt/shards/", recursive=True)
    result = run_filter_shard("gs://bkt/shards", "gs://bkt/out", samples_per_shard=SPS)
    assert result["dropped"] == EXPECTED_DROPPED and result["count"] == GOOD
    gcs.invalidate_cache()
    assert read_marker("gs://bkt/out", "filtered_shards")["shards"] == result["shards"]
    sizes = json.loads(gcs.cat("bkt/out/sizes.json"))
    for name, count in sizes.items():
        with tarfile.open(fileobj=io.BytesIO(gcs.cat(f"bkt/out/{name}"))) as tf:
            assert len(tf.getnames()) == 3 * count


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_component_runs_in_kfp_local(input_dir, tmp_path, monkeypatch):
    from kfp import dsl, local
    from kfp.local import config

    # local.init replaces a process-wide singleton; put back whatever was there.
    monkeypatch.setattr(config.LocalExecutionConfig, "instance", config.LocalExecutionConfig.instance)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline
    def only_filter() -> dsl.Dataset:
        shards = dsl.importer(artifact_uri=input_dir, artifact_class=dsl.Dataset, reimport=False)
        return filter_shard(shards=shards.output, samples_per_shard=SPS).outputs["filtered"]

    filtered = only_filter().output
    assert read_marker(filtered.path, "filtered_shards")["count"] == GOOD


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A Model artifact of the tiny preset (random weights), as the train step writes it."""
    torch = pytest.importorskip("torch")
    from clipa_model.checkpoint import model_config
    from clipa_model.model import build_model

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model("tiny", 84, 8)
    torch.save(model.state_dict(), folder / "checkpoint.pt")
    (folder / "model_config.json").write_text(json.dumps(model_config("tiny", 84, 8)))
    write_marker(str(folder), "model", stage="pretrain", preset="tiny", image_size=84, text_len=8)
    return str(folder)


def test_english_and_clip_score_filters_end_to_end(tmp_path, tiny_model):
    from components.filter_shard.clip_score import ClipScorer

    folder = tmp_path / "shards"
    folder.mkdir()
    english = [_sample(f"00000000{i}", f"a photo of a small {c} house near the river", _jpeg(96, 96, i))
               for i, c in enumerate(["red", "green", "blue", "white", "black", "grey"])]
    german = [_sample(f"00000001{i}", f"ein kleines Haus am Fluss mit {c} Dach", _jpeg(96, 96, 20 + i))
              for i, c in enumerate(["rotem", "blauem"])]
    _write_tar(folder / "00000.tar", english + german)
    write_marker(str(folder), "shards", count=8, successes=8, failures={}, shards=1, seconds=1.0)
    result = run_filter_shard(str(folder), str(tmp_path / "out"), samples_per_shard=4,
                              english_only=True, clip_model=tiny_model, clip_top_fraction=0.5)
    assert result["dropped"] == {"not_english": 2, "clip_score": 3}
    scores = ClipScorer(tiny_model).score([s["jpg"] for s in english], [s["txt"].decode() for s in english])
    top = sorted(zip(scores, [s["key"] for s in english]), key=lambda t: (-t[0], t[1]))[:3]
    kept = _samples_of(str(tmp_path / "out" / "shard-00000.tar"))
    assert sorted(kept) == sorted(k for _, k in top)
    with pytest.raises(ValueError, match="nope.*not a model"):
        run_filter_shard(str(folder), str(tmp_path / "out2"), clip_model=str(tmp_path / "nope"),
                         clip_min_score=0.1)


def _tar_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def test_download_parts_are_read_as_one_namespace(input_dir, tmp_path):
    """A download split into parts: the marker lists the part folders, names are global."""
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for part in parts:
        part.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (parts[0] / name).write_bytes(Path(input_dir, name).read_bytes())
    (parts[1] / "00002.tar").write_bytes(Path(input_dir, "00002.tar").read_bytes())
    merged = tmp_path / "merged"
    write_marker(str(merged), "shards", count=36, successes=36, failures={},
                 shards=["00000.tar", "00001.tar", "00002.tar"], parts=[str(p) for p in parts])
    result = run_filter_shard(str(merged), str(tmp_path / "out"), samples_per_shard=SPS)
    assert result["count"] == GOOD and result["dropped"]["truncated_shard"] == 1  # no stats file
    (parts[1] / "00001.tar").write_bytes(b"")  # the same name in two parts: a collision
    with pytest.raises(ValueError, match="00001.tar is in two parts"):
        run_filter_shard(str(merged), str(tmp_path / "out"))


def test_dataflow_options_are_real_beam_options():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, WorkerOptions

    from components.filter_shard.options import dataflow_options, parse_args

    kwargs = parse_args(["--input", "gs://b/in", "--output", "gs://b/out", "--runner", "DataflowRunner",
                         "--project", "proj", "--region", "europe-west4", "--temp-location", "gs://b/tmp",
                         "--machine-type", "n2-standard-8", "--max-workers", "40",
                         "--sdk-container-image", "eu-docker.pkg.dev/proj/clipa/clipa-data:1",
                         "--english-only"], "test")
    options = PipelineOptions(flags=[], **kwargs["pipeline_options"])
    cloud, worker = options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("proj", "europe-west4", "gs://b/tmp")
    assert (worker.machine_type, worker.max_num_workers) == ("n2-standard-8", 40)
    assert worker.sdk_container_image == "eu-docker.pkg.dev/proj/clipa/clipa-data:1"
    assert kwargs["english_only"] and kwargs["runner"] == "DataflowRunner"
    with pytest.raises(ValueError, match="temp_location"):
        dataflow_options("p", "r", "/tmp/x", sdk_container_image="i")
    with pytest.raises(ValueError, match="need this package"):
        dataflow_options("p", "r", "gs://b/t")
