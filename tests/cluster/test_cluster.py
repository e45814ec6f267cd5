"""Several nodes on one Redis act as one: orders, tracking, chat, presence,
latency and dispatch across nodes."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import pytest

from tests.cluster.helpers import (
    BOX,
    assert_clean,
    assigned_order,
    at,
    open_support,
    pt,
    seqs,
    true,
)
from tests.cluster_harness import (
    Cluster,
    TimedClient,
    next_where,
    now_ms,
)
from tests.harness import MongoServer, RedisServer, uid, until

# -- orders -------------------------------------------------------------------------------

async def test_order_events_cross_nodes_once(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    cust_id, tech_id = uid("c-"), uid("t-")
    oid = str((await cluster.create_order(a, cust_id))["order_id"])

    sub_b = await cluster.client(b, "/orders", "agent")
    assert seqs((await sub_b.ok("subscribe", {"order_id": oid}))["events"]) == [1]
    cust_c = await cluster.client(c, "/orders", "customer", cust_id)  # not subscribed: its user room
    both_c = await cluster.client(c, "/orders", "customer", cust_id)  # subscribed and the customer
    await both_c.ok("subscribe", {"order_id": oid})
    sub_a = await cluster.client(a, "/orders", "admin")  # on the node that makes the change
    await sub_a.ok("subscribe", {"order_id": oid})
    tech_b = await cluster.client(b, "/orders", "technician", tech_id)  # gets it once assigned

    body = await cluster.api(a, "POST", f"/api/orders/{oid}/assign", {"technician_id": tech_id})
    event = body["data"]["event"]
    assert (event["seq"], event["state"]) == (2, "assigned")
    for cl in (sub_b, cust_c, both_c, sub_a, tech_b):
        assert await cl.next("order_event") == event

    for state in ("en_route", "arrived"):
        await cluster.api(a, "POST", f"/api/orders/{oid}/events", {"state": state})
    for cl in (sub_b, cust_c, both_c, sub_a, tech_b):
        got = [await cl.next("order_event") for _ in range(2)]
        assert [(e["seq"], e["state"]) for e in got] == [(3, "en_route"), (4, "arrived")]
    # Per connection, pushes arrive in order: a duplicate of 2 or 3 would have come before 4.
    for cl in (sub_b, cust_c, both_c, sub_a, tech_b):
        assert seqs(cl.received["order_event"]) == [2, 3, 4], cl.received["order_event"]

    # A change made through a socket on B (the technician starts the service) reaches
    # every node the same way.
    done = await tech_b.ok("progress", {"order_id": oid, "state": "in_service"})
    assert done["event"]["seq"] == 5
    for cl in (sub_b, cust_c, both_c, sub_a):
        assert (await cl.next("order_event"))["seq"] == 5
    assert (await tech_b.next("order_event"))["seq"] == 5  # the actor too: it is the technician
    snap = await cluster.api(c, "GET", f"/api/orders/{oid}")
    assert seqs(snap["data"]["events"]) == [1, 2, 3, 4, 5]
    assert_clean(cluster)


# -- tracking -----------------------------------------------------------------------------

async def test_positions_go_only_to_nodes_that_watch(cluster: Cluster) -> None:
    """A position crosses to another node only while a client there watches the
    order (or an area): nodes receive what they serve, nothing else. A `watch` or
    `unwatch` that changes its node's interest is answered once that is published."""
    cluster.env.update(REALTIME_LOCATION_RATE="1000", REALTIME_LOCATION_BURST="1000")
    a, b = await cluster.start(2)
    cust_id, tech_id = uid("c-"), uid("t-")
    oid = await assigned_order(cluster, a, cust_id, tech_id, set_off=True)
    tech = await cluster.client(a, "/tracking", "technician", tech_id)
    local = await cluster.client(a, "/tracking", "customer", cust_id)
    await local.ok("watch", {"order_id": oid})
    series = 'realtime_bus_received_total{signal="positions"}'
    ts = itertools.count(now_ms() - 60_000, 1000)

    async def send(n: int) -> int:
        """n points from the technician on A, until A's own watcher has the last."""
        last = 0
        for i in range(n):
            last = next(ts)
            assert (await tech.ok("location", pt(at(-2000 + i), last)))["status"] == "accepted"
        await next_where(local, "position", lambda x: x["ts"] == last)
        return last

    # Only the technician's own node watches: nothing goes to B.
    await send(3)
    assert (await cluster.metric(b, series) or 0.0) == 0.0

    # A customer on B watches: A sends B the positions.
    remote = await cluster.client(b, "/tracking", "customer", cust_id)
    await cluster.heard(a, remote.ok("watch", {"order_id": oid}))
    last = await send(1)
    await next_where(remote, "position", lambda x: x["ts"] == last)
    assert (await cluster.metric(b, series) or 0.0) >= 1

    # B's customer stops watching: A stops sending.
    await cluster.heard(a, remote.ok("unwatch", {"order_id": oid}))
    before = await cluster.metric(b, series) or 0.0
    await send(3)
    await remote.ok("unwatch", {"order_id": oid})  # a round trip on B after A's sends
    assert (await cluster.metric(b, series) or 0.0) == before

    # An area view on B wants every technician's positions.
    agent = await cluster.client(b, "/tracking", "agent")
    await cluster.heard(a, agent.ok("watch_area", BOX))
    last = await send(1)
    batch = await next_where(agent, "positions",
                             lambda x: any(t["id"] == tech_id and t["ts"] == last for t in x["technicians"]))
    assert batch
    assert (await cluster.metric(b, series) or 0.0) > before
    assert cluster.errors() == [], cluster.errors()


async def test_positions_reach_watchers_on_other_nodes(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    cust_id, tech_id = uid("c-"), uid("t-")
    oid = await assigned_order(cluster, c, cust_id, tech_id, set_off=True)

    tech = await cluster.client(a, "/tracking", "technician", tech_id, name="张师傅")
    watcher = await cluster.client(b, "/tracking", "customer", cust_id)
    view = await cluster.heard(a, watcher.ok("watch", {"order_id": oid}))
    assert view["technician"]["id"] == tech_id and view["position"] is None, view

    p1 = pt(at(-2000))
    assert (await tech.ok("location", p1))["status"] == "accepted"
    pos = await watcher.next("position")
    assert (pos["order_id"], pos["technician_id"], pos["ts"]) == (oid, tech_id, p1["ts"]), pos
    assert pos["lat"] == pytest.approx(p1["lat"]) and pos["lng"] == pytest.approx(p1["lng"])
    assert pos["distance_m"] == pytest.approx(2000, abs=5)

    # A re-watch on yet another node gets the latest position in its reply (shared in Redis)
    # once A has written it: within the write-behind window (storage/redis/positions.py), or at
    # once when A itself reads positions (its searches read their own writes: they flush).
    await cluster.api(a, "GET", f"/api/technicians/nearby?lat={p1['lat']}&lng={p1['lng']}")
    watcher_c = await cluster.client(c, "/tracking", "customer", cust_id)
    view = await cluster.heard(a, watcher_c.ok("watch", {"order_id": oid}))
    assert view["technician"] == {"id": tech_id, "name": "张师傅"}
    assert view["position"]["ts"] == p1["ts"] and view["distance_m"] == pytest.approx(2000, abs=5)

    # An agent on A (the technician's own node) watches the order too.
    watcher_a = await cluster.client(a, "/tracking", "agent")
    assert (await watcher_a.ok("watch", {"order_id": oid}))["position"]["ts"] == p1["ts"]

    # An agent's area view on C lists the technician who reports to A.
    agent = await cluster.client(c, "/tracking", "agent")
    area = await agent.ok("watch_area", BOX)
    [item] = [t for t in area["technicians"] if t["id"] == tech_id]
    assert (item["name"], item["status"], item["order_id"], item["ts"]) == ("张师傅", "busy", oid, p1["ts"])

    p2 = pt(at(-1900), p1["ts"] + 2000)
    assert (await tech.ok("location", p2))["status"] == "accepted"
    for w in (watcher, watcher_c, watcher_a):
        pos = await next_where(w, "position", lambda x: x["ts"] == p2["ts"])
        assert pos["technician_id"] == tech_id

    # Privacy holds across nodes: once the service starts (changed through C), the
    # watchers on B and C see the technician no more.
    other_tech = uid("t-")
    other_oid = await assigned_order(cluster, c, cust_id, other_tech, set_off=True)
    await watcher.ok("watch", {"order_id": other_oid})
    other = await cluster.client(a, "/tracking", "technician", other_tech)
    for state in ("arrived", "in_service"):
        await cluster.api(c, "POST", f"/api/orders/{oid}/events", {"state": state})
    await watcher.error("watch", {"order_id": oid}, "forbidden")
    p3 = pt(at(-1850), p2["ts"] + 1000)
    assert (await tech.ok("location", p3))["status"] == "accepted"
    # Marker: a point of the customer's other technician, also from A, sent after p3.
    q = pt(at(-500))
    assert (await other.ok("location", q))["status"] == "accepted"
    assert (await next_where(watcher, "position", lambda x: x["order_id"] == other_oid))["ts"] == q["ts"]
    assert [x["ts"] for x in watcher.received["position"] if x["order_id"] == oid] == [p1["ts"], p2["ts"]]
    # Once each on every node; never p3 (the service had started).
    assert [x["ts"] for x in watcher_c.received["position"]] == [p2["ts"]]
    assert [x["ts"] for x in watcher_a.received["position"]] == [p2["ts"]]
    assert_clean(cluster)


async def test_reassigned_technician_on_another_node_leaves_the_order_stream(cluster: Cluster) -> None:
    """Re-assignment drops the previous technician from the order's stream on every
    node (a node-to-node signal over the bus)."""
    a, b, c = await cluster.start(3)
    cust_id, first, second = uid("c-"), uid("t-"), uid("t-")
    oid = await assigned_order(cluster, a, cust_id, first)
    old = await cluster.client(b, "/orders", "technician", first)
    assert seqs((await old.ok("subscribe", {"order_id": oid}))["events"]) == [1, 2]
    new = await cluster.client(c, "/orders", "technician", second)
    watcher = await cluster.client(b, "/orders", "agent")  # same node as the old technician
    await watcher.ok("subscribe", {"order_id": oid})

    body = await cluster.api(a, "POST", f"/api/orders/{oid}/assign", {"technician_id": second})
    assert body["data"]["event"]["type"] == "reassigned"
    for x in (old, new, watcher):
        assert (await x.next("order_event"))["seq"] == 3
    await old.error("subscribe", {"order_id": oid}, "not_found")
    await cluster.api(a, "POST", f"/api/orders/{oid}/events", {"state": "en_route"})
    assert (await new.next("order_event"))["seq"] == 4
    assert (await watcher.next("order_event"))["seq"] == 4  # B has relayed seq 4 ...
    assert seqs(old.received["order_event"]) == [3]  # ... and not to the old technician
    assert_clean(cluster)


async def test_area_watch_batches_for_a_technician_on_another_node(cluster: Cluster) -> None:
    """`positions` batches: an agent watching an area on C must see a technician who
    reports to A move, as it would on a single node."""
    a, _, c = await cluster.start(3)
    tech_id = uid("t-")
    tech = await cluster.client(a, "/tracking", "technician", tech_id, name="李师傅")
    p1 = pt(at(-1500))
    assert (await tech.ok("location", p1))["status"] == "accepted"
    local = await cluster.client(a, "/tracking", "agent")   # same node as the technician
    remote = await cluster.client(c, "/tracking", "agent")  # another node
    for w in (local, remote):
        change = w.ok("watch_area", BOX)
        area = await (cluster.heard(a, change) if w is remote else change)
        assert [t["ts"] for t in area["technicians"] if t["id"] == tech_id] == [p1["ts"]], area
    p2 = pt(at(-1400), p1["ts"] + 2000)
    assert (await tech.ok("location", p2))["status"] == "accepted"
    batch = await next_where(local, "positions",
                             lambda x: any(t["id"] == tech_id for t in x["technicians"]), timeout=5)
    assert [t["ts"] for t in batch["technicians"] if t["id"] == tech_id] == [p2["ts"]]
    batch = await next_where(remote, "positions",
                             lambda x: any(t["id"] == tech_id for t in x["technicians"]), timeout=5)
    assert [t["ts"] for t in batch["technicians"] if t["id"] == tech_id] == [p2["ts"]]
    item = next(t for t in batch["technicians"] if t["id"] == tech_id)
    assert (item["name"], item["status"]) == ("李师傅", "available"), item

    # Each move is in one batch per watcher (not one per node): p3 comes after p2's batch.
    p3 = pt(at(-1300), p2["ts"] + 2000)
    assert (await tech.ok("location", p3))["status"] == "accepted"
    for w in (local, remote):
        await next_where(w, "positions", lambda x: any(t["ts"] == p3["ts"] for t in x["technicians"]),
                         timeout=5)
        ts = [t["ts"] for b in w.received["positions"] for t in b["technicians"] if t["id"] == tech_id]
        assert ts == [p2["ts"], p3["ts"]], ts
    assert_clean(cluster)


async def test_assignment_through_another_node_reaches_the_technicians_node(cluster: Cluster) -> None:
    """The technician's node must learn of an assignment (and its setting off) made
    through another node before the technician's next point: the first point after
    it reaches the watcher."""
    a, b, c = await cluster.start(3)
    cust_id, tech_id = uid("c-"), uid("t-")
    tech = await cluster.client(a, "/tracking", "technician", tech_id)
    tech_orders = await cluster.client(a, "/orders", "technician", tech_id)
    t0 = now_ms()
    assert (await tech.ok("location", pt(at(-3000), t0)))["status"] == "accepted"

    oid = await assigned_order(cluster, c, cust_id, tech_id, set_off=True)
    # The assignment and the setting off have reached node A (their order_events were
    # pushed there).
    assert (await next_where(tech_orders, "order_event", lambda e: e["state"] == "en_route"))["seq"] == 3
    watcher = await cluster.client(b, "/tracking", "customer", cust_id)
    await cluster.heard(a, watcher.ok("watch", {"order_id": oid}))

    p = pt(at(-2900), t0 + 2000)
    assert (await tech.ok("location", p))["status"] == "accepted"
    pos = await next_where(watcher, "position", lambda x: x["ts"] == p["ts"], timeout=5)
    assert pos["order_id"] == oid and pos["technician_id"] == tech_id


async def test_en_route_through_another_node_arms_the_geofence(cluster: Cluster) -> None:
    """The arrival geofence runs where the technician's points arrive (A); `en_route`
    set through C must arm it there: two fixes at the door then move the order to
    `arrived`, as on a single node."""
    a, _, c = await cluster.start(3)
    cust_id, tech_id = uid("c-"), uid("t-")
    oid = await assigned_order(cluster, a, cust_id, tech_id)
    tech = await cluster.client(a, "/tracking", "technician", tech_id)
    tech_orders = await cluster.client(a, "/orders", "technician", tech_id)
    t0 = now_ms() - 120_000
    assert (await tech.ok("location", pt(at(-3000), t0)))["status"] == "accepted"

    await cluster.api(c, "POST", f"/api/orders/{oid}/events", {"state": "en_route"})
    assert (await next_where(tech_orders, "order_event", lambda e: e["state"] == "en_route"))["seq"] == 3
    for i, north in enumerate((-20, -10)):
        fix = pt(at(north), now_ms() - 10_000 + 5_000 * i)
        assert (await tech.ok("location", fix))["status"] == "accepted"
    arrived = await next_where(tech_orders, "order_event", lambda e: e["state"] == "arrived", timeout=5)
    assert arrived["actor"] == {"id": "geofence", "role": "system"} and arrived["seq"] == 4


# -- chat ---------------------------------------------------------------------------------

async def test_support_chat_across_nodes(cluster: Cluster) -> None:
    a, b, _ = await cluster.start(3)
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await cluster.client(a, "/chat", "customer", cust_id, name="王女士")
    agent = await cluster.client(b, "/chat", "agent", agent_id, name="小李")
    cid = await open_support(cust, agent, agent_id)

    m1 = (await cust.ok("send", {"conversation_id": cid, "client_msg_id": "c-1", "body": "你好"}))["message"]
    assert m1["seq"] == 1 and m1["sender"] == {"id": cust_id, "role": "customer", "name": "王女士"}
    assert await agent.next("message") == m1
    m2 = (await agent.ok("send", {"conversation_id": cid, "client_msg_id": "a-1",
                                  "body": "您好，请讲"}))["message"]
    assert m2["seq"] == 2
    assert await cust.next("message") == m2

    await cust.ok("typing", {"conversation_id": cid, "typing": True})
    assert await agent.next("typing") == {"conversation_id": cid, "user_id": cust_id, "typing": True}
    await agent.ok("typing", {"conversation_id": cid, "typing": False})
    assert await cust.next("typing") == {"conversation_id": cid, "user_id": agent_id, "typing": False}

    assert await agent.ok("read", {"conversation_id": cid, "seq": 1}) == {"conversation_id": cid, "seq": 1}
    assert await cust.next("read") == {"conversation_id": cid, "user_id": agent_id, "seq": 1}
    await cust.ok("read", {"conversation_id": cid, "seq": 2})
    assert await agent.next("read") == {"conversation_id": cid, "user_id": cust_id, "seq": 2}

    # A retried send (same client_msg_id, now through node C) stores and shows nothing new.
    cust_c = await cluster.client(cluster.nodes[2], "/chat", "customer", cust_id, name="王女士")
    again = (await cust_c.ok("send", {"conversation_id": cid, "client_msg_id": "c-1", "body": "你好"}))
    assert again["message"] == m1
    m3 = (await cust.ok("send", {"conversation_id": cid, "client_msg_id": "c-2", "body": "好的"}))["message"]
    assert m3["seq"] == 3
    assert await agent.next("message") == m3
    assert agent.received["message"] == [m1, m3]  # in order, once each: no copy of m1
    assert await cust_c.next("message") == m3  # the customer's other device, on C
    assert cust.received["message"] == [m2]
    assert agent.received["typing"] == [{"conversation_id": cid, "user_id": cust_id, "typing": True}]

    closed = (await cust.ok("close", {"conversation_id": cid}))["conversation"]
    assert closed["status"] == "closed"
    gone = await next_where(agent, "conversation", lambda x: x["status"] == "closed")
    assert gone["conversation_id"] == cid
    assert_clean(cluster)


async def test_queue_assignment_is_least_loaded_cluster_wide(
        redis_server: RedisServer, mongo_server: MongoServer, session: aiohttp.ClientSession) -> None:
    cl = Cluster(redis_server.url, mongo_server.url, session, REALTIME_AGENT_CAP="2")
    try:
        a, b, c = await cl.start(3)
        agent_b_id, agent_c_id = uid("a-b-"), uid("a-c-")
        agent_b = await cl.client(b, "/chat", "agent", agent_b_id)
        agent_c = await cl.client(c, "/chat", "agent", agent_c_id)
        for ag in (agent_b, agent_c):
            assert await ag.ok("set_status", {"status": "available"}) == {
                "status": "available", "load": 0, "cap": 2}

        # Six customers, three on A and three on C, open support at the same time.
        custs = [await cl.client(node, "/chat", "customer", uid(f"c{i}-"))
                 for i, node in enumerate((a, c, a, c, a, c))]
        opened = await asyncio.gather(*(x.ok("open", {"kind": "support"}) for x in custs))
        cids = [o["conversation"]["conversation_id"] for o in opened]
        assert len(set(cids)) == 6

        # Exactly four are assigned, two to each agent (cap 2), whatever node pumped.
        def assigned_to(ag: TimedClient) -> set[str]:
            return {x["conversation_id"] for x in ag.received["conversation"] if x["status"] == "assigned"}

        await until(lambda: true(len(assigned_to(agent_b)) + len(assigned_to(agent_c)) >= 4),
                    timeout=10, what="four assignments")
        assert len(assigned_to(agent_b)) == 2 and len(assigned_to(agent_c)) == 2
        assert not assigned_to(agent_b) & assigned_to(agent_c)
        waiting = [cid for cid in cids if cid not in assigned_to(agent_b) | assigned_to(agent_c)]
        assert len(waiting) == 2
        for ag in (agent_b, agent_c):
            status = await ag.ok("set_status", {"status": "available"})
            assert status["load"] == 2, status
        # Each customer learns their fate on their own node.
        for x, cid in zip(custs, cids, strict=True):
            if cid in waiting:
                continue
            def about_cid(e: Any, cid: str = cid) -> bool:
                return bool(e["conversation_id"] == cid)

            conv = await next_where(x, "conversation", about_cid)
            assert conv["status"] == "assigned"
        # The waiting ones hold positions 1 and 2 (from the reply or a later push, which may
        # come from whichever node pumped last).
        def positions() -> list[int]:
            out = []
            for x, o in zip(custs, opened, strict=True):
                cid = o["conversation"]["conversation_id"]
                if cid in waiting:
                    pushed = [p["position"] for p in x.received["queue_position"]
                              if p["conversation_id"] == cid]
                    out.append(pushed[-1] if pushed else o.get("queue_position"))
            return sorted(out)

        await until(lambda: true(positions() == [1, 2]), timeout=5, what="queue positions 1 and 2")

        # Agent C closes one of theirs: the oldest waiting conversation goes to C (B is full).
        mine = sorted(assigned_to(agent_c))[0]
        await agent_c.ok("close", {"conversation_id": mine})
        conv = await next_where(agent_c, "conversation",
                                lambda x: x["status"] == "assigned" and x["conversation_id"] in waiting)
        assert conv["assignee"] == agent_c_id
        others = {x["conversation_id"] for x in agent_b.received["conversation"] if x["status"] == "assigned"}
        assert conv["conversation_id"] not in others
        assert (await agent_c.ok("set_status", {"status": "available"}))["load"] == 2
        assert (await agent_b.ok("set_status", {"status": "available"}))["load"] == 2
        assert_clean(cl)
    finally:
        await cl.close()


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


# -- presence -----------------------------------------------------------------------------

async def test_presence_across_nodes(cluster: Cluster) -> None:
    a, b, c = await cluster.start(3)
    tech_id, other_id = uid("t-"), uid("t-")
    ops = await cluster.client(c, "/ops", "agent")

    def about(user: str) -> Any:
        return lambda e: e["kind"] == "technician" and e["user_id"] == user

    t_a = await cluster.client(a, "/tracking", "technician", tech_id)
    assert (await next_where(ops, "presence", about(tech_id)))["online"] is True
    snap = await ops.ok("snapshot", {})
    assert snap["technicians"]["online"] == 1 and snap["engine"] == "redis", snap

    t_b = await cluster.client(b, "/tracking", "technician", tech_id)  # a second device, on B
    await t_a.close()
    # A has handled the disconnect (its gauge is down) ...
    await until(lambda: _eq(cluster.metric(a, 'realtime_connections{namespace="/tracking"}'), 0.0),
                timeout=5, what="the disconnect handled on A")
    # ... and, as a marker, another technician connects on A: an offline announcement
    # for tech_id from A would have been emitted (and relayed in order) before this one.
    await cluster.client(a, "/tracking", "technician", other_id)
    assert (await next_where(ops, "presence", about(other_id)))["online"] is True
    assert [e for e in ops.received["presence"] if e["user_id"] == tech_id] == [
        {"kind": "technician", "user_id": tech_id, "online": True}]
    assert (await ops.ok("snapshot", {}))["technicians"]["online"] == 2

    # The ops view is the same from every node.
    ops_a = await cluster.client(a, "/ops", "admin")
    assert (await ops_a.ok("snapshot", {}))["technicians"]["online"] == 2

    await t_b.close()
    gone = await next_where(ops, "presence", about(tech_id))
    assert gone == {"kind": "technician", "user_id": tech_id, "online": False}
    assert (await next_where(ops_a, "presence", about(tech_id)))["online"] is False
    assert (await ops.ok("snapshot", {}))["technicians"]["online"] == 1
    assert_clean(cluster)


# -- latency ------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@pytest.fixture
async def unlimited_chat(redis_server: RedisServer, mongo_server: MongoServer,
                         session: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    """Nodes whose chat send limits (docs/protocol.md) are out of a measurement's way."""
    c = Cluster(redis_server.url, mongo_server.url, session, REALTIME_CHAT_SEND_BURST="10000",
                REALTIME_CHAT_CONVERSATION_BURST="100000")
    try:
        yield c
    finally:
        await c.close()


async def test_cross_node_chat_latency(unlimited_chat: Cluster) -> None:
    """200 chat messages sent on A: how long until the agent on B has each (and, for
    reference, the customer's other device on A)."""
    cluster = unlimited_chat
    a, b, _ = await cluster.start(3)
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await cluster.client(a, "/chat", "customer", cust_id)
    local = await cluster.client(a, "/chat", "customer", cust_id)
    agent = await cluster.client(b, "/chat", "agent", agent_id)
    cid = await open_support(cust, agent, agent_id)

    n = 200
    sent: dict[str, float] = {}
    for i in range(n):
        cmid = f"lat-{i}"
        sent[cmid] = time.perf_counter()
        await cust.ok("send", {"conversation_id": cid, "client_msg_id": cmid, "body": f"消息 {i}"})
    await until(lambda: true(len(agent.received["message"]) >= n and len(local.received["message"]) >= n),
                timeout=15, what=f"{n} messages on B and on A")

    def arrivals(c: TimedClient) -> dict[str, float]:
        return {m["client_msg_id"]: t for m, t in zip(c.received["message"], c.times["message"], strict=True)}

    on_b, on_a = arrivals(agent), arrivals(local)
    assert sorted(on_b) == sorted(sent) and len(agent.received["message"]) == n  # each once
    cross = [(on_b[k] - sent[k]) * 1000 for k in sent]
    same = [(on_a[k] - sent[k]) * 1000 for k in sent]
    extra = [(on_b[k] - on_a[k]) * 1000 for k in sent]
    report = (f"send on A -> agent on B: p50 {statistics.median(cross):.1f} ms, "
              f"p99 {pct(cross, 0.99):.1f} ms, max {max(cross):.1f} ms; "
              f"same node (A -> A): p50 {statistics.median(same):.1f} ms, "
              f"p99 {pct(same, 0.99):.1f} ms; B minus A: p50 {statistics.median(extra):.1f} ms, "
              f"p99 {pct(extra, 0.99):.1f} ms")
    print("\n[cluster latency] " + report)
    assert pct(cross, 0.99) < 1000, report


# -- dispatch -----------------------------------------------------------------------------

async def test_broadcast_dispatch_across_nodes_exactly_one_accept_wins(cluster: Cluster) -> None:
    nodes = await cluster.start(3)
    a, b, c = nodes
    n = 20
    tech_ids = [uid(f"t{i:02d}-") for i in range(n)]
    offers_to: dict[str, TimedClient] = {}
    for i, tid in enumerate(tech_ids):
        node = nodes[i % 3]
        tracker = await cluster.client(node, "/tracking", "technician", tid, name=f"师傅{i}",
                                       skills=["aircon"])
        offers_to[tid] = await cluster.client(node, "/orders", "technician", tid, skills=["aircon"])
        # All near the address (100..2000 m), each on a distinct spot.
        assert (await tracker.ok("location", pt(at(100 + 100 * i, 50))))["status"] == "accepted"
    # Positions are written to the shared store behind (within 25 ms); a node's
    # own search flushes what it wrote, so every fix is stored once each has searched.
    lat, lng = at(100, 50)
    for node in nodes:
        await cluster.api(node, "GET", f"/api/technicians/nearby?lat={lat}&lng={lng}")

    order = await cluster.create_order(a, uid("c-"), skills=["aircon"])
    oid = order["order_id"]
    started = await cluster.api(b, "POST", f"/api/orders/{oid}/dispatch",
                                {"strategy": "broadcast", "count": n}, expect=202)
    round_ = started["data"]["dispatch"]
    did = round_["dispatch_id"]
    assert round_["strategy"] == "broadcast" and round_["status"] == "running", round_
    assert sorted(x["technician_id"] for x in round_["candidates"] if x["reason"] is None) == sorted(tech_ids)

    # Every technician, on whichever node, gets the offer.
    for tid, tc in offers_to.items():
        offer = await next_where(tc, "offer", lambda o: o["order_id"] == oid)
        assert offer["dispatch_id"] == did, (tid, offer)
        assert offer["address"] == order["address"] and offer["service"] == order["service"]
        assert offer["window"] == order["window"] and offer["expires_ts"] > now_ms()

    # All twenty accept at once: exactly one wins, the others get `conflict`.
    replies = await asyncio.gather(*(tc.call("accept", {"order_id": oid}) for tc in offers_to.values()))
    by_tech = dict(zip(offers_to, replies, strict=True))
    winners = [t for t, r in by_tech.items() if r["ok"]]
    assert len(winners) == 1, by_tech
    [winner] = winners
    assert by_tech[winner]["data"]["status"] == "accepted" and by_tech[winner]["data"]["dispatch_id"] == did
    losers = {t: r for t, r in by_tech.items() if t != winner}
    assert {r["error"]["code"] for r in losers.values()} == {"conflict"}, losers

    # The order is the winner's, seen the same from every node.
    for node in nodes:
        snap = (await cluster.api(node, "GET", f"/api/orders/{oid}"))["data"]
        assert snap["order"]["state"] == "assigned" and snap["order"]["technician_id"] == winner
        assigned = [e for e in snap["events"] if e["state"] == "assigned"]
        assert len(assigned) == 1, snap["events"]
        assert assigned[0]["actor"] == {"id": "dispatch", "role": "system"}
        assert assigned[0]["data"]["technician_id"] == winner and assigned[0]["data"]["dispatch_id"] == did
    event = await next_where(offers_to[winner], "order_event", lambda e: e["order_id"] == oid)
    assert event["state"] == "assigned"
    # The losers' offers are withdrawn, on their own nodes.
    for t in losers:
        gone = await next_where(offers_to[t], "offer_withdrawn", lambda o: o["order_id"] == oid)
        assert gone == {"order_id": oid, "dispatch_id": did, "reason": "taken"}, gone

    # The round's record: assigned to the winner, every candidate with its outcome.
    rounds = (await cluster.api(c, "GET", f"/api/orders/{oid}/dispatch"))["data"]
    assert rounds["order_id"] == oid and [r["dispatch_id"] for r in rounds["dispatches"]] == [did]
    [rec] = rounds["dispatches"]
    assert rec["status"] == "assigned" and rec["assigned_to"] == winner, rec
    cands = {x["technician_id"]: x for x in rec["candidates"]}
    assert set(tech_ids) <= set(cands)
    assert cands[winner]["status"] == "accepted"
    for t in losers:
        assert cands[t]["status"] == "withdrawn", cands[t]
        assert isinstance(cands[t]["offered_ts"], int)
    for t in tech_ids:
        assert cands[t]["distance_m"] <= 2100 and "reason" in cands[t]
    assert_clean(cluster)
