"""The packet edge: JSON only, no permessage-deflate, origin allowlist, settings guards."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web, web_protocol
from pydantic import ValidationError

from realtime.api import CTX
from realtime.settings import Settings
from tests.conftest import JWT_SECRET, Live, StartApp
from tests.harness import until
from tests.wire import RawSocketIO


async def raw_orders_socket(live: Live, token: str, **kw: Any) -> aiohttp.ClientWebSocketResponse:
    """A websocket speaking Engine.IO v4 / Socket.IO v5 by hand, joined to /orders."""
    ws: aiohttp.ClientWebSocketResponse = await live.http.session.ws_connect(
        f"ws://127.0.0.1:{live.port}/socket.io/?EIO=4&transport=websocket", **kw)
    opening = await ws.receive_str(timeout=5)
    assert opening.startswith("0{")
    await ws.send_str('40/orders,' + json.dumps({"token": token}))
    joined = await ws.receive_str(timeout=5)
    assert joined.startswith('40/orders,{"sid"'), joined
    return ws


async def next_ack(ws: aiohttp.ClientWebSocketResponse, ack_id: int) -> Any:
    prefix = f"43/orders,{ack_id}"
    while True:
        msg = await ws.receive_str(timeout=5)
        if msg == "2":  # engine.io ping
            await ws.send_str("3")
            continue
        if msg.startswith(prefix):
            return json.loads(msg[len(prefix):])[0]


async def test_binary_event_is_refused_and_connection_survives(live: Live) -> None:
    ws = await raw_orders_socket(live, live.token("agent"))
    # An engine.io message (4) carrying a BINARY_EVENT (5) announcing one attachment,
    # then the attachment itself.
    await ws.send_str('451-/orders,1["subscribe",{"_placeholder":true,"num":0}]')
    await ws.send_bytes(b"\x00" * 1000)
    reply = await next_ack(ws, 1)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    assert "binary" in reply["error"]["message"]
    # Many announced attachments are not buffered either: the socket still works.
    await ws.send_str('45100-/orders,2["subscribe",{}]')
    assert (await next_ack(ws, 2))["error"]["code"] == "invalid"
    await ws.send_str('42/orders,3["subscribe",{"order_id":"no-such-order"}]')
    assert (await next_ack(ws, 3))["error"]["code"] == "not_found"
    await ws.close()


@pytest.mark.parametrize("packet", [
    '42/orders,4{"not":"a list"}',
    '42/orders,4[]',
    '42/orders,4[123,{}]',
    '42/orders,4["subscribe",{"order_id":',  # truncated JSON
])
async def test_malformed_event_packets(live: Live, packet: str) -> None:
    ws = await raw_orders_socket(live, live.token("agent"))
    await ws.send_str(packet)
    await ws.send_str('42/orders,5["subscribe",{"order_id":"no-such-order"}]')
    assert (await next_ack(ws, 5))["error"]["code"] == "not_found"
    await ws.close()


async def test_malformed_event_with_ack_gets_invalid(live: Live) -> None:
    ws = await raw_orders_socket(live, live.token("agent"))
    await ws.send_str('42/orders,7[42]')
    assert (await next_ack(ws, 7))["error"]["code"] == "invalid"
    await ws.close()


async def test_websocket_refuses_permessage_deflate(live: Live) -> None:
    # Browsers always offer it; the server must not accept it.
    ws = await live.http.session.ws_connect(
        f"ws://127.0.0.1:{live.port}/socket.io/?EIO=4&transport=websocket", compress=15)
    assert ws.compress == 0
    await ws.close()


async def test_oversized_frame_is_refused(live: Live) -> None:
    ws = await raw_orders_socket(live, live.token("agent"))
    await ws.send_str('42/orders,1["subscribe",{"order_id":"' + "x" * (70 * 1024) + '"}]')
    msg = await ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    # The server itself is unharmed.
    client = await live.client("agent")
    assert (await client.call("subscribe", {"order_id": "nope"}))["error"]["code"] == "not_found"


async def polling_handshake(live: Live, origin: str | None) -> aiohttp.ClientResponse:
    headers = {"Origin": origin} if origin else {}
    async with live.http.session.get(
        f"{live.url}/socket.io/?EIO=4&transport=polling", headers=headers) as resp:
        await resp.read()
        return resp


async def test_origin_allowlist(start_app: StartApp) -> None:
    live = await start_app(cors_origins=["https://app.example.com"])
    assert (await polling_handshake(live, "https://evil.example.com")).status == 400
    allowed = await polling_handshake(live, "https://app.example.com")
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    # The server's own pages (same origin) and native clients (no Origin) are admitted.
    assert (await polling_handshake(live, live.url)).status == 200
    assert (await polling_handshake(live, None)).status == 200


def raw_settings(**raw: Any) -> Settings:
    """Settings from raw values: `cors_origins` as text, the way the environment
    gives it (the field holds a list; its validator splits the text)."""
    return Settings(jwt_secret=JWT_SECRET, **raw)


def test_wildcard_origin_needs_dev_mode() -> None:
    with pytest.raises(ValidationError):
        raw_settings(cors_origins="*")
    assert raw_settings(cors_origins="*", dev=True).cors_origins == ["*"]
    parsed = raw_settings(cors_origins="https://a.example, https://b.example/")
    assert parsed.cors_origins == ["https://a.example", "https://b.example"]


def test_short_secret_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(jwt_secret="short")


@pytest.mark.parametrize("name", ["connect", "disconnect", "connect_error", "disconnecting"])
async def test_reserved_event_names_are_refused(live: Live, name: str) -> None:
    order = await live.create_order()
    customer = await live.client("customer", order["customer_id"])
    forged = {"QUERY_STRING": ""}
    reply = await customer.call(name, forged)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    # Still the same authenticated user, still connected.
    data = await customer.ok("subscribe", {"order_id": order["order_id"]})
    assert data["order"]["order_id"] == order["order_id"]


async def test_websocket_sessions_are_pinged_every_interval_and_dropped_when_silent(
        start_app: StartApp) -> None:
    """Pings of a websocket session come from a timer, not a task per socket
    (realtime/transport/sio.py): one every interval for as long as the client answers;
    a client that stops answering is closed after interval + timeout."""
    # Whole seconds: python-engineio advertises the interval truncated to them.
    live = await start_app(ping_interval_s=1.0, ping_timeout_s=1.0)
    raw = await RawSocketIO.open(live.http.session, live.url)
    assert raw.open_packet["pingInterval"] == 1000
    kind, data = await raw.connect_ns("/orders", json.dumps({"token": live.token("admin")}))
    assert kind == "connect", data
    loop = asyncio.get_running_loop()
    pings, end = 0, loop.time() + 3.5
    while loop.time() < end:
        msg = await raw.ws.receive(timeout=2.0)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        if msg.data == "2":
            pings += 1
            await raw.ws.send_str("3")
    assert 3 <= pings <= 4, pings  # one a second
    [reply] = await raw.call("/orders", 1, '["subscribe",{"order_id":"nope"}]')
    assert reply["ok"] is False and reply["error"]["code"] == "not_found"
    # Silent from here on: the server closes the session (a timeout fails the test).
    started = loop.time()
    while True:
        msg = await raw.ws.receive(timeout=5.0)
        if msg.type != aiohttp.WSMsgType.TEXT:  # unanswered pings until then
            break
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    assert loop.time() - started < 3.0  # interval + timeout, and the timer's slack


async def test_a_websocket_session_keeps_no_copy_of_its_handshake(start_app: StartApp) -> None:
    """Once open, a websocket session holds neither every request header
    under a WSGI key nor aiohttp's request, its headers or its request
    handler: the connection is handed to the link (realtime/transport/sio.py,
    realtime/transport/wsdirect.py). And it still works: a namespace connects, refuses
    a token in the query string, and events are answered."""
    from realtime.transport.sio import ENVIRON_KEPT

    live = await start_app()
    sio = live.app[CTX].sio
    headers = {"X-Long-Header": "x" * 2000, "Cookie": "session=" + "y" * 2000}
    raw = await RawSocketIO.open(live.http.session, live.url, headers=headers)
    [environ] = [e for sid, e in sio.environ.items() if sid == raw.sid]
    assert set(environ) <= set(ENVIRON_KEPT) and "HTTP_HOST" in environ, sorted(environ)
    assert "HTTP_COOKIE" not in environ and "HTTP_X_LONG_HEADER" not in environ
    link = sio.eio.sockets[raw.sid].link
    assert type(link.transport.get_protocol()).__name__ == "_LinkProtocol"
    gc.collect()
    held = [o for o in gc.get_objects()
            if isinstance(o, web.BaseRequest) and "X-Long-Header" in o.headers]
    assert held == [], held
    assert not any(isinstance(o, web_protocol.RequestHandler) and o.transport is link.transport
                   for o in gc.get_objects())
    kind, data = await raw.connect_ns("/orders", json.dumps({"token": live.token("admin")}))
    assert kind == "connect", data
    await raw.close()

    leaky = await RawSocketIO.open(live.http.session, live.url, query="&token=abc")
    kind, data = await leaky.connect_ns("/orders", json.dumps({"token": live.token("admin")}))
    assert kind == "connect_error" and "query string" in data["message"], data
    await leaky.close()


async def test_an_open_websocket_session_holds_no_task(start_app: StartApp) -> None:
    """Once its handshake is done, a session has no task at all: not aiohttp's
    two (connection, request handler), no Engine.IO writer task, no task
    asleep until the next ping (realtime/transport/sio.py, realtime/transport/wsdirect.py)."""
    live = await start_app()
    sockets = []

    async def connect(n: int) -> set[asyncio.Task[Any]]:
        for _ in range(n):
            raw = await RawSocketIO.open(live.http.session, live.url)
            kind, data = await raw.connect_ns("/orders", json.dumps({"token": live.token("admin")}))
            assert kind == "connect", data
            sockets.append(raw)
        return asyncio.all_tasks()  # a session's tasks start before its connect is answered

    first = await connect(5)  # the server's own one-off tasks start with the first
    # The driver's tasks of a store operation under way (the outbox relay and the
    # feedback sweep poll the store in the background) belong to that operation,
    # not to a session: any task whose coroutine is PyMongo's own is left out.
    new = [t.get_coro() for t in await connect(5) - first]
    named = [c.__qualname__ for c in new  # type: ignore[union-attr]
             if "/pymongo/" not in getattr(getattr(c, "cr_code", None), "co_filename", "")]
    assert named == [], sorted(named)
    for raw in sockets:
        await raw.close()


class Polling:
    """A long-polling Engine.IO v4 session driven by hand, joined to /orders."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.sid = ""

    @property
    def url(self) -> str:
        return f"{self.live.url}/socket.io/?EIO=4&transport=polling&sid={self.sid}"

    async def open(self) -> None:
        async with self.live.http.session.get(f"{self.live.url}/socket.io/?EIO=4&transport=polling") as r:
            body = await r.text()
        assert body.startswith("0{"), body
        self.sid = json.loads(body[1:])["sid"]
        await self.post('40/orders,' + json.dumps({"token": self.live.token("admin")}))
        joined = await self.get()
        assert joined.startswith('40/orders,{"sid"'), joined

    async def get(self) -> str:
        async with self.live.http.session.get(self.url) as r:
            return await r.text()

    async def post(self, body: str) -> int:
        async with self.live.http.session.post(self.url, data=body.encode()) as r:
            await r.read()
            return r.status


async def test_a_refused_polling_post_ends_the_session_with_close_on_the_pending_get(live: Live) -> None:
    """A POST over the 64 KiB limit is refused and ends its session: the
    client's pending long-poll GET is answered with the CLOSE packet (not an
    empty answer that leaves the CLOSE, and the POST's request, waiting for a
    GET that will not come), and the POST is answered at once."""
    polling = Polling(live)
    await polling.open()
    pending = asyncio.create_task(polling.get())
    queue = live.app[CTX].sio.eio.sockets[polling.sid].queue
    await until(lambda: asyncio.sleep(0, bool(queue._getters)), 5.0, every=0.01,
                what="the GET waiting on the server")
    status = await asyncio.wait_for(polling.post("4" + "x" * (70 * 1024)), 3.0)
    assert status == 400
    assert await asyncio.wait_for(pending, 3.0) == "1"  # CLOSE
    assert polling.sid not in live.app[CTX].sio.eio.sockets


async def test_a_refused_polling_post_is_answered_when_no_get_takes_the_close(live: Live) -> None:
    """The same with no GET pending (a client that gave up): the POST is
    answered once the bounded wait for the client's next GET is over, and
    the session is gone."""
    from realtime.transport.sio import POLL_CLOSE_WAIT_S

    polling = Polling(live)
    await polling.open()
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = await asyncio.wait_for(polling.post("4" + "x" * (70 * 1024)), POLL_CLOSE_WAIT_S + 3.0)
    assert status == 400
    assert loop.time() - started >= POLL_CLOSE_WAIT_S - 0.5  # it did wait for a GET
    assert polling.sid not in live.app[CTX].sio.eio.sockets
    async with live.http.session.get(polling.url) as r:
        assert r.status == 400  # no such session
