"""/tracking over the real wire: real Socket.IO clients, a live app, the real store.

Expectations come from PROTOCOL.md ("Replies", "Orders", "Tracking") and the
tracking settings (docs/tracking.md): the point filter's reasons, batches,
latest-wins, coordinate systems both ways, the privacy rules, ETA and the
arrival geofence, area batches, and trails that survive a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime.api import CTX
from storage.trails import KeepNoTrails
from tests.conftest import Live, StartApp
from tests.harness import Client, Http, ServerProcess, uid
from tests.wire import RawSocketIO, assert_error, assert_no_server_errors, claims, hmac_jwt
from tracking.eta import MAX_SPEED_MPS
from tracking.geo import from_wgs84, gcj02_to_bd09, haversine_m, to_wgs84, wgs84_to_gcj02

NS = "/tracking"
# The address live.create_order() gives every order (People's Square, Shanghai; WGS-84).
ADDR = (31.2304, 121.4737)
M_PER_DEG = haversine_m(0, 0, 1, 0)
SYSTEMS = ("wgs84", "gcj02", "bd09")
# Technicians in these tests send many points quickly; the default limit (5/s,
# burst 10) is tested on its own.
FAST = {"location_rate": 1000.0, "location_burst": 1000.0}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def at(north_m: float = 0.0, east_m: float = 0.0, origin: tuple[float, float] = ADDR) -> tuple[float, float]:
    """A WGS-84 point `north_m`/`east_m` metres from `origin`."""
    lat0, lng0 = origin
    return (lat0 + north_m / M_PER_DEG,
            lng0 + east_m / (M_PER_DEG * math.cos(math.radians(lat0))))


def pt(where: tuple[float, float], ts: int, **extra: Any) -> dict[str, Any]:
    return {"lat": where[0], "lng": where[1], "ts": ts, **extra}


def dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return haversine_m(a[0], a[1], b[0], b[1])


def fields(err: dict[str, Any]) -> set[str]:
    details = err.get("details")
    assert isinstance(details, list), err
    return {d["field"] for d in details}


PATH = {
    "created": [],
    "assigned": [],
    "en_route": ["en_route"],
    "arrived": ["en_route", "arrived"],
    "in_service": ["en_route", "arrived", "in_service"],
    "completed": ["en_route", "arrived", "in_service", "completed"],
    "cancelled": ["cancelled"],
}


async def order_in(live: Live, state: str, customer_id: str | None = None,
                   tech_id: str | None = None) -> tuple[str, str, str]:
    """An order moved (by the backend) to `state`: (order_id, customer_id, technician_id)."""
    order = await live.create_order(customer_id)
    oid, tech_id = order["order_id"], tech_id or uid("t-")
    if state != "created":
        await live.assign(oid, tech_id)
    for s in PATH[state]:
        status, body = await live.post_event(oid, s)
        assert status == 200, body
    return oid, order["customer_id"], tech_id


async def tracker(live: Live, role: str, sub: str | None = None, **kw: Any) -> Client:
    return await live.client(role, sub, namespace=NS, **kw)


async def order_events(live: Live, order_id: str) -> list[dict[str, Any]]:
    status, body = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert status == 200, body
    return list(body["data"]["events"])


# -- the point filter, one reason at a time --------------------------------------------------------

async def test_location_filter_reasons(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    tech = await tracker(live, "technician")
    home = at(-3000)
    t0 = now_ms() - 120_000

    assert await tech.ok("location", pt(home, t0)) == {"status": "accepted", "ts": t0}

    # Out of range: `invalid`, the details name the field.
    for bad, field in [({"lat": 90.5}, "lat"), ({"lat": -91.0}, "lat"),
                       ({"lng": 180.01}, "lng"), ({"lng": -200.0}, "lng")]:
        body = {**pt(home, t0 + 1000), **bad}
        err = await tech.error("location", body, "invalid")
        assert field in fields(err), err

    # From the future (more than 30 s ahead of the server's clock): `invalid`.
    future = now_ms() + 120_000
    await tech.error("location", pt(home, future), "invalid")
    # (It was not taken as the last point: the points below, all older, are judged against t0.)

    # Not newer than the last accepted point: ok reply, dropped as `stale`.
    assert await tech.ok("location", pt(home, t0)) == {"status": "dropped", "reason": "stale", "ts": t0}
    assert await tech.ok("location", pt(home, t0 - 5000)) == {
        "status": "dropped", "reason": "stale", "ts": t0 - 5000}

    # 1 km in 1 s (1000 m/s > 70 m/s): `teleport`.
    assert await tech.ok("location", pt(at(-2000), t0 + 1000)) == {
        "status": "dropped", "reason": "teleport", "ts": t0 + 1000}
    # 60 m/s is a car on an expressway: accepted, and measured from the last
    # *accepted* point (the teleport did not move it).
    assert await tech.ok("location", pt(at(-2940), t0 + 1000)) == {"status": "accepted", "ts": t0 + 1000}

    # Accuracy worse than 200 m: `inaccurate`; 200 m itself is fine.
    assert await tech.ok("location", pt(at(-2940), t0 + 2000, accuracy=500.0)) == {
        "status": "dropped", "reason": "inaccurate", "ts": t0 + 2000}
    assert await tech.ok("location", pt(at(-2940), t0 + 2000, accuracy=200.0)) == {
        "status": "accepted", "ts": t0 + 2000}

    # A phone clock a little ahead (20 s) is tolerated.
    ahead = now_ms() + 20_000
    assert await tech.ok("location", pt(at(-2940), ahead)) == {"status": "accepted", "ts": ahead}


async def test_future_point_reply_says_which_field(live: Live) -> None:
    """Replies: `invalid` comes with `details` listing the fields; Tracking: the
    reply says why a point was refused. A phone whose clock runs ahead must be
    able to tell that it is its `ts`, not its coordinates."""
    tech = await tracker(live, "technician")
    reply = await tech.call("location", pt(at(-3000), now_ms() + 3_600_000))
    assert_error(reply, "invalid", fields={"ts"})
    # In a batch the same point is `invalid` on its own line, with its ts.
    future = now_ms() + 3_600_000
    data = await tech.ok("locations", {"points": [pt(at(-3000), future)]})
    [result] = data["results"]
    assert result["status"] == "invalid" and result["ts"] == future, data
    assert data["invalid"] == 1 and data["accepted"] == 0, data


async def test_non_finite_coordinates_over_a_raw_socket(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """JSON as Python's json reads it accepts NaN and Infinity; the server must
    answer `invalid`, not store NaN nor crash."""
    tech_id = uid("t-")
    raw = await RawSocketIO.open(live.http.session, live.url)
    try:
        kind, data = await raw.connect_ns(NS, json.dumps({"token": live.token("technician", tech_id)}))
        assert kind == "connect" and "sid" in data, data
        ts = now_ms() - 10_000
        lat, lng = at(-1000)
        bodies = [
            f'{{"lat":NaN,"lng":{lng},"ts":{ts}}}',
            f'{{"lat":{lat},"lng":NaN,"ts":{ts}}}',
            f'{{"lat":Infinity,"lng":{lng},"ts":{ts}}}',
            f'{{"lat":{lat},"lng":-Infinity,"ts":{ts}}}',
            f'{{"lat":{lat},"lng":{lng},"ts":{ts},"accuracy":NaN}}',
            f'{{"lat":{lat},"lng":{lng},"ts":{ts},"speed":Infinity}}',
            f'{{"lat":{lat},"lng":{lng},"ts":{ts},"heading":NaN}}',
        ]
        for i, body in enumerate(bodies, start=1):
            [reply] = await raw.call(NS, i, f'["location",{body}]')
            assert_error(reply, "invalid")
        # NaN is not JSON: a batch holding one is refused whole (the packet does not
        # parse; docs/protocol.md, Replies), and nothing of it is stored.
        batch = (f'["locations",{{"points":[{{"lat":{lat},"lng":{lng},"ts":{ts}}},'
                 f'{{"lat":NaN,"lng":{lng},"ts":{ts + 1000}}},'
                 f'{{"lat":{lat},"lng":{lng},"ts":{ts + 2000}}}]}}]')
        [reply] = await raw.call(NS, 50, batch)
        assert_error(reply, "invalid")
        [reply] = await raw.call(NS, 52, batch.replace("NaN", str(lat)))
        assert reply["ok"] is True, reply
        data = reply["data"]
        assert [r["status"] for r in data["results"]] == ["accepted"] * 3, data
        # The socket still works: a good point is accepted.
        [reply] = await raw.call(NS, 51, '["location",' + json.dumps(pt((lat, lng), ts + 3000)) + "]")
        assert reply == {"ok": True, "data": {"status": "accepted", "ts": ts + 3000}}, reply
    finally:
        await raw.close()
    # No NaN reached the position store: an agent sees the last good point.
    agent = await tracker(live, "agent")
    view = await agent.ok("watch_area", {"min_lat": lat - 0.01, "min_lng": lng - 0.01,
                                         "max_lat": lat + 0.01, "max_lng": lng + 0.01})
    [me] = [t for t in view["technicians"] if t["id"] == tech_id]
    assert me["ts"] == ts + 3000 and math.isfinite(me["lat"]) and math.isfinite(me["lng"])
    assert_no_server_errors(caplog)


async def test_rate_limited(start_app: StartApp) -> None:
    live = await start_app(location_rate=1.0, location_burst=2.0)
    tech = await tracker(live, "technician")
    other = await tracker(live, "technician")
    t0 = now_ms() - 60_000
    where = at(-5000)
    assert (await tech.ok("location", pt(where, t0)))["status"] == "accepted"
    assert (await tech.ok("location", pt(where, t0 + 1000)))["status"] == "accepted"
    err = await tech.error("location", pt(where, t0 + 2000), "rate_limited")
    retry = err["retry_after_ms"]
    assert isinstance(retry, int) and 0 < retry <= 1000, err
    # A batch is one message: limited as well, and nothing in it is stored.
    err = await tech.error("locations", {"points": [pt(where, t0 + 3000)]}, "rate_limited")
    assert err["retry_after_ms"] > 0
    # The limit is per technician.
    assert (await other.ok("location", pt(where, t0)))["status"] == "accepted"
    # After the advised wait, the technician may send again (the wait *is* the contract here).
    await asyncio.sleep(err["retry_after_ms"] / 1000 + 0.05)
    assert await tech.ok("location", pt(where, t0 + 4000)) == {"status": "accepted", "ts": t0 + 4000}


# -- batches -----------------------------------------------------------------------------------------

async def test_locations_batch_mixed(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    tech_id = uid("t-")
    tech = await tracker(live, "technician", tech_id)
    t0 = now_ms() - 100_000
    a, b, c = at(-2000), at(-1990), at(-1980)
    points: list[Any] = [
        pt(a, t0),                                  # 0 accepted
        "not a point",                              # 1 invalid: not an object
        {"lat": a[0], "lng": a[1]},                 # 2 invalid: ts missing
        pt(b, t0 + 1000),                           # 3 accepted
        pt(b, t0 + 500),                            # 4 stale (older than #3)
        pt(at(-1000), t0 + 2000),                   # 5 teleport (990 m in 1 s)
        pt(c, t0 + 3000, accuracy=999.0),           # 6 inaccurate
        {**pt(c, t0 + 3000), "altitude": 12},       # 7 invalid: unknown field
        pt((91.0, a[1]), t0 + 3000),                # 8 invalid: out of range
        12345,                                      # 9 invalid
        None,                                       # 10 invalid
        [a[0], a[1], t0 + 3000],                    # 11 invalid: a list is not an object
        pt(b, t0 + 1000),                           # 12 stale (equal to #3)
        pt(c, t0 + 4000, speed=5.0, heading=90.0),  # 13 accepted
    ]
    data = await tech.ok("locations", {"points": points})
    results = data["results"]
    assert len(results) == len(points)
    expected = [
        ("accepted", None), ("invalid", "invalid"), ("invalid", "invalid"), ("accepted", None),
        ("dropped", "stale"), ("dropped", "teleport"), ("dropped", "inaccurate"),
        ("invalid", "invalid"), ("invalid", "invalid"), ("invalid", "invalid"),
        ("invalid", "invalid"), ("invalid", "invalid"), ("dropped", "stale"), ("accepted", None),
    ]
    assert [(r["status"], r.get("reason")) for r in results] == expected, results
    # Aligned: each filtered point's result carries its own ts.
    for i in (0, 3, 4, 5, 6, 12, 13):
        assert results[i]["ts"] == points[i]["ts"], (i, results[i])
    # A point that failed validation says which field.
    assert any("ts" in str(d.get("field")) for d in results[2]["details"]), results[2]
    assert any("altitude" in str(d.get("field")) for d in results[7]["details"]), results[7]
    assert any("lat" in str(d.get("field")) for d in results[8]["details"]), results[8]
    assert (data["accepted"], data["dropped"], data["invalid"]) == (3, 4, 7), data

    # The newest accepted point (#13) is the position.
    agent = await tracker(live, "agent")
    view = await agent.ok("watch_area", {"min_lat": c[0] - 0.01, "min_lng": c[1] - 0.01,
                                         "max_lat": c[0] + 0.01, "max_lng": c[1] + 0.01})
    [me] = [t for t in view["technicians"] if t["id"] == tech_id]
    assert me["ts"] == t0 + 4000 and dist((me["lat"], me["lng"]), c) < 0.01
    assert me["speed"] == 5.0 and me["heading"] == 90.0


async def test_locations_batch_size_limits(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    tech = await tracker(live, "technician")
    t0 = now_ms() - 3_600_000
    start = at(-4000)
    batch = [pt(at(-4000 + i), t0 + i * 1000) for i in range(500)]
    data = await tech.ok("locations", {"points": batch})
    assert len(data["results"]) == 500 and data["accepted"] == 500, {k: data[k] for k in
                                                                        ("accepted", "dropped", "invalid")}
    too_many = [pt(start, t0 + 600_000 + i * 1000) for i in range(501)]
    err = await tech.error("locations", {"points": too_many}, "invalid")
    assert "points" in fields(err), err
    err = await tech.error("locations", {"points": []}, "invalid")
    assert "points" in fields(err), err
    # Nothing of the refused batch was stored: its first point is still newer than the last.
    assert (await tech.ok("location", pt(start, t0 + 600_000)))["status"] == "accepted"


async def test_locations_gcj02_batch_is_stored_as_wgs84(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id)
    wgs = [at(-3000), at(-2900), at(-2800)]
    t0 = now_ms() - 60_000
    gcj = [wgs84_to_gcj02(*w) for w in wgs]
    assert all(dist(g, w) > 300 for g, w in zip(gcj, wgs, strict=True))  # the systems do differ here
    data = await tech.ok("locations", {"coord_sys": "gcj02",
                                       "points": [pt(g, t0 + i * 10_000) for i, g in enumerate(gcj)]})
    assert data["accepted"] == 3, data
    # A point may also name its own system.
    bd = from_wgs84(*at(-2700), "bd09")
    data = await tech.ok("locations", {"points": [pt(bd, t0 + 30_000, coord_sys="bd09")]})
    assert data["accepted"] == 1, data

    # An agent's area view (WGS-84 by default) has the technician at the WGS-84 point...
    agent = await tracker(live, "agent")
    box = {"min_lat": ADDR[0] - 0.1, "min_lng": ADDR[1] - 0.1,
           "max_lat": ADDR[0] + 0.1, "max_lng": ADDR[1] + 0.1}
    view = await agent.ok("watch_area", box)
    [me] = [t for t in view["technicians"] if t["id"] == tech_id]
    assert dist((me["lat"], me["lng"]), at(-2700)) < 1.0, me
    # ...and so does the customer's `watch` (WGS-84 by default); distance is WGS-84 to the address.
    customer = await tracker(live, "customer", cust)
    view = await customer.ok("watch", {"order_id": oid})
    pos = view["position"]
    assert dist((pos["lat"], pos["lng"]), at(-2700)) < 1.0, view
    assert pos["ts"] == t0 + 30_000
    assert abs(view["distance_m"] - 2700) <= 2, view


# -- latest wins ---------------------------------------------------------------------------------------

async def test_latest_wins_under_reordered_input(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "assigned")
    tech = await tracker(live, "technician", tech_id)
    customer = await tracker(live, "customer", cust)
    await customer.ok("watch", {"order_id": oid})
    base = now_ms() - 60_000
    p1, p2, p3 = at(-1600), at(-1580), at(-1560)

    assert (await tech.ok("location", pt(p3, base + 3000)))["status"] == "accepted"
    seen = await customer.next("position")
    assert seen["ts"] == base + 3000 and seen["order_id"] == oid and seen["technician_id"] == tech_id
    for where, ts in ((p1, base + 1000), (p2, base + 2000)):
        assert await tech.ok("location", pt(where, ts)) == {"status": "dropped", "reason": "stale", "ts": ts}

    # `watch` still shows ts 3; its ack comes after any push made before it: none was.
    view = await customer.ok("watch", {"order_id": oid})
    assert view["position"]["ts"] == base + 3000, view
    assert dist((view["position"]["lat"], view["position"]["lng"]), p3) < 0.01
    assert customer.drain("position") == []

    # The same in one batch: [6, 4, 5] -> only 6 is accepted and pushed, once.
    data = await tech.ok("locations", {"points": [pt(at(-1500), base + 6000), pt(at(-1540), base + 4000),
                                                  pt(at(-1520), base + 5000)]})
    assert [r["status"] for r in data["results"]] == ["accepted", "dropped", "dropped"], data
    seen = await customer.next("position")
    assert seen["ts"] == base + 6000
    view = await customer.ok("watch", {"order_id": oid})
    assert view["position"]["ts"] == base + 6000
    assert customer.drain("position") == []

    # A second connection of the same technician cannot move the marker back either.
    tech2 = await tracker(live, "technician", tech_id)
    assert (await tech2.ok("location", pt(p2, base + 5500)))["reason"] == "stale"
    view = await customer.ok("watch", {"order_id": oid})
    assert view["position"]["ts"] == base + 6000
    assert customer.drain("position") == []


# -- coordinate systems over the wire --------------------------------------------------------------

async def test_coordinate_systems_both_ways(start_app: StartApp) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id, name="王师傅")
    watchers = {cs: await tracker(live, "customer", cust) for cs in SYSTEMS}
    for cs, c in watchers.items():
        view = await c.ok("watch", {"order_id": oid, "coord_sys": cs})
        assert view["coord_sys"] == cs and view["order_id"] == oid
        assert view["technician"]["id"] == tech_id

    # The technician's phone draws on Amap: it sends GCJ-02.
    w1 = at(-1200, 400)
    g1 = wgs84_to_gcj02(*w1)
    ts = now_ms() - 30_000
    assert (await tech.ok("location", pt(g1, ts, coord_sys="gcj02")))["status"] == "accepted"
    expected_out = {"wgs84": w1, "gcj02": g1, "bd09": gcj02_to_bd09(*g1)}
    for cs, c in watchers.items():
        p = await c.next("position")
        assert p["ts"] == ts
        assert dist((p["lat"], p["lng"]), expected_out[cs]) < 1.0, (cs, p)
        back = to_wgs84(p["lat"], p["lng"], cs)  # type: ignore[arg-type]
        assert dist(back, w1) < 1.0, (cs, p, back)
        # Distance is between WGS-84 points, whatever the viewer's system.
        assert abs(p["distance_m"] - dist(w1, ADDR)) <= 1.5, p
    # The `watch` reply is converted the same way.
    for cs, c in watchers.items():
        view = await c.ok("watch", {"order_id": oid, "coord_sys": cs})
        pos = view["position"]
        assert dist(to_wgs84(pos["lat"], pos["lng"], cs), w1) < 1.0, (cs, view)  # type: ignore[arg-type]
        assert view["technician"] == {"id": tech_id, "name": "王师傅"}

    # Now a Baidu-map phone: BD-09 in, every viewer gets the same physical point.
    w2 = at(-1100, 350)
    ts2 = ts + 10_000
    reply = await tech.ok("location", pt(from_wgs84(*w2, "bd09"), ts2, coord_sys="bd09"))
    assert reply["status"] == "accepted"
    for cs, c in watchers.items():
        p = await c.next("position")
        assert p["ts"] == ts2
        assert dist(to_wgs84(p["lat"], p["lng"], cs), w2) < 1.0, (cs, p)  # type: ignore[arg-type]

    # Re-watching in another system switches the stream (no double delivery).
    c = watchers["wgs84"]
    await c.ok("watch", {"order_id": oid, "coord_sys": "bd09"})
    w3 = at(-1000, 300)
    assert (await tech.ok("location", pt(w3, ts2 + 10_000)))["status"] == "accepted"
    p = await c.next("position")
    assert dist(to_wgs84(p["lat"], p["lng"], "bd09"), w3) < 1.0
    await c.ok("unwatch", {"order_id": oid})  # round trip: anything pushed earlier has arrived
    assert c.drain("position") == []


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
    assert (await customer.next("position"))["technician_id"] == tech1_id
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
            "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000}})
        assert status == 201, body
        status, body = await http.request("POST", f"/api/orders/{oid}/assign", _tok("service"),
                                          json={"technician_id": tech_id})
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


# -- bad payloads ------------------------------------------------------------------------------------

HUGE = "x" * 50_000


def _point_payloads(ts: int) -> list[Any]:
    good = pt(at(-3000), ts)
    return [
        None, [], [good], "location", 42, 3.5, True,
        {}, {"lng": good["lng"], "ts": ts}, {"lat": good["lat"], "ts": ts},
        {"lat": good["lat"], "lng": good["lng"]},
        {**good, "lat": "31.2"}, {**good, "lat": True}, {**good, "lat": None}, {**good, "lng": [121.4]},
        {**good, "lat": {"deg": 31}},
        {**good, "ts": "1700000000000"}, {**good, "ts": 1.5}, {**good, "ts": -1}, {**good, "ts": 10**20},
        {**good, "ts": None}, {**good, "ts": False},
        {**good, "accuracy": -1}, {**good, "accuracy": "good"}, {**good, "speed": -3},
        {**good, "speed": 10**6}, {**good, "heading": 361}, {**good, "heading": -1},
        {**good, "coord_sys": "WGS84"}, {**good, "coord_sys": "mars"}, {**good, "coord_sys": 2},
        {**good, "coord_sys": HUGE},
        {**good, "technician_id": "someone-else"}, {**good, "foo": 1},
        {**good, "lat": HUGE},
    ]


def _batch_payloads(ts: int) -> list[Any]:
    good = pt(at(-3000), ts)
    return [
        None, [], [good], "points", 7, {}, {"points": None}, {"points": "abc"}, {"points": {"0": good}},
        {"points": []}, {"points": good}, {"points": [good] * 501},
        {"points": [good], "coord_sys": "utm"}, {"points": [good], "coord_sys": HUGE},
        {"points": [good], "technician_id": "x"}, {"points": HUGE}, {"point": [good]},
    ]


def _order_payloads(extra_ok: bool) -> list[Any]:
    out: list[Any] = [
        None, [], ["o-1"], "o-1", 1, {}, {"order_id": None}, {"order_id": 123}, {"order_id": ["o-1"]},
        {"order_id": ""}, {"order_id": "has space"}, {"order_id": "x" * 65}, {"order_id": HUGE},
        {"order_id": "o/../1"}, {"order_id": "o-1", "foo": 1},
        {"orderId": "o-1"},
    ]
    if extra_ok:  # `watch` has coord_sys
        out += [{"order_id": "o-1", "coord_sys": "utm"}, {"order_id": "o-1", "coord_sys": None},
                {"order_id": "o-1", "coord_sys": HUGE}]
    else:  # `unwatch` has none
        out += [{"order_id": "o-1", "coord_sys": "gcj02"}]
    return out


def _area_payloads() -> list[Any]:
    box = {"min_lat": 31.0, "min_lng": 121.0, "max_lat": 32.0, "max_lng": 122.0}
    return [
        None, [], [box], "box", 0, {}, {k: v for k, v in box.items() if k != "max_lng"},
        {**box, "min_lat": 33.0}, {**box, "min_lng": 123.0}, {**box, "max_lat": 91.0},
        {**box, "min_lng": -181.0},
        {**box, "min_lat": "31"}, {**box, "max_lat": None}, {**box, "min_lat": True},
        {**box, "coord_sys": "mars"}, {**box, "zoom": 12}, {**box, "min_lat": HUGE},
    ]


async def test_bad_payload_matrix(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "en_route")
    tech = await tracker(live, "technician", tech_id)
    customer = await tracker(live, "customer", cust)
    agent = await tracker(live, "agent")
    ts = now_ms() - 60_000

    matrix: list[tuple[Client, str, list[Any]]] = [
        (tech, "location", _point_payloads(ts)),
        (tech, "locations", _batch_payloads(ts)),
        (customer, "watch", _order_payloads(True)),
        (agent, "watch", _order_payloads(True)),
        (customer, "unwatch", _order_payloads(False)),
        (agent, "watch_area", _area_payloads()),
    ]
    for client, event, payloads in matrix:
        for payload in payloads:
            reply = await client.call(event, payload)
            assert_error(reply, "invalid")
            assert HUGE not in json.dumps(reply), f"{event}: the reply echoes the input"

    # A batch that is well-formed as a batch but holds junk: answered point by point.
    data = await tech.ok("locations", {"points": [HUGE, {"lat": "9" * 5000}, [1, 2], None]})
    assert (data["accepted"], data["dropped"], data["invalid"]) == (0, 0, 4), data
    assert HUGE not in json.dumps(data)

    # unwatch_area takes no payload; whatever comes, the reply has the Replies shape.
    for payload in (None, {}, {"foo": 1}, "x", [1], HUGE):
        reply = await agent.call("unwatch_area", payload)
        if reply.get("ok") is not True:
            assert_error(reply, "invalid")

    # Unknown events are answered too.
    assert_error(await tech.call("teleport", {"lat": 0}), "invalid")
    assert_error(await customer.call("position", {"order_id": oid}), "invalid")

    # Every connection still works, and nothing was stored from the bad payloads.
    view = await customer.ok("watch", {"order_id": oid})
    assert view["position"] is None, view
    assert await tech.ok("location", pt(at(-3000), ts)) == {"status": "accepted", "ts": ts}
    assert (await customer.next("position"))["ts"] == ts
    assert (await agent.ok("watch", {"order_id": oid}))["position"]["ts"] == ts
    box = {"min_lat": 31.0, "min_lng": 121.0, "max_lat": 32.0, "max_lng": 122.0}
    assert [t["id"] for t in (await agent.ok("watch_area", box))["technicians"]] == [tech_id]
    assert tech.sio.connected and customer.sio.connected and agent.sio.connected
    assert_no_server_errors(caplog)


async def test_invalid_replies_stay_small_for_huge_unknown_keys(live: Live) -> None:
    """An unknown field whose *name* is 50 KB is refused like any unknown field,
    and the reply does not carry those 50 KB back (realtime/errors.py promises
    details "never the offending input (it may be huge or private)")."""
    tech = await tracker(live, "technician")
    agent = await tracker(live, "agent")
    box = {"min_lat": 31.0, "min_lng": 121.0, "max_lat": 32.0, "max_lng": 122.0}
    cases: list[tuple[Client, str, dict[str, Any]]] = [
        (tech, "location", {**pt(at(-3000), now_ms()), HUGE: 1}),
        (tech, "locations", {"points": [pt(at(-3000), now_ms())], HUGE: 1}),
        (agent, "watch", {"order_id": "o-1", HUGE: True}),
        (agent, "unwatch", {"order_id": "o-1", HUGE: True}),
        (agent, "watch_area", {**box, HUGE: 1}),
    ]
    sizes = {}
    for client, event, payload in cases:
        reply = await client.call(event, payload)
        assert_error(reply, "invalid")
        sizes[event] = len(json.dumps(reply))
    assert all(n < 4096 for n in sizes.values()), f"reply sizes in bytes: {sizes}"


# -- a backlog read at once: only the superseded fixes are skipped ------------------------------------

def _client_frame(text: str) -> bytes:
    """One masked client-to-server text frame (RFC 6455), built by hand."""
    payload = bytearray(text.encode())
    mask = os.urandom(4)
    for i in range(len(payload)):
        payload[i] ^= mask[i % 4]
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(payload)


async def test_fixes_read_together_skip_only_the_superseded_and_all_are_kept(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    """Fixes that arrive in one socket read (a phone flushing a backlog, a server
    catching up) are each filtered, acked and kept in the trail. Watchers get
    every one of them except those a newer fix of the read is at least
    SUPERSEDED_MS newer than: a backlog of seconds goes out as its newest fix,
    fixes 40 ms apart all go out, in order."""
    from realtime.feeds.tracking import SUPERSEDED_MS
    live = await start_app(**FAST)
    oid, cust, tech_id = await order_in(live, "assigned")
    customer = await tracker(live, "customer", cust)
    await customer.ok("watch", {"order_id": oid})
    raw = await RawSocketIO.open(live.http.session, live.url)
    try:
        kind, _ = await raw.connect_ns(NS, json.dumps({"token": live.token("technician", tech_id)}))
        assert kind == "connect"
        t0 = now_ms() - 30_000
        [reply] = await raw.call(NS, 1, json.dumps(["location", pt(at(-900), t0)]))
        assert reply["ok"] is True, reply
        assert (await customer.next("position"))["ts"] == t0

        frames = b"".join(
            _client_frame(f"42{NS},{i}" + json.dumps(["location", pt(at(-900 + 10 * i), t0 + 1000 * i)]))
            for i in (2, 3, 4))
        transport = raw.ws._writer.transport
        assert transport is not None
        transport.write(frames)  # one TCP write: the server reads them together
        for i in (2, 3, 4):
            [reply] = await raw.ack(NS, i)
            assert reply == {"ok": True, "data": {"status": "accepted", "ts": t0 + 1000 * i}}, reply
        newest = await customer.next("position")
        assert newest["ts"] == t0 + 4000, newest
        await customer.ok("watch", {"order_id": oid})  # a round trip: anything pushed has arrived
        assert customer.drain("position") == []

        # 5: superseded by 8 (SUPERSEDED_MS newer); 6, 7 and 8 are within it of 8.
        close = [t0 + 5000, t0 + 6000 - SUPERSEDED_MS + 1, t0 + 5960, t0 + 6000]
        transport.write(b"".join(
            _client_frame(f"42{NS},{i}" + json.dumps(["location", pt(at(-859 + 0.1 * i), ts)]))
            for i, ts in zip((5, 6, 7, 8), close, strict=True)))
        for i, ts in zip((5, 6, 7, 8), close, strict=True):
            [reply] = await raw.ack(NS, i)
            assert reply == {"ok": True, "data": {"status": "accepted", "ts": ts}}, reply
    finally:
        await raw.close()
    pushed = [(await customer.next("position"))["ts"] for _ in range(3)]
    assert pushed == close[1:], pushed
    await customer.ok("watch", {"order_id": oid})
    assert customer.drain("position") == []

    # The trail keeps every accepted fix (it is written in the background).
    async with asyncio.timeout(10):
        while True:
            status, body = await live.http.request("GET", f"/api/orders/{oid}/trail", live.token("agent"))
            assert status == 200, body
            if len(body["data"]["points"]) == 8:
                break
            await asyncio.sleep(0.2)
    assert [p["ts"] for p in body["data"]["points"]] == [t0 + 1000 * i for i in (0, 2, 3, 4)] + close
    assert_no_server_errors(caplog)


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
