"""Chat under failure and misuse: a store outage, bad payloads, who may do
what, feedback, sessions ending as the server stops."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chat.wire import (
    NS,
    connect,
    open_assigned,
    payload,
    send,
    transcript,
    until_marker,
)
from tests.conftest import Live, app_on
from tests.harness import (
    Client,
    MongoServer,
    RedisServer,
    free_port,
    stop_process,
    uid,
    wait_port,
)
from tests.wire import assert_error

# -- store outage -----------------------------------------------------------------------------

class PinnedStore:
    """A SecantusDB process on a fixed port and data dir, so that it can be stopped
    and started again where the app expects it, with the same data."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        exe = Path(sys.executable).parent / "secantusd-py"
        self.proc = subprocess.Popen(
            [str(exe), "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", str(self.storage), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None


async def test_store_outage_unavailable_then_retries_store_each_message_once() -> None:
    store = PinnedStore(Path(tempfile.mkdtemp(prefix="chat-store-")))
    await asyncio.to_thread(store.start)
    try:
        async with app_on(store.url, mongo_db="chat_outage", mongo_timeout_ms=500) as live:
            await outage_scenario(live, store)
    finally:
        await asyncio.to_thread(store.stop)


async def outage_scenario(live: Live, store: PinnedStore) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(live, "customer", cust_id)
    agent = await connect(live, "agent", agent_id)
    cid = await open_assigned(live, cust, agent, agent_id)
    await send(cust, cid, "第一条", "out-1")
    await send(agent, cid, "收到", "out-2")

    await asyncio.to_thread(store.stop)
    pending = [(cust, "out-3"), (cust, "out-4"), (agent, "out-5"), (cust, "out-6")]
    t0 = time.monotonic()
    replies = await asyncio.gather(*(c.call("send", payload(cid, f"断库时 {m}", m), timeout=8)
                                     for c, m in pending))
    elapsed = time.monotonic() - t0
    for r in replies:
        assert_error(r, "unavailable")
    assert elapsed < 5.0, f"unavailable took {elapsed:.1f}s"
    assert_error(await cust.call("join", {"conversation_id": cid}, timeout=8), "unavailable")
    # The connection survives the outage.
    assert cust.sio.connected and agent.sio.connected

    await asyncio.to_thread(store.start)
    deadline = time.monotonic() + 30
    results: dict[str, dict[str, Any]] = {}
    while len(results) < len(pending):
        assert time.monotonic() < deadline, f"still failing after the restart: {results.keys()}"
        for c, m in pending:
            if m in results:
                continue
            r = await c.call("send", payload(cid, f"断库时 {m}", m), timeout=8)
            if r["ok"]:
                results[m] = r["data"]["message"]
            else:
                assert r["error"]["code"] == "unavailable", r
        if len(results) < len(pending):
            await asyncio.sleep(0.2)  # pacing retries against a restarting store
    # Retried again: the same stored message.
    for c, m in pending:
        again = await c.ok("send", payload(cid, f"断库时 {m}", m))
        assert again["message"] == results[m]

    status, reply = await transcript(live, cid)
    assert status == 200, reply
    msgs = reply["data"]["messages"]
    assert [m["seq"] for m in msgs] == list(range(1, 7))
    assert sorted(m["client_msg_id"] for m in msgs) == [f"out-{i}" for i in range(1, 7)]
    assert reply["data"]["conversation"]["last_seq"] == 6
    # The agent saw each of the customer's messages exactly once (out-1 live, the
    # others when their retry was stored), and nothing for the failed attempts.
    await send(cust, cid, "恢复了", "out-7")
    got = [m["client_msg_id"] for m in await until_marker(agent, "out-7")]
    assert got[0] == "out-1" and sorted(got) == ["out-1", "out-3", "out-4", "out-6"], got
    got = [m["client_msg_id"] for m in cust.received["message"]]
    assert sorted(got) == ["out-2", "out-5"], got


# -- bad payloads -----------------------------------------------------------------------------

NON_OBJECTS: list[Any] = ["text", 42, 1.5, True, ["a"], []]
EVENTS = ["open", "send", "join", "leave", "history", "typing", "read", "close", "rate",
          "set_status", "transfer", "list"]


async def test_bad_payload_matrix_for_every_chat_event(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)
    sids = (cust.sio.get_sid(NS), agent.sio.get_sid(NS))
    missing = "s-does-not-exist"

    async def bad(c: Client, event: str, data: Any, code: str = "invalid",
                  fields: set[str] | None = None) -> None:
        reply = await c.call(event, data, timeout=5)
        assert_error(reply, code, fields)

    # Non-object payloads, and none at all, for every event.
    for event in EVENTS:
        c = agent if event in ("set_status", "transfer") else cust
        for data in NON_OBJECTS:
            await bad(c, event, data, fields={"(payload)"})
        if event == "list":  # takes no payload: none at all is an empty object
            assert (await c.call(event, None, timeout=5))["ok"] is True
        else:
            await bad(c, event, None)
        await bad(c, event, ({"conversation_id": cid}, {"conversation_id": cid}))
    unknown = await cust.call("frobnicate", {})
    assert "send" in assert_error(unknown, "invalid")["details"]["events"]

    text = payload(cid, "ok")
    cases: list[tuple[Client, str, dict[str, Any], str, set[str] | None]] = [
        # open
        (cust, "open", {}, "invalid", {"kind"}),
        (cust, "open", {"kind": "chat"}, "invalid", {"kind"}),
        (cust, "open", {"kind": 1}, "invalid", {"kind"}),
        (cust, "open", {"kind": "support", "topic": ""}, "invalid", {"topic"}),
        (cust, "open", {"kind": "support", "topic": "x" * 201}, "invalid", {"topic"}),
        (cust, "open", {"kind": "support", "order_id": "bad id!"}, "invalid", {"order_id"}),
        (cust, "open", {"kind": "support", "extra": 1}, "invalid", {"extra"}),
        (cust, "open", {"kind": "order", "order_id": "o-missing-000"}, "not_found", None),
        (cust, "open", {"kind": "support", "order_id": "o-missing-000"}, "not_found", None),
        # send
        (cust, "send", {k: v for k, v in text.items() if k != "conversation_id"}, "invalid",
         {"conversation_id"}),
        (cust, "send", {k: v for k, v in text.items() if k != "client_msg_id"}, "invalid",
         {"client_msg_id"}),
        (cust, "send", {k: v for k, v in text.items() if k != "body"}, "invalid", {"body"}),
        (cust, "send", {**text, "body": ""}, "invalid", {"body"}),
        (cust, "send", {**text, "body": "x" * 4001}, "invalid", {"body"}),
        (cust, "send", {**text, "body": "修" * 4001}, "invalid", {"body"}),
        (cust, "send", {**text, "body": 5}, "invalid", {"body"}),
        (cust, "send", {**text, "body": None}, "invalid", {"body"}),
        (cust, "send", {**text, "kind": "system"}, "invalid", {"kind"}),
        (cust, "send", {**text, "kind": "video"}, "invalid", {"kind"}),
        (cust, "send", {**text, "client_msg_id": ""}, "invalid", {"client_msg_id"}),
        (cust, "send", {**text, "client_msg_id": "m" * 65}, "invalid", {"client_msg_id"}),
        (cust, "send", {**text, "client_msg_id": 7}, "invalid", {"client_msg_id"}),
        (cust, "send", {**text, "conversation_id": 123}, "invalid", {"conversation_id"}),
        (cust, "send", {**text, "conversation_id": "has space"}, "invalid", {"conversation_id"}),
        (cust, "send", {**text, "seq": 3}, "invalid", {"seq"}),
        (cust, "send", {**text, "conversation_id": missing}, "not_found", None),
        # join
        (cust, "join", {}, "invalid", {"conversation_id"}),
        (cust, "join", {"conversation_id": cid, "since_seq": -1}, "invalid", {"since_seq"}),
        (cust, "join", {"conversation_id": cid, "since_seq": "3"}, "invalid", {"since_seq"}),
        (cust, "join", {"conversation_id": cid, "since_seq": 1.5}, "invalid", {"since_seq"}),
        (cust, "join", {"conversation_id": cid, "since_seq": True}, "invalid", {"since_seq"}),
        (cust, "join", {"conversation_id": cid, "x": 1}, "invalid", {"x"}),
        (cust, "join", {"conversation_id": missing}, "not_found", None),
        # leave
        (cust, "leave", {}, "invalid", {"conversation_id"}),
        (cust, "leave", {"conversation_id": cid, "x": 1}, "invalid", {"x"}),
        # history
        (cust, "history", {}, "invalid", {"conversation_id"}),
        (cust, "history", {"conversation_id": cid, "limit": 0}, "invalid", {"limit"}),
        (cust, "history", {"conversation_id": cid, "limit": 101}, "invalid", {"limit"}),
        (cust, "history", {"conversation_id": cid, "limit": "10"}, "invalid", {"limit"}),
        (cust, "history", {"conversation_id": cid, "before_seq": -1}, "invalid", {"before_seq"}),
        (cust, "history", {"conversation_id": cid, "after_seq": 1}, "invalid", {"after_seq"}),
        (cust, "history", {"conversation_id": missing}, "not_found", None),
        # typing
        (cust, "typing", {"conversation_id": cid}, "invalid", {"typing"}),
        (cust, "typing", {"conversation_id": cid, "typing": "yes"}, "invalid", {"typing"}),
        (cust, "typing", {"conversation_id": cid, "typing": 1}, "invalid", {"typing"}),
        (cust, "typing", {"conversation_id": cid, "typing": True, "x": 1}, "invalid", {"x"}),
        (cust, "typing", {"conversation_id": missing, "typing": True}, "not_found", None),
        # read
        (cust, "read", {"conversation_id": cid}, "invalid", {"seq"}),
        (cust, "read", {"conversation_id": cid, "seq": -1}, "invalid", {"seq"}),
        (cust, "read", {"conversation_id": cid, "seq": "5"}, "invalid", {"seq"}),
        (cust, "read", {"conversation_id": cid, "seq": 2**60}, "invalid", {"seq"}),
        (cust, "read", {"conversation_id": missing, "seq": 1}, "not_found", None),
        # close
        (cust, "close", {}, "invalid", {"conversation_id"}),
        (cust, "close", {"conversation_id": cid, "reason": "x"}, "invalid", {"reason"}),
        (cust, "close", {"conversation_id": missing}, "not_found", None),
        # rate
        (cust, "rate", {"conversation_id": cid}, "invalid", {"stars"}),
        (cust, "rate", {"conversation_id": cid, "stars": 0}, "invalid", {"stars"}),
        (cust, "rate", {"conversation_id": cid, "stars": 6}, "invalid", {"stars"}),
        (cust, "rate", {"conversation_id": cid, "stars": "5"}, "invalid", {"stars"}),
        (cust, "rate", {"conversation_id": cid, "stars": 4.5}, "invalid", {"stars"}),
        (cust, "rate", {"conversation_id": cid, "stars": 5, "comment": "x" * 1001}, "invalid",
         {"comment"}),
        (cust, "rate", {"conversation_id": missing, "stars": 5}, "not_found", None),
        # set_status
        (agent, "set_status", {}, "invalid", {"status"}),
        (agent, "set_status", {"status": "busy"}, "invalid", {"status"}),
        (agent, "set_status", {"status": "available", "cap": 9}, "invalid", {"cap"}),
        # transfer
        (agent, "transfer", {"conversation_id": cid}, "invalid", {"to_agent_id"}),
        (agent, "transfer", {"conversation_id": cid, "to_agent_id": ""}, "invalid", {"to_agent_id"}),
        (agent, "transfer", {"conversation_id": missing, "to_agent_id": "a-x"}, "not_found", None),
        # list
        (cust, "list", {"limit": 5}, "invalid", {"limit"}),
    ]
    failures = []
    for c, event, data, code, fields in cases:
        reply = await c.call(event, data, timeout=5)
        try:
            assert_error(reply, code, fields)
        except AssertionError:
            failures.append(f"{event} {str(data)[:80]} -> {reply}")
    assert not failures, "\n".join(failures)

    # Boundaries that are fine, and the same connections still work.
    long = await send(cust, cid, "x" * 4000)
    assert len(long["body"]) == 4000
    assert (await send(cust, cid, "修" * 4000))["body"] == "修" * 4000
    assert len((await send(cust, cid, "a"))["body"]) == 1
    image = await agent.ok("send", {**payload(cid, "https://img.example.com/a.jpg"), "kind": "image"})
    assert image["message"]["kind"] == "image"
    hist = await cust.ok("history", {"conversation_id": cid, "limit": 100})
    assert [m["seq"] for m in hist["messages"]] == [1, 2, 3, 4]
    assert (cust.sio.get_sid(NS), agent.sio.get_sid(NS)) == sids
    assert cust.sio.connected and agent.sio.connected
    assert (await agent.ok("set_status", {"status": "available"}))["status"] == "available"


async def test_order_open_without_order_id_names_the_field(app: Live) -> None:
    """docs/protocol.md, Replies: `invalid` details are `[{field, error}]`."""
    cust = await connect(app, "customer")
    assert_error(await cust.call("open", {"kind": "order"}), "invalid", {"order_id"})


# -- who may do what --------------------------------------------------------------------------

async def test_others_are_refused_and_strangers_told_nothing(app: Live) -> None:
    cust_id, agent_id, tech_id = uid("c-"), uid("a-"), uid("t-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)
    await send(cust, cid, "我的订单有问题")
    order = await app.create_order(cust_id)
    await app.assign(order["order_id"], tech_id)
    ocid = f"order:{order['order_id']}"

    stranger = await connect(app, "customer")
    other_tech = await connect(app, "technician")
    other_agent = await connect(app, "agent")
    own_tech = await connect(app, "technician", tech_id)

    per_conv: list[tuple[str, dict[str, Any]]] = [
        ("send", payload(cid, "插一句")),
        ("join", {"conversation_id": cid}),
        ("join", {"conversation_id": cid, "since_seq": 0}),
        ("history", {"conversation_id": cid}),
        ("typing", {"conversation_id": cid, "typing": True}),
        ("read", {"conversation_id": cid, "seq": 1}),
        ("close", {"conversation_id": cid}),
        ("rate", {"conversation_id": cid, "stars": 1}),
        ("transfer", {"conversation_id": cid, "to_agent_id": agent_id}),
    ]
    # Not theirs to read: exactly as if it did not exist (docs/protocol.md, Orders,
    # "who is told what": an order's chat id is predictable).
    for who in (stranger, other_tech, own_tech):
        for event, data in per_conv:
            reply = await who.call(event, data, timeout=5)
            assert reply["ok"] is False and reply["error"]["code"] == "not_found", (event, reply)
        await who.error("set_status", {"status": "available"}, "forbidden")
    # The stranger's own list does not show it.
    assert (await stranger.ok("list", {}))["conversations"] == []

    await cust.error("set_status", {"status": "available"}, "forbidden")
    await cust.error("transfer", {"conversation_id": cid, "to_agent_id": agent_id}, "forbidden")
    # An agent who is not the assignee may read, but not post, close or transfer.
    await other_agent.error("send", payload(cid, "我来"), "forbidden")
    await other_agent.error("close", {"conversation_id": cid}, "forbidden")
    await other_agent.error("transfer", {"conversation_id": cid, "to_agent_id": agent_id}, "forbidden")
    await other_agent.error("rate", {"conversation_id": cid, "stars": 5}, "forbidden")

    # Support is opened by customers only; someone else's order is not yours.
    await other_tech.error("open", {"kind": "support"}, "forbidden")
    # Someone else's order looks exactly like a missing one (docs/protocol.md, Orders).
    await stranger.error("open", {"kind": "support", "order_id": order["order_id"]}, "not_found")
    # Order chats: a technician or customer of another order.
    await other_tech.error("open", {"kind": "order", "order_id": order["order_id"]}, "not_found")
    await stranger.error("open", {"kind": "order", "order_id": order["order_id"]}, "not_found")
    for event, data in [("send", payload(ocid, "hi")), ("join", {"conversation_id": ocid}),
                        ("history", {"conversation_id": ocid}),
                        ("typing", {"conversation_id": ocid, "typing": True}),
                        ("read", {"conversation_id": ocid, "seq": 1}),
                        ("close", {"conversation_id": ocid})]:
        missing = {**data, "conversation_id": "order:o-missing-000"}
        for who in (stranger, other_tech):
            reply = await who.call(event, data, timeout=5)
            absent = await who.call(event, missing, timeout=5)
            assert reply["ok"] is False and reply["error"]["code"] == "not_found", (event, reply)
            assert (reply["error"]["message"].replace(ocid, "?")
                    == absent["error"]["message"].replace("order:o-missing-000", "?")), (reply, absent)
    # An agent must join an order chat before posting in it.
    await other_agent.error("send", payload(ocid, "hi"), "forbidden")
    await own_tech.ok("send", payload(ocid, "师傅在"))
    # A customer may not close an order chat.
    await cust.error("close", {"conversation_id": ocid}, "forbidden")

    # Nothing the refused calls tried reached the conversation.
    hist = await agent.ok("history", {"conversation_id": cid})
    assert [m["body"] for m in hist["messages"]] == ["我的订单有问题"]
    assert (await agent.ok("join", {"conversation_id": cid}))["conversation"]["status"] == "assigned"
    assert stranger.received["message"] == [] and other_tech.received["message"] == []

    # HTTP: the transcript is for staff and the backend.
    for role in ("customer", "technician"):
        status, reply = await transcript(app, cid, role)
        assert status == 403 and reply["error"]["code"] == "forbidden", reply
    status, reply = await transcript(app, cid, "agent")
    assert status == 200 and reply["data"]["conversation"]["conversation_id"] == cid
    status, reply = await transcript(app, "s-nope", "agent")
    assert status == 404 and reply["error"]["code"] == "not_found"
    status, reply = await app.http.request("GET", f"/api/conversations/{cid}/messages")
    assert status == 401


async def test_feedback_by_anyone_listed_for_staff(app: Live) -> None:
    cust_id = uid("c-")
    ctoken = app.token("customer", cust_id, name="赵女士")
    body = {"category": "app", "body": "地图定位不准", "order_id": "o-123"}
    status, reply = await app.http.request("POST", "/api/feedback", ctoken, json=body)
    assert status == 201, reply
    fb = reply["data"]["feedback"]
    assert fb["category"] == "app" and fb["body"] == "地图定位不准" and fb["order_id"] == "o-123"
    assert fb["user"] == {"id": cust_id, "role": "customer", "name": "赵女士"}
    assert isinstance(fb["id"], str) and isinstance(fb["ts"], int)

    status, reply = await app.http.request("POST", "/api/feedback", app.token("technician"),
                                           json={"category": "pay", "body": "结算慢"})
    assert status == 201 and reply["data"]["feedback"]["order_id"] is None

    status, reply = await app.http.request("GET", "/api/feedback", app.token("agent"))
    assert status == 200, reply
    items = reply["data"]["feedback"]
    assert [i["body"] for i in items] == ["结算慢", "地图定位不准"]  # newest first
    assert items[1]["id"] == fb["id"] and reply["data"]["has_more"] is False

    for role in ("customer", "technician"):
        status, reply = await app.http.request("GET", "/api/feedback", app.token(role))
        assert status == 403 and reply["error"]["code"] == "forbidden"
    for bad in ({"category": "app"}, {"category": "", "body": "x"}, {"category": "app", "body": "x" * 4001},
                {"category": "app", "body": "x", "extra": 1}, {"category": "x" * 33, "body": "x"}):
        status, reply = await app.http.request("POST", "/api/feedback", ctoken, json=bad)
        assert status == 400 and reply["error"]["code"] == "invalid", (bad, reply)
    status, _ = await app.http.request("POST", "/api/feedback", None, json=body)
    assert status == 401


@pytest.mark.parametrize("engine", ["memory", "redis"])
async def test_sessions_ending_as_the_server_stops_finish_their_disconnect_first(
        engine: str, mongo_server: MongoServer, redis_server: RedisServer) -> None:
    """Clients that leave just as the server stops: each session's end (the
    /chat disconnect handlers, which use presence and the chat service)
    finishes before the services stop, and nothing is logged as an error
    (the autouse check). app_on closes every client, then stops at once."""
    extra = {"redis_url": redis_server.url, "redis_channel": uid("t")} if engine == "redis" else {}
    async with app_on(mongo_server.url, mongo_db=uid("chat_"), **extra) as live:
        agents = await asyncio.gather(*(connect(live, "agent") for _ in range(10)))
        await asyncio.gather(*(a.ok("set_status", {"status": "available"}) for a in agents))
        customers = await asyncio.gather(*(connect(live, "customer") for _ in range(10)))
        await asyncio.gather(*(c.ok("open", {"kind": "support"}) for c in customers))
