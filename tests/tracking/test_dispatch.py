"""Dispatch (人员调度), nearest search and /ops over the real wire.

Expectations come from PROTOCOL.md ("Orders": dispatch; "HTTP API": nearby,
dispatch), docs/protocol.md ("Dispatch offers", "Operations (namespace
/ops)", the HTTP API table) and docs/dispatch.md (who is considered, the
reasons, the strategies, exactly one accept).

Technicians become candidates by connecting to /tracking (presence) and
sending a `location`; their token's `skills` go into their position record.
Offers reach them on /orders, so each technician here holds both connections.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import pytest
import socketio

from tests.conftest import Live, StartApp
from tests.harness import Client, uid
from tests.wire import assert_error, assert_no_server_errors
from tracking.geo import haversine_m

# The address live.create_order() gives every order (People's Square, Shanghai; WGS-84).
ADDR = (31.2304, 121.4737)
M_PER_DEG = haversine_m(0, 0, 1, 0)
DISPATCH_ACTOR = {"id": "dispatch", "role": "system"}
WAIT_S = 10.0
# Positions older than this are stale in the apps these tests start; a
# "stale" technician sends a fix twice as old. Fresh fixes stay fresh for
# the whole test, however slow the machine.
STALE_S = 30.0
NEARBY_FIELDS = {"id", "name", "lat", "lng", "ts", "distance_m", "skills", "status"}
OFFER_FIELDS = {"order_id", "dispatch_id", "service", "address", "window", "expires_ts"}
ROUND_FIELDS = {"dispatch_id", "strategy", "status", "assigned_to", "radius_m", "count",
                "timeout_s", "created_ts", "finished_ts", "candidates"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def at(north_m: float = 0.0, east_m: float = 0.0) -> tuple[float, float]:
    """A WGS-84 point `north_m`/`east_m` metres from the order address."""
    lat0, lng0 = ADDR
    return (lat0 + north_m / M_PER_DEG,
            lng0 + east_m / (M_PER_DEG * math.cos(math.radians(lat0))))


@dataclass
class Tech:
    id: str
    tracking: Client
    orders: Client | None
    north_m: float


async def technician(live: Live, north_m: float, skills: tuple[str, ...] = ("aircon",), *,
                     age_s: float = 0.0, orders: bool = True) -> Tech:
    """A technician online on /tracking with one fix `north_m` north of the
    address, `age_s` old; with `orders`, also on /orders to receive offers."""
    tid = uid("t-")
    kw: dict[str, Any] = {"skills": list(skills), "name": f"name-{tid}"}
    trk = await live.client("technician", tid, namespace="/tracking", **kw)
    lat, lng = at(north_m)
    reply = await trk.ok("location", {"lat": lat, "lng": lng, "ts": now_ms() - int(age_s * 1000)})
    assert reply["status"] == "accepted", reply
    ords = await live.client("technician", tid, **kw) if orders else None
    return Tech(tid, trk, ords, north_m)


async def presence_of(ops: Client, user_id: str, online: bool | None = None) -> dict[str, Any]:
    """The next `presence` event about `user_id` (with `online`, the next such one)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            ev = await ops.next("presence")
            if ev.get("user_id") == user_id and (online is None or ev.get("online") is online):
                return dict(ev)


async def go_offline(t: Tech, ops: Client) -> None:
    """Close the technician's /tracking connection; return once /ops says they are offline."""
    await t.tracking.close()
    ev = await presence_of(ops, t.id, online=False)
    assert ev == {"kind": "technician", "user_id": t.id, "online": False}, ev


async def ops_viewer(live: Live) -> Client:
    return await live.client("agent", namespace="/ops")


async def nearby(live: Live, query: str, role: str = "service") -> tuple[int, Any]:
    return await live.http.request("GET", f"/api/technicians/nearby?{query}", live.token(role))


async def nearby_ids(live: Live, query: str = "", role: str = "service") -> list[str]:
    lat, lng = ADDR
    status, reply = await nearby(live, f"lat={lat}&lng={lng}" + (f"&{query}" if query else ""), role)
    assert status == 200 and reply["ok"] is True, (status, reply)
    techs = reply["data"]["technicians"]
    for t in techs:
        assert set(t) == NEARBY_FIELDS, t
    return [t["id"] for t in techs]


async def start_dispatch(live: Live, order_id: str, body: Any = None,
                         role: str = "service") -> tuple[int, Any]:
    return await live.http.request("POST", f"/api/orders/{order_id}/dispatch", live.token(role),
                                   json=body)


async def started(live: Live, order_id: str, body: Any = None) -> dict[str, Any]:
    status, reply = await start_dispatch(live, order_id, body)
    assert status == 202 and reply["ok"] is True, (status, reply)
    return dict(reply["data"]["dispatch"])


async def rounds(live: Live, order_id: str, role: str = "service") -> list[dict[str, Any]]:
    status, reply = await live.http.request("GET", f"/api/orders/{order_id}/dispatch",
                                            live.token(role))
    assert status == 200 and reply["ok"] is True, (status, reply)
    assert reply["data"]["order_id"] == order_id, reply
    return list(reply["data"]["dispatches"])


def by_tech(round_: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["technician_id"]: c for c in round_["candidates"]}


async def order_and_events(live: Live, order_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    status, reply = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert status == 200, reply
    return reply["data"]["order"], reply["data"]["events"]


def assert_offer(offer: dict[str, Any], order: dict[str, Any], dispatch_id: str,
                 timeout_s: float) -> None:
    assert set(offer) == OFFER_FIELDS, offer
    assert offer["order_id"] == order["order_id"] and offer["dispatch_id"] == dispatch_id, offer
    assert offer["service"] == order["service"], offer
    assert offer["address"] == order["address"], offer
    assert offer["window"] == order["window"], offer
    assert isinstance(offer["expires_ts"], int), offer
    left_ms = offer["expires_ts"] - now_ms()
    assert -2000 < left_ms <= timeout_s * 1000 + 500, offer


# -- nearest search ---------------------------------------------------------------------------

async def test_nearby_lists_available_fresh_skilled_technicians_nearest_first(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app(stale_position_s=STALE_S)
    ops = await ops_viewer(live)
    a = await technician(live, 100, orders=False)
    b = await technician(live, 300, ("aircon", "plumbing"), orders=False)
    c = await technician(live, 600, ("plumbing",), orders=False)
    d = await technician(live, 400, orders=False)
    far = await technician(live, 7000, orders=False)
    await technician(live, 200, age_s=2 * STALE_S, orders=False)  # stale
    busy = await technician(live, 250, orders=False)
    await live.assign((await live.create_order())["order_id"], busy.id)
    working = await technician(live, 270, orders=False)  # in_service: still busy
    done = await technician(live, 350, orders=False)  # completed: free again
    for t, states in ((working, ("en_route", "arrived", "in_service")),
                      (done, ("en_route", "arrived", "in_service", "completed"))):
        job = (await live.create_order())["order_id"]
        await live.assign(job, t.id)
        for state in states:
            status, reply = await live.post_event(job, state)
            assert status == 200, reply
    gone = await technician(live, 150, orders=False)
    await go_offline(gone, ops)

    assert await nearby_ids(live, "skill=aircon") == [a.id, b.id, done.id, d.id]
    assert await nearby_ids(live) == [a.id, b.id, done.id, d.id, c.id]
    assert await nearby_ids(live, "skill=plumbing") == [b.id, c.id]
    assert await nearby_ids(live, "limit=2") == [a.id, b.id]
    assert await nearby_ids(live, "limit=1&skill=plumbing") == [b.id]
    assert await nearby_ids(live, "radius_m=250") == [a.id]
    assert await nearby_ids(live, "radius_m=10000&skill=aircon") == [a.id, b.id, done.id, d.id, far.id]
    assert await nearby_ids(live, "skill=welding") == []
    for role in ("agent", "admin"):
        assert await nearby_ids(live, "skill=aircon", role) == [a.id, b.id, done.id, d.id]

    # The items: where, how far, what they can do.
    lat, lng = ADDR
    status, reply = await nearby(live, f"lat={lat}&lng={lng}&skill=plumbing")
    assert status == 200, reply
    first = reply["data"]["technicians"][0]
    assert first["id"] == b.id and first["name"] == f"name-{b.id}", first
    assert abs(first["distance_m"] - 300) <= 2, first
    assert sorted(first["skills"]) == ["aircon", "plumbing"], first
    assert first["status"] == "available", first
    assert (first["lat"], first["lng"]) == pytest.approx(at(300), abs=1e-6), first
    assert isinstance(first["ts"], int) and abs(first["ts"] - now_ms()) < 60_000, first

    # Leaving /tracking means leaving the list.
    await go_offline(d, ops)
    assert await nearby_ids(live, "skill=aircon") == [a.id, b.id, done.id]
    assert_no_server_errors(caplog)


BAD_NEARBY = {
    "lat_missing": ("lng=121.47", "lat"),
    "lng_missing": ("lat=31.23", "lng"),
    "lat_91": ("lat=91&lng=121.47", "lat"),
    "lat_minus_91": ("lat=-91&lng=121.47", "lat"),
    "lng_181": ("lat=31.23&lng=181", "lng"),
    "lat_not_a_number": ("lat=abc&lng=121.47", "lat"),
    "lat_empty": ("lat=&lng=121.47", "lat"),
    "lat_nan": ("lat=nan&lng=121.47", "lat"),
    "lng_nan": ("lat=31.23&lng=NaN", "lng"),
    "lat_inf": ("lat=inf&lng=121.47", "lat"),
    "lat_overflow": ("lat=1e999&lng=121.47", "lat"),
    "radius_0": ("lat=31.23&lng=121.47&radius_m=0", "radius_m"),
    "radius_negative": ("lat=31.23&lng=121.47&radius_m=-5", "radius_m"),
    "radius_nan": ("lat=31.23&lng=121.47&radius_m=nan", "radius_m"),
    "radius_huge": ("lat=31.23&lng=121.47&radius_m=1e9", "radius_m"),
    "radius_text": ("lat=31.23&lng=121.47&radius_m=far", "radius_m"),
    "limit_0": ("lat=31.23&lng=121.47&limit=0", "limit"),
    "limit_51": ("lat=31.23&lng=121.47&limit=51", "limit"),
    "limit_fraction": ("lat=31.23&lng=121.47&limit=2.5", "limit"),
    "limit_text": ("lat=31.23&lng=121.47&limit=ten", "limit"),
    "skill_too_long": ("lat=31.23&lng=121.47&skill=" + "s" * 65, "skill"),
}


async def test_nearby_refuses_bad_queries_and_other_roles(live: Live,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    for name, (query, field) in BAD_NEARBY.items():
        status, reply = await nearby(live, query)
        assert status == 400, (name, status, reply)
        assert_error(reply, "invalid", {field})
    # The limits themselves are fine.
    for query in ("lat=31.23&lng=121.47&radius_m=100000&limit=50",
                  "lat=31.23&lng=121.47&radius_m=1&limit=1"):
        status, reply = await nearby(live, query)
        assert status == 200 and reply["data"] == {"technicians": []}, (query, reply)
    for role in ("customer", "technician"):
        status, reply = await nearby(live, "lat=31.23&lng=121.47", role)
        assert status == 403, (role, reply)
        assert_error(reply, "forbidden")
    status, reply = await live.http.request("GET", "/api/technicians/nearby?lat=31.23&lng=121.47")
    assert status == 401, reply
    assert_error(reply, "unauthorized")
    assert_no_server_errors(caplog)


async def test_nearby_and_dispatch_at_any_valid_latitude(live: Live,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """lat is valid within ±90 (the API and the point filter say so): far
    north and south, search and dispatch work like anywhere else."""
    for lat, lng in ((90, 180), (-90, -180), (-85.5, 0)):
        status, reply = await nearby(live, f"lat={lat}&lng={lng}&radius_m=100000&limit=50")
        assert status == 200 and reply["data"] == {"technicians": []}, (lat, lng, status, reply)
    tid = uid("t-")
    trk = await live.client("technician", tid, namespace="/tracking")
    reply = await trk.call("location", {"lat": 86.001, "lng": 10.0, "ts": now_ms()})
    assert reply["ok"] is True and reply["data"]["status"] == "accepted", reply
    status, reply = await nearby(live, "lat=86&lng=10")
    assert status == 200, (status, reply)
    assert [t["id"] for t in reply["data"]["technicians"]] == [tid], reply

    order = await live.create_order(address={"lat": 86.0, "lng": 10.0, "text": "far north"})
    ords = await live.client("technician", tid)
    status, reply = await start_dispatch(live, order["order_id"], {"strategy": "broadcast"})
    assert status == 202, (status, reply)
    offer = await ords.next("offer")
    assert offer["order_id"] == order["order_id"], offer
    assert (await ords.ok("accept", {"order_id": order["order_id"]}))["status"] == "accepted"
    assert_no_server_errors(caplog)


# -- broadcast --------------------------------------------------------------------------------

async def test_broadcast_first_accept_wins_and_the_round_explains_everyone(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app(stale_position_s=STALE_S)
    ops = await ops_viewer(live)
    order = await live.create_order(skills=["aircon"])
    oid = order["order_id"]
    customer = await live.client("customer", order["customer_id"])

    t1 = await technician(live, 100)
    t2 = await technician(live, 200)
    t3 = await technician(live, 300)
    mismatch = await technician(live, 150, ("plumbing",))
    out = await technician(live, 1500)  # radius 1000: considered (within 2x), not eligible
    stale = await technician(live, 120, age_s=2 * STALE_S)
    busy = await technician(live, 130)
    # On a job under way: with a window, not simply `busy` (the schedule
    # decides, docs/dispatch.md); eligible, and ranked by when they could
    # arrive, after that job: here last.
    job = (await live.create_order())["order_id"]
    await live.assign(job, busy.id)
    status, reply = await live.post_event(job, "en_route")
    assert status == 200, reply
    offline = await technician(live, 110)
    await go_offline(offline, ops)

    doc = await started(live, oid, {"strategy": "broadcast", "count": 2, "radius_m": 1000,
                                    "timeout_s": 30})
    did = doc["dispatch_id"]
    assert isinstance(did, str) and did, doc
    assert doc["order_id"] == oid and doc["strategy"] == "broadcast", doc
    assert doc["count"] == 2 and doc["radius_m"] == 1000 and doc["timeout_s"] == 30, doc
    assert doc["status"] == "running", doc

    assert t1.orders is not None and t2.orders is not None and t3.orders is not None
    assert_offer(await t1.orders.next("offer"), order, did, 30)
    assert_offer(await t2.orders.next("offer"), order, did, 30)

    # The second-nearest answers first, and wins.
    won = await t2.orders.ok("accept", {"order_id": oid})
    assert won["order_id"] == oid and won["dispatch_id"] == did and won["status"] == "accepted", won
    assert won["order"]["state"] == "assigned" and won["order"]["technician_id"] == t2.id, won

    withdrawn = await t1.orders.next("offer_withdrawn")
    assert withdrawn == {"order_id": oid, "dispatch_id": did, "reason": "taken"}, withdrawn
    late = await t1.orders.error("accept", {"order_id": oid}, "conflict")
    assert late["message"], late
    await t1.orders.error("decline", {"order_id": oid}, "conflict")

    # The order: assigned by dispatch, to the winner.
    for who in (customer, t2.orders):
        ev = await who.next("order_event")
        assert ev["type"] == "state_changed" and ev["state"] == "assigned", ev
        assert ev["actor"] == DISPATCH_ACTOR, ev
        assert ev["data"]["technician_id"] == t2.id and ev["data"]["dispatch_id"] == did, ev
    snapshot, events = await order_and_events(live, oid)
    assert snapshot["state"] == "assigned" and snapshot["technician_id"] == t2.id, snapshot
    assigned = [e for e in events if e["state"] == "assigned"]
    assert len(assigned) == 1 and assigned[0]["actor"] == DISPATCH_ACTOR, events
    assert assigned[0]["data"]["dispatch_id"] == did, assigned

    # The round, explained.
    [round_] = await rounds(live, oid)
    assert set(round_) >= ROUND_FIELDS, round_
    assert round_["dispatch_id"] == did and round_["status"] == "assigned", round_
    assert round_["assigned_to"] == t2.id and isinstance(round_["finished_ts"], int), round_
    cands = by_tech(round_)
    expect = {
        t2.id: ("accepted", None),
        t1.id: ("withdrawn", None),
        t3.id: ("not_offered", "beyond_count"),
        mismatch.id: ("skipped", "skill_mismatch"),
        out.id: ("skipped", "out_of_radius"),
        stale.id: ("skipped", "stale_position"),
        busy.id: ("not_offered", "beyond_count"),
        offline.id: ("skipped", "offline"),
    }
    for tid, (outcome, reason) in expect.items():
        assert tid in cands, (tid, round_)
        assert cands[tid]["status"] == outcome, (tid, cands[tid])
        if reason is not None:
            assert cands[tid]["reason"] == reason, (tid, cands[tid])
    assert len(cands) == len(expect), round_
    for t in (t1, t2, t3, mismatch, out, stale, busy, offline):
        assert abs(cands[t.id]["distance_m"] - t.north_m) <= 2, cands[t.id]
    for t in (t1, t2):
        c = cands[t.id]
        assert isinstance(c["offered_ts"], int) and isinstance(c["expires_ts"], int), c
        assert isinstance(c["answered_ts"], int) and c["answered_ts"] >= c["offered_ts"], c
    # Nearest first.
    dists = [c["distance_m"] for c in round_["candidates"]]
    assert dists == sorted(dists), round_

    # Only the top `count` were offered; nobody else ever saw an offer.
    for t in (t3, mismatch, out, stale, busy):
        assert t.orders is not None and t.orders.received["offer"] == [], t.id
    assert t2.orders.received["offer_withdrawn"] == [], t2.orders.received

    # The winner is busy now: no longer in the nearest search.
    assert t2.id not in await nearby_ids(live, "skill=aircon")
    # Reading rounds: agents and admins may, customers and technicians not.
    for role in ("agent", "admin"):
        assert (await rounds(live, oid, role))[0]["dispatch_id"] == did
    for role in ("customer", "technician"):
        status, reply = await live.http.request("GET", f"/api/orders/{oid}/dispatch", live.token(role))
        assert status == 403, reply
        assert_error(reply, "forbidden")
    status, reply = await live.http.request("GET", f"/api/orders/{uid('o-')}/dispatch",
                                            live.token("service"))
    assert status == 404, reply
    assert_error(reply, "not_found")
    assert_no_server_errors(caplog)


async def test_racing_accepts_exactly_one_wins(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    order = await live.create_order()
    oid = order["order_id"]
    techs = [await technician(live, 100 * (i + 1)) for i in range(4)]
    did = (await started(live, oid, {"strategy": "broadcast", "count": 4}))["dispatch_id"]
    accepting: list[Client] = []
    for t in techs:
        assert t.orders is not None
        assert (await t.orders.next("offer"))["dispatch_id"] == did
        accepting.append(t.orders)
    replies = await asyncio.gather(*(c.call("accept", {"order_id": oid}) for c in accepting))
    winners = [t for t, r in zip(techs, replies, strict=True) if r["ok"]]
    assert len(winners) == 1, replies
    for t, r in zip(techs, replies, strict=True):
        if t is not winners[0]:
            assert_error(r, "conflict")
            assert t.orders is not None
            ev = await t.orders.next("offer_withdrawn")
            assert ev == {"order_id": oid, "dispatch_id": did, "reason": "taken"}, ev
    snapshot, events = await order_and_events(live, oid)
    assert snapshot["technician_id"] == winners[0].id, snapshot
    assert [e["state"] for e in events] == ["created", "assigned"], events
    [round_] = await rounds(live, oid)
    assert round_["status"] == "assigned" and round_["assigned_to"] == winners[0].id, round_
    statuses = sorted(c["status"] for c in round_["candidates"])
    assert statuses == ["accepted", "withdrawn", "withdrawn", "withdrawn"], round_
    assert_no_server_errors(caplog)


async def test_accept_after_the_order_was_cancelled(live: Live,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The order changes under a running round: the accept is a conflict,
    and the round's record must not claim it was assigned."""
    order = await live.create_order()
    oid = order["order_id"]
    t = await technician(live, 100)
    assert t.orders is not None
    did = (await started(live, oid, {"strategy": "broadcast", "timeout_s": 30}))["dispatch_id"]
    assert (await t.orders.next("offer"))["dispatch_id"] == did
    status, reply = await live.post_event(oid, "cancelled", role="agent")
    assert status == 200, reply

    await t.orders.error("accept", {"order_id": oid}, "conflict")
    snapshot, _ = await order_and_events(live, oid)
    assert snapshot["state"] == "cancelled" and snapshot["technician_id"] is None, snapshot
    [round_] = await rounds(live, oid)
    assert round_["status"] == "failed", round_
    assert round_["assigned_to"] is None, round_
    assert by_tech(round_)[t.id]["status"] != "accepted", round_
    assert_no_server_errors(caplog)


async def test_accept_after_the_backend_assigned_someone_else(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """The backend assigns the order by hand while a round runs: the order was
    taken, so a late accept is a conflict and must not re-assign it."""
    order = await live.create_order()
    oid = order["order_id"]
    t = await technician(live, 100)
    assert t.orders is not None
    did = (await started(live, oid, {"strategy": "broadcast", "timeout_s": 30}))["dispatch_id"]
    assert (await t.orders.next("offer"))["dispatch_id"] == did
    chosen = uid("t-")
    await live.assign(oid, chosen)

    reply = await t.orders.call("accept", {"order_id": oid})
    snapshot, events = await order_and_events(live, oid)
    assert snapshot["state"] == "assigned" and snapshot["technician_id"] == chosen, (reply, events)
    assert [e["type"] for e in events] == ["state_changed", "state_changed"], events
    assert_error(reply, "conflict")
    [round_] = await rounds(live, oid)
    assert round_["assigned_to"] is None and round_["status"] != "assigned", round_
    assert_no_server_errors(caplog)


# -- sequential -------------------------------------------------------------------------------

async def test_sequential_decline_then_timeout_then_accept(start_app: StartApp,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app(dispatch_timeout_s=1)
    order = await live.create_order()
    oid = order["order_id"]
    t1, t2, t3 = [await technician(live, m) for m in (100, 200, 300)]
    assert t1.orders is not None and t2.orders is not None and t3.orders is not None

    doc = await started(live, oid)
    did = doc["dispatch_id"]
    assert doc["strategy"] == "sequential" and doc["timeout_s"] == 1, doc

    # Nearest first; a decline passes the offer on at once.
    assert_offer(await t1.orders.next("offer"), order, did, 1)
    declined = await t1.orders.ok("decline", {"order_id": oid})
    assert declined == {"order_id": oid, "dispatch_id": did, "status": "declined"}, declined
    assert_offer(await t2.orders.next("offer", timeout=5), order, did, 1)
    t0 = time.monotonic()
    await t1.orders.error("accept", {"order_id": oid}, "conflict")  # declined is final

    # The second says nothing: after timeout_s the offer is withdrawn and goes on.
    withdrawn = await t2.orders.next("offer_withdrawn", timeout=5)
    waited = time.monotonic() - t0
    assert withdrawn == {"order_id": oid, "dispatch_id": did, "reason": "timed_out"}, withdrawn
    assert 0.7 <= waited <= 4.0, waited
    assert_offer(await t3.orders.next("offer", timeout=5), order, did, 1)
    await t2.orders.error("accept", {"order_id": oid}, "conflict")  # too late

    won = await t3.orders.ok("accept", {"order_id": oid})
    assert won["status"] == "accepted" and won["order"]["technician_id"] == t3.id, won
    snapshot, events = await order_and_events(live, oid)
    assert snapshot["state"] == "assigned" and snapshot["technician_id"] == t3.id, snapshot
    assert events[-1]["actor"] == DISPATCH_ACTOR, events
    assert events[-1]["data"] == {"technician_id": t3.id, "dispatch_id": did}, events

    [round_] = await rounds(live, oid)
    assert round_["status"] == "assigned" and round_["assigned_to"] == t3.id, round_
    cands = by_tech(round_)
    assert (cands[t1.id]["status"], cands[t1.id]["reason"]) == ("declined", "declined"), cands
    assert (cands[t2.id]["status"], cands[t2.id]["reason"]) == ("timed_out", "timed_out"), cands
    assert cands[t3.id]["status"] == "accepted", cands
    assert cands[t2.id]["answered_ts"] >= cands[t2.id]["expires_ts"], cands[t2.id]
    # The decline passed the offer on at once, not when the first offer would have expired.
    assert cands[t2.id]["offered_ts"] < cands[t1.id]["expires_ts"], cands
    # Nobody was offered twice, and the decliner's offer was not "withdrawn".
    assert len(t1.orders.received["offer"]) == len(t2.orders.received["offer"]) == 1
    assert t1.orders.received["offer_withdrawn"] == []
    assert t3.orders.received["offer_withdrawn"] == []
    assert_no_server_errors(caplog)


# -- no one to offer it to --------------------------------------------------------------------

async def test_round_without_candidates_fails_and_says_why(live: Live,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    order = await live.create_order(skills=["welding"])
    oid = order["order_id"]
    customer = await live.client("customer", order["customer_id"])
    await technician(live, 100, ("aircon",))
    await technician(live, 700, ("welding",))  # radius 500: out of it

    did = (await started(live, oid, {"radius_m": 500}))["dispatch_id"]
    ev = await customer.next("order_event")
    assert ev["type"] == "dispatch_failed" and ev["order_id"] == oid, ev
    assert ev["state"] == "created" and ev["seq"] == 2, ev
    assert ev["actor"] == DISPATCH_ACTOR, ev
    assert ev["data"] == {"dispatch_id": did, "reasons": {"skill_mismatch": 1, "out_of_radius": 1},
                          "considered": 2}, ev

    snapshot, events = await order_and_events(live, oid)
    assert snapshot["state"] == "created" and snapshot["technician_id"] is None, snapshot
    assert [e["type"] for e in events] == ["state_changed", "dispatch_failed"], events
    [round_] = await rounds(live, oid)
    assert round_["status"] == "failed" and round_["assigned_to"] is None, round_
    assert isinstance(round_["finished_ts"], int), round_

    # A failed round does not block the next one; with nobody around, it fails on nothing.
    did2 = (await started(live, oid, {"radius_m": 10}))["dispatch_id"]
    ev = await customer.next("order_event")
    assert ev["type"] == "dispatch_failed" and ev["seq"] == 3, ev
    assert ev["data"] == {"dispatch_id": did2, "reasons": {}, "considered": 0}, ev
    assert [r["dispatch_id"] for r in await rounds(live, oid)] == [did, did2]
    assert (await order_and_events(live, oid))[0]["state"] == "created"
    assert_no_server_errors(caplog)


# -- refusals ---------------------------------------------------------------------------------

BAD_DISPATCH = {
    "strategy_random": ({"strategy": "random"}, "strategy"),
    "count_0": ({"count": 0}, "count"),
    "count_101": ({"count": 101}, "count"),
    "count_text": ({"count": "5"}, "count"),
    "radius_negative": ({"radius_m": -1}, "radius_m"),
    "radius_0": ({"radius_m": 0}, "radius_m"),
    "timeout_0": ({"timeout_s": 0}, "timeout_s"),
    "timeout_601": ({"timeout_s": 601}, "timeout_s"),
    "extra_field": ({"strategy": "broadcast", "urgent": True}, "urgent"),
    "not_an_object": ([{"strategy": "broadcast"}], "(payload)"),
}


async def test_dispatch_refused(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    order = await live.create_order()
    oid = order["order_id"]
    for name, (body, field) in BAD_DISPATCH.items():
        status, reply = await start_dispatch(live, oid, body)
        assert status == 400, (name, status, reply)
        assert_error(reply, "invalid", {field})
    for role in ("customer", "technician"):  # agents may (a re-dispatch, docs/dispatch.md)
        status, reply = await start_dispatch(live, oid, {}, role)
        assert status == 403, (role, reply)
        assert_error(reply, "forbidden")
    status, reply = await start_dispatch(live, uid("o-"), {})
    assert status == 404, reply
    assert_error(reply, "not_found")
    assert await rounds(live, oid) == [], "a refused request started a round"

    # Only a `created` or `assigned` order (a re-dispatch) is dispatched.
    for state in ("en_route", "cancelled"):
        other = (await live.create_order())["order_id"]
        if state == "en_route":
            await live.assign(other, uid("t-"))
        status, reply = await live.post_event(other, state)
        assert status == 200, reply
        status, reply = await start_dispatch(live, other, {})
        assert status == 409, (state, reply)
        assert_error(reply, "conflict")
        assert await rounds(live, other) == []

    # One round at a time: while one runs, another POST is a conflict.
    t = await technician(live, 100)
    assert t.orders is not None
    did = (await started(live, oid, {"timeout_s": 30}))["dispatch_id"]
    assert (await t.orders.next("offer"))["dispatch_id"] == did
    for body in ({}, {"strategy": "broadcast"}):
        status, reply = await start_dispatch(live, oid, body)
        assert status == 409, reply
        assert_error(reply, "conflict")
    assert [r["dispatch_id"] for r in await rounds(live, oid)] == [did]
    # The only candidate declines: the round fails (the customer hears of it),
    # and an admin may start the next one.
    customer = await live.client("customer", order["customer_id"])
    await t.orders.ok("decline", {"order_id": oid})
    ev = await customer.next("order_event")
    assert ev["type"] == "dispatch_failed" and ev["data"]["reasons"] == {"declined": 1}, ev
    assert (await rounds(live, oid))[0]["status"] == "failed"
    status, reply = await start_dispatch(live, oid, {"radius_m": 10}, "admin")
    assert status == 202, reply
    assert reply["data"]["dispatch"]["started_by"]["role"] == "admin", reply
    assert_no_server_errors(caplog)


async def test_answers_refused_and_the_connection_survives(live: Live,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    order = await live.create_order()
    oid = order["order_id"]
    offered = await technician(live, 100)
    stranger = await live.client("technician")
    customer = await live.client("customer", order["customer_id"])
    agent = await live.client("agent")
    assert offered.orders is not None

    # No round yet: nothing to answer.
    for event in ("accept", "decline"):
        await offered.orders.error(event, {"order_id": oid}, "conflict")
        await stranger.error(event, {"order_id": oid}, "conflict")

    did = (await started(live, oid, {"timeout_s": 30}))["dispatch_id"]
    assert (await offered.orders.next("offer"))["dispatch_id"] == did
    for event in ("accept", "decline"):
        # Never offered: the same answer as before the round (nothing learnt of it).
        await stranger.error(event, {"order_id": oid}, "conflict")
        await customer.error(event, {"order_id": oid}, "forbidden")
        await agent.error(event, {"order_id": oid}, "forbidden")

    bad: list[tuple[Any, set[str]]] = [
        ({}, {"order_id"}),
        ({"order_id": oid, "really": True}, {"really"}),
        ({"order_id": 42}, {"order_id"}),
        ({"order_id": ""}, {"order_id"}),
        ({"order_id": "no spaces allowed"}, {"order_id"}),
        ({"order_id": "x" * 65}, {"order_id"}),
        (oid, {"(payload)"}),
        ([oid], {"(payload)"}),
        (7, {"(payload)"}),
    ]
    for event in ("accept", "decline"):
        for payload, fields in bad:
            assert_error(await offered.orders.call(event, payload), "invalid", fields)
        assert_error(await offered.orders.call(event), "invalid", {"order_id"})
    assert offered.orders.sio.connected

    # Still connected, still the offer holder: the accept goes through.
    won = await offered.orders.ok("accept", {"order_id": oid})
    assert won["status"] == "accepted" and won["dispatch_id"] == did, won
    await offered.orders.error("accept", {"order_id": oid}, "conflict")
    assert_no_server_errors(caplog)


# -- /ops -------------------------------------------------------------------------------------

async def test_ops_snapshot_and_presence(live: Live, engine: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    ops = await ops_viewer(live)
    snap = await ops.ok("snapshot", {})
    assert snap["technicians"] == {"online": 0}, snap
    assert snap["agents"] == {"online": 0, "available": 0}, snap
    assert snap["engine"] == engine and isinstance(snap["node"], str) and snap["node"], snap
    assert (await ops.ok("snapshot")) == snap  # no payload is the empty object
    assert_error(await ops.call("snapshot", {"extra": 1}), "invalid", {"extra"})

    # A technician comes online with their first /tracking connection, and
    # goes offline with their last.
    tid = uid("t-")
    first = await live.client("technician", tid, namespace="/tracking")
    assert await presence_of(ops, tid) == {"kind": "technician", "user_id": tid, "online": True}
    assert (await ops.ok("snapshot"))["technicians"] == {"online": 1}
    second = await live.client("technician", tid, namespace="/tracking")
    await first.close()
    await second.close()
    # Neither the second connection nor closing the first announced anything.
    assert await presence_of(ops, tid) == {"kind": "technician", "user_id": tid, "online": False}
    assert (await ops.ok("snapshot"))["technicians"] == {"online": 0}
    # An /orders connection alone is not presence.
    await live.client("technician", namespace="/orders")
    assert (await ops.ok("snapshot"))["technicians"] == {"online": 0}

    # Agents: online on /chat, with their status, and every status change.
    aid = uid("a-")
    chat = await live.client("agent", aid, namespace="/chat")
    ev = await presence_of(ops, aid)
    assert ev == {"kind": "agent", "user_id": aid, "online": True, "status": "away"}, ev
    assert (await chat.ok("set_status", {"status": "available"}))["status"] == "available"
    ev = await presence_of(ops, aid)
    assert ev == {"kind": "agent", "user_id": aid, "online": True, "status": "available"}, ev
    assert (await ops.ok("snapshot"))["agents"] == {"online": 1, "available": 1}
    await chat.ok("set_status", {"status": "away"})
    ev = await presence_of(ops, aid)
    assert ev == {"kind": "agent", "user_id": aid, "online": True, "status": "away"}, ev
    assert (await ops.ok("snapshot"))["agents"] == {"online": 1, "available": 0}
    await chat.close()
    ev = await presence_of(ops, aid)
    assert ev["kind"] == "agent" and ev["online"] is False, ev
    assert (await ops.ok("snapshot"))["agents"]["online"] == 0
    # Nothing else was announced (the /orders-only technician included).
    assert ops.drain("presence") == [], ops.received["presence"]

    # An admin is admitted as well.
    admin = await live.client("admin", namespace="/ops")
    assert (await admin.ok("snapshot"))["engine"] == engine
    assert_no_server_errors(caplog)


@pytest.mark.parametrize("role", ["customer", "technician"])
async def test_ops_refuses_customers_and_technicians(live: Live, role: str) -> None:
    client = Client(live.url, "/ops", live.token(role))
    seen: list[Any] = []

    async def _refused(data: Any = None) -> None:
        seen.append(data)

    client.sio.on("connect_error", _refused, namespace="/ops")

    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.sio.connect(live.url, namespaces=["/ops"], auth={"token": client.token},
                                     transports=["websocket"], wait_timeout=10)
    finally:
        await client.close()
    assert len(seen) == 1, seen
    data = seen[0]["data"] if isinstance(seen[0], dict) and "data" in seen[0] else seen[0]
    assert data["code"] == "forbidden" and data["message"], seen
