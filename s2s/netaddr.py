"""The address a worker advertises for its /metrics and /healthz server.

Workers register this URL in the liveness registry (`s2s:workers`); `/healthz`, `s2s bench`'s
per-stage breakdown and the gateway's Prometheus service discovery (`/sd`) hand it to
processes on *other* hosts, so it must be one they can reach: never 127.0.0.1 unless
everything runs on one host.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


def route_source(peer_host: str, peer_port: int = 6379) -> str | None:
    """The local address this host uses to reach ``peer_host`` (connecting a UDP socket sends
    nothing; it only asks the kernel for the route), or None where there is no route."""
    try:
        infos = socket.getaddrinfo(peer_host, peer_port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(addr)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def own_address(redis_url: str = "") -> str:
    """This host's address as other hosts see it.

    The best guess is the source address of the route to Redis: every component shares Redis,
    so whatever network reaches Redis reaches this host too (and with Redis on loopback,
    everything runs on this host and 127.0.0.1 is right). Then the address the host name
    resolves to, when it is not a loopback one; 127.0.0.1 as a last resort."""
    redis_host = urlsplit(redis_url).hostname if redis_url else None
    if redis_host:
        addr = route_source(redis_host, urlsplit(redis_url).port or 6379)
        if addr:
            return addr
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    except (OSError, ValueError):
        pass
    return "127.0.0.1"


def advertise_url(advertise: str, bound_host: str, port: int, redis_url: str = "") -> str:
    """The URL to register for a metrics server bound to ``bound_host:port``.

    ``advertise`` (S2S_METRICS_ADVERTISE) wins: ``http://host:port``, ``host:port``, or a bare
    ``host`` (the bound port is added). Otherwise the bound address, or, bound to a wildcard
    (0.0.0.0, ::), this host's own routable address."""
    advertise = advertise.strip()
    if advertise:  # a bad value stops the worker at start with one clear line (like config.load)
        url = advertise if "://" in advertise else f"http://{advertise}"
        parts = urlsplit(url)
        if not parts.hostname:
            raise SystemExit(f"invalid S2S_METRICS_ADVERTISE={advertise!r}: no host in it")
        try:
            has_port = parts.port is not None
        except ValueError as e:
            raise SystemExit(f"invalid S2S_METRICS_ADVERTISE={advertise!r}: {e}") from None
        if not has_port:
            url = f"{parts.scheme}://{_host_port(parts.hostname, port)}{parts.path}"
        return url.rstrip("/")
    host = own_address(redis_url) if bound_host in WILDCARDS else bound_host
    return f"http://{_host_port(host, port)}"
