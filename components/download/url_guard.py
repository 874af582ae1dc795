"""The connect-time URL guard and the whole-URL deadline (in img2dataset's workers).

``install_guard`` makes ``urllib.request.urlopen`` (what img2dataset fetches with) use
``guarded_opener``, which enforces ``components.download.url_safety``'s policy however
the request leaves:

* **direct**: the connection resolves the host once, drops every address the policy
  refuses and connects only to an address it checked (no second lookup that DNS
  rebinding could change). Metadata host names are refused by name, before any lookup.
* **through a proxy** (``http_proxy`` / ``https_proxy`` in the environment): the proxy
  connects to the target, so the target is checked here before the request is handed
  to the proxy, on every redirect hop: its name, then every address it resolves to (a
  name that does not resolve here is refused: what it would reach cannot be checked).
  The proxy's own address is the operator's setting and is not checked.

Every request also runs under a whole-URL deadline: the ``timeout`` given to
``urlopen`` bounds connect, redirects and all reads together, not each socket read, so
a server dripping bytes cannot hold a download thread longer than that.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import urlsplit

from components.download.url_safety import (
    GUARD_MESSAGE, UnsafeAddressError, UrlPolicy, _ip_literal, address_refusal,
    is_metadata_host, parse_allow_list, screen_url)

_local = threading.local()  # per download thread: the deadline of the URL being fetched


class DeadlineExceeded(TimeoutError):
    """A URL took longer than its whole-URL deadline (connect + all reads)."""


def _deadline_error(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"timed out: whole-URL deadline of {seconds:g} s "
                            "(connect + all reads) passed")


class _DeadlineReads:
    """Socket mixin: each read waits at most until the URL's deadline."""

    deadline: tuple[float, float] | None = None  # (time.monotonic() limit, seconds)

    def recv_into(self, *args, **kwargs):
        if self.deadline is not None:
            left = self.deadline[0] - time.monotonic()
            if left <= 0:
                raise _deadline_error(self.deadline[1])
            self.settimeout(left)
        try:
            return super().recv_into(*args, **kwargs)
        except TimeoutError:
            if self.deadline is not None and time.monotonic() >= self.deadline[0]:
                raise _deadline_error(self.deadline[1]) from None
            raise


class _DeadlineSocket(_DeadlineReads, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineReads, ssl.SSLSocket):
    pass


def _current_deadline() -> tuple[float, float] | None:
    return getattr(_local, "deadline", None)


def _wait(timeout, deadline) -> float | None:
    """The socket timeout for a connect: ``timeout``, cut to what the deadline leaves."""
    wait = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout
    if deadline is None:
        return wait
    left = deadline[0] - time.monotonic()
    if left <= 0:
        raise _deadline_error(deadline[1])
    return min(wait, left) if wait is not None else left


def _connector(policy: UrlPolicy | None):
    """``socket.create_connection`` under the deadline; with ``policy``, only to allowed
    addresses (None: the proxy, which is not checked)."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                          source_address=None, **_):
        host, port = address[:2]
        if policy is not None and is_metadata_host(host):  # by name: no DNS lookup at all
            raise UnsafeAddressError(f"{GUARD_MESSAGE}: {host} is a metadata host name; "
                                     "not fetched")
        deadline = _current_deadline()
        error: OSError | None = None
        refused = []
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
                host, port, 0, socket.SOCK_STREAM):
            why = policy is not None and address_refusal(sockaddr[0].split("%", 1)[0], policy)
            if why:
                refused.append(f"{sockaddr[0]} ({why})")
                continue
            sock = _DeadlineSocket(family, kind, proto)
            try:
                wait = _wait(timeout, deadline)
                if wait is not None:
                    sock.settimeout(wait)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the address just checked: no second lookup
                sock.deadline = deadline
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        raise UnsafeAddressError(f"{GUARD_MESSAGE}: {host} resolves to "
                                 f"{', '.join(refused) or 'nothing'}; not fetched")

    return create_connection


def target_refusal(url: str, policy: UrlPolicy) -> str | None:
    """Why a URL may not be sent to a proxy (which would fetch it), or None.

    The name is checked first (scheme, metadata names, IP literals: no lookup), then
    every address the name resolves to here.
    """
    reason, note = screen_url(url, policy)
    if reason:
        return f"{reason}: {note}"
    host = urlsplit(url).hostname.rstrip(".")
    if _ip_literal(host) is not None:
        return None
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except OSError as e:
        return f"{host} does not resolve here ({e}); its address cannot be checked"
    for *_, sockaddr in infos:
        why = address_refusal(sockaddr[0].split("%", 1)[0], policy)
        if why:
            return f"{host} resolves to {sockaddr[0]} ({why})"
    return None


class _GuardedProxyHandler(urllib.request.ProxyHandler):
    """urllib's ProxyHandler that checks the target before handing it to the proxy."""

    def __init__(self, policy: UrlPolicy):
        super().__init__()
        self.policy = policy

    def proxy_open(self, req, proxy, type):  # noqa: A002 - urllib's signature
        if req.host and urllib.request.proxy_bypass(req.host):
            return None  # no_proxy: a direct connection, checked when it connects
        why = target_refusal(req.full_url, self.policy)
        if why:
            raise urllib.error.URLError(UnsafeAddressError(
                f"{GUARD_MESSAGE}: {why}; not sent to the proxy"))
        req.via_proxy = True  # its connection goes to the proxy, not to the target
        return super().proxy_open(req, proxy, type)


class _DeadlineOpener(urllib.request.OpenerDirector):
    """An opener whose ``timeout`` is a deadline for the whole URL, redirects included."""

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        depth = getattr(_local, "depth", 0)
        if depth == 0:  # the URL asked for; redirects (nested opens) share its deadline
            _local.deadline = ((time.monotonic() + timeout, timeout)
                               if isinstance(timeout, (int, float)) else None)
        _local.depth = depth + 1
        try:
            return super().open(fullurl, data, timeout)
        finally:
            _local.depth = depth


def _connection_class(base, direct, to_proxy):
    """``base`` (HTTP or HTTPS connection) connecting through the guard or to the proxy."""

    class Connection(base):
        def __init__(self, *args, via_proxy=False, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = to_proxy if via_proxy else direct  # http.client's hook
            if isinstance(self, http.client.HTTPSConnection):
                self._context.sslsocket_class = _DeadlineSSLSocket

        def connect(self):
            super().connect()
            self.sock.deadline = _current_deadline()  # a TLS socket is a new object

    return Connection


def _handlers(policy: UrlPolicy) -> tuple:
    """HTTP and HTTPS handlers whose connections go through the guard or to the proxy."""
    direct, to_proxy = _connector(policy), _connector(None)
    http_conn = _connection_class(http.client.HTTPConnection, direct, to_proxy)
    https_conn = _connection_class(http.client.HTTPSConnection, direct, to_proxy)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req, via_proxy=getattr(req, "via_proxy", False))

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context,
                                via_proxy=getattr(req, "via_proxy", False))

    return HTTPHandler(), HTTPSHandler()


def guarded_opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only, guarded and under a whole-URL deadline.

    Redirects are followed (each new target is checked again); ``file:``, ``ftp:`` and
    ``data:`` handlers are left out, so a redirect there fails.
    """
    opener = _DeadlineOpener()
    for handler in (_GuardedProxyHandler(policy), urllib.request.UnknownHandler(),
                    *_handlers(policy), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


@lru_cache(maxsize=8)
def install_guard(allow_networks: str) -> None:
    """Make ``urllib.request.urlopen`` in this process use ``guarded_opener`` (once)."""
    urllib.request.install_opener(guarded_opener(parse_allow_list(allow_networks)))
