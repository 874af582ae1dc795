"""Serve the embedded demo images over loopback HTTP, with a URL list that looks real.

The default pipeline run needs no internet: synthetic JPEGs are written to a folder,
served on ``127.0.0.1`` by ``serve_directory``, and ``write_url_list`` makes the URL list
the ``download`` step reads. That list carries the failures a web-scale list has (dead
links, HTML error pages, thumbnails, re-hosted duplicates, useless captions) so the
download and filter stages run their real failure paths in the demo and in tests.

The URLs hold the server's ephemeral port: a list is valid only while its server runs.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import random
import threading
import urllib.parse
from typing import Iterator

import fsspec
import pandas as pd
from PIL import Image

# Bad-row kinds, in the order they are made (the order fixes what the seed picks).
BAD_KINDS = ("http_404", "html_page", "tiny_image", "duplicate_image", "short_caption",
             "truncated_jpeg", "redirect_to_metadata")

# Where a redirect_to_metadata row points: the cloud metadata server, which on a cloud
# worker would hand out its credentials. The download's URL-safety guard refuses it.
METADATA_URL = "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token"

# Captions a scraper really finds next to images: nothing, or one uninformative word.
_SHORT_CAPTIONS = ("", "image", "photo", "IMG_2041", "untitled", "thumbnail", " ")

_HTML_PAGE = """<!DOCTYPE html>
<html><head><title>Page not found</title></head>
<body><h1>Sorry, this image is no longer available</h1>
<p>The page you requested was moved. <a href="/">Back to the gallery</a></p></body></html>
"""


class _RootedHandler(http.server.SimpleHTTPRequestHandler):
    """Serves regular files under ``directory`` only: no listings, nothing outside it.

    ``SimpleHTTPRequestHandler`` already drops ``..`` segments; the realpath check also
    stops symlinks that lead out of the root. A file ``NAME.location`` beside ``NAME``
    makes ``NAME`` answer 302 to the URL it holds (a redirect, as image hosts send).
    """

    def send_head(self):
        path = self.translate_path(self.path)
        root = os.path.realpath(self.directory)
        real = os.path.realpath(path)
        inside = os.path.commonpath([root, real]) == root
        if inside and os.path.isfile(real + ".location"):
            with open(real + ".location") as f:
                location = f.read().strip()
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if not inside or not os.path.isfile(real):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per request on stderr would drown the download's own progress


@contextlib.contextmanager
def serve_directory(root: str) -> Iterator[str]:
    """Serve the files under ``root`` over HTTP on loopback while the block runs.

    Args:
        root: an existing folder; only regular files inside it are served (no directory
            listings, no paths or symlinks leading outside it).

    Yields:
        The base URL, e.g. ``"http://127.0.0.1:41234"`` (an ephemeral port).

    Raises:
        NotADirectoryError: when ``root`` is not a folder.
    """
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a folder; expected the folder of images to serve")
    handler = functools.partial(_RootedHandler, directory=os.path.abspath(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a hung client must not block shutdown
    # A short poll interval: shutdown() waits for the next poll (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"demo-http-{root}", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _url(base_url: str, rel_path: str) -> str:
    """The URL of ``rel_path`` (relative to the served root) under ``base_url``."""
    return base_url.rstrip("/") + "/" + urllib.parse.quote(rel_path.replace(os.sep, "/"))


def _check_samples(samples: list[dict], root: str) -> None:
    """Raise ValueError naming the first sample that lacks a field or whose file is missing."""
    if not samples:
        raise ValueError("write_url_list: no samples; expected a list of "
                         "{'file', 'caption', 'label'} dicts")
    for i, s in enumerate(samples):
        missing = {"file", "caption", "label"} - set(s)
        if missing:
            raise ValueError(f"sample {i} ({s!r}): missing {sorted(missing)}; expected keys "
                             f"'file', 'caption', 'label'")
        if not os.path.isfile(os.path.join(root, s["file"])):
            raise ValueError(f"sample {i}: {os.path.join(root, s['file'])} does not exist; "
                             f"expected 'file' to be a JPEG path relative to {root}")


def _write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _save_jpeg(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.convert("RGB").save(path, format="JPEG", quality=90)


def _bad_row(kind: str, i: int, src: dict, root: str, base_url: str, rng: random.Random) -> dict:
    """Make one bad row of ``kind`` (writing its file under ``root/bad/``) from sample ``src``.

    Returns:
        ``{"url", "caption", "label", "kind"}``.
    """
    src_path = os.path.join(root, src["file"])
    row = {"caption": src["caption"], "label": int(src["label"]), "kind": kind}
    if kind == "http_404":
        rel = f"bad/missing/gone-{i:05d}.jpg"  # never written: the server answers 404
    elif kind == "html_page":
        # A "soft 404": the link answers 200 with an HTML page instead of the image.
        rel = f"bad/page-{i:05d}.html"
        os.makedirs(os.path.join(root, "bad"), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(_HTML_PAGE)
    elif kind == "tiny_image":
        rel = f"bad/tiny-{i:05d}.jpg"  # a thumbnail of a real sample: right caption, too small
        side = rng.randint(16, 24)
        with Image.open(src_path) as im:
            _save_jpeg(im.resize((side, rng.randint(16, 24))), os.path.join(root, rel))
    elif kind == "duplicate_image":
        rel = f"bad/copy-{i:05d}.jpg"  # the same bytes re-hosted under another URL
        os.makedirs(os.path.join(root, "bad"), exist_ok=True)
        with open(src_path, "rb") as f_in, open(os.path.join(root, rel), "wb") as f_out:
            f_out.write(f_in.read())
    elif kind == "short_caption":
        # A new image (mirrored, so not a duplicate) whose caption says nothing.
        rel = f"bad/caption-{i:05d}.jpg"
        with Image.open(src_path) as im:
            _save_jpeg(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), os.path.join(root, rel))
        row["caption"] = rng.choice(_SHORT_CAPTIONS)
    elif kind == "truncated_jpeg":
        # The connection dropped mid-transfer: the first half of a real JPEG.
        rel = f"bad/cut-{i:05d}.jpg"
        with open(src_path, "rb") as f:
            data = f.read()
        _write_bytes(os.path.join(root, rel), data[: len(data) // 2])
    elif kind == "redirect_to_metadata":
        rel = f"bad/moved-{i:05d}.jpg"  # answers 302 to the metadata server
        _write_bytes(os.path.join(root, rel + ".location"), METADATA_URL.encode())
    else:
        raise ValueError(f"unknown bad row kind {kind!r}; expected one of {BAD_KINDS}")
    row["url"] = _url(base_url, rel)
    return row


def write_url_list(samples: list[dict], root: str, base_url: str, out_path: str,
                   seed: int = 0, *, bad_fraction: float = 0.03) -> dict:
    """Write a parquet URL list for the served demo images, with realistic bad rows.

    Args:
        samples: ``{"file": JPEG path relative to root, "caption": str, "label": int}``
            dicts; each gives one good row.
        root: the folder ``serve_directory`` serves; bad rows' files go to ``root/bad/``.
        base_url: what ``serve_directory`` yielded.
        out_path: the parquet to write (local or fsspec URL); columns ``url``,
            ``caption``, ``label``.
        seed: fixes which samples the bad rows derive from and the row order.
        bad_fraction: bad rows of each kind per good row (at least one of each).

    Returns:
        Rows per kind: ``good`` and each of ``BAD_KINDS`` (``http_404``: the server
        answers 404; ``html_page``: 200 with an HTML body; ``tiny_image``: 16-24 px;
        ``duplicate_image``: the bytes of a good sample under another URL;
        ``short_caption``: a new image with an empty or one-word caption;
        ``truncated_jpeg``: the first half of a JPEG; ``redirect_to_metadata``: 302 to
        the cloud metadata address, which the download must refuse).

    Raises:
        ValueError: naming the sample, when one lacks a field or its file is missing.
    """
    _check_samples(samples, root)
    rng = random.Random(seed)
    rows = [{"url": _url(base_url, s["file"]), "caption": s["caption"],
             "label": int(s["label"]), "kind": "good"} for s in samples]
    n_bad = max(1, round(bad_fraction * len(samples)))
    i = 0
    for kind in BAD_KINDS:
        for _ in range(n_bad):
            rows.append(_bad_row(kind, i, rng.choice(samples), root, base_url, rng))
            i += 1
    rng.shuffle(rows)
    counts = {"good": len(samples), **{k: n_bad for k in BAD_KINDS}}
    df = pd.DataFrame(rows)
    if "://" not in str(out_path):
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # "kind" is the answer key for tests, not an input of the pipeline: left out.
    buf = io.BytesIO()
    df[["url", "caption", "label"]].to_parquet(buf, index=False)
    with fsspec.open(str(out_path), "wb") as f:
        f.write(buf.getvalue())
    return counts
