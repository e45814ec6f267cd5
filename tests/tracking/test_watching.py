"""Watching a technician over the wire: privacy, ETA and the arrival
geofence, area views, trails."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime.api import CTX
from storage.trails import KeepNoTrails
from tests.conftest import Live, StartApp
from tests.harness import Client, Http, ServerProcess, a_window, uid
from tests.tracking.wire import (
    ADDR,
    FAST,
    NS,
    at,
    dist,
    now_ms,
    order_events,
    order_in,
    pt,
    tracker,
)
from tests.wire import RawSocketIO, assert_no_server_errors, claims, hmac_jwt
from tracking.eta import MAX_SPEED_MPS
from tracking.geo import to_wgs84, wgs84_to_gcj02

# -- privacy ------------------------------------------------------------------------------------------

async def test_watch_forbidden_cases(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    # Before assignment (state `created`): no technician to show.
    oid, cust, _ = await order_in(live, "created")
    customer = await tracker(live, "customer", cust)
    err = await customer.error("watch", {"order_id": oid}, "forbidden")
    assert "lat" not in json.dumps(err)
    agent = await tracker(live, "agent")
    await agent.error("watch", {"order_id": oid}, "forbidden")

    # Another customer's order: as if it did not exist.
    oid2, cust2, tech2 = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech2)
    assert (await tech.ok("location", pt(at(-900), now_ms() - 1000)))["status"] == "accepted"
    err = await customer.error("watch", {"order_id": oid2}, "not_found")
    assert "lat" not in json.dumps(err) and tech2 not in json.dumps(err)
    # The technician, even of this very order, does not watch.
    await tech.error("watch", {"order_id": oid2}, "forbidden")
    # Agents and admins may; the owner may.
    assert (await agent.ok("watch", {"order_id": oid2}))["technician"]["id"] == tech2
    admin = await tracker(live, "admin")
    assert (await admin.ok("watch", {"order_id": oid2}))["position"] is not None
    owner = await tracker(live, "customer", cust2)
    assert (await owner.ok("watch", {"order_id": oid2}))["position"] is not None

    # After in_service, completed, cancelled: forbidden for everyone.
    for state in ("in_service", "completed", "cancelled"):
        oid3, cust3, _ = await order_in(live, state)
        c3 = await tracker(live, "customer", cust3)
        err = await c3.error("watch", {"order_id": oid3}, "forbidden")
        assert "lat" not in json.dumps(err)
        await agent.error("watch", {"order_id": oid3}, "forbidden")

    # A customer may not watch an area, nor send locations.
    box = {"min_lat": 31.0, "min_lng": 121.0, "max_lat": 32.0, "max_lng": 122.0}
    await customer.error("watch_area", box, "forbidden")
    await tech.error("watch_area", box, "forbidden")
    await customer.error("location", pt(at(-900), now_ms()), "forbidden")
    await customer.error("locations", {"points": [pt(at(-900), now_ms())]}, "forbidden")
    await agent.error("location", pt(at(-900), now_ms()), "forbidden")
    # An unknown order.
    await customer.error("watch", {"order_id": uid("nope-")}, "not_found")


async def test_watches_in_flight_together_share_one_order_read(
        start_app: StartApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconnect storm: every device watching an order asks at once; the
    order is read from the store once for all of them (and afresh later)."""
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    orders = live.app[CTX].services.tracking.orders
    store = orders._store
    real_get, real_read_shared = store.get, orders.read_shared
    reads: list[str] = []
    # The store read is held until every watch of a round has asked for the
    # order: all of them are then in flight together.
    asked, expected, all_asked = 0, 0, asyncio.Event()

    async def read_shared(order_id: str) -> Any:
        nonlocal asked
        asked += 1
        if asked == expected:
            all_asked.set()
        return await real_read_shared(order_id)

    async def held_get(order_id: str) -> Any:
        reads.append(order_id)
        await all_asked.wait()
        return await real_get(order_id)

    def round_of(n: int) -> None:
        nonlocal asked, expected
        asked, expected = 0, n
        all_asked.clear()

    monkeypatch.setattr(orders, "read_shared", read_shared)
    monkeypatch.setattr(store, "get", held_get)
    devices = [await tracker(live, "customer", cust) for _ in range(6)]
    agent = await tracker(live, "agent")
    round_of(7)
    views = await asyncio.gather(*(d.ok("watch", {"order_id": oid}) for d in [*devices, agent]))
    assert all(v["technician"]["id"] == tech_id and v["state"] == "en_route" for v in views)
    assert reads.count(oid) == 1
    # Authorization still per viewer: another customer, in flight with the owner.
    other = await tracker(live, "customer")
    round_of(2)
    mine, theirs = await asyncio.gather(devices[0].ok("watch", {"order_id": oid}),
                                        other.error("watch", {"order_id": oid}, "not_found"))
    assert mine["order_id"] == oid and "lat" not in json.dumps(theirs)
    assert reads.count(oid) == 2, "a later watch reads the order again: nothing is cached"
    # An unknown order: every reader in flight gets not_found.
    missing = uid("nope-")
    round_of(3)
    await asyncio.gather(*(d.error("watch", {"order_id": missing}, "not_found") for d in devices[:3]))
    assert reads.count(missing) == 1


async def test_watcher_sees_nothing_after_in_service(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id)
    customer = await tracker(live, "customer", cust)
    agent = await tracker(live, "agent")
    await customer.ok("watch", {"order_id": oid})
    await agent.ok("watch", {"order_id": oid})
    t0 = now_ms() - 60_000
    far = at(-1500)
    assert (await tech.ok("location", pt(far, t0)))["status"] == "accepted"
    assert (await customer.next("position"))["ts"] == t0
    assert (await agent.next("position"))["ts"] == t0

    status, _ = await live.post_event(oid, "arrived")
    assert status == 200
    assert (await tech.ok("location", pt(far, t0 + 1000)))["status"] == "accepted"
    assert (await customer.next("position"))["ts"] == t0 + 1000  # still visible while `arrived`
    assert (await agent.next("position"))["ts"] == t0 + 1000

    status, _ = await live.post_event(oid, "in_service")
    assert status == 200
    assert (await tech.ok("location", pt(far, t0 + 2000)))["status"] == "accepted"
    # A round trip on each watcher's own socket after the point was taken: any
    # push would have arrived before this ack.
    await customer.error("watch", {"order_id": oid}, "forbidden")
    await agent.error("watch", {"order_id": oid}, "forbidden")
    assert customer.drain("position") == []
    assert agent.drain("position") == []
    assert (await tech.ok("location", pt(far, t0 + 3000)))["status"] == "accepted"
    await customer.ok("unwatch", {"order_id": oid})
    assert customer.drain("position") == []


async def test_watcher_sees_nothing_after_cancel_or_unwatch(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id)
    customer = await tracker(live, "customer", cust)
    await customer.ok("watch", {"order_id": oid, "coord_sys": "gcj02"})
    t0 = now_ms() - 60_000
    assert (await tech.ok("location", pt(at(-1500), t0)))["status"] == "accepted"
    await customer.next("position")
    await customer.ok("unwatch", {"order_id": oid})
    assert (await tech.ok("location", pt(at(-1500), t0 + 1000)))["status"] == "accepted"
    await customer.ok("unwatch", {"order_id": oid})
    assert customer.drain("position") == []

    await customer.ok("watch", {"order_id": oid, "coord_sys": "bd09"})
    status, _ = await live.post_event(oid, "cancelled", role="agent")
    assert status == 200
    assert (await tech.ok("location", pt(at(-1500), t0 + 2000)))["status"] == "accepted"
    await customer.error("watch", {"order_id": oid}, "forbidden")
    assert customer.drain("position") == []


async def test_reassigned_technician_is_no_longer_shown(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech1_id = await order_in(live, "assigned")
    t1 = await tracker(live, "technician", tech1_id)
    customer = await tracker(live, "customer", cust)
    await customer.ok("watch", {"order_id": oid})
    t0 = now_ms() - 60_000
    assert (await t1.ok("location", pt(at(-800), t0)))["status"] == "accepted"
    # (Not set off yet: when, not where; docs/tracking.md.)
    view = await customer.ok("watch", {"order_id": oid})
    assert view["technician"]["id"] == tech1_id and view["eta_s"] > 0
    assert view["position"] is None and customer.drain("position") == []
    tech2_id = uid("t-")
    await live.assign(oid, tech2_id)
    assert (await t1.ok("location", pt(at(-790), t0 + 1000)))["status"] == "accepted"
    view = await customer.ok("watch", {"order_id": oid})
    assert view["technician"]["id"] == tech2_id and view["position"] is None, view
    assert customer.drain("position") == []


async def test_service_role_is_refused_at_the_tracking_handshake(live: Live) -> None:
    for role, expected in [("service", "connect_error"), ("technician", "connect"), ("customer", "connect"),
                           ("agent", "connect"), ("admin", "connect")]:
        raw = await RawSocketIO.open(live.http.session, live.url)
        try:
            kind, data = await raw.connect_ns(NS, json.dumps({"token": live.token(role)}))
        finally:
            await raw.close()
        assert kind == expected, (role, kind, data)
        if expected == "connect_error":
            assert data["data"]["code"] == "forbidden", data
            assert isinstance(data["data"]["message"], str) and data["data"]["message"]


# -- ETA and the arrival geofence -------------------------------------------------------------------

async def test_eta_decreases_and_arrival_fires_once(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    orders_client = await live.client("customer", cust)  # /orders: order events reach the customer
    tech = await tracker(live, "technician", tech_id, name="李师傅")
    watcher = await tracker(live, "customer", cust)
    view = await watcher.ok("watch", {"order_id": oid})
    assert view["position"] is None and view["state"] == "en_route"

    base = now_ms() - 600_000
    step = 10_000
    etas: list[int] = []
    dists: list[int] = []
    # 1000 m out, 100 m per 10 s (10 m/s) straight towards the door.
    for i, d in enumerate(range(1000, 199, -100)):
        ts = base + i * step
        assert (await tech.ok("location", pt(at(-d), ts)))["status"] == "accepted"
        p = await watcher.next("position")
        assert p["ts"] == ts and p["order_id"] == oid and p["technician_id"] == tech_id
        assert isinstance(p["eta_s"], int) and isinstance(p["distance_m"], int), p
        required = {"order_id", "technician_id", "lat", "lng", "ts", "eta_s", "distance_m"}
        assert required <= set(p) <= required | {"speed", "heading"}, p
        assert abs(p["distance_m"] - d) <= 1, p
        etas.append(p["eta_s"])
        dists.append(p["distance_m"])
    assert all(e > 0 for e in etas), etas
    assert all(b < a for a, b in itertools.pairwise(etas)), f"ETA must fall: {etas}"
    # Sane magnitude: 200 m at ~10 m/s with a 1.35 road factor is under a minute or so.
    assert etas[-1] < 120, etas
    view = await watcher.ok("watch", {"order_id": oid})
    assert view["eta_s"] == etas[-1] and view["distance_m"] == dists[-1], view

    # One fix inside 100 m: not yet (could be a GPS jump).
    i = len(etas)
    ts_in1 = base + i * step
    assert (await tech.ok("location", pt(at(-90), ts_in1)))["status"] == "accepted"
    p = await watcher.next("position")
    assert p["eta_s"] == 0 and p["distance_m"] <= 100
    # Second consecutive fix inside: `arrived`, by the geofence.
    ts_in2 = ts_in1 + step
    assert (await tech.ok("location", pt(at(-40), ts_in2)))["status"] == "accepted"
    ev = await orders_client.next("order_event")
    assert ev["order_id"] == oid and ev["state"] == "arrived", ev
    assert ev["actor"] == {"id": "geofence", "role": "system"}, ev
    assert ev["type"] == "state_changed"
    assert ev["data"].get("fix_ts") == ts_in2, ev
    assert (await watcher.next("position"))["eta_s"] == 0

    # More fixes at the door: still visible (`arrived`), no second arrival.
    for k, d in enumerate((30, 20, 10, 5, 2)):
        ts = ts_in2 + (k + 1) * step
        assert (await tech.ok("location", pt(at(-d), ts)))["status"] == "accepted"
        p = await watcher.next("position")
        assert p["ts"] == ts and p["eta_s"] == 0
    # An unrelated later event, serialized after anything the geofence queued.
    status, _ = await live.post_event(oid, "in_service", role="service")
    assert status == 200
    ev = await orders_client.next("order_event")
    assert ev["state"] == "in_service", ev
    assert orders_client.drain("order_event") == []
    events = await order_events(live, oid)
    states = [e["state"] for e in events]
    assert states == ["created", "assigned", "en_route", "arrived", "in_service"], events
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    arrived = [e for e in events if e["state"] == "arrived"]
    assert len(arrived) == 1 and arrived[0]["actor"] == {"id": "geofence", "role": "system"}


async def test_geofence_needs_en_route_and_consecutive_fixes(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "assigned")
    orders_client = await live.client("customer", cust)
    tech = await tracker(live, "technician", tech_id)
    base = now_ms() - 600_000
    # At the door while only `assigned`: no arrival.
    for k in range(3):
        assert (await tech.ok("location", pt(at(-10), base + k * 10_000)))["status"] == "accepted"
    status, _ = await live.post_event(oid, "en_route")
    assert status == 200
    assert (await orders_client.next("order_event"))["state"] == "en_route"
    # inside, outside, inside: not two in a row.
    ts = base + 100_000
    for d in (50, 300, 60):
        assert (await tech.ok("location", pt(at(-d), ts)))["status"] == "accepted"
        ts += 10_000
    events = await order_events(live, oid)
    assert events[-1]["state"] == "en_route", events
    assert orders_client.drain("order_event") == []
    # The next fix inside is the second in a row.
    assert (await tech.ok("location", pt(at(-20), ts)))["status"] == "accepted"
    ev = await orders_client.next("order_event")
    assert ev["state"] == "arrived" and ev["actor"] == {"id": "geofence", "role": "system"}


async def test_arrival_radius_is_a_setting(start_app: StartApp) -> None:
    live = await start_app(arrival_radius_m=300.0, **FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    orders_client = await live.client("customer", cust)
    tech = await tracker(live, "technician", tech_id)
    watcher = await tracker(live, "customer", cust)
    await watcher.ok("watch", {"order_id": oid})
    ts = now_ms() - 60_000
    for d in (280, 250):
        assert (await tech.ok("location", pt(at(-d), ts)))["status"] == "accepted"
        assert (await watcher.next("position"))["eta_s"] == 0
        ts += 10_000
    ev = await orders_client.next("order_event")
    assert ev["state"] == "arrived" and ev["actor"]["id"] == "geofence"


async def test_new_order_eta_is_not_blended_with_the_previous_orders(start_app: StartApp) -> None:
    """The ETA a customer sees for their order is about their address. A
    technician who just stood at the previous customer's door (ETA 0 there)
    and is now 3 km from this one is not "a few seconds" away."""
    live = await start_app(**FAST)
    tech_id = uid("t-")
    oid_a, _, _ = await order_in(live, "assigned", tech_id=tech_id)
    tech = await tracker(live, "technician", tech_id)
    base = now_ms() - 600_000
    for i, d in enumerate((600, 400, 200, 30)):  # ~20 m/s, ending at A's door
        assert (await tech.ok("location", pt(at(-d), base + i * 10_000)))["status"] == "accepted"
    status, _ = await live.post_event(oid_a, "cancelled", role="agent")
    assert status == 200

    b_addr = at(3000)
    order_b = await live.create_order(address={"lat": b_addr[0], "lng": b_addr[1], "text": "B"})
    oid_b = order_b["order_id"]
    await live.assign(oid_b, tech_id)
    status, _ = await live.post_event(oid_b, "en_route")
    assert status == 200
    watcher = await tracker(live, "customer", order_b["customer_id"])
    await watcher.ok("watch", {"order_id": oid_b})
    assert (await tech.ok("location", pt(at(-30), base + 50_000)))["status"] == "accepted"
    p = await watcher.next("position")
    assert p["order_id"] == oid_b and abs(p["distance_m"] - 3030) <= 2, p
    # Whatever the pace, no estimate is below distance × road factor / the fastest pace
    # (less a second: eta_s is rounded to whole seconds and distance_m to metres).
    floor = p["distance_m"] * live.settings.road_factor / MAX_SPEED_MPS - 1
    assert p["eta_s"] >= floor, f"ETA {p['eta_s']} s for {p['distance_m']} m (at least {floor:.0f} s)"


async def test_inside_fix_of_a_previous_order_does_not_count_for_the_next(start_app: StartApp) -> None:
    """Arrival needs two consecutive fixes inside *this* order's radius."""
    live = await start_app(**FAST)
    tech_id = uid("t-")
    oid_a, _, _ = await order_in(live, "en_route", tech_id=tech_id)
    tech = await tracker(live, "technician", tech_id)
    base = now_ms() - 600_000
    assert (await tech.ok("location", pt(at(-300), base)))["status"] == "accepted"
    assert (await tech.ok("location", pt(at(-50), base + 30_000)))["status"] == "accepted"  # 1 fix inside A
    status, _ = await live.post_event(oid_a, "cancelled", role="agent")
    assert status == 200
    assert [e["state"] for e in await order_events(live, oid_a)][-2:] == ["en_route", "cancelled"]

    b_addr = at(600)
    order_b = await live.create_order(address={"lat": b_addr[0], "lng": b_addr[1], "text": "B"})
    oid_b = order_b["order_id"]
    await live.assign(oid_b, tech_id)
    status, _ = await live.post_event(oid_b, "en_route")
    assert status == 200
    # One fix inside B's radius (5 m/s from A's door).
    assert (await tech.ok("location", pt(at(580), base + 150_000)))["status"] == "accepted"
    # The backend marks arrival itself: legal only if the geofence did not already
    # (anything the geofence queued holds the order's lock before this request).
    status, body = await live.post_event(oid_b, "arrived")
    events = await order_events(live, oid_b)
    assert status == 200, (body, events)
    assert [e["actor"]["id"] for e in events if e["state"] == "arrived"] != ["geofence"], events


# -- area watch ------------------------------------------------------------------------------------

async def test_area_watch_lists_batches_and_stops(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, _, a_id = await order_in(live, "en_route")
    b_id, c_id, d_id = uid("tb-"), uid("tc-"), uid("td-")
    a = await tracker(live, "technician", a_id, name="A")
    b = await tracker(live, "technician", b_id, name="B")
    c = await tracker(live, "technician", c_id, name="C")
    d = await tracker(live, "technician", d_id, name="D")
    t0 = now_ms() - 600_000
    spots = {a_id: at(-1500), b_id: at(300, 300), c_id: at(20_000), d_id: at(-100, -100)}
    for cl, tid in ((a, a_id), (b, b_id), (c, c_id), (d, d_id)):
        assert (await cl.ok("location", pt(spots[tid], t0)))["status"] == "accepted"
    await d.close()  # D goes offline; its last position stays, marked offline

    box = {"min_lat": ADDR[0] - 0.05, "min_lng": ADDR[1] - 0.05,
           "max_lat": ADDR[0] + 0.05, "max_lng": ADDR[1] + 0.05}
    agent = await tracker(live, "agent")
    agent2 = await tracker(live, "admin")
    deadline = time.monotonic() + 5
    while True:  # the disconnect is processed by the server asynchronously: bounded poll
        view = await agent.ok("watch_area", box)
        techs = {t["id"]: t for t in view["technicians"]}
        if techs.get(d_id, {}).get("status") == "offline" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert set(techs) == {a_id, b_id, d_id}, techs
    assert techs[a_id]["status"] == "busy" and techs[a_id]["order_id"] == oid
    assert techs[b_id]["status"] == "available" and techs[b_id]["order_id"] is None
    assert techs[d_id]["status"] == "offline"
    assert techs[a_id]["name"] == "A" and techs[a_id]["ts"] == t0
    assert dist((techs[b_id]["lat"], techs[b_id]["lng"]), spots[b_id]) < 0.01
    # The same box asked in GCJ-02 (an Amap console): the same technicians, drawn in GCJ-02.
    lo, hi = wgs84_to_gcj02(box["min_lat"], box["min_lng"]), wgs84_to_gcj02(box["max_lat"], box["max_lng"])
    view = await agent2.ok("watch_area", {"min_lat": lo[0], "min_lng": lo[1], "max_lat": hi[0],
                                          "max_lng": hi[1], "coord_sys": "gcj02"})
    gtechs = {t["id"]: t for t in view["technicians"]}
    assert set(gtechs) == {a_id, b_id, d_id}, gtechs
    assert dist(to_wgs84(gtechs[b_id]["lat"], gtechs[b_id]["lng"], "gcj02"), spots[b_id]) < 1.0

    # ~3 s of quick updates from A, B (inside) and C (outside).
    stamps: list[float] = []
    batches: list[dict[str, Any]] = []

    async def collect() -> None:
        while True:
            batch = await agent.next("positions", timeout=30)
            stamps.append(time.monotonic())
            batches.append(batch)

    collector = asyncio.create_task(collect())
    last: dict[str, int] = {}
    ts = t0
    started = time.monotonic()
    k = 0
    while time.monotonic() - started < 3.0:
        k += 1
        ts = t0 + k * 100
        for cl, tid in ((a, a_id), (b, b_id), (c, c_id)):
            where = at(k, 0, spots[tid])  # 1 m per 100 ms
            assert (await cl.ok("location", pt(where, ts)))["status"] == "accepted"
            last[tid] = ts
        await asyncio.sleep(0.1)  # pacing the simulated phones, not synchronization
    # Wait (bounded) for the batch carrying the final fixes.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = {t["id"]: t["ts"] for bt in batches for t in bt["technicians"]}
        if seen.get(a_id) == last[a_id] and seen.get(b_id) == last[b_id]:
            break
        await asyncio.sleep(0.05)
    collector.cancel()
    await asyncio.gather(collector, return_exceptions=True)

    assert len(batches) >= 2, batches
    gaps = [b2 - b1 for b1, b2 in itertools.pairwise(stamps)]
    assert all(g >= 0.8 for g in gaps), f"batches closer than a second: {gaps}"
    assert len(batches) <= math.ceil(time.monotonic() - started) + 1, stamps
    for bt in batches:
        ids = [t["id"] for t in bt["technicians"]]
        assert c_id not in ids, bt  # outside the box
        assert len(ids) == len(set(ids)), bt  # one entry per technician per batch
        for t in bt["technicians"]:
            assert {"id", "lat", "lng", "ts", "status"} <= set(t), t
            assert t["status"] in ("busy", "available"), t
    seen = {t["id"]: t["ts"] for bt in batches for t in bt["technicians"]}
    assert seen.get(a_id) == last[a_id] and seen.get(b_id) == last[b_id], (seen, last)

    # unwatch_area stops the batches for that watcher only.
    agent.drain("positions")
    assert await agent.ok("unwatch_area") == {}
    ts += 10_000
    assert (await a.ok("location", pt(at(-1400), ts)))["status"] == "accepted"
    while True:
        bt = await agent2.next("positions", timeout=5)
        if any(t["id"] == a_id and t["ts"] == ts for t in bt["technicians"]):
            break
    await agent.error("watch", {"order_id": uid("nope-")}, "not_found")  # round trip on agent's socket
    assert agent.drain("positions") == []


# -- trails survive a restart ---------------------------------------------------------------------

TRAIL_SECRET = "trail-test-secret-0123456789abcdef-0123456789"


def _node(data_dir: Path, cwd: Path) -> ServerProcess:
    node = ServerProcess({
        "REALTIME_DATA_DIR": str(data_dir),
        "REALTIME_JWT_SECRET": TRAIL_SECRET,
        # Long flush interval: the points can only reach the store through the
        # graceful-stop flush.
        "REALTIME_TRAIL_FLUSH_S": "600",
        "REALTIME_LOG_LEVEL": "WARNING",
    }, cwd=cwd)
    for key in ("MONGO_URL", "REALTIME_MONGO_URL", "REDIS_URL", "REALTIME_REDIS_URL"):
        node.env.pop(key, None)
    return node


def _tok(role: str, sub: str | None = None) -> str:
    return hmac_jwt(claims(sub=sub or uid(f"{role}-"), role=role), TRAIL_SECRET.encode())


async def test_trail_is_written_and_readable_after_restart() -> None:
    root = Path(tempfile.mkdtemp(prefix="rt-trail-"))
    data_dir = root / "data"
    node = _node(data_dir, root)
    await asyncio.to_thread(node.start)
    tech_id, cust_id, oid = uid("t-"), uid("c-"), uid("o-")
    session = aiohttp.ClientSession()
    client: Client | None = None
    try:
        http = Http(node.url, session)
        status, body = await http.request("POST", "/api/orders", _tok("service"), json={
            "order_id": oid, "customer_id": cust_id,
            "service": {"code": "aircon_repair", "name": "空调维修"},
            "address": {"lat": ADDR[0], "lng": ADDR[1], "text": "上海市黄浦区人民广场 1 号"},
            "window": a_window()})
        assert status == 201, body
        status, body = await http.request("POST", f"/api/orders/{oid}/assign", _tok("service"),
                                          json={"technician_id": tech_id})
        assert status == 200, body
        status, body = await http.request("POST", f"/api/orders/{oid}/events", _tok("service"),
                                          json={"state": "en_route"})
        assert status == 200, body
        client = await Client(node.url, NS, _tok("technician", tech_id)).connect()
        t0 = now_ms() - 300_000
        accepted: list[dict[str, Any]] = []
        for i in range(3):
            p = pt(at(-2000 + 50 * i), t0 + i * 10_000, accuracy=8.0)
            assert (await client.ok("location", p))["status"] == "accepted"
            accepted.append(p)
        assert (await client.ok("location", pt(at(-1800), t0 + 5_000)))["reason"] == "stale"
        batch = [pt(at(-1850), t0 + 30_000, speed=5.0, heading=10.0), pt(at(-1850), t0 + 25_000),
                 pt(at(0), t0 + 31_000), pt(at(-1800), t0 + 40_000)]
        data = await client.ok("locations", {"points": batch})
        assert [r["status"] for r in data["results"]] == ["accepted", "dropped", "dropped", "accepted"]
        accepted += [batch[0], batch[3]]
        await client.close()
        client = None
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(node.stop)  # SIGTERM: a graceful stop flushes the trail
    assert node.proc is not None and node.proc.returncode == 0, node.log.read_text()[-3000:]

    node2 = _node(data_dir, root)
    await asyncio.to_thread(node2.start)
    try:
        http = Http(node2.url, session)
        status, body = await http.request("GET", f"/api/orders/{oid}/trail", _tok("agent"))
        assert status == 200, body
        trail = body["data"]
        assert trail["order_id"] == oid and trail["technician_id"] == tech_id
        assert trail["has_more"] is False
        got = trail["points"]
        assert [p["ts"] for p in got] == [p["ts"] for p in accepted], got
        for want, have in zip(accepted, got, strict=True):
            assert dist((want["lat"], want["lng"]), (have["lat"], have["lng"])) < 0.01
            assert have["technician_id"] == tech_id
            for k in ("accuracy", "speed", "heading"):
                assert have.get(k) == want.get(k), (k, want, have)
        # Paging.
        page = f"/api/orders/{oid}/trail?after_ts={accepted[1]['ts']}&limit=2"
        status, body = await http.request("GET", page,
                                          _tok("admin"))
        assert status == 200, body
        assert [p["ts"] for p in body["data"]["points"]] == [accepted[2]["ts"], accepted[3]["ts"]]
        assert body["data"]["has_more"] is True
        # Customers (even the order's own) and technicians may not read trails.
        for token in (_tok("customer", cust_id), _tok("customer"), _tok("technician", tech_id)):
            status, body = await http.request("GET", f"/api/orders/{oid}/trail", token)
            assert status == 403 and body["error"]["code"] == "forbidden", body
        status, body = await http.request("GET", f"/api/orders/{uid('nope-')}/trail", _tok("agent"))
        assert status == 404, body
    finally:
        await session.close()
        await asyncio.to_thread(node2.stop)


async def test_a_deployment_that_keeps_no_trails(start_app: StartApp,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """REALTIME_TRAILS=false: positions relay as ever, nothing goes to the
    trails collection, and the trail endpoint says why it has nothing."""
    live = await start_app(trails=False, **FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id)
    customer = await tracker(live, "customer", cust)
    await customer.ok("watch", {"order_id": oid})
    t0 = now_ms() - 10_000
    for i in range(3):
        assert (await tech.ok("location", pt(at(-900 + 10 * i), t0 + 1000 * i)))["status"] == "accepted"
        assert (await customer.next("position"))["ts"] == t0 + 1000 * i
    status, body = await live.http.request("GET", f"/api/orders/{oid}/trail", live.token("agent"))
    assert status == 404 and body["error"]["code"] == "not_found", body
    assert "REALTIME_TRAILS" in body["error"]["message"], body
    ctx = live.app[CTX]
    assert isinstance(ctx.services.trails, KeepNoTrails)
    assert await ctx.services.store.db["trails"].count_documents(
        {"technician_id": tech_id}) == 0
    assert_no_server_errors(caplog)
