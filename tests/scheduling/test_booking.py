"""/booking and the hold routes over the wire (docs/scheduling.md): holds
take a technician's time exclusively and push the change to watchers; a
release, an expiry, a cancellation give it back; a confirm turns a hold into
its order once; assignments respect schedules; nonsense is refused with the
field."""

from __future__ import annotations

import time
from datetime import date
from typing import Any

import jwt
import pytest
import socketio

from tests.conftest import Live
from tests.harness import Client, uid
from tests.scheduling.test_availability_api import FAR, NEAR, at, set_calendar, some_day

NS = "/booking"


def query(day: date, skill: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"lat": NEAR["lat"], "lng": NEAR["lng"], "skill": skill,
                            "from_date": day.isoformat(), "days": 1, "duration_min": 60}
    body.update(over)
    return body


def counts(slots: list[dict[str, Any]]) -> dict[int, int]:
    return {s["start_ts"]: s["count"] for s in slots}


def hold_body(start: int, skill: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"start_ts": start, "duration_min": 60, "lat": NEAR["lat"],
                            "lng": NEAR["lng"], "skill": skill}
    body.update(over)
    return body


async def two_technicians(live: Live) -> tuple[str, str, str]:
    skill = uid("skill-")
    a, b = uid("tech-a-"), uid("tech-b-")
    await set_calendar(live, a, skills=[skill])
    await set_calendar(live, b, skills=[skill])
    return skill, a, b


async def seen(c: Client, start: int, count: int) -> None:
    """Wait for a push that sets `start` to `count` (earlier pushes may come first)."""
    while True:
        push = await c.next("availability_changed")
        if {"start_ts": start, "count": count} in push["changes"]:
            return


async def order_at(live: Live, day: date, start_h: int, end_h: int, address: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    return await live.create_order(window={"start_ts": at(day, start_h), "end_ts": at(day, end_h)},
                                   address=address, **extra)


async def assign(live: Live, order: dict[str, Any], tech: str) -> tuple[int, Any]:
    return await live.http.request("POST", f"/api/orders/{order['order_id']}/assign",
                                   live.token("service"), json={"technician_id": tech})


def confirm_body(order_id: str, customer: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"order_id": order_id, "customer_id": customer,
                            "service": {"code": "plumbing", "name": "水管维修"},
                            "address": NEAR}
    body.update(over)
    return body


async def test_a_hold_takes_the_slot_from_every_watcher_and_a_release_gives_it_back(live: Live) -> None:
    day = some_day()
    skill, a, b = await two_technicians(live)
    watcher = await live.client("customer", namespace=NS)
    view = counts((await watcher.ok("watch_availability", query(day, skill)))["slots"])
    ten = at(day, 10)
    assert view[ten] == 2
    me = uid("cust-")
    holder = await live.client("customer", me, namespace=NS)
    held = await holder.ok("hold", hold_body(ten, skill))
    assert held["technician"] in (a, b) and held["start_ts"] == ten
    assert held["end_ts"] == ten + 3_600_000 and held["expires_ts"] > time.time() * 1000 + 290_000
    await seen(watcher, ten, 1)
    # Customers see counts, never who.
    assert "technicians" not in (await holder.ok("availability", query(day, skill)))["slots"][0]
    released = await holder.ok("release", {"hold_id": held["hold_id"]})
    assert released["state"] == "released"
    await seen(watcher, ten, 2)
    ended = await holder.next("hold_ended")
    assert ended["hold_id"] == held["hold_id"] and ended["reason"] == "released"
    # Released twice: the same answer, nothing more to give back.
    assert (await holder.ok("release", {"hold_id": held["hold_id"]}))["state"] == "released"
    async with live.http.session.get(live.url + "/metrics") as resp:
        text = await resp.text()
    assert 'realtime_holds_total{outcome="made"} 1.0' in text, text[-2000:]
    assert 'realtime_holds_total{outcome="released"} 1.0' in text
    assert "realtime_availability_watchers 1.0" in text


async def test_a_taken_slot_answers_conflict_with_the_next_free_starts(live: Live) -> None:
    day = some_day()
    skill, a, _ = await two_technicians(live)
    ten = at(day, 10)
    first = await live.client("customer", namespace=NS)
    await first.ok("hold", hold_body(ten, skill, technician_id=a))
    second = await live.client("customer", namespace=NS)
    err = await second.error("hold", hold_body(ten, skill, technician_id=a), "conflict")
    assert err["details"]["reason"] == "taken"
    nxt = err["details"]["next"]
    # The drive from the hold next door is a minute: 11:00 is the next start on the grid.
    assert nxt and nxt[0] == at(day, 11) and all(t > ten for t in nxt)
    # Another technician is still free then: an unnamed hold takes them.
    held = await second.ok("hold", hold_body(ten, skill))
    assert held["technician"] != a


async def test_a_customer_has_at_most_two_live_holds(live: Live) -> None:
    day = some_day()
    skill, _, _ = await two_technicians(live)
    me = await live.client("customer", namespace=NS)
    h1 = await me.ok("hold", hold_body(at(day, 10), skill))
    await me.ok("hold", hold_body(at(day, 14), skill))
    err = await me.error("hold", hold_body(at(day, 16), skill), "conflict")
    assert err["details"]["reason"] == "hold_limit" and err["details"]["limit"] == 2
    await me.ok("release", {"hold_id": h1["hold_id"]})
    await me.ok("hold", hold_body(at(day, 16), skill))


async def test_someone_elses_hold_is_forbidden_and_an_unknown_one_not_found(live: Live) -> None:
    day = some_day()
    skill, _, _ = await two_technicians(live)
    owner = await live.client("customer", namespace=NS)
    held = await owner.ok("hold", hold_body(at(day, 10), skill))
    stranger = await live.client("customer", namespace=NS)
    await stranger.error("release", {"hold_id": held["hold_id"]}, "forbidden")
    await stranger.error("release", {"hold_id": "h-nope"}, "not_found")
    status, reply = await live.http.request("GET", f"/api/holds/{held['hold_id']}",
                                            live.token("customer"))
    assert status == 403, reply
    agent = await live.client("agent", namespace=NS)
    await agent.error("hold", hold_body(at(day, 12), skill), "forbidden")


async def test_an_expired_hold_returns_to_every_watcher_within_a_second(start_app: Any) -> None:
    live: Live = await start_app(hold_ttl_s=1.0)
    day = some_day()
    skill, a, _ = await two_technicians(live)
    ten = at(day, 10)
    watchers = [await live.client("customer", namespace=NS) for _ in range(3)]
    for w in watchers:
        await w.ok("watch_availability", query(day, skill))
    holder = await live.client("customer", namespace=NS)
    held = await holder.ok("hold", hold_body(ten, skill, technician_id=a))
    for w in watchers:
        await seen(w, ten, 1)
    for w in watchers:
        await seen(w, ten, 2)
        back_ms = time.time() * 1000
        assert back_ms - held["expires_ts"] <= 1000, back_ms - held["expires_ts"]
    ended = await holder.next("hold_ended")
    assert ended["reason"] == "expired"
    # An expired hold cannot be confirmed.
    status, reply = await live.http.request(
        "POST", f"/api/holds/{held['hold_id']}/confirm", live.token("service"),
        json=confirm_body(uid("o-"), holder_id(holder)))
    assert status == 409 and reply["error"]["details"]["reason"] == "expired", reply


def holder_id(c: Client) -> str:
    """The customer a test client's token names."""
    return str(jwt.decode(c.token or "", options={"verify_signature": False})["sub"])


async def test_a_hold_confirmed_twice_makes_one_assigned_order(live: Live) -> None:
    day = some_day()
    skill, _, _ = await two_technicians(live)
    me = uid("cust-")
    c = await live.client("customer", me, namespace=NS)
    watcher = await live.client("customer", namespace=NS)
    await watcher.ok("watch_availability", query(day, skill))
    held = await c.ok("hold", hold_body(at(day, 10), skill))
    await seen(watcher, at(day, 10), 1)
    order_id = uid("o-")
    path = f"/api/holds/{held['hold_id']}/confirm"
    status, first = await live.http.request("POST", path, live.token("service"),
                                            json=confirm_body(order_id, me))
    assert status == 201, first
    order = first["data"]["order"]
    assert order["state"] == "assigned" and order["technician_id"] == held["technician"]
    assert order["window"] == {"start_ts": held["start_ts"], "end_ts": held["end_ts"]}
    status, again = await live.http.request("POST", path, live.token("service"),
                                            json=confirm_body(order_id, me))
    assert status == 200 and again["data"]["order"]["order_id"] == order_id, again
    assert again["data"]["created"] is False
    status, got = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert [e["state"] for e in got["data"]["events"]] == ["created", "assigned"]
    # The same hold as another order: refused; the hold is gone from the customer's count.
    status, reply = await live.http.request("POST", path, live.token("service"),
                                            json=confirm_body(uid("o-"), me))
    assert status == 409, reply
    ended = await c.next("hold_ended")
    assert ended["reason"] == "confirmed" and ended["order_id"] == order_id, ended
    # Cancelling the booked order gives its time back, live.
    status, reply = await live.post_event(order_id, "cancelled")
    assert status == 200, reply
    await seen(watcher, at(day, 10), 2)


async def customer_holding(live: Live) -> tuple[str, dict[str, Any]]:
    """A customer of their own holding 10:00 of some day: their id and the hold."""
    day = some_day()
    skill, _, _ = await two_technicians(live)
    me = uid("cust-")
    c = await live.client("customer", me, namespace=NS)
    return me, await c.ok("hold", hold_body(at(day, 10), skill))


async def test_confirm_checks_the_customer_the_window_and_the_payload(live: Live) -> None:
    day = some_day()
    me, held = await customer_holding(live)
    path = f"/api/holds/{held['hold_id']}/confirm"
    svc = live.token("service")
    status, reply = await live.http.request("POST", path, svc, json=confirm_body(uid("o-"), "other"))
    assert status == 403, reply
    status, reply = await live.http.request("POST", path, svc, json=confirm_body(
        uid("o-"), me, window={"start_ts": at(day, 11), "end_ts": at(day, 12)}))
    assert status == 400 and reply["error"]["details"][0]["field"] == "window", reply
    for bad in ({}, {"order_id": ""}, confirm_body(uid("o-"), me, extra=1),
                confirm_body("bad id", me), confirm_body(uid("o-"), me, address={"lat": 1})):
        status, reply = await live.http.request("POST", path, svc, json=bad)
        assert status == 400 and reply["error"]["code"] == "invalid", (bad, reply)
    status, reply = await live.http.request("POST", path, live.token("customer", me),
                                            json=confirm_body(uid("o-"), me))
    assert status == 403, reply
    status, reply = await live.http.request("POST", "/api/holds/h-none/confirm", svc,
                                            json=confirm_body(uid("o-"), me))
    assert status == 404, reply
    # The backend may release a hold (payment failed).
    status, reply = await live.http.request("POST", f"/api/holds/{held['hold_id']}/release", svc)
    assert status == 200 and reply["data"]["hold"]["state"] == "released", reply
    status, reply = await live.http.request("POST", path, svc, json=confirm_body(uid("o-"), me))
    assert status == 409 and reply["error"]["details"]["reason"] == "released", reply


async def test_assigning_an_overlapping_order_is_refused_with_the_conflicting_id(live: Live) -> None:
    day = some_day()
    _, a, _ = await two_technicians(live)
    first = await order_at(live, day, 10, 12, NEAR)
    await live.assign(first["order_id"], a)
    second = await order_at(live, day, 11, 13, NEAR)
    status, reply = await assign(live, second, a)
    assert status == 409, reply
    details = reply["error"]["details"]
    assert details["order_id"] == first["order_id"] and details["reason"] == "taken"
    assert details["conflict"] == {"kind": "order", "id": first["order_id"],
                                   "start_ts": at(day, 10), "end_ts": at(day, 12)}
    # Right after it, but across the city: the drive does not fit.
    third = await order_at(live, day, 12, 13, FAR)
    status, reply = await assign(live, third, a)
    assert status == 409 and reply["error"]["details"]["reason"] == "travel_from", reply
    # Outside working hours (09:00-18:00).
    night = await order_at(live, day, 19, 20, NEAR)
    status, reply = await assign(live, night, a)
    assert status == 409 and reply["error"]["details"]["reason"] == "outside_hours", reply
    # Once the first is cancelled, the second fits.
    status, reply = await live.post_event(first["order_id"], "cancelled")
    assert status == 200, reply
    await live.assign(second["order_id"], a)


async def test_a_hold_across_the_city_right_after_a_job_is_refused_for_the_drive(live: Live) -> None:
    day = some_day()
    skill, a, _ = await two_technicians(live)
    booked = await order_at(live, day, 10, 11, FAR)
    await live.assign(booked["order_id"], a)
    c = await live.client("customer", namespace=NS)
    err = await c.error("hold", hold_body(at(day, 11), skill, technician_id=a), "conflict")
    assert err["details"]["next"] and err["details"]["next"][0] >= at(day, 11, 30)
    view = counts((await c.ok("availability", query(day, skill)))["slots"])
    assert view[at(day, 11)] == 1  # only the other technician


async def test_bad_booking_payloads_answer_invalid_with_the_field(live: Live) -> None:
    day = some_day()
    skill, _, _ = await two_technicians(live)
    c = await live.client("customer", namespace=NS)
    for body, field in (
        (query(day, skill, days=15), "days"),
        (query(day, skill, duration_min=0), "duration_min"),
        (query(day, skill, duration_min=-30), "duration_min"),
        (query(day, skill, from_date="2020-01-01"), "from_date"),
        (query(day, skill, from_date="tomorrow"), "from_date"),
        (query(day, skill, lat=91), "lat"),
        (query(day, skill, extra=1), "extra"),
        (query(day, skill, days=14, granularity_min=5), "(payload)"),
    ):
        for event in ("availability", "watch_availability"):
            err = await c.error(event, body, "invalid")
            assert any(d["field"] == field for d in err["details"]), (event, err)
    for body, field in (
        (hold_body(at(day, 10), skill, duration_min=0), "duration_min"),
        (hold_body(1_000, skill), "start_ts"),
        (hold_body(int(time.time() * 1000) + 20 * 86_400_000, skill), "start_ts"),
        (hold_body(at(day, 10), skill, technician_id="bad id"), "technician_id"),
        (hold_body("10:00", skill), "start_ts"),  # type: ignore[arg-type]
    ):
        err = await c.error("hold", body, "invalid")
        assert any(d["field"] == field for d in err["details"]), err
    await c.error("release", {}, "invalid")
    await c.error("release", {"hold_id": 5}, "invalid")
    await c.error("hold", [1, 2], "invalid")
    await c.error("nope", {}, "invalid")
    assert (await c.ok("unwatch_availability")) == {}


async def test_technicians_are_refused_the_namespace(live: Live) -> None:
    c = Client(live.url, NS, live.token("technician"))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await c.connect()
    await c.close()


async def test_a_dispatch_round_skips_technicians_whose_day_is_taken(live: Live) -> None:
    day = some_day()
    _, a, b = await two_technicians(live)
    booked = await order_at(live, day, 10, 12, NEAR)
    await live.assign(booked["order_id"], a)
    order = await order_at(live, day, 11, 12, NEAR, skills=[])
    techs = []
    for t in (a, b):
        tc = await live.client("technician", t, namespace="/tracking", skills=[])
        await tc.ok("location", {"lat": NEAR["lat"], "lng": NEAR["lng"], "ts": int(time.time() * 1000)})
        techs.append(tc)
    status, reply = await live.http.request(
        "POST", f"/api/orders/{order['order_id']}/dispatch", live.token("service"), json={})
    assert status == 202, reply
    record = {c["technician_id"]: c for c in reply["data"]["dispatch"]["candidates"]}
    assert record[a]["status"] == "skipped" and record[a]["reason"] == "schedule_conflict"
    assert record[a]["conflict"]["order_id"] == booked["order_id"]
    assert record[b]["status"] in ("eligible", "offered")


async def test_watchers_get_no_push_for_unchanged_views(live: Live) -> None:
    day = some_day()
    skill, _, _ = await two_technicians(live)
    other_skill, _, _ = await two_technicians(live)
    watcher = await live.client("customer", namespace=NS)
    await watcher.ok("watch_availability", query(day, skill))
    marker = await live.client("customer", namespace=NS)
    await marker.ok("watch_availability", query(day, other_skill))
    holder = await live.client("customer", namespace=NS)
    await holder.ok("hold", hold_body(at(day, 10), other_skill))
    await seen(marker, at(day, 10), 1)
    # The watcher's view was looked at before the marker's (first watched);
    # a push to it would arrive before the answer to its next call.
    await watcher.ok("availability", query(day, skill))
    assert watcher.drain("availability_changed") == []


async def test_a_calendar_set_moves_the_views_live(live: Live) -> None:
    day = some_day()
    skill, a, _ = await two_technicians(live)
    watcher = await live.client("customer", namespace=NS)
    view = counts((await watcher.ok("watch_availability", query(day, skill)))["slots"])
    assert view[at(day, 10)] == 2
    # Technician a takes the day off: every start of the day loses one.
    await set_calendar(live, a, skills=[skill],
                       exceptions=[{"date": day.isoformat(), "kind": "off"}])
    push = await watcher.next("availability_changed")
    moved = {c["start_ts"]: c["count"] for c in push["changes"]}
    assert moved[at(day, 10)] == 1 and all(n == view[t] - 1 for t, n in moved.items()), moved


async def test_confirm_refuses_an_address_far_from_the_hold(live: Live) -> None:
    me, held = await customer_holding(live)
    status, reply = await live.http.request(
        "POST", f"/api/holds/{held['hold_id']}/confirm", live.token("service"),
        json=confirm_body(uid("o-"), me, address=FAR))
    assert status == 400 and reply["error"]["details"][0]["field"] == "address", reply
