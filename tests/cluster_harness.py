"""Helpers for multi-process cluster tests: several `python -m realtime` nodes
sharing one Redis and one MongoDB, a redis-server that can be stopped and
started again on the same port, and clients spread over the nodes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from realtime.auth import mint_token
from realtime.settings import Settings
from tests.harness import (
    Client,
    Http,
    ServerProcess,
    a_window,
    free_port,
    stop_process,
    uid,
    until,
    wait_port,
)
from tests.server_procs import log_text, server_process, start, stop

SECRET = "cluster-test-secret-0123456789abcdef"
_SETTINGS = Settings(jwt_secret=SECRET)
ADDR = (31.2304, 121.4737)  # People's Square, Shanghai (WGS-84)


def token(role: str, sub: str | None = None, **kw: Any) -> str:
    return mint_token(_SETTINGS, sub=sub or uid(f"{role}-"), role=role, **kw)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class TimedClient(Client):
    """A recording client that also notes when (perf_counter) each event arrived."""

    def __init__(self, base_url: str, namespace: str, token: str | None) -> None:
        super().__init__(base_url, namespace, token)
        self.times: dict[str, list[float]] = defaultdict(list)

        async def _any(event: str, data: Any = None) -> None:
            self.times[event].append(time.perf_counter())
            self.received[event].append(data)
            self._queues[event].put_nowait(data)

        self.sio.on("*", _any, namespace=namespace)


class RestartableRedis:
    """A redis-server of our own on a fixed port: stop it and start it again
    (empty, no persistence) on the same port, as an outage would."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run ./scripts/test, which installs it")
        self.exe = exe
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc, timeout=20)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig, timeout=10)


async def next_where(c: Client, event: str, pred: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """The next `event` on c matching pred (earlier non-matching ones are consumed)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no matching {event!r} on {c.namespace}; received: "
                               f"{c.received.get(event)}")
        try:
            item = await c.next(event, timeout=remaining)
        except TimeoutError:
            raise TimeoutError(f"no matching {event!r} on {c.namespace}; received: "
                               f"{c.received.get(event)}") from None
        if pred(item):
            return item


class Cluster:
    """N nodes of one test: same Redis channel, same MongoDB database, and the
    clients and HTTP session of the test, all closed at its end."""

    def __init__(self, redis_url: str, mongo_url: str, session: aiohttp.ClientSession,
                 **env: str) -> None:
        self.redis_url = redis_url
        self.mongo_url = mongo_url
        self.session = session
        self.channel = uid("cl")
        self.env = {
            "REDIS_URL": redis_url, "MONGO_URL": mongo_url,
            "REALTIME_REDIS_CHANNEL": self.channel, "REALTIME_MONGO_DB": uid("cluster_"),
            "REALTIME_JWT_SECRET": SECRET, "REALTIME_LOG_LEVEL": "INFO", **env,
        }
        self.nodes: list[ServerProcess] = []
        self.clients: list[Client] = []

    async def start(self, n: int) -> list[ServerProcess]:
        new = [server_process(dict(self.env)) for _ in range(n)]
        for s in new:  # server_process drops store URLs from the environment: ours are meant
            s.env.update(REDIS_URL=self.redis_url, MONGO_URL=self.mongo_url)
        self.nodes.extend(new)
        await asyncio.gather(*(start(s) for s in new))
        for s in new:  # really one cluster: the shared store and the Redis engine
            assert "store ready (MONGO_URL); redis engine" in log_text(s), log_text(s)[-3000:]
        return new

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await asyncio.gather(*(stop(s) for s in self.nodes if s.proc is not None),
                             return_exceptions=True)

    def http(self, node: ServerProcess) -> Http:
        return Http(node.url, self.session)

    async def client(self, node: ServerProcess, namespace: str, role: str, sub: str | None = None,
                     **kw: Any) -> TimedClient:
        c = TimedClient(node.url, namespace, token(role, sub, **kw))
        self.clients.append(c)
        return await c.connect()

    async def api(self, node: ServerProcess, method: str, path: str, json: Any = None,
                  role: str = "service", expect: int | None = 200) -> Any:
        status, body = await self.http(node).request(method, path, token(role, "backend"), json=json)
        if expect is not None:
            assert status == expect, (method, path, status, body)
        return body

    async def create_order(self, node: ServerProcess, customer_id: str, **extra: Any) -> dict[str, Any]:
        body = {
            "order_id": uid("o-"), "customer_id": customer_id,
            "service": {"code": "aircon_repair", "name": "空调维修"},
            "address": {"lat": ADDR[0], "lng": ADDR[1], "text": "上海市黄浦区人民广场 1 号"},
            "window": a_window(),
            **extra,
        }
        reply = await self.api(node, "POST", "/api/orders", body, expect=201)
        return dict(reply["data"]["order"])

    async def healthz(self, node: ServerProcess) -> int:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.get(node.url + "/healthz",
                                        timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status
        return 0

    async def metric(self, node: ServerProcess, series: str) -> float | None:
        """One sample of the node's /metrics, e.g. 'realtime_connections{namespace="/ops"}'."""
        async with self.session.get(node.url + "/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def heard(self, node: ServerProcess, change: Awaitable[Any]) -> Any:
        """Await `change`, a `watch`, `unwatch` or `watch_area` on another node
        that changes that node's interest, then wait until `node` has received
        the announcement; returns the change's reply. (The watching node
        answers once it has published the announcement; `node` handles it a
        moment later, and a fix it relays before then skips the watching node:
        the one-fix window realtime/interest.py documents.)"""
        series = 'realtime_bus_received_total{signal="interest"}'
        before = await self.metric(node, series) or 0.0
        reply = await change

        async def heard() -> bool:  # another process's counter: nothing to await but its rise
            return (await self.metric(node, series) or 0.0) > before

        await until(heard, 10, every=0.02, what=f"node {node.port} hearing the interest change")
        return reply

    def logs(self) -> str:
        return "\n".join(f"--- node {s.port}\n{log_text(s)[-4000:]}" for s in self.nodes)

    def errors(self) -> list[str]:
        """Lines of the nodes' logs that mean a crash or an unhandled error."""
        bad = []
        for s in self.nodes:
            for line in log_text(s).splitlines():
                if " ERROR " in line or " CRITICAL " in line or "Traceback" in line:
                    bad.append(f"node {s.port}: {line}")
        return bad
