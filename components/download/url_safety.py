"""Keep the download step from fetching what a URL list must not reach (SSRF).

On a cloud worker, ``http://169.254.169.254/...`` or ``http://metadata.google.internal/``
answers with the worker's credentials, and private addresses reach services that trust
the network. A web-scale URL list is untrusted input, so the download refuses, by default:

* schemes other than http and https (``file:``, ``ftp:``, ``gopher:``, ``data:``...);
* host names of cloud metadata services (``metadata.google.internal``, ``*.internal``);
* every address that is not globally routable: loopback (127/8, ::1), private (10/8,
  172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the metadata address
  169.254.169.254, fe80::/10), shared (100.64/10), unspecified, multicast and reserved
  ranges, also when written as IPv4-mapped IPv6 or in the legacy numeric forms
  (``http://2130706433/``, ``http://0x7f.1/``).

Two places enforce it. ``screen_url`` checks each row of the URL list before any work
(scheme, host name, IP literal), so refused rows are counted and never reach
img2dataset. A host *name* can resolve to any address, and a public URL can redirect to
a private one, so the check that counts happens when a connection is made:
``install_guard`` gives ``urllib`` (which img2dataset fetches with) connection classes
that resolve the host, drop every address the policy refuses and connect only to an
address that was checked (no second lookup that DNS rebinding could change). The guard
is installed in img2dataset's worker processes only, for image fetches only: storage
clients (gcsfs, google-auth) use their own HTTP stacks and still reach the metadata
server for the worker's credentials.

``allow_networks`` lifts the refusal for given networks, e.g. ``"127.0.0.1/32"`` for the
local demo server and tests, or a proxy's network.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata",
                            "instance-data", "instance-data.ec2.internal"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Failure reasons (the download's counts) and the message prefix the guard raises with.
REFUSED_SCHEME, REFUSED_HOST, REFUSED_ADDRESS, BAD_URL = (
    "unsafe_scheme", "unsafe_host", "unsafe_address", "bad_url")
GUARD_MESSAGE = "refused by URL safety"


class UnsafeAddressError(OSError):
    """A connection to an address the URL policy refuses."""


class UrlPolicy(NamedTuple):
    """Networks whose addresses may be fetched even though they are not global."""
    allow: tuple = ()

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.allow)


def parse_allow_list(text: str) -> UrlPolicy:
    """``"127.0.0.1/32, 10.1.0.0/16"`` -> ``UrlPolicy``; "" refuses every private address.

    Raises:
        ValueError: naming an entry that is not an IP address or CIDR network.
    """
    networks = []
    for entry in str(text or "").replace(";", ",").replace(" ", ",").split(","):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"allow_networks entry {entry!r} is not an IP network; expected "
                             "e.g. '127.0.0.1/32' or '10.0.0.0/8'") from None
    return UrlPolicy(tuple(networks))


def _embedded_ipv4(ip):
    """The IPv4 address inside an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo else None


def address_refusal(ip, policy: UrlPolicy) -> str | None:
    """Why ``ip`` may not be fetched (e.g. ``"loopback"``), or None when it may."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if any(ip.version == n.version and ip in n for n in policy.allow):
        return None
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = address_refusal(inner, policy)
        return f"{why} (inside {ip})" if why else None
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def _ip_literal(host: str):
    """The address a host written as an IP means, legacy IPv4 forms included, or None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:  # inet_aton reads 2130706433, 0x7f.1, 0177.0.0.1 as 127.0.0.1, as resolvers do
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def screen_url(url: str, policy: UrlPolicy) -> tuple[str | None, str]:
    """Check one URL without any network access.

    Returns:
        ``(reason, note)``: reason is None (fetch it), ``"unsafe_scheme"``,
        ``"unsafe_host"`` (a metadata service name), ``"unsafe_address"`` (an IP
        literal the policy refuses) or ``"bad_url"``; note says what was found.
    """
    if not str(url).strip():
        return BAD_URL, "empty URL"
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname
    except ValueError as e:
        return BAD_URL, str(e)[:100]
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return REFUSED_SCHEME, f"scheme {scheme or '(none)'!r}"
    if not host:
        return BAD_URL, "no host"
    host = host.rstrip(".").lower()
    if host in METADATA_HOSTS or host.endswith(".internal"):
        return REFUSED_HOST, host
    ip = _ip_literal(host)
    if ip is not None:
        why = address_refusal(ip, policy)
        if why:
            return REFUSED_ADDRESS, f"{host} is {why}"
    return None, ""


# ---------------------------------------------------------------------------------------
# The connect-time guard (in img2dataset's worker processes)


def guarded_create_connection(policy: UrlPolicy):
    """``socket.create_connection`` that only connects to addresses ``policy`` allows."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                          source_address=None, **_):
        host, port = address[:2]
        error: OSError | None = None
        refused = []
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
                host, port, 0, socket.SOCK_STREAM):
            why = address_refusal(sockaddr[0].split("%", 1)[0], policy)
            if why:
                refused.append(f"{sockaddr[0]} ({why})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the address just checked: no second lookup
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        raise UnsafeAddressError(f"{GUARD_MESSAGE}: {host} resolves to "
                                 f"{', '.join(refused) or 'nothing'}; not fetched")

    return create_connection


def guarded_opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only whose connections pass through the guard.

    Redirects are followed (each new host is checked again); ``file:``, ``ftp:`` and
    ``data:`` handlers are left out, so a redirect there fails.
    """
    connect = guarded_create_connection(policy)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect  # http.client's hook for opening the socket

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                    HTTPHandler(), HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


@lru_cache(maxsize=8)
def install_guard(allow_networks: str) -> None:
    """Make ``urllib.request.urlopen`` in this process use ``guarded_opener`` (once)."""
    urllib.request.install_opener(guarded_opener(parse_allow_list(allow_networks)))
