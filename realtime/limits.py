"""Rate limits at the HTTP edge, and who the client is.

- HTTP without a valid token (pages, static files, health, metrics, and
  every refused token) is limited per client address;
- HTTP with a valid token is limited per principal (sub + role) instead:
  behind a carrier-grade NAT thousands of customers share one address, a
  token is one person or one backend. Role `service` (the business backend)
  has its own, larger bucket;
- a new Engine.IO session (a GET to /socket.io/ without `sid`, polling or
  websocket) is limited per client address, before engine.io allocates
  anything.

A refusal is `429 rate_limited` with `retry_after_ms` and `Retry-After`, and
counts in `realtime_rate_limited_total{scope}` (ip, principal, handshake).

The buckets are the GPS limiter's (kernel.rate.MemoryRateLimiter):
per node, in memory. A Redis round trip per request would cost more than
most requests; each node protects its own event loop, which is the point.
Behind a load balancer spreading one client over N nodes the client gets up
to N times the rate (1 time with source-address affinity).

The client address is the TCP peer. X-Forwarded-For is believed only when
the peer is in REALTIME_TRUSTED_PROXIES, and then read from the right: the
first address that is not a trusted proxy is the client (what a client
writes itself is further left and is never reached). IPv6 clients are keyed
by their /64, which one host can rotate through at will.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web
from prometheus_client import Counter

from kernel.rate import MemoryRateLimiter
from realtime.auth import Principal
from realtime.errors import WireError
from realtime.metrics import Metrics
from realtime.settings import Network, Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# python-socketio's default path, which create_app keeps.
SOCKETIO_PATH = "/socket.io/"
SCOPES = ("ip", "principal", "handshake")
# Buckets kept per node before full (idle) ones are forgotten.
MAX_KEYS = 100_000


class Limited(WireError):
    """`rate_limited`, with how long to wait; answered 429 with Retry-After."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__("rate_limited", message, {"retry_after_ms": retry_after_ms})


class _NoLimit:
    def take(self, key: str) -> int:
        return 0


def _buckets(rate: float, burst: float) -> MemoryRateLimiter | _NoLimit:
    return MemoryRateLimiter(rate, burst, MAX_KEYS) if rate > 0 else _NoLimit()


class Limits:
    """The edge's buckets and their counter; one per app."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.trusted: tuple[Network, ...] = tuple(settings.trusted_proxies)
        self._ip = _buckets(settings.http_ip_rate, settings.http_ip_burst)
        self._user = _buckets(settings.http_user_rate, settings.http_user_burst)
        self._service = _buckets(settings.http_service_rate, settings.http_service_burst)
        self._handshake = _buckets(settings.handshake_rate, settings.handshake_burst)
        counter = Counter(
            "realtime_rate_limited_total",
            "Requests refused 429 by an edge rate limit, by scope (ip, principal, handshake)",
            ["scope"], registry=metrics.registry)
        self._refused = {scope: counter.labels(scope) for scope in SCOPES}

    def client(self, request: web.BaseRequest) -> Address | None:
        return client_address(request, self.trusted)

    def by_address(self, request: web.BaseRequest) -> None:
        """An HTTP request without a valid token: raises Limited when over."""
        self._take(self._ip, "ip", bucket_key(self.client(request)),
                   "too many requests from this address")

    def by_principal(self, principal: Principal) -> None:
        """An HTTP request with a valid token: raises Limited when over."""
        buckets = self._service if principal.role == "service" else self._user
        self._take(buckets, "principal", f"{principal.role}:{principal.id}",
                   "too many requests for this token")

    def new_session(self, request: web.BaseRequest) -> None:
        """A new Engine.IO session: raises Limited when over."""
        self._take(self._handshake, "handshake", bucket_key(self.client(request)),
                   "too many new connections from this address")

    def _take(self, buckets: MemoryRateLimiter | _NoLimit, scope: str, key: str,
              message: str) -> None:
        wait_ms = buckets.take(key)
        if wait_ms:
            self._refused[scope].inc()
            raise Limited(f"{message}; retry in {wait_ms} ms", wait_ms)


LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)


def is_new_session(request: web.BaseRequest) -> bool:
    """A request that would make engine.io create a session: a GET (polling
    or a websocket upgrade) without a session id."""
    return (request.method == "GET" and request.path.startswith(SOCKETIO_PATH)
            and "sid" not in request.query)


def parse_address(text: str) -> Address | None:
    """An address as peers and proxies write it: plain, `[v6]:port`, `v4:port`;
    IPv4-mapped IPv6 is the IPv4 address. None when it is not an address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def within(addr: Address | None, networks: Sequence[Network]) -> bool:
    return addr is not None and any(addr in net for net in networks)


def client_address(request: web.BaseRequest, trusted: Sequence[Network]) -> Address | None:
    """The peer, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not one (an unreadable entry stops the walk: the
    last trusted hop is then the client as far as we know)."""
    addr = parse_address(request.remote or "")
    if not trusted or not within(addr, trusted):
        return addr
    hops = ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
    for hop in reversed(hops):
        if not hop.strip():
            continue
        parsed = parse_address(hop)
        if parsed is None:
            break
        addr = parsed
        if not within(addr, trusted):
            break
    return addr


def bucket_key(addr: Address | None) -> str:
    if addr is None:
        return "unknown"  # a unix socket: one shared bucket
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)

