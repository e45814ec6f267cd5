"""The technician's day over the wire (issue 17): one job at a time, each
customer sees only their own job, queued ETAs, late-arrival warnings, the
day view, re-dispatch ranked by arrival. Real Redis or memory engine, the
real store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Live, StartApp
from tests.harness import Client, uid
from tests.tracking.wire import ADDR, FAST, at, dist, now_ms, order_events, pt, tracker
from tracking.eta import EtaConfig

MIN = 60_000
ETA = EtaConfig()
# Projections every 0.1 s: the tests wait for what they cause, not for a timer.
QUICK = {**FAST, "project_interval_s": 0.1}


def drive_s(a: tuple[float, float], b: tuple[float, float]) -> float:
    return dist(a, b) * ETA.road_factor / ETA.default_speed_mps


def address(where: tuple[float, float]) -> dict[str, Any]:
    return {"lat": where[0], "lng": where[1], "text": f"{where[0]:.5f},{where[1]:.5f}"}


async def order_at(live: Live, where: tuple[float, float], start: int, minutes: int = 60,
                   customer_id: str | None = None) -> dict[str, Any]:
    return await live.create_order(customer_id, address=address(where),
                                   window={"start_ts": start, "end_ts": start + minutes * MIN})


async def orders_client(live: Live, role: str, sub: str) -> Client:
    return await live.client(role, sub, namespace="/orders")


async def next_event(c: Client, order_id: str, ev_type: str, timeout: float = 20.0) -> dict[str, Any]:
    """The next pushed order event of this type for this order (others skipped)."""
    while True:
        ev = await c.next("order_event", timeout=timeout)
        if ev["order_id"] == order_id and ev["type"] == ev_type:
            return dict(ev)


async def progress(tech: Client, order_id: str, state: str) -> None:
    await tech.ok("progress", {"order_id": order_id, "state": state})


# -- one job at a time; each customer sees only their own job ----------------------------------------

@pytest.mark.parametrize("b_assigned", ["before", "while_a_is_under_way"])
async def test_each_customer_sees_only_their_own_job(start_app: StartApp, b_assigned: str) -> None:
    """Two orders of one technician, B assigned before they set off to A or while they
    drive there: A's customer gets every position until arrival, B's none (and no place
    at all) until the technician sets off to B."""
    live = await start_app(**QUICK)
    tech_id = uid("t-")
    now = now_ms()
    b_at = at(3000)  # B's home, 3 km north of A's
    a = await order_at(live, ADDR, now + 20 * MIN)
    b = await order_at(live, b_at, now + 4 * 60 * MIN)
    A, B = a["order_id"], b["order_id"]
    await live.assign(A, tech_id)
    if b_assigned == "before":
        await live.assign(B, tech_id)
    tech = await tracker(live, "technician", tech_id)
    tech_orders = await orders_client(live, "technician", tech_id)
    watch_a = await tracker(live, "customer", a["customer_id"])
    watch_b = await tracker(live, "customer", b["customer_id"])
    t0 = now_ms() - 120_000
    # Not set off yet: nobody sees where the technician is, only when they may come.
    assert (await tech.ok("location", pt(at(-2250), t0 - 10_000)))["status"] == "accepted"
    view_a = await watch_a.ok("watch", {"order_id": A})
    assert view_a["technician_status"] == "not_started" and view_a["position"] is None
    assert view_a["eta_basis"] == "idle" and view_a["eta_s"] > 0 and view_a["distance_m"] is None
    assert watch_a.drain("position") == []

    await progress(tech_orders, A, "en_route")
    if b_assigned == "before":
        view_b = await watch_b.ok("watch", {"order_id": B})
        assert view_b["technician_status"] == "on_another_job"
        assert view_b["position"] is None and view_b["distance_m"] is None
    # One job at a time: B cannot be set off while A is going, on either path.
    if b_assigned == "before":
        err = await tech_orders.error("progress", {"order_id": B, "state": "en_route"}, "conflict")
        assert err["details"] == {"reason": "job_in_progress", "order_id": A, "state": "en_route"}
        status, body = await live.post_event(B, "en_route")
        assert status == 409 and body["error"]["details"]["order_id"] == A, body

    # The drive to A: every fix reaches A's customer, none reaches B's (B assigned midway
    # in the second case: the new order takes nothing over).
    fixes = [pt(at(-2000 + 250 * i), t0 + 10_000 * i) for i in range(8)]
    fixes += [pt(at(-40), t0 + 85_000), pt(at(-10), t0 + 90_000)]
    got = []
    for i, f in enumerate(fixes):
        if i == 3 and b_assigned == "while_a_is_under_way":
            await live.assign(B, tech_id)
            view_b = await watch_b.ok("watch", {"order_id": B})
            assert view_b["technician_status"] == "on_another_job" and view_b["position"] is None
        assert (await tech.ok("location", f))["status"] == "accepted"
        got.append(await watch_a.next("position"))
    assert [(p["order_id"], p["ts"]) for p in got] == [(A, f["ts"]) for f in fixes]
    again = await watch_b.ok("watch", {"order_id": B})  # one round trip after the last fix
    assert watch_b.drain("position") == []
    assert again["technician_status"] == "on_another_job" and again["position"] is None
    assert "lat" not in str(again) and "lat" not in str(watch_b.drain("eta"))

    # The geofence moves A to arrived; then A is served and completed.
    watcher_orders = await orders_client(live, "customer", a["customer_id"])
    await watcher_orders.ok("subscribe", {"order_id": A})
    events = await order_events(live, A)
    if events[-1]["state"] != "arrived":
        await next_event(watcher_orders, A, "state_changed")
    assert (await order_events(live, A))[-1]["state"] == "arrived"
    await progress(tech_orders, A, "in_service")
    await progress(tech_orders, A, "completed")

    # Still at A's door: B's customer is not shown where (that is A's home).
    door = pt(at(-5), now_ms())
    assert (await tech.ok("location", door))["status"] == "accepted"
    idle = await watch_b.ok("watch", {"order_id": B})
    assert idle["technician_status"] == "not_started" and idle["position"] is None
    assert watch_b.drain("position") == []
    # Set off to B: B's customer gets positions from then on.
    await progress(tech_orders, B, "en_route")
    going = await watch_b.ok("watch", {"order_id": B})
    assert going["technician_status"] == "on_this_job" and going["position"] is None
    nxt = pt(at(100), door["ts"] + 10_000)
    assert (await tech.ok("location", nxt))["status"] == "accepted"
    pos = await watch_b.next("position")
    assert (pos["order_id"], pos["ts"]) == (B, nxt["ts"])


async def test_a_queued_job_eta_counts_the_rest_of_the_current_job(start_app: StartApp) -> None:
    live = await start_app(**QUICK)
    tech_id = uid("t-")
    now = now_ms()
    b_at = at(3000)
    a = await order_at(live, ADDR, now + 10 * MIN, minutes=60)
    b = await order_at(live, b_at, now + 3 * 60 * MIN, minutes=30)
    A, B = a["order_id"], b["order_id"]
    await live.assign(A, tech_id)
    await live.assign(B, tech_id)
    tech = await tracker(live, "technician", tech_id)
    tech_orders = await orders_client(live, "technician", tech_id)
    await progress(tech_orders, A, "en_route")
    watch_a = await tracker(live, "customer", a["customer_id"])
    await watch_a.ok("watch", {"order_id": A})
    watch_b = await tracker(live, "customer", b["customer_id"])
    before = await watch_b.ok("watch", {"order_id": B})
    assert before["eta_s"] is None and before["eta_basis"] == "no_position"  # said, not guessed
    f = pt(at(-1500), now_ms() - 1000, speed=8.0)
    await tech.ok("location", f)
    live_a = await watch_a.next("position")
    arrival_a = live_a["ts"] + live_a["eta_s"] * 1000
    # The rest of A: its drive, then its hour (from its window's start at the earliest);
    # then the drive from A's home to B's.
    free = max(arrival_a, a["window"]["start_ts"]) + 60 * MIN
    want_s = (free + drive_s(ADDR, b_at) * 1000 - now_ms()) / 1000

    view = await watch_b.ok("watch", {"order_id": B})
    assert view["technician_status"] == "on_another_job" and view["eta_basis"] == "queued"
    assert view["eta_s"] > 60 * 60 and abs(view["eta_s"] - want_s) < 5, (view, want_s)
    # Pushed too (the first one at once; then when it moves by more than a minute).
    pushed = await watch_b.next("eta")
    assert pushed["order_id"] == B and pushed["basis"] == "queued"
    assert abs(pushed["eta_s"] - want_s) < 5 and set(pushed) == {"order_id", "eta_s", "basis"}

    # Bad payloads of the watch still get clear errors.
    for bad in ({}, {"order_id": ""}, {"order_id": B, "extra": 1}, {"order_id": 5}):
        await watch_b.error("watch", bad, "invalid")


# -- late-arrival warnings ------------------------------------------------------------------------

async def test_late_risk_once_when_idle_far_away_and_on_time_again_after_driving_closer(
        start_app: StartApp) -> None:
    live = await start_app(**QUICK)
    tech_id = uid("t-")
    order = await order_at(live, ADDR, now_ms() + 20 * MIN)
    oid = order["order_id"]
    await live.assign(oid, tech_id)
    customer = await orders_client(live, "customer", order["customer_id"])
    await customer.ok("subscribe", {"order_id": oid})
    tech = await tracker(live, "technician", tech_id)
    far = at(-30_000)  # 30 km away: some 97 minutes' drive
    await tech.ok("location", pt(far, now_ms() - 500_000))
    late = await next_event(customer, oid, "late_risk")
    data = late["data"]
    assert late["actor"] == {"id": "lateness", "role": "system"}
    assert data["basis"] == "idle" and data["minutes_late"] > 60
    assert data["projected_arrival_ts"] > order["window"]["start_ts"] + 60 * MIN

    agent = live.token("agent")
    status, body = await live.http.request("GET", "/api/orders/late", agent)
    assert status == 200 and oid in [o["order_id"] for o in body["data"]["orders"]], body
    mine = next(o for o in body["data"]["orders"] if o["order_id"] == oid)
    assert mine["late"]["minutes_late"] == data["minutes_late"]

    # Closer (1 km, a plausible drive since the last fix): on time again, once.
    await tech.ok("location", pt(at(-1000), now_ms()))
    back = await next_event(customer, oid, "on_time_again")
    assert back["data"]["minutes_late"] < 0 and back["data"]["basis"] == "idle"
    types = [e["type"] for e in await order_events(live, oid)]
    assert types.count("late_risk") == 1 and types.count("on_time_again") == 1, types
    # Replayed with since_seq like every event, with gap-free seqs.
    history = (await customer.ok("subscribe", {"order_id": oid, "since_seq": late["seq"] - 1}))
    assert [e["type"] for e in history["events"]][:2] == ["late_risk", "on_time_again"]
    status, body = await live.http.request("GET", "/api/orders/late", agent)
    assert oid not in [o["order_id"] for o in body["data"]["orders"]]


async def test_late_routes_refuse_bad_input(live: Live) -> None:
    agent = live.token("agent")
    for query in ("?limit=0", "?limit=abc", "?limit=501", "?x=1", "?limit=1&limit=2"):
        status, body = await live.http.request("GET", f"/api/orders/late{query}", agent)
        assert status == 400 and body["error"]["code"] == "invalid", (query, body)
    for role in ("customer", "technician"):
        status, body = await live.http.request("GET", "/api/orders/late", live.token(role))
        assert status == 403, body
    status, _ = await live.http.request("GET", "/api/orders/late")
    assert status == 401


# -- the day view -----------------------------------------------------------------------------------

async def test_the_day_view_lists_three_jobs_in_order(live: Live) -> None:
    tech_id = uid("t-")
    # 2030-03-04 in Shanghai (UTC+8): 10:00, 13:00 and 16:00.
    base = 1_898_820_000_000  # 2030-03-04T02:00:00Z = 10:00 in Shanghai
    starts = [base + h * 60 * MIN for h in (6, 0, 3)]  # created out of order
    made = [await order_at(live, at(500 * i), s) for i, s in enumerate(starts)]
    for o in made:
        await live.assign(o["order_id"], tech_id)
    first, second, third = sorted(made, key=lambda o: o["window"]["start_ts"])
    for state in ("en_route", "arrived", "in_service", "completed"):
        assert (await live.post_event(first["order_id"], state))[0] == 200
    assert (await live.post_event(second["order_id"], "en_route"))[0] == 200
    other = await order_at(live, ADDR, base + 60 * MIN)  # another technician's: not listed
    await live.assign(other["order_id"], uid("t-"))

    status, body = await live.http.request(
        "GET", f"/api/technicians/{tech_id}/day?date=2030-03-04", live.token("agent"))
    assert status == 200, body
    view = body["data"]
    assert (view["date"], view["timezone"]) == ("2030-03-04", "Asia/Shanghai")
    jobs = view["jobs"]
    assert [j["order_id"] for j in jobs] == [o["order_id"] for o in (first, second, third)]
    assert [j["state"] for j in jobs] == ["completed", "en_route", "assigned"]
    assert jobs[0]["started_ts"] and jobs[0]["ended_ts"] >= jobs[0]["started_ts"]
    arrived = jobs[0]["times"]["arrived"]
    assert jobs[0]["eta_basis"] == "actual"
    assert jobs[0]["minutes_late"] == -((first["window"]["start_ts"] - arrived) // MIN)  # early
    # No fix yet: said, not guessed.
    assert jobs[1]["eta_basis"] == "no_position" and jobs[1]["projected_arrival_ts"] is None
    assert jobs[2]["eta_basis"] == "no_position"
    assert all(j["window"] == o["window"] for j, o in zip(jobs, (first, second, third), strict=True))
    # The technician reads their own day; nobody else's.
    status, _ = await live.http.request("GET", f"/api/technicians/{tech_id}/day?date=2030-03-04",
                                        live.token("technician", tech_id))
    assert status == 200
    status, _ = await live.http.request("GET", f"/api/technicians/{tech_id}/day",
                                        live.token("technician"))
    assert status == 403
    status, _ = await live.http.request("GET", f"/api/technicians/{tech_id}/day",
                                        live.token("customer"))
    assert status == 403
    for query in ("?date=2030-13-01", "?date=tomorrow", "?date=2030-3-4", "?when=1",
                  "?date=2030-03-04&date=2030-03-05"):
        status, body = await live.http.request("GET", f"/api/technicians/{tech_id}/day{query}",
                                               live.token("agent"))
        assert status == 400 and body["error"]["code"] == "invalid", (query, body)

    # The ops page's day: one row per technician, and live `job` pushes.
    ops = await live.client("agent", namespace="/ops")
    day = await ops.ok("day", {"date": "2030-03-04"})
    rows = {r["technician_id"]: r["jobs"] for r in day["technicians"]}
    assert [j["order_id"] for j in rows[tech_id]] == [o["order_id"] for o in (first, second, third)]
    assert (await live.post_event(second["order_id"], "arrived"))[0] == 200
    job = await ops.next("job")
    while job["order_id"] != second["order_id"]:
        job = await ops.next("job")
    assert job["state"] == "arrived" and job["technician_id"] == tech_id
    assert job["times"]["arrived"] and "address" not in job
    for bad in ({"date": "2030-02-30"}, {"date": 20300304}, {"day": "2030-03-04"}):
        await ops.error("day", bad, "invalid")


# -- re-dispatch of a queued order, ranked by arrival ----------------------------------------------

async def test_redispatch_from_assigned_excludes_the_current_technician_and_ranks_by_arrival(
        start_app: StartApp) -> None:
    live = await start_app(**QUICK, dispatch_strategy="sequential")
    now = now_ms()
    order = await order_at(live, ADDR, now + 5 * 60 * MIN, minutes=60)
    oid = order["order_id"]
    holder, idle_far, working_near = uid("t-"), uid("t-"), uid("t-")
    await live.assign(oid, holder)
    techs = {t: await tracker(live, "technician", t, skills=["aircon_repair"])
             for t in (holder, idle_far, working_near)}
    # The near one is on a job 4 km away that lasts two more hours.
    job = await order_at(live, at(4000), now - 10 * MIN, minutes=130)
    await live.assign(job["order_id"], working_near)
    for state in ("en_route", "arrived", "in_service"):
        assert (await live.post_event(job["order_id"], state))[0] == 200
    await techs[holder].ok("location", pt(at(-300), now_ms()))
    await techs[working_near].ok("location", pt(at(1000), now_ms()))
    far_ts = now_ms()
    await techs[idle_far].ok("location", pt(at(-3000), far_ts))
    offers = await live.client("technician", idle_far, namespace="/orders")
    watcher = await tracker(live, "customer", order["customer_id"])
    assert (await watcher.ok("watch", {"order_id": oid}))["technician"]["id"] == holder

    status, body = await live.http.request("POST", f"/api/orders/{oid}/dispatch",
                                           live.token("agent"), json={"count": 2})
    assert status == 202, body
    cands = {c["technician_id"]: c for c in body["data"]["dispatch"]["candidates"]}
    assert cands[holder]["reason"] == "current_technician"
    far, near = cands[idle_far], cands[working_near]
    assert far["status"] == near["status"] == "eligible"
    assert far["arrival_ts"] < near["arrival_ts"]  # nearer, but two hours of work first
    assert near["arrival_s"] > 2 * 3600 - 60
    offer = await offers.next("offer")
    assert offer["order_id"] == oid
    accepted = await offers.ok("accept", {"order_id": oid})
    assert accepted["order"]["technician_id"] == idle_far
    events = await order_events(live, oid)
    assert events[-1]["type"] == "reassigned"
    assert events[-1]["data"]["previous_technician_id"] == holder
    # The customer's view switches technicians: the new one's ETA at once, and their
    # positions once they set off.
    view = await watcher.ok("watch", {"order_id": oid})
    assert view["technician"]["id"] == idle_far and view["technician_status"] == "not_started"
    assert view["eta_basis"] == "idle" and abs(view["eta_s"] - far["arrival_s"]) < 5, (view, far)
    status, body = await live.post_event(oid, "en_route")
    assert status == 200, body
    moved = pt(at(-2990), far_ts + 2000)  # 10 m in 2 s
    assert (await techs[idle_far].ok("location", moved))["status"] == "accepted"
    pos = await watcher.next("position")
    assert (pos["order_id"], pos["technician_id"]) == (oid, idle_far)

    # Not from other states; bad payloads refused.
    status, body = await live.http.request("POST", f"/api/orders/{job['order_id']}/dispatch",
                                           live.token("agent"))
    assert status == 409, body
    for bad in ({"count": 0}, {"strategy": "lottery"}, {"radius_m": -1}, {"x": 1}):
        status, body = await live.http.request("POST", f"/api/orders/{oid}/dispatch",
                                               live.token("agent"), json=bad)
        assert status == 400, (bad, body)
    status, body = await live.http.request("POST", f"/api/orders/{oid}/dispatch",
                                           live.token("customer"))
    assert status == 403, body


async def test_agents_move_a_queued_order_but_do_not_make_the_first_assignment(live: Live) -> None:
    order = await live.create_order()
    oid = order["order_id"]
    agent = live.token("agent")
    status, body = await live.http.request("POST", f"/api/orders/{oid}/assign", agent,
                                           json={"technician_id": uid("t-")})
    assert status == 403, body
    first, second = uid("t-"), uid("t-")
    await live.assign(oid, first)
    status, body = await live.http.request("POST", f"/api/orders/{oid}/assign", agent,
                                           json={"technician_id": second})
    assert status == 200 and body["data"]["order"]["technician_id"] == second, body
    assert body["data"]["event"]["type"] == "reassigned"


async def test_an_order_whose_technician_is_connected_nowhere_is_flagged_overdue(
        start_app: StartApp) -> None:
    live = await start_app(**QUICK)
    # The window began 25 minutes ago; its technician never connected.
    order = await order_at(live, ADDR, now_ms() - 25 * MIN)
    oid = order["order_id"]
    await live.assign(oid, uid("t-"))
    customer = await orders_client(live, "customer", order["customer_id"])
    await customer.ok("subscribe", {"order_id": oid})
    late = await next_event(customer, oid, "late_risk")
    assert late["data"]["basis"] == "overdue" and late["data"]["minutes_late"] >= 25
    assert late["actor"] == {"id": "lateness", "role": "system"}
    # An order whose window began long ago (past the 6 h horizon) is not swept for ever:
    # a sweep that saw it (it flags the fresh one made after it) leaves it alone.
    old = await order_at(live, ADDR, now_ms() - 7 * 60 * MIN, customer_id=order["customer_id"])
    await live.assign(old["order_id"], uid("t-"))
    fresh = await order_at(live, at(100), now_ms() - 15 * MIN, customer_id=order["customer_id"])
    await live.assign(fresh["order_id"], uid("t-"))
    await customer.ok("subscribe", {"order_id": fresh["order_id"]})
    await next_event(customer, fresh["order_id"], "late_risk")
    assert "late_risk" not in [e["type"] for e in await order_events(live, old["order_id"])]


async def test_two_racing_set_offs_on_two_nodes_one_wins(start_app: StartApp) -> None:
    """The store decides one job at a time, whatever node each write goes through; a
    cancelled current job frees the technician at once."""
    lives = [await start_app(), await start_app()]
    for _ in range(5):
        tech_id = uid("t-")
        base = now_ms() + 60 * MIN
        made = [await order_at(lives[0], at(200 * k), base + k * 120 * MIN) for k in range(2)]
        ids = [o["order_id"] for o in made]
        for oid in ids:
            await lives[0].assign(oid, tech_id)
        replies = await asyncio.gather(*(lv.post_event(oid, "en_route")
                                         for lv, oid in zip(lives, ids, strict=True)))
        assert sorted(status for status, _ in replies) == [200, 409], replies
        winner = ids[[status for status, _ in replies].index(200)]
        loser = ids[1 - ids.index(winner)]
        refused = next(body for status, body in replies if status == 409)
        assert refused["error"]["details"] == {"reason": "job_in_progress", "order_id": winner,
                                               "state": "en_route"}
        assert (await lives[1].post_event(winner, "cancelled", role="agent"))[0] == 200
        assert (await lives[0].post_event(loser, "en_route"))[0] == 200
