"""Real HTTP receivers the outbox tests start on loopback ports: a webhook
receiver that verifies Standard Webhooks signatures (with the reference
library) and can be told to fail, and a Web Push service that checks the
VAPID JWT and decrypts the payload with the subscription's keys."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.harness import free_port


async def serve(path: str, handler: Any, port: int) -> tuple[web.AppRunner, int]:
    """An HTTP server on loopback answering POSTs to `path`."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    ts: float
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """POST /hook: answers `status` (a list is consumed one per request, then 200)."""

    secret: str | None = None
    fail: list[int] = field(default_factory=list)
    down: bool = False
    hits: list[Hit] = field(default_factory=list)
    bad_signatures: int = 0
    delay_s: float = 0.0
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        self._runner, self.port = await serve("/hook", self._hook, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, dict(request.headers))
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=400)
        status = 503 if self.down else (self.fail.pop(0) if self.fail else 200)
        self.hits.append(Hit(dict(request.headers), body, time.time(), status))
        self._changed.set()
        return web.Response(status=status)

    def ok(self) -> list[Hit]:
        return [h for h in self.hits if h.status == 200]

    async def until(self, pred: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"receiver: condition not met; {len(self.hits)} hits")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class PushService:
    """A push service (RFC 8030) for one browser: POST /push/{id}; it checks
    the VAPID Authorization (RFC 8292) against `vapid_key` and decrypts each
    message (RFC 8291, aes128gcm) with the subscriber's private key."""

    vapid_key: str = ""
    port: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    gone: bool = False
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)

    def subscription(self, name: str = "browser") -> dict[str, Any]:
        pub = self.private.public_key().public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": f"http://127.0.0.1:{self.port}/push/{name}",
                "keys": {"p256dh": b64u(pub), "auth": b64u(self.auth)}}

    async def start(self) -> PushService:
        self._runner, self.port = await serve("/push/{name}", self._push, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _push(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.gone:
            return web.Response(status=410)
        auth = request.headers.get("Authorization", "")
        try:
            scheme, _, rest = auth.partition(" ")
            params = dict(p.strip().split("=", 1) for p in rest.split(","))
            assert scheme.lower() == "vapid", scheme
            assert params["k"] == self.vapid_key, "the server's key"
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64u_decode(params["k"]))
            pem = pub.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            claims = jwt.decode(params["t"], pem, algorithms=["ES256"],
                                audience=f"http://127.0.0.1:{self.port}")
            assert claims["sub"].startswith("mailto:"), claims
            plain = http_ece.decrypt(body, private_key=self.private, auth_secret=self.auth,
                                     version=request.headers.get("Content-Encoding", "aes128gcm"))
        except Exception as exc:
            self.refused.append(f"{type(exc).__name__}: {exc}")
            self._changed.set()
            return web.Response(status=403)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append({"headers": headers, "payload": json.loads(plain), "ts": time.time()})
        self._changed.set()
        return web.Response(status=201)

    async def until(self, pred: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"push service: condition not met; refused {self.refused}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
