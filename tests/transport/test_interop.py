"""Interop: the official JavaScript socket.io-client (tests/interop, Node) against
the live server, over websocket and over long-polling."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest

from tests.conftest import Live, StartApp
from tests.harness import uid
from tests.node_client import NodeOrdersClient

StartNode = Callable[..., Awaitable[NodeOrdersClient]]

# A long-polling client that closes its session leaves its pending GET open on
# this server until ping_interval + ping_timeout has passed (see
# test_js_polling_client_close_releases_pending_poll); app teardown then waits for
# that request. The polling runs below use short ping settings to keep that wait
# at ~2 s instead of 45 s; the bug itself is asserted by that test.
SHORT_PINGS = {"ping_interval_s": 1.0, "ping_timeout_s": 1.0}


@pytest.fixture(params=["websocket", "polling"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def app(start_app: StartApp, transport: str) -> Live:
    """The live app, for the JS client on `transport`."""
    return await start_app(**(SHORT_PINGS if transport == "polling" else {}))


@pytest.fixture
async def node_client() -> AsyncIterator[StartNode]:
    # NodeOrdersClient.start fails the test (no skip) if node or node_modules is missing.
    started: list[NodeOrdersClient] = []

    async def start(*args: Any, **kw: Any) -> NodeOrdersClient:
        client = await NodeOrdersClient.start(*args, **kw)
        started.append(client)
        return client

    yield start
    for client in started:
        await client.close()


async def test_js_client_subscribes_and_receives_order_events(
        app: Live, node_client: StartNode, transport: str) -> None:
    live = app
    order = await live.create_order()
    order_id, technician = order["order_id"], uid("tech-")
    client = await node_client(live.url, live.token("customer", order["customer_id"]), order_id,
                               transport=transport, count=2)

    connected = await client.expect("connect")
    assert connected["transport"] == transport
    reply = (await client.expect("subscribe"))["reply"]
    assert reply["ok"] is True, reply
    assert reply["data"]["order"]["order_id"] == order_id
    assert reply["data"]["order"]["state"] == "created"
    assert reply["data"]["order"]["seq"] == 1
    assert [(e["seq"], e["state"]) for e in reply["data"]["events"]] == [(1, "created")]

    # Only now that the JS client is subscribed does the order change.
    await live.assign(order_id, technician)
    event = (await client.expect("order_event"))["event"]
    assert event["order_id"] == order_id
    assert (event["seq"], event["type"], event["state"]) == (2, "state_changed", "assigned")
    assert event["data"]["technician_id"] == technician
    assert event["actor"]["role"] == "service"
    assert isinstance(event["ts"], int)

    status, body = await live.post_event(order_id, "en_route")
    assert status == 200, body
    event = (await client.expect("order_event"))["event"]
    # Subscribed *and* the order's customer: seq 3 next, never seq 2 again.
    assert (event["seq"], event["state"]) == (3, "en_route")

    assert await client.expect("done") == {"type": "done", "received": 2}
    assert await client.exit_code() == 0
    if transport == "websocket":
        assert client.stderr == ""  # closed promptly (polling: see the test at the end)


async def test_js_client_since_seq_replays_only_newer_events(
        app: Live, node_client: StartNode, transport: str) -> None:
    live = app
    order = await live.create_order()
    order_id = order["order_id"]
    await live.assign(order_id, uid("tech-"))
    client = await node_client(live.url, live.token("agent"), order_id,
                               transport=transport, count=0, since_seq=1)
    await client.expect("connect")
    reply = (await client.expect("subscribe"))["reply"]
    assert reply["ok"] is True, reply
    assert [(e["seq"], e["state"]) for e in reply["data"]["events"]] == [(2, "assigned")]
    assert reply["data"]["order"]["seq"] == 2
    assert await client.expect("done") == {"type": "done", "received": 0}
    assert await client.exit_code() == 0


def _foreign_token() -> str:
    """Well-formed, unexpired, but signed with a secret the server does not have."""
    claims = {"sub": "c-1", "role": "customer", "exp": int(time.time()) + 600}
    return jwt.encode(claims, "not-the-server-secret-0123456789abcdef", algorithm="HS256")


@pytest.mark.parametrize("token", ["not-a-jwt", "foreign"])
async def test_js_client_bad_token_gets_connect_error(
        app: Live, node_client: StartNode, transport: str, token: str) -> None:
    live = app
    order = await live.create_order()
    bad = _foreign_token() if token == "foreign" else token
    client = await node_client(live.url, bad, order["order_id"], transport=transport)

    line = await client.expect("connect_error")
    assert isinstance(line["message"], str) and line["message"]
    data = line["data"]
    assert isinstance(data, dict), line
    assert set(data) == {"code", "message"}, data
    assert data["code"] == "unauthorized"
    assert isinstance(data["message"], str) and data["message"]
    assert await client.exit_code() == 1


async def test_js_polling_client_close_releases_pending_poll(
        start_app: StartApp, node_client: StartNode) -> None:
    """A long-polling client always has a GET waiting at the server. When the client
    closes (engine.io CLOSE packet), the server must answer that GET at once, as
    the reference engine.io server does; otherwise the client (a Node process here)
    cannot finish and the server holds the request until ping_interval + ping_timeout.

    Pings of 5 s + 5 s: long enough that a held GET outlives the script's 3 s
    close grace, short enough that app teardown does not wait 45 s if it does."""
    live = await start_app(ping_interval_s=5.0, ping_timeout_s=5.0)
    order = await live.create_order()
    client = await node_client(live.url, live.token("customer", order["customer_id"]),
                               order["order_id"], transport="polling", count=0)
    assert (await client.expect("connect"))["transport"] == "polling"
    assert (await client.expect("subscribe"))["reply"]["ok"] is True
    await client.expect("done")
    assert await client.exit_code() == 0
    assert "forced exit" not in client.stderr, (
        "after socket.disconnect() over long-polling, the server kept the client's pending "
        f"GET open; stderr: {client.stderr.strip()}")
