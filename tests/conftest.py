"""Session-wide real servers (redis-server, SecantusDB) and per-test live apps."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from realtime.app import create_app
from realtime.auth import mint_token
from realtime.settings import Settings
from tests.harness import (
    Client,
    Http,
    MongoServer,
    RedisServer,
    a_window,
    assert_no_tasks_left,
    free_port,
    uid,
)

JWT_SECRET = "test-secret-0123456789abcdef-0123456789"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoServer]:
    server = MongoServer()
    yield server
    server.stop()


def make_settings(mongo_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "jwt_secret": JWT_SECRET,
        "mongo_url": mongo_url,
        "mongo_db": "realtime_test",
        "data_dir": Path(tempfile.mkdtemp(prefix="rt-data-")),
        "host": "127.0.0.1",
        "port": 0,
    }
    base.update(overrides)
    return Settings(**base)


class Live:
    """A running app on a free port, with helpers to mint tokens and connect clients."""

    def __init__(self, settings: Settings, app: web.Application, port: int,
                 session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = Http(self.url, session)
        self.clients: list[Client] = []

    def token(self, role: str, sub: str | None = None, **kw: Any) -> str:
        return mint_token(self.settings, sub=sub or uid(f"{role}-"), role=role, **kw)

    async def client(self, role: str, sub: str | None = None, namespace: str = "/orders",
                     **kw: Any) -> Client:
        c = Client(self.url, namespace, self.token(role, sub, **kw))
        self.clients.append(c)
        return await c.connect()

    async def create_order(self, customer_id: str | None = None, **extra: Any) -> dict[str, Any]:
        body = {
            "order_id": uid("o-"),
            "customer_id": customer_id or uid("c-"),
            "service": {"code": "aircon_repair", "name": "空调维修"},
            "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
            "window": a_window(),
            **extra,
        }
        status, reply = await self.http.request("POST", "/api/orders", self.token("service"), json=body)
        assert status == 201, reply
        return dict(reply["data"]["order"])

    async def post_event(self, order_id: str, state: str, data: dict[str, Any] | None = None,
                         role: str = "service") -> tuple[int, Any]:
        return await self.http.request("POST", f"/api/orders/{order_id}/events", self.token(role),
                                       json={"state": state, **({"data": data} if data else {})})

    async def assign(self, order_id: str, technician_id: str) -> dict[str, Any]:
        status, reply = await self.http.request(
            "POST", f"/api/orders/{order_id}/assign", self.token("service"),
            json={"technician_id": technician_id})
        assert status == 200, reply
        return dict(reply["data"]["order"])


StartApp = Callable[..., Awaitable[Live]]


@contextlib.asynccontextmanager
async def app_on(mongo_url: str, **overrides: Any) -> AsyncIterator[Live]:
    """A live app outside `start_app`: on a store of its own, or shared by a
    module. Stopped, with its clients, when the block ends; it must leave no
    task behind."""
    settings = make_settings(mongo_url, **overrides)
    web_app = create_app(settings)
    runner = web.AppRunner(web_app, handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession()
    live = Live(settings, web_app, port, session)
    try:
        yield live
    finally:
        for c in live.clients:
            await c.close()
        await runner.cleanup()
        await session.close()
        await assert_no_tasks_left()


# Every test that starts an app runs on both engines: memory (one node) and
# Redis (the cluster engine, here one node; tests/cluster/ runs several).
ENGINES = [e for e in os.environ.get("REALTIME_TEST_ENGINES", "memory,redis").split(",") if e]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def start_app(mongo_server: MongoServer, redis_server: RedisServer,
                    engine: str) -> AsyncIterator[StartApp]:
    runners: list[web.AppRunner] = []
    lives: list[Live] = []
    session = aiohttp.ClientSession()

    channel = uid("t")  # this test's own Redis keys and channel

    async def start(**overrides: Any) -> Live:
        if engine == "redis":
            overrides.setdefault("redis_url", redis_server.url)
            overrides.setdefault("redis_channel", channel)
        settings = make_settings(overrides.pop("mongo_url", mongo_server.url), **overrides)
        app = create_app(settings)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        live = Live(settings, app, port, session)
        lives.append(live)
        return live

    yield start
    for live in lives:
        for c in live.clients:
            await c.close()
    for runner in runners:
        await runner.cleanup()
    await session.close()
    await assert_no_tasks_left()


@pytest.fixture
async def live(start_app: StartApp) -> Live:
    return await start_app()


@pytest.fixture(autouse=True)
async def dump_tasks_when_stuck() -> AsyncIterator[None]:
    """A test still running after 100 s (pytest-timeout ends it at 120 s)
    prints what every task is waiting on: a hang in a coroutine shows no
    useful thread stack."""
    import asyncio
    import sys

    def dump() -> None:
        print(f"\n--- tasks after 100 s ({len(asyncio.all_tasks())}) ---", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(limit=12, file=sys.stderr)

    handle = asyncio.get_running_loop().call_later(100, dump)
    try:
        yield
    finally:
        handle.cancel()
