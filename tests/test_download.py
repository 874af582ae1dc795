"""The download step: URL list checks, and real img2dataset runs against a loopback server.

img2dataset spawns a worker and a logger process per run (~10 s here, mostly imports), so
the module downloads once (fixture ``downloaded``) and one test resumes a copy of it.
"""
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pandas as pd
import pytest
from PIL import Image

from clipa_model.artifacts import read_marker
from components.download import UrlListError, failure_reason, read_url_list, run_download
from pipelines.demo_server import serve_directory, write_url_list

N_GOOD = 40
DOWNLOAD_ARGS = dict(image_size=64, samples_per_shard=20, threads=8, timeout=5)


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


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """One real download of the demo list (good rows plus 2 bad rows of each kind).

    The server stays up for the whole module, so a test can download the same list again.
    """
    tmp = tmp_path_factory.mktemp("download")
    root = tmp / "served"
    samples = make_samples(str(root), N_GOOD)
    with serve_directory(str(root)) as base_url:
        url_list = str(tmp / "urls.parquet")
        kinds = write_url_list(samples, str(root), base_url, url_list, seed=0, bad_fraction=0.05)
        out = str(tmp / "shards")
        result = run_download(url_list, out, **DOWNLOAD_ARGS)
        yield {"tmp": tmp, "url_list": url_list, "out": out, "kinds": kinds, "result": result,
               "urls": pd.read_parquet(url_list).set_index("url")}


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
    assert {"count", "successes", "failures", "shards", "seconds"} <= set(marker)
    assert result["shards"] == ["00000.tar", "00001.tar", "00002.tar"]  # 50 rows / 20
    assert not os.path.exists(os.path.join(downloaded["out"], "_tmp"))


def test_counts_successes_and_failures_by_reason(downloaded):
    kinds, result = downloaded["kinds"], downloaded["result"]
    assert result["count"] == sum(kinds.values())
    # tiny, duplicate and short-caption rows download fine: the filter stage drops them
    assert result["successes"] == (kinds["good"] + kinds["tiny_image"]
                                   + kinds["duplicate_image"] + kinds["short_caption"])
    assert result["failures"] == {"http_404": kinds["http_404"],
                                  "decode_error": kinds["html_page"]}
    assert result["successes"] + sum(result["failures"].values()) == result["count"]


def test_tars_hold_image_caption_and_metadata(downloaded):
    urls, out = downloaded["urls"], downloaded["out"]
    seen, hashes, tiny = 0, set(), 0
    for shard in downloaded["result"]["shards"]:
        for key, sample in _samples_in(os.path.join(out, shard)).items():
            assert set(sample) == {"jpg", "txt", "json"}, key
            meta = json.loads(sample["json"])
            row = urls.loc[meta["url"]]
            assert sample["txt"].decode() == row["caption"]
            assert meta["label"] == row["label"]  # extra columns are carried through
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                assert im.size == (meta["width"], meta["height"])
                tiny += min(im.size) < 32  # not upscaled: the filter sees the true size
            hashes.add(meta["sha256"])
            seen += 1
    kinds = downloaded["kinds"]
    assert seen == downloaded["result"]["successes"]
    assert tiny == kinds["tiny_image"]
    # sha256 is of the downloaded bytes, so re-hosted copies share their source's hash
    assert len(hashes) == seen - kinds["duplicate_image"]


def test_rerun_of_a_finished_folder_does_nothing(downloaded):
    out = downloaded["out"]
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    again = run_download(downloaded["url_list"], out, **DOWNLOAD_ARGS)
    assert again == downloaded["result"]  # same seconds too: read back from the marker
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == mtimes


def test_finished_folder_of_other_settings_is_refused(downloaded):
    with pytest.raises(ValueError, match="already holds finished shards.*image_size"):
        run_download(downloaded["url_list"], downloaded["out"],
                     **{**DOWNLOAD_ARGS, "image_size": 32})


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
    assert read_marker(out, "shards")["successes"] == first["successes"]


def test_bad_url_list_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UrlListError, match="nope.parquet"):
        run_download(str(tmp_path / "nope.parquet"), str(out))
    assert not out.exists()


# --- read_url_list ---------------------------------------------------------------------

ROWS = [{"url": "http://x/1.jpg", "caption": "a cat", "label": 1},
        {"url": "http://x/2.jpg", "caption": "a dog", "label": 2}]


@pytest.mark.parametrize("name, write", [
    ("l.parquet", lambda df, p: df.to_parquet(p)),
    ("l.csv", lambda df, p: df.to_csv(p, index=False)),
    ("l.tsv", lambda df, p: df.to_csv(p, index=False, sep="\t")),
    ("l.jsonl", lambda df, p: df.to_json(p, orient="records", lines=True)),
    ("l.json", lambda df, p: df.to_json(p, orient="records", lines=True)),
    ("array.json", lambda df, p: df.to_json(p, orient="records")),
    ("l.csv.gz", lambda df, p: df.to_csv(p, index=False, compression="gzip")),
])
def test_reads_each_format(tmp_path, name, write):
    path = tmp_path / name
    write(pd.DataFrame(ROWS), path)
    df = read_url_list(str(path))
    assert df["url"].tolist() == ["http://x/1.jpg", "http://x/2.jpg"]
    assert df["caption"].tolist() == ["a cat", "a dog"]


def test_reads_custom_column_names(tmp_path):
    path = tmp_path / "l.parquet"
    pd.DataFrame(ROWS).rename(columns={"url": "URL", "caption": "TEXT"}).to_parquet(path)
    assert len(read_url_list(str(path), url_col="URL", caption_col="TEXT")) == 2


def _write_bytes(data):
    return lambda p: p.write_bytes(data)


GARBAGE = bytes(range(256)) * 8


@pytest.mark.parametrize("name, make, message", [
    ("missing.parquet", None, "not found"),
    ("links.csv", lambda p: pd.DataFrame({"link": ["u"], "caption": ["c"]}).to_csv(p, index=False),
     r"no 'url' column.*'link'"),
    ("nocap.parquet", lambda p: pd.DataFrame({"url": ["u"], "alt": ["c"]}).to_parquet(p),
     r"no 'caption' column.*'alt'"),
    ("garbage.parquet", _write_bytes(GARBAGE), "cannot read as parquet"),
    ("garbage.csv", _write_bytes(GARBAGE), "cannot read as csv"),
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


def test_folder_is_not_a_url_list(tmp_path):
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(UrlListError, match="folder"):
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
    ("something new", "other"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason


def test_component_compiles(tmp_path):
    from kfp import compiler

    from components.download import download

    path = tmp_path / "download.yaml"
    compiler.Compiler().compile(download, str(path))
    text = path.read_text()
    assert "run_download" in text and "shards" in text and "system.Metrics" in text


def test_module_imports_inside_the_component_runtime():
    """In the container kfp sets _KFP_RUNTIME=true and kfp.dsl has no `component` there."""
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    proc = subprocess.run([sys.executable, "-c", "import components.download"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
