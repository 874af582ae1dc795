"""A GCS emulator on loopback for the eval / Vertex tests (gcp-storage-emulator).

``start_emulator`` yields (gcsfs filesystem, endpoint URL) with gs:// URLs of fsspec routed
to the emulator; processes started while it runs reach it through the same settings in
their environment (``child_env``).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def start_emulator(bucket: str = "bkt"):
    """Run the emulator; route gs:// of fsspec to it. Yields (filesystem, endpoint)."""
    gcsfs = pytest.importorskip("gcsfs")
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    if not os.path.exists(exe):
        pytest.skip("gcp-storage-emulator is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "start", "-H", "127.0.0.1", "--port", str(port),
                             "--default-bucket", bucket, "-q", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    original = fsspec.get_filesystem_class("gs")
    saved_conf = fsspec.config.conf.get("gcs")
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert time.monotonic() < deadline and proc.poll() is None, "GCS emulator did not start"
            time.sleep(0.1)
        # gcsfs's extended class probes each bucket over gRPC first (~60 s against an
        # emulator): gs:// goes to the core class.
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.config.conf["gcs"] = {"endpoint_url": endpoint, "token": "anon"}
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        yield fsspec.filesystem("gs"), endpoint
    finally:
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, original, clobber=True)
        if saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = saved_conf
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait()


def use_emulator_in_child(endpoint: str) -> None:
    """In a child process: route gs:// to the emulator at ``endpoint`` (fsspec core class)."""
    import gcsfs

    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf["gcs"] = {"endpoint_url": endpoint, "token": "anon"}


@pytest.fixture
def gcs(monkeypatch):
    """The emulator for one test; child processes (img2dataset's spawned workers) reach it
    through fsspec's FSSPEC_GCS environment variable. Yields the gcsfs filesystem."""
    import json

    with start_emulator() as (fs, endpoint):
        monkeypatch.setenv("FSSPEC_GCS", json.dumps({"endpoint_url": endpoint, "token": "anon"}))
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        yield fs
