"""Every download option the issue lists reaches img2dataset and does what it says.

One real img2dataset run (module fixture) with every option away from its default, against
a loopback server whose paths add what real hosts do: an ``X-Robots-Tag`` header, a slow
answer, a failure that a retry gets past. The default-directive direction of the robots
handling is in test_download.py (its big run fetches a ``noai`` image and must refuse it).
"""
import collections
import contextlib
import hashlib
import importlib
import http.server
import inspect
import io
import json
import math
import os
import tarfile
import threading
import time
from typing import Iterator

import pandas as pd
import pytest
from PIL import Image

from components.download.options import DEFAULT_DISALLOWED, DownloadOptions

SLOW_SECONDS = 4  # the /slow/ answer's delay; the run's timeout is shorter
DRIP_SECONDS = 0.5  # the /drip/ answer's gap between 16-byte pieces (each read is quick)


class _HeaderHandler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's root; the first path segment says how to answer:

    ``/noai/F``: F with ``X-Robots-Tag: noai``; ``/otherbot/F``: with ``X-Robots-Tag:
    otherbot: noai`` (meant for another crawler); ``/slow/F``: F after SLOW_SECONDS;
    ``/flaky/F``: 503 the first time, F afterwards; ``/drip/F``: F in 16-byte pieces
    DRIP_SECONDS apart (no read waits long, the whole answer does); anything else: F.
    """

    kind = ""

    def send_head(self):
        first, _, rest = self.path.lstrip("/").partition("/")
        if first in ("noai", "otherbot", "slow", "flaky", "drip"):
            self.kind, self.path = first, "/" + rest
        self.server.requests[self.kind + self.path] += 1
        if self.kind == "flaky" and self.server.requests[self.kind + self.path] == 1:
            self.send_error(503, "Try again")
            return None
        if self.kind == "slow":
            time.sleep(SLOW_SECONDS)
        return super().send_head()

    def end_headers(self):
        tag = {"noai": "noai", "otherbot": "otherbot: noai"}.get(self.kind)
        if tag:
            self.send_header("X-Robots-Tag", tag)
        super().end_headers()

    def copyfile(self, source, outputfile):
        try:
            if self.kind != "drip":
                super().copyfile(source, outputfile)
                return
            while piece := source.read(16):
                outputfile.write(piece)
                outputfile.flush()
                time.sleep(DRIP_SECONDS)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a /slow/ or /drip/ answer: what the test wants

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_with_headers(root: str) -> Iterator[http.server.ThreadingHTTPServer]:
    """``_HeaderHandler`` over ``root`` on 127.0.0.1; ``server.base_url``, ``server.requests``."""
    handler = lambda *a, **kw: _HeaderHandler(*a, directory=root, **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.requests = collections.Counter()
    server.base_url = "http://127.0.0.1:%d" % server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# Every option away from its default (processes stays 1: a second worker costs ~5 s of CPU
# here; bench/bench_download.py runs 1 and 2).
OPTIONS = dict(image_size=32, resize_mode="center_crop", encode_format="png", encode_quality=3,
               samples_per_shard=5, threads=3, timeout=2, retries=1, min_image_size=50,
               max_aspect_ratio=1.5, compute_hash="md5", disallowed_header_directives="")
SIZES = [(64, 48), (72, 56), (80, 64), (88, 48), (96, 56), (64, 64), (72, 48), (80, 56)]


def _expected(width: int, height: int) -> str:
    """img2dataset's verdict on an original of this size under OPTIONS."""
    if min(width, height) < OPTIONS["min_image_size"]:
        return "too_small"
    if max(width, height) / min(width, height) > OPTIONS["max_aspect_ratio"]:
        return "aspect_ratio"
    return "success"


@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
    from components.download.component import run_download

    tmp = tmp_path_factory.mktemp("options")
    (tmp / "root" / "images").mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (30 * i, 200 - 20 * i, 90)).save(
            tmp / "root" / "images" / f"{i}.jpg", quality=90)
        rows.append((f"images/{i}.jpg", _expected(w, h)))
    rows += [("noai/images/5.jpg", "success"),  # honoured by default; "" honours none
             ("flaky/images/2.jpg", "success"),  # 503, then 200 on the retry
             ("slow/images/1.jpg", "timeout"),
             ("drip/images/3.jpg", "timeout")]  # the whole-URL deadline (timeout=2)
    with serve_with_headers(str(tmp / "root")) as server:
        pd.DataFrame({"url": [f"{server.base_url}/{p}" for p, _ in rows],
                      "caption": [f"a test image number {i}" for i in range(len(rows))],
                      "expect": [e for _, e in rows]}).to_parquet(tmp / "urls.parquet")
        result = run_download(str(tmp / "urls.parquet"), str(tmp / "out"),
                              allow_networks="127.0.0.1/32", progress_seconds=60, **OPTIONS)
        requests = dict(server.requests)
    return {"tmp": tmp, "rows": rows, "result": result, "requests": requests}


def _samples(folder, shards):
    out = {}
    for shard in shards:
        with tarfile.open(os.path.join(folder, shard)) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_outcomes_follow_the_size_aspect_robots_retry_and_timeout_options(options_run):
    result, rows = options_run["result"], options_run["rows"]
    want = collections.Counter(e for _, e in rows)
    assert result["successes"] == want.pop("success")
    assert result["failures"] == dict(want)  # too_small, aspect_ratio, timeout
    assert options_run["requests"]["flaky/images/2.jpg"] == 2  # retries=1 fetched it again
    assert options_run["requests"]["slow/images/1.jpg"] == 2  # timed out twice
    assert options_run["requests"]["drip/images/3.jpg"] == 2  # a deadline, not per read


def test_images_are_cropped_encoded_hashed_and_sharded_as_asked(options_run):
    result, tmp = options_run["result"], options_run["tmp"]
    assert result["shards"] == [f"{i:05d}.tar" for i in range(math.ceil(len(options_run["rows"]) / 5))]
    samples = _samples(tmp / "out", result["shards"])
    assert len(samples) == result["successes"]
    for key, sample in samples.items():
        assert set(sample) == {"png", "txt", "json"}, key  # encode_format
        meta = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["png"])) as im:
            assert (im.format, im.size) == ("PNG", (32, 32))  # center_crop to image_size
        served = tmp / "root" / "images" / meta["url"].rsplit("/", 1)[1]
        assert meta["md5"] == hashlib.md5(served.read_bytes()).hexdigest()  # compute_hash
        assert "sha256" not in meta


def test_every_option_is_exposed_everywhere_with_img2datasets_robots_default(capsys):
    from components.download.component import download_part, main
    from components.download.pipeline import download

    fields = {f for f in DownloadOptions.__dataclass_fields__}
    assert fields >= {"image_size", "resize_mode", "encode_format", "encode_quality",
                      "samples_per_shard", "processes", "threads", "timeout", "retries",
                      "min_image_size", "max_aspect_ratio", "compute_hash",
                      "disallowed_header_directives"}
    pipeline_params = set(inspect.signature(download.pipeline_func).parameters)
    part_params = set(inspect.signature(download_part.python_func).parameters)
    assert fields <= pipeline_params
    assert fields - {"samples_per_shard"} <= part_params  # the split fixes samples_per_shard
    for name in fields:  # the sub-pipeline defaults to DownloadOptions
        default = DownloadOptions.__dataclass_fields__[name].default
        assert inspect.signature(download.pipeline_func).parameters[name].default == default, name
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert all("--" + name.replace("_", "-") in usage for name in fields)
    # the robots default is img2dataset's own list of X-Robots-Tag directives
    source = inspect.getsource(importlib.import_module("img2dataset.main").download)
    assert repr(DEFAULT_DISALLOWED.split(",")).replace("'", '"') in source


def test_download_options_are_defined_once():
    """DownloadOptions is the one definition: every place that takes download options
    takes its fields with its defaults and types, and nothing else by those names."""
    from components.download.component import download_part
    from components.download.pipeline import download
    from pipelines.preflight import DOWNLOAD_PARAMETERS
    from pipelines.training_pipeline import clipa_training

    fields = DownloadOptions.__dataclass_fields__
    for func, skip in ((download.pipeline_func, {"samples_per_shard"}),
                       (download_part.python_func, {"samples_per_shard"})):
        params = inspect.signature(func).parameters
        for name, field in fields.items():
            if name in skip:
                continue
            assert params[name].default == field.default, (func.__name__, name)
            assert params[name].annotation is type(field.default), (func.__name__, name)
    # The sub-pipeline hands every option to its part tasks (compiled, not just named).
    spec = download.pipeline_spec.root.dag.tasks["for-loop-1"].component_ref.name
    part_inputs = download.pipeline_spec.components[spec].dag.tasks["download-part"].inputs.parameters
    assert set(fields) - {"samples_per_shard"} <= set(part_inputs)
    # The training pipeline's download parameters are DownloadOptions fields by another
    # name, of the same type (preflight checks their values with DownloadOptions).
    inputs = clipa_training.component_spec.inputs
    ours = {n for n in inputs if n.startswith("download_")} - {"download_parts",
                                                               "download_allow_networks"}
    assert ours | {"samples_per_shard"} == set(DOWNLOAD_PARAMETERS)
    kfp_type = {int: "Integer", float: "Float", str: "String"}
    for name, field in DOWNLOAD_PARAMETERS.items():
        assert inputs[name].type == kfp_type[type(fields[field].default)], name


@pytest.mark.parametrize("bad, message", [
    (dict(encode_format="png"), r"encode_quality=95 .* expected 0-9 for png"),
    (dict(encode_format="gif"), r"encode_format='gif' .* expected one of"),
    (dict(resize_mode="stretch"), r"resize_mode='stretch'"),
    (dict(compute_hash="crc32"), r"compute_hash='crc32'"),
    (dict(max_aspect_ratio=0.5), r"max_aspect_ratio=0.5 .* 0 \(off\) or at least 1"),
    (dict(processes=0), r"processes=0 .* at least 1"),
])
def test_bad_options_fail_before_any_work_naming_the_option(tmp_path, bad, message):
    from components.download.component import run_download

    pd.DataFrame({"url": ["http://example.com/a.jpg"], "caption": ["a cat on a mat"]}
                 ).to_parquet(tmp_path / "urls.parquet")
    with pytest.raises(ValueError, match=message):
        run_download(str(tmp_path / "urls.parquet"), str(tmp_path / "out"), **bad)
    assert not (tmp_path / "out").exists()
