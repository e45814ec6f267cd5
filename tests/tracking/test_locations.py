"""GPS points over the wire: the filter, batches, latest wins, coordinate
systems, bad payloads, and a backlog read at once."""

from __future__ import annotations

import asyncio
import json
import math
import os
from typing import Any

import pytest

from tests.conftest import Live, StartApp
from tests.harness import Client, uid
from tests.tracking.wire import (
    ADDR,
    FAST,
    NS,
    SYSTEMS,
    at,
    dist,
    fields,
    now_ms,
    order_in,
    pt,
    tracker,
)
from tests.wire import RawSocketIO, assert_error, assert_no_server_errors
from tracking.geo import from_wgs84, gcj02_to_bd09, to_wgs84, wgs84_to_gcj02

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
    oid, cust, tech_id = await order_in(live, "en_route")
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
        back = to_wgs84(p["lat"], p["lng"], cs)
        assert dist(back, w1) < 1.0, (cs, p, back)
        # Distance is between WGS-84 points, whatever the viewer's system.
        assert abs(p["distance_m"] - dist(w1, ADDR)) <= 1.5, p
    # The `watch` reply is converted the same way.
    for cs, c in watchers.items():
        view = await c.ok("watch", {"order_id": oid, "coord_sys": cs})
        pos = view["position"]
        assert dist(to_wgs84(pos["lat"], pos["lng"], cs), w1) < 1.0, (cs, view)
        assert view["technician"] == {"id": tech_id, "name": "王师傅"}

    # Now a Baidu-map phone: BD-09 in, every viewer gets the same physical point.
    w2 = at(-1100, 350)
    ts2 = ts + 10_000
    reply = await tech.ok("location", pt(from_wgs84(*w2, "bd09"), ts2, coord_sys="bd09"))
    assert reply["status"] == "accepted"
    for cs, c in watchers.items():
        p = await c.next("position")
        assert p["ts"] == ts2
        assert dist(to_wgs84(p["lat"], p["lng"], cs), w2) < 1.0, (cs, p)

    # Re-watching in another system switches the stream (no double delivery).
    c = watchers["wgs84"]
    await c.ok("watch", {"order_id": oid, "coord_sys": "bd09"})
    w3 = at(-1000, 300)
    assert (await tech.ok("location", pt(w3, ts2 + 10_000)))["status"] == "accepted"
    p = await c.next("position")
    assert dist(to_wgs84(p["lat"], p["lng"], "bd09"), w3) < 1.0
    await c.ok("unwatch", {"order_id": oid})  # round trip: anything pushed earlier has arrived
    assert c.drain("position") == []


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
    oid, cust, tech_id = await order_in(live, "en_route")
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
