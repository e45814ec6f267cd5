"""Chat hardening (issue 14, items 3 and 8): read markers never use a user id
as a MongoDB field name, and chat sends are rate limited per user and per
conversation (docs/protocol.md, Support chat).

Real components only: live apps on both engines, real Socket.IO clients, the
real store and redis-server. Limits that must not refill during a test run at
a tiny rate (0.01 tokens/s: one token per 100 s), so the counts asserted are
exact without depending on timing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from pymongo import AsyncMongoClient
from redis import asyncio as aioredis

from realtime.settings import Settings
from storage.chat import MongoChatStore
from storage.redis.rate_limits import shared_limiter
from tests.cluster_harness import RestartableRedis
from tests.conftest import JWT_SECRET, Live, StartApp
from tests.harness import Client, MongoServer, server_errors, uid, until

NS = "/chat"
SLOW = 0.01  # tokens per second: nothing refills while a test runs


@pytest.fixture(autouse=True)
def _no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Odd ids and floods are answered, never logged as a crash."""
    yield
    bad = server_errors(caplog.get_records("setup") + caplog.get_records("call"))
    assert not bad, "server logged errors:\n" + "\n".join(
        f"{r.levelname} {r.name}: {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}" for r in bad)


async def connect(live: Live, role: str, sub: str) -> Client:
    return await live.client(role, sub, namespace=NS)


def payload(cid: str, body: str, cmid: str | None = None) -> dict[str, Any]:
    return {"conversation_id": cid, "client_msg_id": cmid or uid("m-"), "body": body}


async def send(c: Client, cid: str, body: str, cmid: str | None = None) -> dict[str, Any]:
    return dict((await c.ok("send", payload(cid, body, cmid)))["message"])


async def next_conversation(c: Client, cid: str, status: str) -> dict[str, Any]:
    while True:
        conv = await c.next("conversation")
        if conv["conversation_id"] == cid and conv["status"] == status:
            return dict(conv)


async def open_assigned(cust: Client, agent: Client, agent_id: str) -> str:
    cid = (await cust.ok("open", {"kind": "support"}))["conversation"]["conversation_id"]
    await agent.ok("set_status", {"status": "available"})
    assert (await next_conversation(agent, cid, "assigned"))["assignee"] == agent_id
    await next_conversation(cust, cid, "assigned")
    return str(cid)


async def until_marker(c: Client, cmid: str) -> list[dict[str, Any]]:
    """Messages pushed to c before the marker (which proves nothing else was queued)."""
    seen = []
    while (msg := await c.next("message"))["client_msg_id"] != cmid:
        seen.append(msg)
    return seen


def marker(conv: dict[str, Any]) -> tuple[int, int]:
    assert conv["unread"] == conv["last_seq"] - conv["last_read_seq"], conv
    assert "read" not in conv and "reads" not in conv
    return conv["last_read_seq"], conv["unread"]


def listed(listing: dict[str, Any], cid: str) -> tuple[int, int]:
    return marker(next(c for c in listing["conversations"] if c["conversation_id"] == cid))


def assert_rate_limited(reply: dict[str, Any]) -> None:
    assert reply["ok"] is False, reply
    err = reply["error"]
    assert set(err) == {"code", "message", "details", "retry_after_ms"}, err
    assert err["code"] == "rate_limited"
    assert isinstance(err["retry_after_ms"], int) and err["retry_after_ms"] > 0
    assert err["details"] == {"retry_after_ms": err["retry_after_ms"]}


async def metric(live: Live, name: str, **labels: str) -> float:
    """A sample of /metrics, matched on its name and all its labels (in any order)."""
    async with live.http.session.get(live.url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if m and m[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', m[2])) == labels:
            return float(m[3])
    return 0.0


# -- read markers with ids that are not field names ------------------------------------------

# (customer id, agent id, who marks first). `c1` / `c1.x`: the agent's id extends the
# customer's as a MongoDB path would, and the other way round; `john.doe@x.com`: a
# dotted id. Ids a token may not carry (`$`, NUL: realtime/auth.py) are stored the
# same way: test_store_markers_for_any_string_id.
ID_CASES = [
    ("c1", "c1.x", "agent"),
    ("c1", "c1.x", "customer"),
    ("c2.x", "c2", "agent"),
    ("john.doe@x.com", "ops.agent@x.com", "customer"),
]


@pytest.mark.parametrize(("cust_id", "agent_id", "first"), ID_CASES)
async def test_read_markers_work_and_are_isolated_for_odd_ids(
        start_app: StartApp, cust_id: str, agent_id: str, first: str) -> None:
    live = await start_app(mongo_db=uid("reads_"))
    cust = await connect(live, "customer", cust_id)
    agent = await connect(live, "agent", agent_id)
    cid = await open_assigned(cust, agent, agent_id)
    for i in range(3):
        await send(agent, cid, f"第 {i + 1} 条")
    assert [m["seq"] for m in [await cust.next("message") for _ in range(3)]] == [1, 2, 3]

    marks = {"agent": (agent, 3), "customer": (cust, 2)}
    for who in (first, *(w for w in marks if w != first)):
        c, seq = marks[who]
        mark = {"conversation_id": cid, "seq": seq}
        assert await c.ok("read", mark) == mark

    # Each user sees their own marker everywhere a conversation is shown to them.
    assert listed(await cust.ok("list", {}), cid) == (2, 1)
    assert listed(await agent.ok("list", {}), cid) == (3, 0)
    assert marker((await cust.ok("join", {"conversation_id": cid}))["conversation"]) == (2, 1)
    assert marker((await agent.ok("join", {"conversation_id": cid}))["conversation"]) == (3, 0)
    reopened = (await cust.ok("open", {"kind": "support"}))["conversation"]
    assert reopened["conversation_id"] == cid and marker(reopened) == (2, 1)
    # Only forward, each on its own.
    assert (await cust.ok("read", {"conversation_id": cid, "seq": 1}))["seq"] == 2
    assert (await agent.ok("read", {"conversation_id": cid, "seq": 1}))["seq"] == 3
    # A new message is unread for the customer until they read it; never past last_seq.
    await send(agent, cid, "还在吗？")
    assert listed(await cust.ok("list", {}), cid) == (2, 2)
    assert (await cust.ok("read", {"conversation_id": cid, "seq": 99}))["seq"] == 4
    assert listed(await cust.ok("list", {}), cid) == (4, 0)
    assert listed(await agent.ok("list", {}), cid) == (3, 1)


async def test_order_chat_markers_for_a_technician_whose_id_extends_the_customers(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("reads_"))
    cust_id, tech_id = "t", "t.1"
    cust = await connect(live, "customer", cust_id)
    tech = await connect(live, "technician", tech_id)
    order = await live.create_order(cust_id)
    await live.assign(order["order_id"], tech_id)
    cid = f"order:{order['order_id']}"
    conv = (await tech.ok("open", {"kind": "order", "order_id": order["order_id"]}))["conversation"]
    assert marker(conv) == (0, 2)  # the timeline's two cards
    await send(cust, cid, "师傅好")
    assert (await tech.ok("read", {"conversation_id": cid, "seq": 3}))["seq"] == 3
    assert (await cust.ok("read", {"conversation_id": cid, "seq": 1}))["seq"] == 1
    assert listed(await tech.ok("list", {}), cid) == (3, 0)
    assert listed(await cust.ok("list", {}), cid) == (1, 2)
    opened = (await cust.ok("open", {"kind": "order", "order_id": order["order_id"]}))["conversation"]
    assert marker(opened) == (1, 2)


async def test_store_markers_for_any_string_id(mongo_server: MongoServer) -> None:
    """Any string is a user id to the store, also what tokens may not carry (`$`, NUL)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_server.url)
    try:
        store = MongoChatStore(client, client[uid("reads_")])
        await store.ensure_indexes()
        convs = []
        for _ in range(2):
            conv, _ = await store.insert_open({
                "conversation_id": uid("s-"), "kind": "support", "status": "open",
                "customer_id": "c1", "last_seq": 10, "updated_ts": 1})
            convs.append(conv["conversation_id"])
        a, b = convs
        ids = ["c1.x", "c1", "c1.x.y", "a.b$c", "$max", "n\x00ul", "read", "_id", "."]
        for i, user in enumerate(ids):
            assert await store.set_read(a, user, i + 1) == i + 1
        assert await store.set_read(a, "c1", 1) == 2  # only forward
        for i, user in enumerate(ids):
            assert await store.read_markers(user, [a, b]) == {a: i + 1}
        assert await store.set_read(b, "n\x00ul", 7) == 7
        assert await store.read_markers("n\x00ul", [a, b]) == {a: 6, b: 7}
        assert await store.read_markers("nobody", [a, b]) == {}
        # Concurrent first markers of one user: one record, the highest wins.
        got = await asyncio.gather(*(store.set_read(b, "race", s) for s in range(1, 9)))
        assert max(got) == 8 and await store.read_markers("race", [b]) == {b: 8}
    finally:
        await client.close()


# -- send rate limits --------------------------------------------------------------------------

async def test_a_flooding_socket_stores_its_burst_and_is_refused_the_rest(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("flood_"), chat_send_rate=SLOW)
    burst = 20  # the default
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(live, "customer", cust_id)
    agent = await connect(live, "agent", agent_id)
    agent_tab = await connect(live, "agent", agent_id)
    cid = await open_assigned(cust, agent, agent_id)

    replies = await asyncio.gather(*(cust.call("send", payload(cid, f"刷屏 {i}", f"f-{i}"))
                                     for i in range(100)))
    stored = [r["data"]["message"] for r in replies if r["ok"]]
    refused = [r for r in replies if not r["ok"]]
    assert len(stored) == burst and len(refused) == 100 - burst
    for r in refused:
        assert_rate_limited(r)
    assert sorted(m["seq"] for m in stored) == list(range(1, burst + 1))

    # Another user is not limited by this one (the agent's send is the marker).
    await send(agent_tab, cid, "请慢一点", "agent-marker")
    got = await until_marker(agent, "agent-marker")
    assert [m["seq"] for m in got] == list(range(1, burst + 1))
    assert {m["id"] for m in got} == {m["id"] for m in stored}

    # Refused sends stored nothing, and a retry of a stored message while limited is
    # refused too (every attempt spends a token; docs/protocol.md).
    status, reply = await live.http.request(
        "GET", f"/api/conversations/{cid}/messages?limit=1000", live.token("service"))
    assert status == 200, reply
    assert len(reply["data"]["messages"]) == burst + 1
    assert_rate_limited(await cust.call("send", payload(cid, "刷屏 0", stored[0]["client_msg_id"])))
    assert len((await agent.ok("join", {"conversation_id": cid}))["messages"]) == burst + 1
    assert await metric(live, "realtime_acks_total", namespace="/chat", event="send",
                        code="rate_limited") == 100 - burst + 1


async def test_the_conversation_cap_counts_all_senders_and_not_outsiders(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("flood_"), chat_conversation_rate=SLOW, chat_conversation_burst=10)
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(live, "customer", cust_id)
    agent = await connect(live, "agent", agent_id)
    cid = await open_assigned(cust, agent, agent_id)

    # Someone who may not post spends nothing of the conversation's allowance.
    outsider = await connect(live, "customer", uid("c-"))
    for r in await asyncio.gather(*(outsider.call("send", payload(cid, "骚扰")) for _ in range(12))):
        # Not theirs: as if it did not exist (docs/protocol.md, "who is told what").
        assert r["ok"] is False and r["error"]["code"] == "not_found", r

    replies = await asyncio.gather(*(c.call("send", payload(cid, f"{i}")) for i in range(8)
                                     for c in (cust, agent)))
    stored = [r["data"]["message"] for r in replies if r["ok"]]
    assert len(stored) == 10
    for r in replies:
        if not r["ok"]:
            assert_rate_limited(r)
    assert sorted(m["seq"] for m in stored) == list(range(1, 11))
    assert {m["sender"]["id"] for m in stored} == {cust_id, agent_id}

    # Another conversation of the same agent has its own allowance.
    other_id = uid("c-")
    other = await connect(live, "customer", other_id)
    ocid = (await other.ok("open", {"kind": "support"}))["conversation"]["conversation_id"]
    await next_conversation(other, ocid, "assigned")
    assert (await send(agent, ocid, "您好"))["seq"] == 1
    assert (await send(other, ocid, "你好"))["seq"] == 2


async def test_order_timeline_cards_are_never_limited(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("flood_"), chat_conversation_rate=SLOW, chat_conversation_burst=2)
    cust_id, tech_id = uid("c-"), uid("t-")
    cust = await connect(live, "customer", cust_id)
    order = await live.create_order(cust_id)
    oid, cid = order["order_id"], f"order:{order['order_id']}"
    await live.assign(oid, tech_id)
    await cust.ok("open", {"kind": "order", "order_id": oid})
    await send(cust, cid, "一")
    await send(cust, cid, "二")
    assert_rate_limited(await cust.call("send", payload(cid, "三")))
    for state in ("en_route", "arrived"):
        status, reply = await live.post_event(oid, state)
        assert status == 200, reply
    joined = await cust.ok("join", {"conversation_id": cid})
    assert [(m["seq"], m["kind"]) for m in joined["messages"]] == [
        (1, "system"), (2, "system"), (3, "text"), (4, "text"), (5, "system"), (6, "system")]


@pytest.mark.parametrize("engine", ["redis"])
async def test_limits_are_shared_by_the_nodes_of_a_cluster(start_app: StartApp, engine: str) -> None:
    db = uid("flood_")
    a = await start_app(mongo_db=db, chat_send_rate=SLOW, chat_send_burst=12)
    b = await start_app(mongo_db=db, chat_send_rate=SLOW, chat_send_burst=12)
    cust_id, agent_id = uid("c-"), uid("a-")
    cust_a = await connect(a, "customer", cust_id)
    cust_b = await connect(b, "customer", cust_id)
    agent = await connect(a, "agent", agent_id)
    cid = await open_assigned(cust_a, agent, agent_id)

    replies = await asyncio.gather(*(c.call("send", payload(cid, f"{i}")) for i in range(10)
                                     for c in (cust_a, cust_b)))
    assert sum(1 for r in replies if r["ok"]) == 12
    for r in replies:
        if not r["ok"]:
            assert_rate_limited(r)


async def test_while_redis_is_away_each_node_limits_from_its_own_memory() -> None:
    """Two nodes share a bucket in Redis; with Redis gone each answers from its own
    buckets (sends go on, limited per node); with Redis back they share again."""
    redis = RestartableRedis()
    client = aioredis.Redis.from_url(redis.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        prefix = uid("rl:")
        a, b = (shared_limiter(client, prefix, SLOW, 3) for _ in range(2))
        assert [await a.take("u"), await b.take("u"), await a.take("u")] == [0, 0, 0]
        assert await b.take("u") > 0 and await a.take("u") > 0
        assert await a.take("someone-else") == 0

        await asyncio.to_thread(redis.stop)
        assert [await a.take("u") for _ in range(3)] == [0, 0, 0]
        assert await a.take("u") > 0
        assert await b.take("u") == 0  # b's own bucket

        await asyncio.to_thread(redis.start)  # empty: full buckets
        # a's own bucket is spent: a token for a now comes from Redis.
        await until(lambda: _is_zero(a.take("u")), timeout=10, what="the limiter to use Redis again")
        c = shared_limiter(client, prefix, SLOW, 3)  # a third node
        assert [await c.take("u"), await c.take("u")] == [0, 0]
        assert await c.take("u") > 0
    finally:
        await client.aclose()
        redis.stop()


async def _is_zero(wait: Awaitable[int]) -> bool:
    return await wait == 0


def test_settings_defaults_bounds_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(jwt_secret=JWT_SECRET)
    assert (s.chat_send_rate, s.chat_send_burst, s.chat_conversation_rate, s.chat_conversation_burst) \
        == (2.0, 20.0, 10.0, 50.0)
    out_of_bounds: tuple[tuple[str, Any], ...] = (
        ("chat_send_rate", 0), ("chat_send_rate", -1), ("chat_send_burst", 0.5),
        ("chat_conversation_rate", 0), ("chat_conversation_burst", 0),
        ("chat_send_rate", 1e9), ("chat_conversation_burst", 1e9))
    for field, bad in out_of_bounds:
        with pytest.raises(ValidationError):
            Settings(jwt_secret=JWT_SECRET, **{field: bad})
    monkeypatch.setenv("REALTIME_CHAT_SEND_RATE", "0.5")
    monkeypatch.setenv("REALTIME_CHAT_SEND_BURST", "5")
    monkeypatch.setenv("REALTIME_CHAT_CONVERSATION_RATE", "4")
    monkeypatch.setenv("REALTIME_CHAT_CONVERSATION_BURST", "8")
    s = Settings(jwt_secret=JWT_SECRET)
    assert (s.chat_send_rate, s.chat_send_burst, s.chat_conversation_rate, s.chat_conversation_burst) \
        == (0.5, 5.0, 4.0, 8.0)
