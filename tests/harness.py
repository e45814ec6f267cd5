"""Real processes and real clients for the tests: redis-server, the embedded
store, live apps on free ports, Socket.IO clients that record what they see."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp
import socketio

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 10.0
EVENT_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run ./scripts/test, which installs it")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.proc)


class MongoServer:
    """SecantusDB as a separate process, like the server's embedded default."""

    def __init__(self, storage: str = ":memory:") -> None:
        self.port = free_port()
        self.storage = storage
        exe = Path(sys.executable).parent / "secantusd-py"
        self.proc = subprocess.Popen(
            [str(exe), "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", storage, "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def stop(self) -> None:
        stop_process(self.proc)


async def until(pred: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.1,
                what: str = "condition") -> float:
    """Poll an async predicate until true; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if await pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(every)


def _chain(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its coroutine chain, outermost first."""
    links: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        where = f" ({frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""
        links.append(f"{getattr(coro, '__qualname__', type(coro).__name__)}{where}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " -> ".join(links)


async def assert_no_tasks_left(timeout: float = 5.0) -> None:
    """Once an app has stopped, nothing of it may still run: a task left
    pending is a request or session that hangs (a client kept waiting), or
    one the garbage collector later finds mid-iteration and reports as an
    error of whatever test runs then. The browser the page tests share
    (playwright) is not ours."""
    current = asyncio.current_task()
    ours = [t for t in asyncio.all_tasks() if t is not current and "playwright" not in _chain(t)]
    if ours:  # those already ending get `timeout` to finish
        _, left = await asyncio.wait(ours, timeout=timeout)
        assert not left, "tasks left running after the app stopped:\n" + "\n".join(_chain(t) for t in left)


def server_errors(records: list[Any]) -> list[Any]:
    """Log records that mean the server failed: ERROR and above, or a traceback.

    Not counted: asyncio's "Task was destroyed but it is pending", which the
    garbage collector logs at an arbitrary later moment for request tasks
    of apps that earlier tests already tore down."""
    return [r for r in records
            if (r.levelno >= 40 or r.exc_info)
            and not (r.name == "asyncio" and "Task was destroyed" in r.getMessage())]


def a_window(minutes: int = 6) -> dict[str, int]:
    """A window of its own, years ahead: an order's window takes its
    technician's time (docs/scheduling.md), so tests that give one technician
    several orders must not give them the same time by accident."""
    start = 1_800_000_000_000 + random.randrange(10**6) * 600_000
    return {"start_ts": start, "end_ts": start + minutes * 60_000}


def uid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class Client:
    """A real Socket.IO client over TCP that records every event it receives."""

    def __init__(self, base_url: str, namespace: str, token: str | None) -> None:
        self.base_url = base_url
        self.namespace = namespace
        self.token = token
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: dict[str, list[Any]] = defaultdict(list)
        self._queues: dict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)

        async def _any(event: str, data: Any = None) -> None:
            self.received[event].append(data)
            self._queues[event].put_nowait(data)

        self.sio.on("*", _any, namespace=namespace)

    async def connect(self, transports: list[str] | None = None, **kw: Any) -> Self:
        auth = {"token": self.token} if self.token is not None else None
        await self.sio.connect(self.base_url, namespaces=[self.namespace], auth=auth,
                               transports=transports or ["websocket"], wait_timeout=10, **kw)
        return self

    async def call(self, event: str, data: Any = None, timeout: float = CALL_TIMEOUT) -> Any:
        return await self.sio.call(event, data, namespace=self.namespace, timeout=timeout)

    async def ok(self, event: str, data: Any = None) -> Any:
        reply = await self.call(event, data)
        assert reply["ok"] is True, reply
        return reply["data"]

    async def error(self, event: str, data: Any, code: str) -> dict[str, Any]:
        reply = await self.call(event, data)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        return dict(reply["error"])

    async def next(self, event: str, timeout: float = EVENT_TIMEOUT) -> Any:
        return await asyncio.wait_for(self._queues[event].get(), timeout)

    def drain(self, event: str) -> list[Any]:
        q, out = self._queues[event], []
        while not q.empty():
            out.append(q.get_nowait())
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect()


class Http:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.session = session

    async def request(self, method: str, path: str, token: str | None = None,
                      json: Any = None, data: Any = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base_url + path, json=json, data=data,
                                        headers=h) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, body


class ServerProcess:
    """`python -m realtime` as a real child process (for restart and multi-node tests)."""

    def __init__(self, env: dict[str, str], cwd: Path | None = None) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "REALTIME_PORT": str(self.port),
                    "REALTIME_HOST": "127.0.0.1"}
        self.cwd = cwd or Path(tempfile.mkdtemp(prefix="rt-node-"))
        self.log = self.cwd / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "realtime"], env=self.env,
                                         cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server on {self.port} not ready; log:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
