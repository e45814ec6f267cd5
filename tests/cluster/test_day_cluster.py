"""The technician's day across nodes (issue 17): the late-arrival projection
runs where the technician is connected, and moves with them when that node
dies."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.cluster.helpers import at, pt
from tests.cluster_harness import Cluster, next_where, now_ms
from tests.harness import MongoServer, RedisServer, uid

MIN = 60_000


async def test_a_late_warning_fires_from_another_node_after_the_technicians_node_dies(
        redis_server: RedisServer, mongo_server: MongoServer,
        session: aiohttp.ClientSession) -> None:
    cl = Cluster(redis_server.url, mongo_server.url, session, REALTIME_PRESENCE_TTL_S="3",
                 REALTIME_LOCATION_RATE="1000", REALTIME_LOCATION_BURST="1000")
    try:
        # A projects too rarely to warn within the test; B every 0.1 s.
        cl.env["REALTIME_PROJECT_INTERVAL_S"] = "300"
        [a] = await cl.start(1)
        cl.env["REALTIME_PROJECT_INTERVAL_S"] = "0.1"
        [b] = await cl.start(1)
        cust, tech_id = uid("c-"), uid("t-")
        start = now_ms() + 20 * MIN
        order = await cl.create_order(b, cust, window={"start_ts": start, "end_ts": start + 60 * MIN})
        oid = order["order_id"]
        await cl.api(b, "POST", f"/api/orders/{oid}/assign", {"technician_id": tech_id})
        customer = await cl.client(b, "/orders", "customer", cust)
        await customer.ok("subscribe", {"order_id": oid})

        # The technician, on A, idles 30 km away: late, but A has not said so yet.
        on_a = await cl.client(a, "/tracking", "technician", tech_id)
        t0 = now_ms() - 400_000
        assert (await on_a.ok("location", pt(at(-30_000), t0)))["status"] == "accepted"
        await asyncio.to_thread(a.stop, signal.SIGKILL)

        # They reconnect to B and go on: B projects their day and warns, once.
        on_b = await cl.client(b, "/tracking", "technician", tech_id)
        assert (await on_b.ok("location", pt(at(-29_900), t0 + 10_000)))["status"] == "accepted"
        late = await next_where(customer, "order_event", lambda e: e["type"] == "late_risk",
                                timeout=20)
        assert late["order_id"] == oid and late["actor"] == {"id": "lateness", "role": "system"}
        assert late["data"]["basis"] == "idle" and late["data"]["minutes_late"] > 60
        listed = await cl.api(b, "GET", "/api/orders/late", role="agent")
        assert oid in [o["order_id"] for o in listed["data"]["orders"]]
        body = await cl.api(b, "GET", f"/api/orders/{oid}")
        types = [e["type"] for e in body["data"]["events"]]
        assert types.count("late_risk") == 1, types
        assert [e["seq"] for e in body["data"]["events"]] == list(range(1, len(types) + 1))
    finally:
        await cl.close()


async def test_a_queued_jobs_customer_on_another_node_gets_no_positions(
        redis_server: RedisServer, mongo_server: MongoServer,
        session: aiohttp.ClientSession) -> None:
    """Positions cross nodes only for the current job's watchers: B's customer, on
    another node than the technician, gets none while the technician drives to A,
    and none once A is done and the technician has not set off to B."""
    cl = Cluster(redis_server.url, mongo_server.url, session,
                 REALTIME_LOCATION_RATE="1000", REALTIME_LOCATION_BURST="1000")
    try:
        a_node, b_node = await cl.start(2)
        tech_id = uid("t-")
        start = now_ms() + 60 * MIN
        orders = [await cl.create_order(a_node, uid("c-"), window={
            "start_ts": start + k * 3 * 60 * MIN, "end_ts": start + (k * 3 + 1) * 60 * MIN})
            for k in range(2)]
        A, B = (o["order_id"] for o in orders)
        for oid in (A, B):
            await cl.api(a_node, "POST", f"/api/orders/{oid}/assign", {"technician_id": tech_id})
        tech = await cl.client(a_node, "/tracking", "technician", tech_id)
        tech_orders = await cl.client(a_node, "/orders", "technician", tech_id)
        watch_a = await cl.client(b_node, "/tracking", "customer", orders[0]["customer_id"])
        watch_b = await cl.client(b_node, "/tracking", "customer", orders[1]["customer_id"])
        await cl.heard(a_node, watch_a.ok("watch", {"order_id": A}))
        await cl.heard(a_node, watch_b.ok("watch", {"order_id": B}))
        await cl.api(a_node, "POST", f"/api/orders/{A}/events", {"state": "en_route"})
        t0 = now_ms() - 60_000
        for i in range(4):
            f = pt(at(-1500 + 200 * i), t0 + 10_000 * i)
            assert (await tech.ok("location", f))["status"] == "accepted"
            got = await next_where(watch_a, "position", lambda x: bool(x["ts"] == f["ts"]))  # noqa: B023
            assert got["order_id"] == A
        for state in ("arrived", "in_service", "completed"):
            await cl.api(a_node, "POST", f"/api/orders/{A}/events", {"state": state})
        done = pt(at(-700), t0 + 50_000)
        assert (await tech.ok("location", done))["status"] == "accepted"
        view = await watch_b.ok("watch", {"order_id": B})  # a round trip on B's node
        assert view["technician_status"] == "not_started" and view["position"] is None
        assert watch_b.drain("position") == []
        # Set off to B (through B's node): the next fix crosses to B's customer.
        await cl.api(b_node, "POST", f"/api/orders/{B}/events", {"state": "en_route"})
        # (Node A has it once its event reached the technician's socket there.)
        await next_where(tech_orders, "order_event",
                         lambda e: e["order_id"] == B and e["state"] == "en_route")
        going = pt(at(-600), t0 + 60_000)
        assert (await tech.ok("location", going))["status"] == "accepted"
        got = await next_where(watch_b, "position", lambda x: x["ts"] == going["ts"])
        assert got["order_id"] == B
    finally:
        await cl.close()
