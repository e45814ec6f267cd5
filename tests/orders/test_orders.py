"""Orders over the real wire (Socket.IO on /orders and the HTTP API) against the real store.

The expectations below are written from PROTOCOL.md ("Orders" and "HTTP API"),
not from orders/lifecycle.py, so a drift between the two shows up here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from tests.conftest import Live, StartApp
from tests.harness import Client, a_window, uid

# -- the contract, restated from PROTOCOL.md ------------------------------------------------------

STATES = (
    "created", "assigned", "en_route", "arrived", "in_service", "completed",
    "cancelled", "refund_requested", "refunded", "refund_rejected",
)
SUCCESSORS: dict[str, frozenset[str]] = {
    "created": frozenset({"assigned", "cancelled"}),
    "assigned": frozenset({"assigned", "en_route", "cancelled"}),  # assigned -> assigned: re-assign
    "en_route": frozenset({"arrived", "cancelled"}),
    "arrived": frozenset({"in_service", "cancelled"}),
    "in_service": frozenset({"completed"}),
    "completed": frozenset({"refund_requested"}),
    "cancelled": frozenset({"refund_requested"}),
    "refund_requested": frozenset({"refunded", "refund_rejected"}),
    "refunded": frozenset(),
    "refund_rejected": frozenset(),
}
WORK = frozenset({"en_route", "arrived", "in_service", "completed"})

# The cast of a test: who acts, and with which token role. "customer" is the
# order's customer, "technician" the assigned one.
WHO_ROLE = {
    "customer": "customer",
    "other_customer": "customer",
    "technician": "technician",
    "other_technician": "technician",
    "agent": "agent",
    "admin": "admin",
    "service": "service",
}
WHOS = tuple(WHO_ROLE)
HTTP_STATUS = {"ok": 200, "conflict": 409, "forbidden": 403, "not_found": 404, "invalid": 400}


def expected(from_state: str, target: str, who: str) -> str:
    """'ok', 'not_found', 'forbidden' or 'conflict' for `who` moving an order from
    `from_state` to `target`. Checked in this order: a stranger (no relation to the
    order) gets `not_found`, as for a missing order; then who may make the move at
    all (`forbidden`); then the state (`conflict`)."""
    # "technician" is the assigned one, and has no relation to an order not yet assigned.
    if who in ("other_customer", "other_technician") or (who == "technician"
                                                          and from_state == "created"):
        return "not_found"
    if target == "assigned":
        # Agents move an assigned order to another technician; the first
        # assignment is the backend's (or dispatch's).
        allowed = who in ("admin", "service") or (who == "agent" and from_state == "assigned")
    elif target in WORK:
        allowed = who in ("technician", "admin", "service")
    elif target == "cancelled":
        allowed = who in ("customer", "agent", "admin", "service")
    elif target == "refund_requested":
        allowed = who == "customer"
    elif target in ("refunded", "refund_rejected"):
        allowed = who in ("agent", "admin", "service")
    else:  # `created`: no transition leads there, for anyone
        allowed = True
    if not allowed:
        return "forbidden"
    if target not in SUCCESSORS[from_state]:
        return "conflict"
    if target == "cancelled" and who == "customer" and from_state not in ("created", "assigned"):
        return "conflict"  # the order's customer may cancel only before the technician sets off
    return "ok"


# What the socket events carry into the event's data (docs/protocol.md, "Order events").
SOCKET_DATA = {
    "cancelled": {"reason": "changed my mind"},
    "refund_requested": {"reason": "not fixed"},
    "refunded": {"note": "checked"},
    "refund_rejected": {"note": "checked"},
}


def channels(target: str) -> tuple[str, ...]:
    """Every wire path that asks for `target`: the socket event (if any) and the HTTP API."""
    if target == "created":
        return ("http_events",)
    if target == "assigned":
        return ("http_assign", "http_events")
    return ("socket", "http_events")


# How the tests bring an order into a state: (target, who) steps from `created`.
TO_COMPLETED = [("assigned", "service"), ("en_route", "service"), ("arrived", "service"),
                ("in_service", "service"), ("completed", "service")]
BUILD_PATH: dict[str, list[tuple[str, str]]] = {
    "created": [],
    "assigned": TO_COMPLETED[:1],
    "en_route": TO_COMPLETED[:2],
    "arrived": TO_COMPLETED[:3],
    "in_service": TO_COMPLETED[:4],
    "completed": TO_COMPLETED,
    "cancelled": [("assigned", "service"), ("cancelled", "service")],
    "refund_requested": [*TO_COMPLETED, ("refund_requested", "customer")],
    "refunded": [*TO_COMPLETED, ("refund_requested", "customer"), ("refunded", "service")],
    "refund_rejected": [*TO_COMPLETED, ("refund_requested", "customer"), ("refund_rejected", "agent")],
}


def check_legal_history(events: list[dict[str, Any]]) -> None:
    """Seqs 1..N with no gap or duplicate, and every state change a legal step of the table."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"seqs not contiguous from 1: {seqs}"
    assert events[0]["state"] == "created"
    for prev, ev in itertools.pairwise(events):
        if ev["type"] == "rated":
            assert ev["state"] == prev["state"], ev
            continue
        assert ev["state"] in SUCCESSORS[prev["state"]], (
            f"illegal step {prev['state']} -> {ev['state']} at seq {ev['seq']}")


# -- helpers --------------------------------------------------------------------------------------

class Cast:
    """Fixed user ids per role for one test, so actors can be checked exactly."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.ids = {who: uid(who.replace("_", "-") + "-") for who in WHOS}

    @property
    def customer_id(self) -> str:
        return self.ids["customer"]

    @property
    def tech_id(self) -> str:
        return self.ids["technician"]

    def token(self, who: str, live: Live | None = None) -> str:
        return (live or self.live).token(WHO_ROLE[who], self.ids[who])

    def actor(self, who: str) -> dict[str, str]:
        return {"id": self.ids[who], "role": WHO_ROLE[who]}

    async def client(self, who: str, live: Live | None = None) -> Client:
        return await (live or self.live).client(WHO_ROLE[who], self.ids[who])

    async def http(self, method: str, path: str, who: str, json: Any = None,
                   live: Live | None = None) -> tuple[int, Any]:
        live = live or self.live
        return await live.http.request(method, path, self.token(who, live), json=json)

    def order_body(self, order_id: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "order_id": order_id or uid("o-"),
            "customer_id": self.customer_id,
            "service": {"code": "aircon_repair", "name": "空调维修"},
            "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
            "window": a_window(),
            **extra,
        }

    async def create(self) -> str:
        body = self.order_body()
        status, reply = await self.http("POST", "/api/orders", "service", body)
        assert status == 201, reply
        return str(body["order_id"])

    async def step(self, order_id: str, target: str, who: str = "service",
                   live: Live | None = None) -> dict[str, Any]:
        if target == "assigned":
            status, reply = await self.http("POST", f"/api/orders/{order_id}/assign", who,
                                            {"technician_id": self.tech_id}, live)
        else:
            status, reply = await self.http("POST", f"/api/orders/{order_id}/events", who,
                                            {"state": target}, live)
        assert status == 200, (order_id, target, who, reply)
        return dict(reply["data"]["event"])

    async def build(self, state: str) -> str:
        order_id = await self.create()
        for target, who in BUILD_PATH[state]:
            await self.step(order_id, target, who)
        return order_id

    async def snapshot(self, order_id: str, live: Live | None = None) -> tuple[dict[str, Any], list[Any]]:
        status, reply = await self.http("GET", f"/api/orders/{order_id}", "service", live=live)
        assert status == 200, reply
        return reply["data"]["order"], reply["data"]["events"]

    async def attempt(self, channel: str, who: str, client: Client, order_id: str, target: str,
                      tech_id: str) -> tuple[str, Any, str]:
        """Ask for `target` over `channel`. Returns (code, data, problem) where code is 'ok' or
        the error code and problem is non-empty when the HTTP status does not match the code."""
        if channel == "socket":
            payload: dict[str, Any]
            if target in WORK:
                event, payload = "progress", {"order_id": order_id, "state": target}
            elif target == "cancelled":
                event, payload = "cancel", {"order_id": order_id, **SOCKET_DATA[target]}
            elif target == "refund_requested":
                event, payload = "request_refund", {"order_id": order_id, **SOCKET_DATA[target]}
            else:
                event, payload = "resolve_refund", {"order_id": order_id, "approve": target == "refunded",
                                                    **SOCKET_DATA[target]}
            reply = await client.call(event, payload)
            if reply["ok"]:
                return "ok", reply["data"], ""
            return reply["error"]["code"], reply["error"], ""
        if channel == "http_assign":
            status, reply = await self.http("POST", f"/api/orders/{order_id}/assign", who,
                                            {"technician_id": tech_id})
        else:
            body: dict[str, Any] = {"state": target, "data": {"ticket": "T-1"}}
            if target == "assigned":
                body["data"]["technician_id"] = tech_id
            status, reply = await self.http("POST", f"/api/orders/{order_id}/events", who, body)
        code = "ok" if reply.get("ok") else reply["error"]["code"]
        problem = "" if HTTP_STATUS.get(code) == status else f"HTTP status {status} for {code}"
        return code, reply.get("data") or reply.get("error"), problem


async def barrier(client: Client) -> None:
    """One round trip. Everything the server emitted to this client before the
    round trip started (e.g. while handling a request that has already been
    answered) arrives before the reply: one connection is one ordered stream."""
    await client.ok("unsubscribe", {"order_id": "barrier"})


# -- 1. the transition table, every state x target x role x wire path -----------------------------

@pytest.mark.parametrize("who", WHOS)
@pytest.mark.parametrize("from_state", STATES)
async def test_transition_matrix(live: Live, from_state: str, who: str) -> None:
    """From `from_state`, `who` asks for every target over every path (socket event,
    POST /events, POST /assign). Allowed ones store exactly one event with the next seq;
    refused ones are `not_found` / `forbidden` / `conflict` and store nothing."""
    cast = Cast(live)
    client = await cast.client(who)
    cases = [(target, channel, expected(from_state, target, who))
             for target in STATES for channel in channels(target)]
    # One order for all refused requests (they must leave it untouched), a fresh one per
    # allowed request, each with a cast of its own (a technician has one job under way at
    # a time: orders en route for one technician cannot be built side by side); built
    # concurrently.
    n_fresh = sum(want == "ok" for _, _, want in cases)
    casts = [Cast(live) for _ in range(n_fresh)]
    base, *fresh_ids = await asyncio.gather(cast.build(from_state),
                                            *(c.build(from_state) for c in casts))
    fresh = list(zip(casts, fresh_ids, strict=True))
    base_order, base_events = await cast.snapshot(base)
    assert base_order["state"] == from_state
    prev_seq = len(BUILD_PATH[from_state]) + 1
    assert base_order["seq"] == prev_seq

    async def run(target: str, channel: str, want: str, c: Cast, order_id: str) -> list[str]:
        # A re-assign goes to someone else; a first assignment to the cast's technician.
        tech_id = c.ids["other_technician"] if from_state == "assigned" else c.tech_id
        me = client if c is cast else await c.client(who)
        problems: list[str] = []
        case = f"{from_state} -> {target} by {who} via {channel}"
        code, data, problem = await c.attempt(channel, who, me, order_id, target, tech_id)
        if problem:
            problems.append(f"{case}: {problem}")
        if code != want:
            problems.append(f"{case}: expected {want}, got {code}: {data}")
            return problems
        if want != "ok":
            return problems
        ev, order = data["event"], data["order"]
        reassign = from_state == "assigned" and target == "assigned"
        want_ev = {
            "order_id": order_id,
            "seq": prev_seq + 1,
            "type": "reassigned" if reassign else "state_changed",
            "state": target,
            "actor": c.actor(who),
        }
        got_ev = {k: ev.get(k) for k in want_ev}
        if got_ev != want_ev:
            problems.append(f"{case}: event {got_ev} != {want_ev}")
        if not isinstance(ev.get("ts"), int) or abs(ev["ts"] - time.time() * 1000) > 60_000:
            problems.append(f"{case}: ts {ev.get('ts')!r} is not epoch ms of now")
        if (order["state"], order["seq"]) != (target, ev["seq"]):
            problems.append(f"{case}: snapshot state/seq {order['state']}/{order['seq']}")
        if target == "assigned":
            if ev["data"].get("technician_id") != tech_id or order["technician_id"] != tech_id:
                problems.append(f"{case}: not assigned to {tech_id}: {ev['data']} {order}")
            if reassign and ev["data"].get("previous_technician_id") != c.tech_id:
                problems.append(f"{case}: previous_technician_id missing: {ev['data']}")
        want_data = {"socket": SOCKET_DATA.get(target, {}), "http_assign": {}}.get(
            channel, {"ticket": "T-1"})
        if any(ev["data"].get(k) != v for k, v in want_data.items()):
            problems.append(f"{case}: event data {ev['data']} lacks {want_data}")
        stored_order, stored = await c.snapshot(order_id)
        if stored[-1] != ev or len(stored) != ev["seq"] or stored_order["state"] != target:
            problems.append(f"{case}: stored history does not end with the event: {stored[-2:]}")
        return problems

    # Independent requests: refused ones all aim at `base` (and must not move it), allowed
    # ones each at their own order; so they run concurrently.
    found = await asyncio.gather(*(
        run(target, channel, want, *((cast, base) if want != "ok" else fresh.pop()))
        for target, channel, want in cases))
    problems = [p for ps in found for p in ps]
    after_order, after_events = await cast.snapshot(base)
    if (after_order, after_events) != (base_order, base_events):
        problems.append(f"refused requests changed order {base}: {after_events[len(base_events):]}")
    assert not problems, "\n".join(problems)


async def test_reassign_moves_the_order_to_the_new_technician(live: Live) -> None:
    cast = Cast(live)
    order_id = await cast.build("assigned")
    old = await cast.client("technician")
    new = await cast.client("other_technician")
    customer = await cast.client("customer")
    sub = await old.ok("subscribe", {"order_id": order_id})
    assert sub["order"]["technician_id"] == cast.tech_id
    # Re-assigning must name a different technician (docs/protocol.md); nothing is stored.
    status, reply = await cast.http("POST", f"/api/orders/{order_id}/assign", "service",
                                    {"technician_id": cast.tech_id})
    assert status == 409 and reply["error"]["code"] == "conflict", reply

    status, reply = await cast.http("POST", f"/api/orders/{order_id}/assign", "admin",
                                    {"technician_id": cast.ids["other_technician"]})
    assert status == 200, reply
    ev = reply["data"]["event"]
    assert (ev["type"], ev["state"], ev["seq"]) == ("reassigned", "assigned", 3), ev
    assert ev["actor"] == cast.actor("admin")
    assert ev["data"]["technician_id"] == cast.ids["other_technician"]
    assert ev["data"]["previous_technician_id"] == cast.tech_id
    # The new technician hears of it without subscribing, as does the customer.
    assert await new.next("order_event") == ev
    assert await customer.next("order_event") == ev

    # The previous technician has lost the order: no subscribe, no GET, no progress; to
    # them it is now an order like any other not theirs (not_found).
    await old.error("subscribe", {"order_id": order_id}, "not_found")
    status, reply = await live.http.request("GET", f"/api/orders/{order_id}", cast.token("technician"))
    assert status == 404 and reply["error"]["code"] == "not_found", reply
    await old.error("progress", {"order_id": order_id, "state": "en_route"}, "not_found")
    old.drain("order_event")

    # ... and stops hearing about it, although it had subscribed before.
    data = await new.ok("progress", {"order_id": order_id, "state": "en_route"})
    assert data["event"]["seq"] == 4 and data["event"]["actor"] == cast.actor("other_technician")
    assert await customer.next("order_event") == data["event"]
    await barrier(old)
    assert old.drain("order_event") == [], "the previous technician still receives the order's events"
    _, events = await cast.snapshot(order_id)
    check_legal_history(events)
    assert len(events) == 4


# -- 2. rate --------------------------------------------------------------------------------------

async def test_rate_only_own_customer_after_completed_once(live: Live) -> None:
    cast = Cast(live)
    clients = {who: await cast.client(who) for who in WHOS}
    customer = clients["customer"]

    # Not before `completed`, not on a cancelled order.
    for state in ("created", "assigned", "en_route", "arrived", "in_service", "cancelled"):
        order_id = await cast.build(state)
        err = await customer.error("rate", {"order_id": order_id, "stars": 5}, "conflict")
        assert err["message"], err
        _, events = await cast.snapshot(order_id)
        assert len(events) == len(BUILD_PATH[state]) + 1, f"rating a {state} order stored an event"
        if state in ("en_route", "arrived", "in_service"):  # one job at a time: end this one
            await cast.step(order_id, "completed" if state == "in_service" else "cancelled")

    order_id = await cast.build("completed")
    # Only the order's customer; strangers are not told the order exists.
    for who in ("technician", "agent", "admin", "service"):
        await clients[who].error("rate", {"order_id": order_id, "stars": 5}, "forbidden")
    for who in ("other_customer", "other_technician"):
        await clients[who].error("rate", {"order_id": order_id, "stars": 5}, "not_found")
    # Stars and the three dimensions are 1..5 integers; the payload is validated.
    bad: list[tuple[dict[str, Any], str]] = [
        ({"stars": 0}, "stars"), ({"stars": 6}, "stars"), ({"stars": "5"}, "stars"),
        ({"stars": 4.5}, "stars"), ({}, "stars"),
        ({"stars": 3, "quality": 0}, "quality"), ({"stars": 3, "attitude": 6}, "attitude"),
        ({"stars": 3, "efficiency": -1}, "efficiency"), ({"stars": 3, "tip": 5}, "tip"),
    ]
    for extra, field in bad:
        err = await customer.error("rate", {"order_id": order_id, **extra}, "invalid")
        fields = [d["field"] for d in err.get("details") or []]
        assert field in fields, (extra, err)
    await customer.error("rate", {"order_id": uid("missing-"), "stars": 5}, "not_found")
    order, events = await cast.snapshot(order_id)
    assert len(events) == 6 and order["rating"] is None, "refused ratings were stored"

    for c in (customer, clients["technician"]):
        await barrier(c)  # every push from building the orders has arrived ...
        c.drain("order_event")  # ... and is dropped
    rating = {"stars": 1, "quality": 5, "attitude": 1, "efficiency": 5, "comment": "准时, 专业"}
    data = await customer.ok("rate", {"order_id": order_id, **rating})
    ev = data["event"]
    assert (ev["type"], ev["state"], ev["seq"]) == ("rated", "completed", 7), ev
    assert ev["actor"] == cast.actor("customer")
    assert {k: ev["data"].get(k) for k in rating} == rating, ev["data"]
    assert data["order"]["state"] == "completed"
    assert {k: data["order"]["rating"].get(k) for k in rating} == rating
    assert await customer.next("order_event") == ev
    assert await clients["technician"].next("order_event") == ev
    order, events = await cast.snapshot(order_id)
    assert events[-1] == ev and order["rating"]["stars"] == 1
    check_legal_history(events)

    # Once per order.
    await customer.error("rate", {"order_id": order_id, "stars": 5}, "conflict")
    await customer.error("rate", {"order_id": order_id, **rating}, "conflict")
    after, events_after = await cast.snapshot(order_id)
    assert events_after == events and after["rating"] == order["rating"]


# -- 3. replay ------------------------------------------------------------------------------------

async def test_replay_after_reconnect_returns_exactly_the_missed_events(start_app: StartApp) -> None:
    live, other_node = await start_app(), await start_app()
    cast = Cast(live)
    order_id = await cast.build("assigned")
    agent = await cast.client("agent")
    first = await agent.ok("subscribe", {"order_id": order_id})
    assert [e["seq"] for e in first["events"]] == [1, 2]
    assert first["order"]["seq"] == 2 and first["order"]["state"] == "assigned"
    live_ev = await cast.step(order_id, "en_route")
    assert await agent.next("order_event") == live_ev
    last_seen = live_ev["seq"]
    await agent.close()

    missed = [await cast.step(order_id, s) for s in ("arrived", "in_service", "completed")]
    missed.append(await cast.step(order_id, "refund_requested", "customer"))

    # It comes back through another node (same store), as behind a load balancer.
    again = await cast.client("agent", other_node)
    data = await again.ok("subscribe", {"order_id": order_id, "since_seq": last_seen})
    assert data["events"] == missed, [e["seq"] for e in data["events"]]
    assert [e["seq"] for e in data["events"]] == [4, 5, 6, 7]
    assert data["order"]["state"] == "refund_requested" and data["order"]["seq"] == 7

    _, stored = await cast.snapshot(order_id)
    assert len(stored) == 7
    check_legal_history(stored)
    everything = await again.ok("subscribe", {"order_id": order_id})
    assert everything["events"] == stored
    assert (await again.ok("subscribe", {"order_id": order_id, "since_seq": 0}))["events"] == stored
    for beyond in (7, 8, 1_000):
        data = await again.ok("subscribe", {"order_id": order_id, "since_seq": beyond})
        assert data["events"] == [], (beyond, data["events"])
        assert data["order"]["seq"] == 7
    await again.error("subscribe", {"order_id": order_id, "since_seq": -1}, "invalid")

    # Subscribed several times over: the next event still arrives once.
    again.drain("order_event")
    nxt = await cast.step(order_id, "refunded", "agent", other_node)
    assert await again.next("order_event") == nxt
    await barrier(again)
    assert again.drain("order_event") == []


# -- 4. concurrency: seqs stay contiguous ----------------------------------------------------------

@pytest.mark.parametrize("n_apps", [1, 2], ids=["one_app", "two_apps"])
async def test_fifty_concurrent_transitions_keep_seqs_contiguous(start_app: StartApp, n_apps: int) -> None:
    # Fifty changes queue on one order's lock: on a busy 2-core machine (the
    # outbox's relay shares the embedded store) the last would wait past the
    # 2.5 s default and answer `unavailable`, which is right but not what this
    # test is about (seqs), so its apps wait longer.
    lives = [await start_app(mongo_timeout_ms=15_000) for _ in range(n_apps)]
    cast = Cast(lives[0])
    order_id = await cast.build("assigned")
    sockets = [{who: await cast.client(who, lv) for who in ("agent", "admin", "service")} for lv in lives]
    watchers = [await lv.client("agent") for lv in lives]
    for w in watchers:
        await w.ok("subscribe", {"order_id": order_id})

    async def reassign(i: int) -> tuple[str, str, Any]:
        lv = lives[i % n_apps]
        status, reply = await cast.http("POST", f"/api/orders/{order_id}/assign", "service",
                                        {"technician_id": f"tech-{i}-{uid()}"}, lv)
        code = "ok" if reply.get("ok") else reply["error"]["code"]
        assert status == HTTP_STATUS.get(code), (status, reply)
        return f"assign#{i}", code, reply.get("data") or reply.get("error")

    async def socket_call(i: int, who: str, event: str, payload: dict[str, Any]) -> tuple[str, str, Any]:
        reply = await sockets[i % n_apps][who].call(event, {"order_id": order_id, **payload})
        code = "ok" if reply["ok"] else reply["error"]["code"]
        return f"{event}#{i}", code, reply.get("data") or reply.get("error")

    # Warm the HTTP keep-alive pool, so requests race with socket calls instead of trailing
    # behind TCP connects.
    await asyncio.gather(*(cast.snapshot(order_id, lv) for lv in lives for _ in range(40)))
    ops = []
    for i in range(50):
        kind = i % 5
        if kind < 3:
            ops.append(reassign(i))
        elif kind == 3:
            state = "en_route" if i % 10 == 3 else "arrived"
            ops.append(socket_call(i, "admin" if i % 2 else "service", "progress", {"state": state}))
        else:
            ops.append(socket_call(i, "agent", "cancel", {"reason": f"race {i}"}))
    results = await asyncio.gather(*ops)

    order, events = await cast.snapshot(order_id)
    check_legal_history(events)
    wins = [r for r in results if r[1] == "ok"]
    losses = [r for r in results if r[1] != "ok"]
    assert all(code == "conflict" for _, code, _ in losses), [r for r in losses if r[1] != "conflict"]
    assert len(events) == 2 + len(wins), (len(events), len(wins))
    assert sorted(r[2]["event"]["seq"] for r in wins) == list(range(3, len(events) + 1))
    by_seq = {e["seq"]: e for e in events}
    for name, _, data in wins:
        assert by_seq[data["event"]["seq"]] == data["event"], name
    assert order["seq"] == len(events) and order["state"] == events[-1]["state"]
    assert wins, results
    # A subscriber hears each event once, in seq order (on one node: every event; each node
    # publishes what it commits).
    for w in watchers:
        await barrier(w)
    heard = [[e["seq"] for e in w.received["order_event"]] for w in watchers]
    for seqs in heard:
        assert seqs == sorted(set(seqs)), f"pushed out of order or twice: {seqs}"
    if n_apps == 1:
        assert watchers[0].received["order_event"] == events[2:]


RACES = [
    # (from_state, (who, how, target), (who, how, target)): whichever commits first makes
    # the other illegal, so exactly one may win.
    ("assigned", ("customer", "socket", "cancelled"), ("technician", "socket", "en_route")),
    ("assigned", ("customer", "http_events", "cancelled"), ("service", "socket", "en_route")),
    ("refund_requested", ("agent", "socket", "refunded"), ("admin", "http_events", "refund_rejected")),
    ("in_service", ("technician", "socket", "completed"), ("service", "http_events", "completed")),
]


@pytest.mark.parametrize("n_apps", [1, 2], ids=["one_app", "two_apps"])
async def test_concurrent_transitions_from_the_same_state_one_wins(start_app: StartApp,
                                                                   n_apps: int) -> None:
    lives = [await start_app() for _ in range(n_apps)]
    cast = Cast(lives[0])
    clients = [{who: await cast.client(who, lv) for who in WHOS} for lv in lives]
    casts = []
    for lv in lives:
        c = Cast(lv)
        c.ids = cast.ids
        casts.append(c)

    rounds = [(race, r) for race in RACES for r in range(3)]
    for race, r in rounds:
        from_state, first, second = race
        # Built one at a time: the cast's technician has one job under way at a time.
        order_id = await cast.build(from_state)
        _, before = await cast.snapshot(order_id)
        attempts = []
        for k, (who, how, target) in enumerate((first, second)):
            node = (k + r) % n_apps  # with two apps, the two sides run on different apps
            attempts.append(casts[node].attempt(how, who, clients[node][who], order_id, target,
                                                cast.tech_id))
        results = await asyncio.gather(*attempts)
        codes = sorted(code for code, _, _ in results)
        label = f"{from_state}: {first} vs {second} (round {r})"
        assert codes == ["conflict", "ok"], (label, results)
        assert not any(problem for _, _, problem in results), (label, results)
        winner = next(data for code, data, _ in results if code == "ok")
        _, events = await cast.snapshot(order_id)
        check_legal_history(events)
        assert len(events) == len(before) + 1, (label, events[len(before):])
        assert events[-1] == winner["event"], label
        if events[-1]["state"] == "en_route":  # end it, for the next round's order
            await cast.step(order_id, "cancelled")


# -- 5. order_event delivery ----------------------------------------------------------------------

async def test_order_event_delivery_to_subscribers_customer_and_technician_exactly_once(
        live: Live) -> None:
    cast = Cast(live)
    order_id = await cast.create()
    agent = await cast.client("agent")            # subscribes
    bystander = await live.client("agent")        # an agent who does not subscribe
    customer = await cast.client("customer")      # the order's customer
    tech = await cast.client("technician")        # becomes the order's technician
    other_customer = await cast.client("other_customer")
    other_tech = await cast.client("other_technician")
    everyone = (agent, bystander, customer, tech, other_customer, other_tech)
    await agent.ok("subscribe", {"order_id": order_id})

    # assigned: the subscriber, the customer and the (new) technician, none of the others.
    e2 = await cast.step(order_id, "assigned")
    for c in (agent, customer, tech):
        assert await c.next("order_event") == e2

    # The customer and technician now subscribe as well: still once each.
    await customer.ok("subscribe", {"order_id": order_id})
    await tech.ok("subscribe", {"order_id": order_id})
    e3 = (await tech.ok("progress", {"order_id": order_id, "state": "en_route"}))["event"]
    e4 = await cast.step(order_id, "arrived")
    for c in (agent, customer, tech):
        # e4 arriving after e3 on the same connection proves no second copy of e3 came in between.
        assert [await c.next("order_event"), await c.next("order_event")] == [e3, e4]
    for c in everyone:
        await barrier(c)
    for name, c in (("agent", agent), ("customer", customer), ("technician", tech)):
        assert c.drain("order_event") == [], f"duplicate order_event to the {name}"
        assert c.received["order_event"] == [e2, e3, e4], name
    for name, c in (("unsubscribed agent", bystander), ("other customer", other_customer),
                    ("other technician", other_tech)):
        assert c.received["order_event"] == [], f"{name} received {c.received['order_event']}"

    # Unsubscribed: the agent hears nothing more; the customer and technician still do.
    for c in (agent, customer, tech):
        await c.ok("unsubscribe", {"order_id": order_id})
    e5 = await cast.step(order_id, "in_service")
    assert await customer.next("order_event") == e5
    assert await tech.next("order_event") == e5
    e6 = (await tech.ok("progress", {"order_id": order_id, "state": "completed"}))["event"]
    assert await customer.next("order_event") == e6
    assert await tech.next("order_event") == e6
    for c in everyone:
        await barrier(c)
    assert agent.drain("order_event") == [], "an unsubscribed agent still receives order events"
    assert customer.drain("order_event") == [] and tech.drain("order_event") == []
    for c in (bystander, other_customer, other_tech):
        assert c.received["order_event"] == []


# -- 6. visibility --------------------------------------------------------------------------------

async def test_visibility_of_get_and_subscribe(live: Live) -> None:
    cast = Cast(live)
    clients = {who: await cast.client(who) for who in WHOS}
    created = await cast.create()
    assigned = await cast.build("assigned")
    visible = {
        # who: (sees the created order, sees the assigned order)
        "customer": (True, True),
        "other_customer": (False, False),
        "technician": (False, True),  # only once assigned to them
        "other_technician": (False, False),
        "agent": (True, True),
        "admin": (True, True),
        "service": (True, True),
    }
    problems = []
    for who, sees in visible.items():
        for order_id, can in zip((created, assigned), sees, strict=True):
            status, reply = await live.http.request("GET", f"/api/orders/{order_id}", cast.token(who))
            sub = await clients[who].call("subscribe", {"order_id": order_id})
            label = f"{who} on {order_id}"
            if can:
                if status != 200 or reply["data"]["order"]["order_id"] != order_id:
                    problems.append(f"GET {label}: {status} {reply}")
                elif [e["seq"] for e in reply["data"]["events"]] != list(
                        range(1, reply["data"]["order"]["seq"] + 1)):
                    problems.append(f"GET {label}: events {reply['data']['events']}")
                if not sub["ok"] or sub["data"]["order"]["order_id"] != order_id:
                    problems.append(f"subscribe {label}: {sub}")
                elif sub["data"]["events"] != reply["data"]["events"]:
                    problems.append(f"subscribe {label}: events differ from GET")
            else:  # not theirs: as if it did not exist
                if status != 404 or reply["error"]["code"] != "not_found":
                    problems.append(f"GET {label}: expected 404 not_found, got {status} {reply}")
                if sub["ok"] or sub["error"]["code"] != "not_found":
                    problems.append(f"subscribe {label}: expected not_found, got {sub}")
        missing = uid("nope-")
        status, reply = await live.http.request("GET", f"/api/orders/{missing}", cast.token(who))
        if status != 404 or reply["error"]["code"] != "not_found":
            problems.append(f"GET unknown order by {who}: {status} {reply}")
        sub = await clients[who].call("subscribe", {"order_id": missing})
        if sub["ok"] or sub["error"]["code"] != "not_found":
            problems.append(f"subscribe unknown order by {who}: {sub}")
    assert not problems, "\n".join(problems)
    # A refused subscribe joins nothing: the other customer hears nothing of the order.
    await cast.step(assigned, "en_route")
    await barrier(clients["other_customer"])
    assert clients["other_customer"].received["order_event"] == []


# -- 7. POST /api/orders --------------------------------------------------------------------------

async def test_create_order_is_idempotent_and_staff_only(live: Live) -> None:
    cast = Cast(live)
    body = cast.order_body(skills=["aircon"])
    status, first = await cast.http("POST", "/api/orders", "service", body)
    assert status == 201 and first["data"]["created"] is True, first
    order = first["data"]["order"]
    assert order["state"] == "created" and order["seq"] == 1 and order["customer_id"] == cast.customer_id

    status, again = await cast.http("POST", "/api/orders", "service", body)
    assert status == 200, again
    assert again["data"]["created"] is False and again["data"]["order"] == order

    for change in ({"customer_id": uid("c-")}, {"service": {"code": "plumbing", "name": "水管维修"}},
                   {"window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_720_000}},
                   {"skills": ["plumbing"]}):
        status, reply = await cast.http("POST", "/api/orders", "service", {**body, **change})
        assert status == 409 and reply["error"]["code"] == "conflict", (change, status, reply)

    stored, events = await cast.snapshot(body["order_id"])
    assert stored == order, "a repeated or conflicting create changed the order"
    assert len(events) == 1 and events[0]["seq"] == 1 and events[0]["actor"] == cast.actor("service")

    # A retry after the order has moved on still creates nothing and returns the order as it is.
    await cast.step(body["order_id"], "assigned")
    status, late = await cast.http("POST", "/api/orders", "service", body)
    assert status == 200 and late["data"]["created"] is False, late
    assert late["data"]["order"]["state"] == "assigned" and late["data"]["order"]["seq"] == 2, late
    assert late["data"]["order"]["created_ts"] == order["created_ts"]
    _, events = await cast.snapshot(body["order_id"])
    assert [e["seq"] for e in events] == [1, 2]

    # Concurrent retries of one create: one 201, the rest 200 with the same order.
    body2 = cast.order_body()
    replies = await asyncio.gather(*(cast.http("POST", "/api/orders", "service", body2)
                                     for _ in range(8)))
    statuses = sorted(s for s, _ in replies)
    assert statuses == [200] * 7 + [201], replies
    assert len({r["data"]["order"]["created_ts"] for _, r in replies}) == 1
    _, events2 = await cast.snapshot(body2["order_id"])
    assert [e["seq"] for e in events2] == [1]

    # Only service and admin may create.
    for who in ("customer", "technician", "agent"):
        status, reply = await cast.http("POST", "/api/orders", who, cast.order_body())
        assert status == 403 and reply["error"]["code"] == "forbidden", (who, status, reply)
    body3 = cast.order_body()
    status, reply = await cast.http("POST", "/api/orders", "customer", body3)
    assert status == 403
    status, reply = await cast.http("GET", f"/api/orders/{body3['order_id']}", "service")
    assert status == 404, "a refused create stored the order"
    status, reply = await cast.http("POST", "/api/orders", "admin", body3)
    assert status == 201 and reply["data"]["created"] is True, reply
    assert reply["data"]["order"]["order_id"] == body3["order_id"]
