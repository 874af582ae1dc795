"""The download step: URL list checks, and real img2dataset runs against a loopback server.

img2dataset spawns a worker and a logger process per run (~10 s here, mostly imports), so
the module downloads once (fixture ``downloaded``) and the other runs are few and small.
The list mixes the demo's realistic bad rows with unsafe URLs, decompression bombs and
a host name, read from a folder of a parquet and a gzipped tsv file.
"""
# No `from __future__ import annotations`: kfp reads the test pipeline's annotations as types.
import collections
import glob
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib

import pandas as pd
import pytest
from PIL import Image

from clipa_model.artifacts import read_marker
from components.download.component import UrlListError, failure_reason, read_url_list, run_download
from components.download.stats import metrics
from pipelines.demo_server import BAD_KINDS, serve_directory, write_url_list
from test_download_options import serve_with_headers
from support import REPO_ROOT

N_GOOD = 40
ALLOW = "127.0.0.1/32"  # the loopback server; everything else private stays refused
DOWNLOAD_ARGS = dict(image_size=64, samples_per_shard=20, threads=8, timeout=5,
                     allow_networks=ALLOW, progress_seconds=1)


def make_samples(root, n):
    """Write ``n`` distinct small JPEGs under ``root/images`` and return their sample dicts."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    samples = []
    for i in range(n):
        label = i % 4
        img = Image.new("RGB", (64 + (i % 5) * 8, 48 + (i % 3) * 8),
                        ((60 * label + 40) % 256, (37 * i) % 256, 200 - 40 * label))
        img.paste((255 - label * 50, 20 * (i % 10), 90), (i % 20, i % 13, i % 20 + 16, i % 13 + 16))
        rel = f"images/{i:04d}.jpg"
        img.save(os.path.join(root, rel), quality=90)
        samples.append({"file": rel, "caption": f"a square of class {label}, number {i}",
                        "label": label})
    return samples


def bomb_png(side):
    """A ~100-byte PNG whose header claims side x side RGB pixels."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    chunk = lambda body: struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(idat) + chunk(b"IEND")


def extra_rows(root, base_url, header_url):
    """Rows the demo list lacks: unsafe URLs, bombs, a host name, X-Robots-Tag headers
    (from ``header_url``, a ``serve_with_headers`` server of the same folder); with a
    uid column."""
    port = base_url.rsplit(":", 1)[1]
    Image.new("RGB", (80, 70), (10, 200, 30)).save(os.path.join(root, "images", "named.jpg"))
    Image.new("RGB", (80, 70), (200, 10, 30)).save(os.path.join(root, "images", "tagged.jpg"))
    for side in (100_000, 30_000):
        with open(os.path.join(root, f"bomb-{side}.png"), "wb") as f:
            f.write(bomb_png(side))
    rows = [
        ("file:///etc/passwd", "unsafe_scheme"),
        ("gopher://127.0.0.1:70/", "unsafe_scheme"),
        ("http://169.254.169.254/computeMetadata/v1/", "unsafe_address"),
        ("http://metadata.google.internal/computeMetadata/v1/", "unsafe_host"),
        ("http://10.0.0.1/a.jpg", "unsafe_address"),
        (f"http://[::1]:{port}/images/0000.jpg", "unsafe_address"),  # not in the allow-list
        (f"{base_url}/bomb-100000.png", "too_large"),
        (f"{base_url}/bomb-30000.png", "too_large"),
        (f"http://localhost:{port}/images/named.jpg", "success"),  # a name for 127.0.0.1
        # img2dataset's default directives: "noai" refuses; a tag for another bot does not
        (f"{header_url}/noai/images/tagged.jpg", "robots_disallowed"),
        (f"{header_url}/otherbot/images/tagged.jpg", "success"),
    ]
    return pd.DataFrame({"url": [u for u, _ in rows],
                         "caption": [f"an extra row about {k}, number {i}" for i, (_, k) in enumerate(rows)],
                         "label": ["1"] * len(rows), "uid": [f"uid-{i}" for i in range(len(rows))],
                         "expect": [k for _, k in rows]})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The loopback server and a URL list folder (a parquet and a gzipped tsv)."""
    tmp = tmp_path_factory.mktemp("download")
    root = tmp / "served"
    samples = make_samples(str(root), N_GOOD)
    with serve_directory(str(root)) as base_url, serve_with_headers(str(root)) as tagged:
        urls = tmp / "urls"
        urls.mkdir()
        kinds = write_url_list(samples, str(root), base_url, str(urls / "a.parquet"), seed=0,
                               bad_fraction=0.05)
        extra = extra_rows(str(root), base_url, tagged.base_url)
        with gzip.open(urls / "b.tsv.gz", "wt") as f:
            extra.drop(columns="expect").to_csv(f, sep="\t", index=False)
        yield {"tmp": tmp, "root": root, "base_url": base_url, "url_list": str(urls),
               "kinds": kinds, "extra": extra}


@pytest.fixture(scope="module")
def downloaded(served):
    """One real download of the whole list."""
    out = str(served["tmp"] / "shards")
    # In a fresh interpreter, so that RUSAGE_CHILDREN there measures img2dataset's workers
    # alone (in this process it would also hold the peak of every earlier test's children).
    script = ("import json, logging, resource, sys; from components.download.component import run_download; "
              "logging.basicConfig(level=logging.INFO); "
              "result = run_download(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3])); "
              "print(json.dumps({'result': result, 'workers_maxrss_kib': "
              "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    proc = subprocess.run([sys.executable, "-c", script, served["url_list"], out,
                           json.dumps(DOWNLOAD_ARGS)], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**served, "out": out, "result": report["result"], "log": proc.stderr,
            "workers_maxrss_kib": report["workers_maxrss_kib"],
            "urls": read_url_list(served["url_list"]).set_index("url")}


def _samples_in(tar_path):
    """{key: {ext: bytes}} of a webdataset tar."""
    samples = collections.defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return samples


def test_marker_is_written_with_the_result(downloaded):
    marker = read_marker(downloaded["out"], "shards")
    result = downloaded["result"]
    assert {k: v for k, v in marker.items() if k not in ("kind", "format_version")} == result
    assert {"count", "successes", "failures", "shards", "seconds", "success_rate",
            "images_per_second"} <= set(marker)
    n_fetched = len(downloaded["urls"]) - 6  # six rows are refused before img2dataset
    assert result["shards"] == [f"{i:05d}.tar" for i in range(-(-n_fetched // 20))]
    assert not os.path.exists(os.path.join(downloaded["out"], "_tmp"))


def test_counts_successes_and_failures_by_reason(downloaded):
    kinds, result, extra = downloaded["kinds"], downloaded["result"], downloaded["extra"]
    expect = collections.Counter(extra["expect"])
    assert result["count"] == sum(kinds.values()) + len(extra)
    # tiny, duplicate and short-caption rows download fine: the filter stage drops them
    assert result["successes"] == (kinds["good"] + kinds["tiny_image"] + kinds["duplicate_image"]
                                   + kinds["short_caption"] + expect["success"])
    assert result["failures"] == {
        "http_404": kinds["http_404"], "decode_error": kinds["html_page"],
        "truncated_image": kinds["truncated_jpeg"],
        # a redirect to 169.254.169.254 is refused when the connection is made
        "unsafe_address": kinds["redirect_to_metadata"] + expect["unsafe_address"],
        "unsafe_scheme": expect["unsafe_scheme"], "unsafe_host": expect["unsafe_host"],
        "too_large": expect["too_large"], "robots_disallowed": expect["robots_disallowed"]}
    assert result["successes"] + sum(result["failures"].values()) == result["count"]
    assert "169.254.169.254" in result["failure_examples"]["unsafe_address"] or \
        "link-local" in result["failure_examples"]["unsafe_address"]


def test_refused_rows_are_listed_and_bombs_cost_no_memory(downloaded):
    refused = pd.read_parquet(os.path.join(downloaded["out"], "refused.parquet"))
    assert sorted(refused["reason"]) == sorted(
        k for k in downloaded["extra"]["expect"] if k.startswith("unsafe"))
    # img2dataset's workers are children of this process: decoding the 30000 x 30000 PNG
    # would have taken 2.7 GB in one of them.
    assert downloaded["workers_maxrss_kib"] < 1.5 * 2**20


def test_tars_hold_image_caption_and_metadata(downloaded):
    urls, out = downloaded["urls"], downloaded["out"]
    seen, hashes, tiny, uids = 0, set(), 0, set()
    for shard in downloaded["result"]["shards"]:
        for key, sample in _samples_in(os.path.join(out, shard)).items():
            assert set(sample) == {"jpg", "txt", "json"}, key
            meta = json.loads(sample["json"])
            row = urls.loc[meta["url"]]
            assert sample["txt"].decode() == row["caption"]
            assert str(meta["label"]) == str(row["label"])  # extra columns are carried
            uids.add(meta["uid"])
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                assert im.size == (meta["width"], meta["height"])
                tiny += min(im.size) < 32  # not upscaled: the filter sees the true size
            hashes.add(meta["sha256"])
            seen += 1
    kinds = downloaded["kinds"]
    assert seen == downloaded["result"]["successes"]
    assert tiny == kinds["tiny_image"]
    assert "uid-8" in uids  # the localhost row, from the tsv.gz file
    # sha256 is of the downloaded bytes, so re-hosted copies share their source's hash
    assert len(hashes) == seen - kinds["duplicate_image"]


def test_report_and_metrics_show_rate_and_reasons(downloaded):
    result = downloaded["result"]
    numbers = metrics(result)
    assert numbers["success_rate"] == pytest.approx(result["successes"] / result["count"], abs=1e-3)
    assert numbers["images_per_second"] > 0 and numbers["failed_unsafe_scheme"] == 2
    page = open(os.path.join(downloaded["out"], "report.html")).read()
    for reason in result["failures"]:
        assert f"<td>{reason}</td>" in page
    assert "images/s" in page


def test_progress_is_logged_while_it_runs(downloaded):
    lines = [l for l in downloaded["log"].splitlines() if "download progress:" in l]
    n = len(downloaded["result"]["shards"])
    assert lines and lines[-1].split("download progress: ", 1)[1].startswith(f"{n} of {n} shards")
    assert "downloaded %d of %d images" % (downloaded["result"]["successes"],
                                           downloaded["result"]["count"]) in downloaded["log"]


def test_rerun_of_a_finished_folder_does_nothing(downloaded):
    out = downloaded["out"]
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    again = run_download(downloaded["url_list"], out, **DOWNLOAD_ARGS)
    assert again == downloaded["result"]  # same seconds too: read back from the marker
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == mtimes


def test_finished_folder_of_other_settings_is_refused(downloaded):
    with pytest.raises(ValueError, match="already holds finished shards.*image_size"):
        run_download(downloaded["url_list"], downloaded["out"], **{**DOWNLOAD_ARGS, "image_size": 32})


def test_unfinished_folder_resumes_missing_shards_only(downloaded):
    out = str(downloaded["tmp"] / "resumed")
    shutil.copytree(downloaded["out"], out)
    # as if killed while shard 1 was being written: no marker, no stats for shard 1
    os.remove(os.path.join(out, "clipa_artifact.json"))
    os.remove(os.path.join(out, "00001_stats.json"))
    before = {s: os.path.getmtime(os.path.join(out, s)) for s in ("00000.tar", "00002.tar")}
    result = run_download(downloaded["url_list"], out, **DOWNLOAD_ARGS)
    first = downloaded["result"]
    for field in ("count", "successes", "failures", "shards"):
        assert result[field] == first[field], field
    assert {s: os.path.getmtime(os.path.join(out, s)) for s in before} == before
    keys = lambda d: sorted(k for s in first["shards"] for k in _samples_in(os.path.join(d, s)))  # noqa: E731
    assert keys(out) == keys(downloaded["out"])  # nothing dropped, nothing twice


def _as_if_killed(downloaded, name):
    """A copy of the finished download as a kill during shard 1 leaves it."""
    out = str(downloaded["tmp"] / name)
    shutil.copytree(downloaded["out"], out)
    os.remove(os.path.join(out, "clipa_artifact.json"))
    os.remove(os.path.join(out, "00001_stats.json"))
    return out


def _state(folder):
    return {f: os.path.getmtime(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("change, named", [
    (dict(url_list="a.parquet"), "url_list"),  # another list (a part of the first one)
    (dict(image_size=32), "image_size"),
    (dict(encode_format="png", encode_quality=9), "encode_format"),
])
def test_unfinished_folder_of_another_job_is_refused_untouched(downloaded, change, named):
    out = _as_if_killed(downloaded, f"other-job-{named}")
    before = _state(out)
    args = {**DOWNLOAD_ARGS, **change}
    url_list = os.path.join(downloaded["url_list"], args.pop("url_list", ""))
    with pytest.raises(ValueError, match=rf"already holds unfinished shards of another "
                                         rf"download.*{named}.*delete this folder") as err:
        run_download(url_list.rstrip("/"), out, **args)
    assert out in str(err.value)
    assert _state(out) == before  # nothing fetched, nothing written: no mix


def test_shards_without_a_fingerprint_are_refused(downloaded):
    out = _as_if_killed(downloaded, "no-fingerprint")
    os.remove(os.path.join(out, "download_job.fingerprint"))
    before = _state(out)
    with pytest.raises(ValueError, match=r"holds \d+ \.tar shards but no download_job\.fingerprint"):
        run_download(downloaded["url_list"], out, **DOWNLOAD_ARGS)
    assert _state(out) == before


def test_sigkill_takes_img2datasets_workers_and_a_rerun_stays_one_job(served, tmp_path):
    """A download killed mid-shard: no worker outlives it; the folder keeps its job."""
    from process_tree import reaped, sigkill, wait_for

    out, urls = tmp_path / "out", tmp_path / "urls.parquet"
    with serve_with_headers(str(served["root"])) as drip:  # /drip/: 16 bytes per 0.5 s
        pd.DataFrame({"url": [f"{drip.base_url}/drip/images/{i:04d}.jpg" for i in range(4)],
                      "caption": [f"a slow image number {i}" for i in range(4)]}
                     ).to_parquet(urls)
        with reaped(subprocess.Popen(
                [sys.executable, "-m", "components.download", "--url-list", str(urls), "--output",
                 str(out), "--allow-networks", ALLOW, "--timeout", "120", "--image-size", "64"],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) as proc:
            wait_for(lambda: drip.requests["drip/images/0000.jpg"], 120)  # fetching now
            workers, survivors = sigkill(proc, 20)
            assert len(workers) >= 2  # img2dataset's worker and logger processes
            assert survivors == set()
    assert not (out / "clipa_artifact.json").exists()  # unfinished
    with pytest.raises(ValueError, match=r"unfinished shards of another download.*image_size"):
        run_download(str(urls), str(out), **{**DOWNLOAD_ARGS, "image_size": 32})


def test_default_policy_refuses_loopback_even_behind_a_name(served, tmp_path):
    """No allow-list: 127.0.0.1 is refused by the screen, ``localhost`` when connecting."""
    base, port = served["base_url"], served["base_url"].rsplit(":", 1)[1]
    pd.DataFrame({"url": [f"{base}/images/0000.jpg", f"http://localhost:{port}/images/0001.jpg"],
                  "caption": ["a literal loopback address", "a name that resolves to loopback"]}
                 ).to_parquet(tmp_path / "urls.parquet")
    result = run_download(str(tmp_path / "urls.parquet"), str(tmp_path / "out"),
                          **{**DOWNLOAD_ARGS, "allow_networks": ""})
    assert result["successes"] == 0 and result["failures"] == {"unsafe_address": 2}
    assert "localhost resolves to 127.0.0.1 (loopback)" in open(tmp_path / "out" / "report.html").read() \
        or "resolves to" in result["failure_examples"]["unsafe_address"]
    # Nothing downloaded: the next stage stops with a clear error, so training never starts.
    from components.filter_shard.component import run_filter_shard

    with pytest.raises(ValueError, match=r"no \.tar shards|hold no samples") as err:
        run_filter_shard(str(tmp_path / "out"), str(tmp_path / "filtered"))
    assert str(tmp_path / "out") in str(err.value)


def test_bad_url_list_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UrlListError, match="nope.parquet"):
        run_download(str(tmp_path / "nope.parquet"), str(out))
    assert not out.exists()
    with pytest.raises(ValueError, match="allow_networks entry 'localhost'"):
        run_download(str(tmp_path / "nope.parquet"), str(out), allow_networks="localhost")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_parts_in_kfp_local_give_the_single_run_shards(downloaded, tmp_path, monkeypatch):
    """The pipeline's download: split in 2, parallel parts, merge; same shards and keys."""
    from kfp import dsl, local
    from kfp.local import config

    from components.download.pipeline import download
    from components.filter_shard.component import run_filter_shard

    monkeypatch.setattr(config.LocalExecutionConfig, "instance", config.LocalExecutionConfig.instance)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline
    def only_download(url_list: str) -> dsl.Dataset:
        return download(url_list=url_list, parts=2, samples_per_shard=20, image_size=64,
                        threads=8, timeout=5, allow_networks=ALLOW).outputs["shards"]

    merged = only_download(url_list=downloaded["url_list"]).output.path
    marker, single = read_marker(merged, "shards"), downloaded["result"]
    for field in ("count", "successes", "failures", "shards"):
        assert marker[field] == single[field], field
    assert len(marker["parts"]) == 2
    keys = lambda folders: sorted(k for d in folders for s in os.listdir(d) if s.endswith(".tar")  # noqa: E731
                                  for k in _samples_in(os.path.join(d, s)))
    assert keys(marker["parts"]) == keys([downloaded["out"]])
    # The merge component's Metrics and HTML: rate, throughput, failures by reason.
    from kfp.dsl import HTML, Dataset, Metrics

    from components.download.component import merge_download

    plan_dir = os.path.dirname(next(iter(glob.glob(str(tmp_path / "root" / "**" / "plan.json"),
                                                   recursive=True))))
    stats, report = Metrics(uri=str(tmp_path / "stats")), HTML(uri=str(tmp_path / "r" / "page.html"))
    merge_download.python_func(url_parts=Dataset(uri=plan_dir),
                               parts=[Dataset(uri=d) for d in marker["parts"]],
                               shards=Dataset(uri=str(tmp_path / "merged_again")), stats=stats,
                               report=report)
    assert stats.metadata["success_rate"] == single["success_rate"]
    assert stats.metadata["images_per_second"] > 0 and stats.metadata["shards"] == len(single["shards"])
    assert {k: v for k, v in stats.metadata.items() if k.startswith("failed_")} == {
        "failed_" + r: n for r, n in single["failures"].items()}
    page = open(report.path).read()
    assert all(f"<td>{r}</td>" in page for r in single["failures"]) and "images/s" in page
    filtered = run_filter_shard(merged, str(tmp_path / "filtered"), samples_per_shard=16)
    assert filtered["input_count"] == single["successes"]
    assert "duplicate_key" not in filtered["dropped"]  # one namespace: no key collisions


def test_reads_and_writes_gs_urls(served, gcs):  # noqa: F811 - the fixture
    rows = read_url_list(os.path.join(served["url_list"], "a.parquet")).iloc[:6]
    with gcs.open("bkt/lists/urls.jsonl.gz", "wb") as f:
        f.write(gzip.compress(rows.to_json(orient="records", lines=True).encode()))
    result = run_download("gs://bkt/lists/*.jsonl.gz", "gs://bkt/shards", **DOWNLOAD_ARGS)
    gcs.invalidate_cache()
    assert read_marker("gs://bkt/shards", "shards")["count"] == 6
    assert result["successes"] + sum(result["failures"].values()) == 6
    with tarfile.open(fileobj=io.BytesIO(gcs.cat("bkt/shards/00000.tar"))) as tf:
        assert len(tf.getnames()) == 3 * result["successes"]


# --- read_url_list ---------------------------------------------------------------------

ROWS = [{"url": "http://x/1.jpg", "caption": "a cat", "label": 1},
        {"url": "http://x/2.jpg", "caption": "a dog", "label": 2}]


@pytest.mark.parametrize("name, write", [
    ("l.parquet", lambda df, p: df.to_parquet(p)),
    ("l.csv", lambda df, p: df.to_csv(p, index=False)),
    ("l.tsv", lambda df, p: df.to_csv(p, index=False, sep="\t")),
    ("l.tsv.gz", lambda df, p: df.to_csv(p, index=False, sep="\t", compression="gzip")),
    ("l.jsonl", lambda df, p: df.to_json(p, orient="records", lines=True)),
    ("l.json", lambda df, p: df.to_json(p, orient="records", lines=True)),
    ("array.json", lambda df, p: df.to_json(p, orient="records")),
    ("l.csv.gz", lambda df, p: df.to_csv(p, index=False, compression="gzip")),
    ("l.jsonl.gz", lambda df, p: df.to_json(p, orient="records", lines=True, compression="gzip")),
])
def test_reads_each_format(tmp_path, name, write):
    path = tmp_path / name
    write(pd.DataFrame(ROWS), path)
    df = read_url_list(str(path))
    assert df["url"].tolist() == ["http://x/1.jpg", "http://x/2.jpg"]
    assert df["caption"].tolist() == ["a cat", "a dog"]


def test_reads_custom_column_names_and_carries_the_rest(tmp_path):
    path = tmp_path / "l.parquet"
    pd.DataFrame(ROWS).assign(uid=["u1", "u2"]).rename(
        columns={"url": "URL", "caption": "TEXT"}).to_parquet(path)
    df = read_url_list(str(path), url_col="URL", caption_col="TEXT")
    assert list(df.columns) == ["url", "caption", "label", "uid"] and df["uid"].tolist() == ["u1", "u2"]


def test_reads_a_folder_and_a_glob_in_name_order(tmp_path):
    pd.DataFrame(ROWS[:1]).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame(ROWS[1:]).to_csv(tmp_path / "a.csv.gz", index=False, compression="gzip")
    (tmp_path / "notes.txt").write_text("not a url list")
    assert read_url_list(str(tmp_path))["url"].tolist() == ["http://x/2.jpg", "http://x/1.jpg"]
    assert read_url_list(str(tmp_path / "*.parquet"))["url"].tolist() == ["http://x/1.jpg"]
    with pytest.raises(UrlListError, match=r"\*.jsonl: no matches"):
        read_url_list(str(tmp_path / "*.jsonl"))


def _write_bytes(data):
    return lambda p: p.write_bytes(data)


GARBAGE = bytes(range(256)) * 8
LATIN1 = "url,caption\nhttp://x/1.jpg,a caf\xe9 in Paris\n".encode("latin-1")


@pytest.mark.parametrize("name, make, message", [
    ("missing.parquet", None, "not found"),
    ("links.csv", lambda p: pd.DataFrame({"link": ["u"], "caption": ["c"]}).to_csv(p, index=False),
     r"no 'url' column.*'link'"),
    ("nocap.parquet", lambda p: pd.DataFrame({"url": ["u"], "alt": ["c"]}).to_parquet(p),
     r"no 'caption' column.*'alt'"),
    ("garbage.parquet", _write_bytes(GARBAGE), "cannot read as parquet"),
    ("garbage.csv", _write_bytes(GARBAGE), "not UTF-8"),
    ("latin1.csv", _write_bytes(LATIN1), r"not UTF-8 text: byte b'\\xe9' at offset 32 \(line 2\)"),
    ("latin1.tsv.gz", _write_bytes(gzip.compress(LATIN1.replace(b",", b"\t"))), r"not UTF-8.*line 2"),
    ("bytes.parquet", lambda p: pd.DataFrame({"url": ["u"], "caption": [b"caf\xe9"]}).to_parquet(p),
     r"row 0 of column 'caption' is not UTF-8"),
    ("garbage.jsonl", _write_bytes(b'{"url": "u", "caption": \n'), "cannot read as jsonl"),
    ("urls.xlsx", _write_bytes(b"PK"), r"unknown URL list format '\.xlsx'"),
    ("urls.txt", _write_bytes(b"http://x/1.jpg\n"), r"unknown URL list format '\.txt'"),
    ("empty.parquet", lambda p: pd.DataFrame({"url": pd.Series([], dtype=str),
                                              "caption": pd.Series([], dtype=str)}).to_parquet(p),
     "empty"),
    ("header_only.csv", _write_bytes(b"url,caption\n"), "empty"),
    ("empty.jsonl", _write_bytes(b""), "empty.jsonl"),
])
def test_bad_url_lists_name_the_file_and_problem(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(UrlListError, match=message) as err:
        read_url_list(str(path))
    assert str(path) in str(err.value)


def test_folder_without_url_lists_is_an_error(tmp_path):
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UrlListError, match="no URL list files in the folder"):
        read_url_list(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: File not found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("Image decoding error", "decode_error"),
    ("The read operation timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("unknown url type: 'ftp-ish'", "bad_url"),
    ("Use of image disallowed by X-Robots-Tag directive", "robots_disallowed"),
    ("<urlopen error refused by URL safety: x resolves to 10.0.0.1 (private); not fetched>",
     "unsafe_address"),
    ("image has more pixels than max_image_pixels=89478485 (30000x30000); not decoded", "too_large"),
    ("image is cut: JPEG is cut (no end-of-image marker)", "truncated_image"),
    ("something new", "other"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason


def test_components_and_pipeline_compile(tmp_path):
    from kfp import compiler

    from components.download.pipeline import download

    path = tmp_path / "download.yaml"
    compiler.Compiler().compile(download, str(path))
    text = path.read_text()
    assert "run_download_part" in text and "merge_download_parts" in text
    assert "parallelismLimit: 16" in text and "system.Metrics" in text and "system.HTML" in text


def test_modules_import_inside_the_component_runtime():
    """In the container kfp sets _KFP_RUNTIME=true and kfp.dsl has no `component` there."""
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    code = "import components.download.component, components.download.run, components.download.img2dataset_runner"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_demo_list_has_every_bad_kind():
    assert {"truncated_jpeg", "redirect_to_metadata"} <= set(BAD_KINDS)
