"""The loopback HTTP server and the demo URL list (real server on 127.0.0.1, no mocks)."""
import hashlib
import http.client
import io
import os
import urllib.error
import urllib.parse
import urllib.request

import pandas as pd
import pytest
from PIL import Image

from pipelines.demo_server import BAD_KINDS, serve_directory, write_url_list


def make_samples(root, n, seed=0):
    """Write ``n`` distinct small JPEGs under ``root/images`` and return their sample dicts."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    samples = []
    for i in range(n):
        label = i % 4
        w, h = 64 + (i % 5) * 8, 48 + (i % 3) * 8
        img = Image.new("RGB", (w, h), ((60 * label + 40) % 256, (37 * i + seed) % 256, 200 - 40 * label))
        img.paste((255 - label * 50, 20 * (i % 10), 90), (i % 20, i % 13, i % 20 + 16, i % 13 + 16))
        rel = f"images/{i:04d}.jpg"
        img.save(os.path.join(root, rel), quality=90)
        samples.append({"file": rel, "caption": f"a {['red', 'green', 'blue', 'grey'][label]} "
                                                f"square on a plain background, number {i}",
                        "label": label})
    return samples


def _get(url):
    """(status, body, content type) of a GET, without raising on HTTP errors."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def _raw_get(base_url, path):
    """GET ``path`` exactly as given (urllib would normalise ``..`` away)."""
    parsed = urllib.parse.urlparse(base_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path):
    """A served root with two files, and a secret next to (outside) the root."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    with serve_directory(str(root)) as base_url:
        yield root, base_url


def test_serves_files_under_root(served):
    root, base_url = served
    assert base_url.startswith("http://127.0.0.1:")
    assert _get(base_url + "/a.txt")[:2] == (200, b"hello")
    assert _get(base_url + "/sub/b.bin")[:2] == (200, b"\x00\x01\x02")
    assert _get(base_url + "/nope.jpg")[0] == 404


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
    "/../../../../../../etc/passwd", "//etc/passwd",
])
def test_refuses_paths_outside_root(served, path):
    _, base_url = served
    status, body = _raw_get(base_url, path)
    assert status in (400, 403, 404), (path, status)
    assert b"TOP SECRET" not in body and b"root:" not in body


def test_location_file_makes_a_redirect(served):
    root, base_url = served
    (root / "moved.jpg.location").write_text("http://169.254.169.254/latest/meta-data/")
    parsed = urllib.parse.urlparse(base_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
    conn.request("GET", "/moved.jpg")
    r = conn.getresponse()
    assert r.status == 302 and r.getheader("Location") == "http://169.254.169.254/latest/meta-data/"
    conn.close()


def test_refuses_symlink_out_of_root_and_listings(served, tmp_path):
    root, base_url = served
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    status, body = _raw_get(base_url, "/link.txt")
    assert status == 404 and b"TOP SECRET" not in body
    assert _raw_get(base_url, "/")[0] == 404
    assert _raw_get(base_url, "/sub/")[0] == 404


def test_quiet_and_stops_on_exit(tmp_path, capfd):
    (tmp_path / "x.txt").write_text("x")
    with serve_directory(str(tmp_path)) as base_url:
        _get(base_url + "/x.txt")
        _get(base_url + "/missing")
    out, err = capfd.readouterr()
    assert "GET" not in out + err  # no per-request log lines
    with pytest.raises(OSError):
        urllib.request.urlopen(base_url + "/x.txt", timeout=2)


def test_not_a_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        with serve_directory(str(tmp_path / "nope")):
            pass


def _classify(row, good_hashes):
    """What the server really answers for a URL list row, judged from outside."""
    status, body = _raw_get(row.url, urllib.parse.urlparse(row.url).path)  # no redirects
    if status == 302:
        return "redirect_to_metadata"
    if status == 404:
        return "http_404"
    if body.lstrip().lower().startswith(b"<!doctype html"):
        return "html_page"
    if not body.endswith(b"\xff\xd9"):
        return "truncated_jpeg"
    with Image.open(io.BytesIO(body)) as im:
        if max(im.size) <= 24:
            return "tiny_image"
    if hashlib.sha256(body).hexdigest() in good_hashes and "/bad/" in row.url:
        return "duplicate_image"
    if len(str(row.caption).split()) <= 1:
        return "short_caption"
    return "good"


def test_write_url_list_makes_each_kind_of_bad_row(tmp_path):
    root = tmp_path / "root"
    samples = make_samples(str(root), 40)
    with serve_directory(str(root)) as base_url:
        counts = write_url_list(samples, str(root), base_url, str(tmp_path / "list.parquet"),
                                seed=3, bad_fraction=0.05)
        df = pd.read_parquet(tmp_path / "list.parquet")
        good_hashes = {hashlib.sha256((root / s["file"]).read_bytes()).hexdigest()
                       for s in samples}
        seen = pd.Series([_classify(r, good_hashes) for r in df.itertuples()]).value_counts()
    assert counts == {"good": 40, **{k: 2 for k in BAD_KINDS}}
    assert list(df.columns) == ["url", "caption", "label"] and len(df) == 40 + 2 * len(BAD_KINDS)
    assert seen.to_dict() == counts
    assert df["url"].is_unique
    assert all((root / "bad").iterdir())  # bad files live under root/bad


def test_write_url_list_is_deterministic_by_seed(tmp_path):
    root = tmp_path / "root"
    samples = make_samples(str(root), 60)
    base = "http://127.0.0.1:1"
    lists = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_url_list(samples, str(root), base, str(tmp_path / f"{name}.parquet"), seed=seed)
        lists[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    pd.testing.assert_frame_equal(lists["a"], lists["b"])
    assert not lists["a"]["url"].equals(lists["c"]["url"])
    # ~3% of each kind: 2 of each for 60 good rows
    assert len(lists["a"]) == 60 + 2 * len(BAD_KINDS)


def test_write_url_list_names_a_missing_sample(tmp_path):
    samples = make_samples(str(tmp_path), 2) + [{"file": "images/ghost.jpg", "caption": "c",
                                                 "label": 0}]
    with pytest.raises(ValueError, match="ghost.jpg"):
        write_url_list(samples, str(tmp_path), "http://127.0.0.1:1", str(tmp_path / "l.parquet"))
