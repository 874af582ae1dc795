"""filter_shard on small img2dataset-style shards, with Beam's local FnApiRunner.

The input (built once per module) mixes good samples with one of each kind of bad one:

    00000.tar  7 good + short caption + 5-char caption + 32 px image + 4:1 image
    00001.tar  7 good + a duplicate of a 00000 image under another key
               + an undecodable jpg + an unparsable json
    00002.tar  6 good, then cut inside the 7th sample (its stats file says 8 were written)
"""
# No `from __future__ import annotations`: kfp reads the test pipeline's annotations as types.
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from clipa_model.artifacts import ArtifactError, read_marker, write_marker
from components.filter_samples import (
    FilterConfig, SampleInfo, TruncatedShardError, check_sample, iter_tar_samples, pack_spans, plan_shards,
    read_spans, sort_order)
from components.filter_shard import filter_shard, main, run_filter_shard

SPS = 8  # samples per output shard
GOOD = 7 + 7 + 6
EXPECTED_DROPPED = {"caption_words": 1, "caption_chars": 1, "min_side": 1, "aspect_ratio": 1,
                    "duplicate_sha256": 1, "decode_error": 2, "truncated_shard": 2}


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A small JPEG whose bytes differ per seed (a gradient with a seed-dependent colour)."""
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    im = Image.merge("RGB", (im.getchannel(0), im.getchannel(1).point(lambda v: (v + 37 * seed) % 256),
                             Image.new("L", (width, height), (seed * 11) % 256)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _sample(key: str, caption: str, jpg: bytes, width: int = 0, height: int = 0) -> dict:
    meta = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": caption, "status": "success",
            "width": width, "height": height, "original_width": width, "original_height": height}
    return {"key": key, "jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}


def _good(shard: int, i: int) -> dict:
    key = f"{shard:05d}{i:04d}"
    w, h = 64 + 3 * i, 72 + 5 * shard
    return _sample(key, f"a photo of thing {shard} {i}", _jpeg(w, h, 10 * shard + i), w, h)


def _write_tar(path: Path, samples: list[dict], cut: int | None = None) -> None:
    """Write samples the way img2dataset does (webdataset: members sorted by extension)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            for ext in ("jpg", "json", "txt"):
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
        _sample("000000103", "a wide panorama here", _jpeg(256, 64, 103), 256, 64)]  # 4:1
    shard1 = [_good(1, i) for i in range(7)] + [
        _sample("000010100", "the same image again", shard0[2]["jpg"]),     # duplicate_sha256
        _sample("000010101", "a broken jpeg file", b"\xff\xd8 not really a jpeg"),  # decode_error
        {**_sample("000010102", "a broken json file", _jpeg(80, 80, 104)), "json": b"{not json"}]
    shard2 = [_good(2, i) for i in range(8)]
    for n, samples in enumerate((shard0, shard1)):
        _write_tar(folder / f"{n:05d}.tar", samples)
        _write_stats(folder, n, len(samples))
    _write_tar(folder / "00002.tar", shard2, cut=_tar_offset_of(shard2, 6))
    _write_stats(folder, 2, len(shard2))
    write_marker(str(folder), "shards", count=30, successes=30, failures={}, shards=3, seconds=1.0)
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
    assert result["dropped"] == {"decode_error": 2, "truncated_shard": 2}
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
                # The second pass reads a sample back at the offsets the first pass found.
                assert read_spans(f, pack_spans(sample.spans)) == sample.members
        except TruncatedShardError as e:
            error = e
    assert got == [s["key"] for s in samples[:yielded]]
    assert (error.partial if error else None) == partial


def test_check_sample_reasons():
    cfg = FilterConfig()
    ok = _good(0, 0)
    assert check_sample(ok, cfg)[0] is None
    assert check_sample({**ok, "txt": b"hi there"}, cfg)[0] == "caption_words"
    assert check_sample({**ok, "jpg": ok["jpg"][: len(ok["jpg"]) // 2]}, cfg)[0] == "decode_error"
    assert check_sample({k: v for k, v in ok.items() if k != "txt"}, cfg)[0] == "decode_error"
    tall = _sample("k", "a tall image here", _jpeg(64, 200, 1))
    assert check_sample(tall, cfg)[0] == "aspect_ratio"
    assert check_sample(tall, FilterConfig(max_aspect_ratio=0))[0] is None


def test_plan_keeps_smallest_key_of_duplicates_and_one_sample_per_key():
    def info(source, position, key, sha):
        return SampleInfo(source, position, key, sha, sort_order(0, key), b"")

    records = [info(1, 0, "b", b"same"), info(0, 5, "a", b"same"),  # same bytes: "a" stays
               info(0, 1, "c", b"x"), info(1, 1, "c", b"y"),        # same key: tar 0's stays
               info(0, 2, "d", b"z")]
    cfg = FilterConfig(samples_per_shard=2)
    placements, dropped = plan_shards(records, cfg)
    assert dropped == {"duplicate_sha256": 1, "duplicate_key": 1}
    assert sorted((p.info.key, p.info.source) for p in placements) == [("a", 0), ("c", 0), ("d", 0)]
    assert [(p.shard, p.rank) for p in placements] == [(0, 0), (0, 1), (1, 0)]
    assert plan_shards(records[::-1], cfg)[0] == placements  # input order does not matter


def test_component_logs_metrics_and_copies_report(input_dir, tmp_path):
    from kfp.dsl import HTML, Dataset, Metrics

    shards, out = Dataset(uri=input_dir), Dataset(uri=str(tmp_path / "filtered"))
    stats, report = Metrics(uri=str(tmp_path / "stats")), HTML(uri=str(tmp_path / "report" / "page.html"))
    filter_shard.python_func(shards=shards, filtered=out, stats=stats, report=report, samples_per_shard=SPS)
    assert stats.metadata["kept"] == GOOD and stats.metadata["dropped_decode_error"] == 2
    assert out.metadata["count"] == GOOD and out.metadata["shards"] == 3
    assert "<svg" in Path(report.path).read_text()


def test_command_line(input_dir, tmp_path, capsys):
    main(["--input", input_dir, "--output", str(tmp_path), "--samples-per-shard", "8",
          "--no-dedup", "--option", "direct_num_workers=1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == GOOD + 1 and printed["settings"]["dedup_sha256"] is False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def gcs(monkeypatch):
    """A GCS emulator on loopback; gs:// URLs reach it through fsspec's config."""
    gcsfs = pytest.importorskip("gcsfs")
    emulator = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    if not os.path.exists(emulator):
        pytest.skip("gcp-storage-emulator is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([emulator, "start", "-H", "127.0.0.1", "--port", str(port), "--default-bucket", "bkt",
                             "-q", "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # gcsfs's default (extended) class first probes each bucket over gRPC, which waits
    # ~60 s against an emulator: gs:// goes to the core class for this test.
    original = fsspec.get_filesystem_class("gs")
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert time.monotonic() < deadline and proc.poll() is None, "GCS emulator did not start"
            time.sleep(0.1)
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        monkeypatch.setitem(fsspec.config.conf, "gcs", {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon"})
        yield fsspec.filesystem("gs")
    finally:
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, original, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait()


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
