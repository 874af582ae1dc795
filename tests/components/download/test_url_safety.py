"""URL safety: the static screen, and the connect-time guard against real loopback servers."""
import http.client
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse

import pytest

from components.download.url_guard import guarded_opener
from components.download.url_safety import (
    GUARD_MESSAGE, address_refusal, parse_allow_list, screen_url)

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


# ---------------------------------------------------------------------------------------
# Through an HTTP proxy: the target is checked before the proxy gets the request


class _ForwardProxy(http.server.BaseHTTPRequestHandler):
    """A plain forward proxy: ``GET http://host:port/path`` is fetched and relayed.

    It fetches whatever it is asked (as a real proxy would) and records each target in
    ``server.seen``, so a test sees what the guard let through.
    """

    def do_GET(self):  # noqa: N802 - the base class's name
        self.server.seen.append(self.path)
        parts = urllib.parse.urlsplit(self.path)
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=3)
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
            answer = conn.getresponse()
            body = answer.read()
        except OSError as e:
            self.send_error(502, f"proxy could not reach {self.path}: {e}")
            return
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(handler, host="127.0.0.1"):
    srv = http.server.ThreadingHTTPServer((host, 0), handler)
    srv.daemon_threads = True
    srv.seen = []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture
def proxy(monkeypatch):
    """A forward proxy on 127.0.0.1 named in http_proxy; yields its list of targets."""
    srv = _serve(_ForwardProxy)
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{srv.server_address[1]}")
    yield srv.seen
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def lookups(monkeypatch):
    """Every host name looked up in DNS from now on (socket.getaddrinfo still answers)."""
    names, real = [], socket.getaddrinfo

    def spy(host, *args, **kwargs):
        names.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    return names


def test_guard_refuses_metadata_names_before_any_lookup(server, lookups):
    base = f"http://127.0.0.1:{server}"
    for name in ("metadata.google.internal", "metadata", "METADATA.Google.Internal."):
        refused = _fetch("127.0.0.1/32", f"{base}/to?http://{name}/computeMetadata/v1/")
        assert GUARD_MESSAGE in refused and "metadata host name" in refused
    assert not [n for n in lookups if "metadata" in n.lower()]


def test_proxy_fetches_allowed_targets(server, proxy):
    assert _fetch("127.0.0.1/32", f"http://127.0.0.1:{server}/img") == "image"
    assert proxy == [f"http://127.0.0.1:{server}/img"]  # it did go through the proxy


def test_proxy_gets_no_refused_target(server, proxy):
    # The proxy is on 127.0.0.1 and reached (the operator's setting), but with nothing
    # allowed, neither a loopback address nor a name resolving to one is sent to it.
    for url in (f"http://127.0.0.1:{server}/img", f"http://localhost:{server}/img",
                "http://169.254.169.254/computeMetadata/v1/", "http://10.1.2.3/x.jpg"):
        refused = _fetch("", url)
        assert GUARD_MESSAGE in refused and "not sent to the proxy" in refused, url
    assert proxy == []


def test_proxy_gets_no_refused_redirect_target(server, proxy, lookups):
    base = f"http://127.0.0.1:{server}"
    targets = ["http://169.254.169.254/computeMetadata/v1/",
               "http://metadata.google.internal/computeMetadata/v1/",
               f"http://127.0.0.2:{server}/img", f"http://0x7f.0.0.2:{server}/img"]
    for target in targets:
        refused = _fetch("127.0.0.1/32", f"{base}/to?{target}")
        assert GUARD_MESSAGE in refused and "not sent to the proxy" in refused, target
    # The proxy saw each first hop (allowed) and none of the redirect targets.
    assert proxy == [f"{base}/to?{t}" for t in targets]
    assert not [n for n in lookups if "metadata" in n.lower()]


# ---------------------------------------------------------------------------------------
# The whole-URL deadline


class _Drip(http.server.BaseHTTPRequestHandler):
    """Announces 100 bytes and sends one every 0.2 s (each read is quick; the URL is not)."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                self.server.seen.append(1)
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up: what the test wants

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for localhost / 127.0.0.1 (openssl's command line)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"),
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(tmp / "cert.pem"), str(tmp / "key.pem")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_deadline_bounds_the_whole_url_not_each_read(scheme, request, monkeypatch):
    srv = _serve(_Drip)
    if scheme == "https":  # TLS reads go through the SSL socket: the deadline holds there too
        cert, key = request.getfixturevalue("tls_cert")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        srv.socket = context.wrap_socket(srv.socket, server_side=True)
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # the client trusts it (default context)
    try:
        url = f"{scheme}://localhost:{srv.server_address[1]}/slow.jpg"
        with pytest.raises(TimeoutError, match="whole-URL deadline of 1 s"):
            with guarded_opener(parse_allow_list("127.0.0.1/32")).open(url, timeout=1) as r:
                r.read()
        # Each 0.2 s gap is far below the 1 s timeout: only a deadline over all reads
        # stops the client before the server's 100 bytes are out.
        assert 0 < len(srv.seen) < 100
    finally:
        srv.shutdown()
        srv.server_close()
