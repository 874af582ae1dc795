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

Three places enforce it. ``screen_url`` checks each row of the URL list before any work
(scheme, host name, IP literal), so refused rows are counted and never reach
img2dataset. A host *name* can resolve to any address, and a public URL can redirect to
a private one, so the check that counts happens when a connection is made:
``url_guard.install_guard`` gives ``urllib`` (which img2dataset fetches with) connection classes
that resolve the host, drop every address the policy refuses and connect only to an
address that was checked (no second lookup that DNS rebinding could change). The guard
is installed in img2dataset's worker processes only, for image fetches only: storage
clients (gcsfs, google-auth) use their own HTTP stacks and still reach the metadata
server for the worker's credentials.

With an HTTP(S) proxy in the environment (``http_proxy``, ``https_proxy``), the proxy
makes the connection to the target, so the guard checks the *target* before the request
is handed to the proxy, on every redirect hop: its name (metadata names refused before
any DNS lookup) and every address it resolves to here. The proxy itself is the
operator's setting and is not checked (``components.download.url_guard``).

``allow_networks`` lifts the refusal for given networks, e.g. ``"127.0.0.1/32"`` for the
local demo server and tests.
"""
from __future__ import annotations

import ipaddress
import socket
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
    if is_metadata_host(host):
        return REFUSED_HOST, host
    ip = _ip_literal(host)
    if ip is not None:
        why = address_refusal(ip, policy)
        if why:
            return REFUSED_ADDRESS, f"{host} is {why}"
    return None, ""


def is_metadata_host(host: str) -> bool:
    """Whether ``host`` names a cloud metadata service (refused by name, never looked up)."""
    host = str(host or "").rstrip(".").lower()
    return host in METADATA_HOSTS or host.endswith(".internal")

