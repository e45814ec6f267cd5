"""Outbound HTTP for the outbox relay (outbox/relay.py): signed webhook POSTs
and Web Push requests, over one aiohttp session per node.

Every request is bounded (REALTIME_WEBHOOK_TIMEOUT_S, connect included),
follows no redirect (a 3xx is a failed try: a receiver that moved is
re-registered, never silently followed), and reads at most a little of the
answer. The relay bounds how many run at once per target."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives import serialization
from py_vapid import Vapid02 as Vapid
from pywebpush import WebPushException, webpush_async
from standardwebhooks.webhooks import Webhook

from kernel.clock import now_ms
from realtime.settings import make_private, private_data_dir

log = logging.getLogger(__name__)

USER_AGENT: Final = "realtime-webhooks/1"
# What of a receiver's answer is kept with the attempt.
MAX_ANSWER: Final = 256


def attempt(t0: float, result: str, status: int | None = None, error: str | None = None) -> dict[str, Any]:
    return {"ts": now_ms(), "result": result, "status": status,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 1), "error": error}


def _classify(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused"
    return "error"


class HttpSender:
    def __init__(self, timeout_s: float, vapid: Vapid, vapid_subject: str) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._vapid = vapid
        self._subject = vapid_subject

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"user-agent": USER_AGENT},
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def webhook(self, endpoint: dict[str, Any], msg_id: str, body: str) -> dict[str, Any]:
        stamp = dt.datetime.now(dt.UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": Webhook(endpoint["secret"]).sign(msg_id, stamp, body),
        }
        t0 = time.perf_counter()
        try:
            async with self._http().post(endpoint["url"], data=body.encode(), headers=headers,
                                         allow_redirects=False) as resp:
                answer = (await resp.content.read(MAX_ANSWER)).decode("utf-8", "replace")
                if 200 <= resp.status < 300:
                    return attempt(t0, "ok", resp.status)
                result = "redirect" if 300 <= resp.status < 400 else "http_error"
                return attempt(t0, result, resp.status, answer or None)
        except Exception as exc:
            return attempt(t0, _classify(exc), None, type(exc).__name__)

    async def webpush(self, subscription: dict[str, Any], body: str, ttl_s: int, urgency: str,
                      topic: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        info = {"endpoint": subscription["endpoint"], "keys": subscription["keys"]}
        try:
            resp = await webpush_async(
                info, body, vapid_private_key=self._vapid, vapid_claims={"sub": self._subject},
                ttl=ttl_s, headers={"urgency": urgency, "topic": topic},
                timeout=self._timeout, aiohttp_session=self._http())
        except WebPushException as exc:
            status = getattr(exc.response, "status", None)
            # 404/410: the subscription expired or was withdrawn (RFC 8030 7.3).
            result = "gone" if status in (404, 410) else "http_error"
            return attempt(t0, result, status, "push service refused")
        except Exception as exc:
            return attempt(t0, _classify(exc), None, type(exc).__name__)
        status = getattr(resp, "status", None)
        return attempt(t0, "ok" if status and 200 <= status < 300 else "http_error", status)


# -- VAPID keys ----------------------------------------------------------
def load_vapid(data_dir: Path, configured: str | None) -> Vapid:
    """The configured key (PEM text or a path), or one generated on first
    start and kept in the data dir (like the JWT secret)."""
    if configured:
        text = Path(configured).read_text() if not configured.lstrip().startswith("-----") \
            else configured
        return Vapid.from_pem(text.encode())
    path = data_dir / "vapid_private.pem"
    private_data_dir(data_dir)
    if path.exists():
        make_private(path, 0o600)  # an older version's file, tightened
        return Vapid.from_file(str(path))
    vapid = Vapid()
    vapid.generate_keys()
    pem = vapid.private_pem()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return vapid


def application_server_key(vapid: Vapid) -> str:
    """The public key a browser subscribes with (base64url, uncompressed point)."""
    raw = vapid.public_key.public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# -- URLs ----------------------------------------------------------------
async def url_problem(url: str, own_ports: set[int], max_len: int = 2048) -> str | None:
    """Why a webhook or push URL is refused, or None: http(s) only, a host,
    no credentials, and never this server itself (a loop of deliveries)."""
    if len(url) > max_len:
        return f"at most {max_len} characters"
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username or parts.password:
        return "credentials in the URL are refused; authenticate by the signature"
    if parts.fragment:
        return "a fragment is never sent; remove it"
    if port in own_ports and await _is_local(parts.hostname):
        return "points at this server itself"
    return None


async def _is_local(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
        addrs = {addr}
    except ValueError:
        if host.lower() in ("localhost", socket.gethostname().lower()):
            return True
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None), 2.0)
        except (OSError, TimeoutError):
            return False  # unresolvable here: not this server
        addrs = {ipaddress.ip_address(i[4][0]) for i in infos}
    own = _own_addresses()
    return any(a.is_loopback or a.is_unspecified or a in own for a in addrs)


def _own_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(ipaddress.ip_address(info[4][0]))
    except OSError:
        pass
    return out
