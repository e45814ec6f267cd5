"""Test helpers spoken at the wire level: a hand-written Engine.IO v4 / Socket.IO v5
client over a raw websocket, hand-built JWTs, and checks of the error shape."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.harness import server_errors

RAW_TIMEOUT = 10.0


class RawClosed(ConnectionResetError):
    """The websocket ended; ``clean`` is False when it ended in a protocol error
    (e.g. bytes that are not a websocket frame arrived)."""

    def __init__(self, msg_type: aiohttp.WSMsgType, data: Any) -> None:
        super().__init__(f"websocket ended: {msg_type!r} {data!r}")
        self.msg_type = msg_type
        self.clean = msg_type != aiohttp.WSMsgType.ERROR


class RawSocketIO:
    """One websocket speaking Engine.IO v4 + Socket.IO v5 by hand, so that what the
    server puts on the wire (e.g. a CONNECT_ERROR's ``data``) is seen unfiltered."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, open_packet: dict[str, Any]) -> None:
        self.ws = ws
        self.open_packet = open_packet
        self.sid: str = open_packet["sid"]  # the Engine.IO session id

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, base_url: str, query: str = "",
                   headers: dict[str, str] | None = None) -> RawSocketIO:
        url = base_url.replace("http://", "ws://", 1) + "/socket.io/?EIO=4&transport=websocket" + query
        ws = await session.ws_connect(url, headers=headers)
        raw = await ws.receive_str(timeout=RAW_TIMEOUT)
        assert raw.startswith("0"), raw
        return cls(ws, json.loads(raw[1:]))

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def recv(self, timeout: float = RAW_TIMEOUT) -> str:
        """The next Socket.IO packet as text; Engine.IO pings are answered here."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "2":
                    await self.ws.send_str("3")
                    continue
                return str(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise RawClosed(msg.type, msg.data)

    async def connect_ns(self, namespace: str, auth: str | None) -> tuple[str, Any]:
        """Send CONNECT with ``auth`` (JSON text, or None for no payload at all).
        Returns ("connect", data) or ("connect_error", data)."""
        await self.send(f"40{namespace}," + (auth if auth is not None else ""))
        while True:
            kind, ns, _, data = parse_packet(await self.recv())
            if ns != namespace:
                continue
            if kind == "0":
                return "connect", data
            if kind == "4":
                return "connect_error", data
            raise AssertionError(f"unexpected packet type {kind} during connect")

    async def call(self, namespace: str, ack_id: int, args: str) -> Any:
        """Send the raw EVENT text ``42<ns>,<id><args>`` and wait for ACK ``<id>``."""
        await self.send(f"42{namespace},{ack_id}{args}")
        return await self.ack(namespace, ack_id)

    async def ack(self, namespace: str, ack_id: int, timeout: float = RAW_TIMEOUT) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                kind, ns, pid, data = parse_packet(await self.recv())
                if kind == "3" and ns == namespace and pid == ack_id:
                    return data

    async def close(self) -> None:
        await self.ws.close()


def parse_packet(text: str) -> tuple[str, str, int | None, Any]:
    """'4<type>[/ns,][id][json]' -> (type, namespace, id, data)."""
    assert text.startswith("4"), f"not a Socket.IO message: {text[:80]!r}"
    kind, rest, namespace = text[1], text[2:], "/"
    if rest.startswith("/"):
        namespace, _, rest = rest.partition(",")
    digits = len(rest) - len(rest.lstrip("0123456789"))
    pid = int(rest[:digits]) if digits else None
    body = rest[digits:]
    return kind, namespace, pid, json.loads(body) if body else None


# -- JWTs built by hand --------------------------------------------------------

def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(sub: object = "user-1", role: object = "customer", ttl_s: int = 3600,
           **extra: Any) -> dict[str, Any]:
    """A token's claims. Any value may be malformed (a number for `sub`, a list
    for `role`), and a claim given as None is left out."""
    now = int(time.time())
    out: dict[str, Any] = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def unsigned_jwt(payload: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """alg=none: header.payload. with an empty signature."""
    h = header or {"alg": "none", "typ": "JWT"}
    return f"{b64url(json.dumps(h).encode())}.{b64url(json.dumps(payload).encode())}."


def hmac_jwt(payload: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """An HS* token signed by hand with any bytes as the key (PyJWT refuses PEM keys
    as HMAC secrets, which is exactly what a key-confusion attacker does not)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{b64url(sig)}"


# -- error shape ----------------------------------------------------------------

def assert_error(reply: Any, code: str, fields: set[str] | None = None) -> dict[str, Any]:
    """``reply`` is {ok: false, error: {code, message, details?}}; with ``fields``,
    ``details`` is a list of {field, error} naming exactly those fields."""
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    assert set(reply) == {"ok", "error"}, reply
    err = reply["error"]
    assert isinstance(err, dict) and err.get("code") == code, reply
    assert isinstance(err.get("message"), str) and err["message"], reply
    assert set(err) <= {"code", "message", "details", "retry_after_ms"}, reply
    if fields is not None:
        details = err.get("details")
        assert isinstance(details, list) and details, f"details must list the fields: {reply}"
        for d in details:
            assert isinstance(d, dict) and isinstance(d.get("field"), str), reply
            assert isinstance(d.get("error"), str), reply
        assert {d["field"] for d in details} == fields, reply
    return dict(err)


def assert_no_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    """No record at ERROR or above, and no traceback at any level."""
    bad = server_errors(caplog.records)
    assert not bad, "server logged errors:\n" + "\n".join(
        f"{r.levelname} {r.name}: {r.getMessage()} "
        f"{type(r.exc_info[1]).__name__ + ': ' + str(r.exc_info[1]) if r.exc_info and r.exc_info[1] else ''}"
        for r in bad
    )
