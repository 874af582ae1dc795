"""URL safety: the static screen, and the connect-time guard against real loopback servers."""
import http.server
import threading
import urllib.error

import pytest

from components.download.url_safety import (
    GUARD_MESSAGE, address_refusal, guarded_opener, parse_allow_list, screen_url)

NONE, LOOPBACK = parse_allow_list(""), parse_allow_list("127.0.0.1/32")


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/computeMetadata/v1/", "unsafe_address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "unsafe_host"),
    ("http://METADATA.google.internal./x", "unsafe_host"),
    ("http://node-1.us-central1-a.c.proj.internal/x.jpg", "unsafe_host"),
    ("http://10.1.2.3/a.jpg", "unsafe_address"),
    ("http://172.16.0.1/a.jpg", "unsafe_address"),
    ("http://172.31.255.255/a.jpg", "unsafe_address"),
    ("http://192.168.1.1/a.jpg", "unsafe_address"),
    ("http://127.0.0.1:8080/a.jpg", "unsafe_address"),
    ("http://127.1.2.3/a.jpg", "unsafe_address"),
    ("http://0.0.0.0/a.jpg", "unsafe_address"),
    ("http://100.64.0.1/a.jpg", "unsafe_address"),
    ("http://[::1]/a.jpg", "unsafe_address"),
    ("http://[fe80::1]/a.jpg", "unsafe_address"),
    ("http://[fd00::1]/a.jpg", "unsafe_address"),
    ("http://[::ffff:169.254.169.254]/a.jpg", "unsafe_address"),
    ("http://[64:ff9b::a00:1]/a.jpg", "unsafe_address"),  # NAT64 of 10.0.0.1
    ("http://2130706433/a.jpg", "unsafe_address"),  # 127.0.0.1 as one number
    ("http://0x7f.1/a.jpg", "unsafe_address"),
    ("http://0251.0376.0251.0376/", "unsafe_address"),  # 169.254.169.254 in octal
    ("file:///etc/passwd", "unsafe_scheme"),
    ("ftp://example.com/a.jpg", "unsafe_scheme"),
    ("gopher://example.com:70/", "unsafe_scheme"),
    ("data:image/png;base64,iVBOR", "unsafe_scheme"),
    ("//example.com/a.jpg", "unsafe_scheme"),
    ("http:///a.jpg", "bad_url"),
    ("", "bad_url"),
    ("http://[::1/a.jpg", "bad_url"),
    ("http://example.com/a.jpg", None),
    ("HTTPS://Example.COM:8443/a.jpg?x=1", None),
    ("http://8.8.8.8/a.jpg", None),
    ("http://[2001:4860:4860::8888]/a.jpg", None),
])
def test_screen_refuses_by_default(url, reason):
    assert screen_url(url, NONE)[0] == reason


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1:8080/a.jpg", True),
    ("http://2130706433/a.jpg", True),  # the same address, written otherwise
    ("http://127.0.0.2/a.jpg", False),  # loopback, but not in 127.0.0.1/32
    ("http://[::1]/a.jpg", False),
    ("http://169.254.169.254/", False),
    ("http://metadata.google.internal/", False),  # names are never allowed
])
def test_allow_list_lifts_only_its_networks(url, allowed):
    assert (screen_url(url, LOOPBACK)[0] is None) == allowed


def test_allow_list_parsing():
    assert str(parse_allow_list("127.0.0.1, 10.0.0.0/8;::1")) == "127.0.0.1/32,10.0.0.0/8,::1/128"
    with pytest.raises(ValueError, match="'localhost' is not an IP network"):
        parse_allow_list("localhost")
    assert address_refusal("10.0.0.1", parse_allow_list("10.0.0.0/8")) is None
    assert address_refusal("10.0.0.1", NONE) == "private"
    assert address_refusal("93.184.216.34", NONE) is None


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/img`` answers 200; ``/to?URL`` answers 302 to URL."""

    def do_GET(self):  # noqa: N802 - the base class's name
        if self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[4:])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"image")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _fetch(allow: str, url: str) -> str:
    try:
        with guarded_opener(parse_allow_list(allow)).open(url, timeout=5) as r:
            return r.read().decode()
    except urllib.error.URLError as e:
        return str(e.reason)


def test_guard_refuses_a_name_that_resolves_to_loopback(server):
    refused = _fetch("", f"http://localhost:{server}/img")
    assert GUARD_MESSAGE in refused and "127.0.0.1 (loopback)" in refused
    assert _fetch("127.0.0.1/32", f"http://localhost:{server}/img") == "image"


def test_guard_checks_every_redirect(server):
    base = f"http://127.0.0.1:{server}"
    assert _fetch("127.0.0.1/32", f"{base}/to?{base}/img") == "image"
    # 127.0.0.2 is loopback too (Linux answers on all of 127/8) but not allowed
    to_other = _fetch("127.0.0.1/32", f"{base}/to?http://127.0.0.2:{server}/img")
    assert GUARD_MESSAGE in to_other and "127.0.0.2" in to_other
    to_metadata = _fetch("127.0.0.1/32", f"{base}/to?http://169.254.169.254/computeMetadata/v1/")
    assert GUARD_MESSAGE in to_metadata and "link-local" in to_metadata
    to_file = _fetch("127.0.0.1/32", f"{base}/to?file:///etc/passwd")
    assert "root:" not in to_file
