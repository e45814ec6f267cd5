"""OrderService called directly: no socket, no HTTP. Built as realtime/app.py
builds it, on the real store (a SecantusDB process, MongoOrderStore behind the
StoreGate), each test on a database of its own. The on-change callback the
app fans out from is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden, NotFound, Unavailable
from orders.model import Event, Order
from orders.service import OrderService
from storage.mongo import MongoOrderStore
from tests.harness import MongoServer, uid
from tests.stores import BOUND_S, own_database

BACKEND = Actor("backend", "service")
AGENT = Actor("a-1", "agent")
DISPATCH = Actor("dispatch", "system")


class Changes:
    """The on-change callback: every (order, event) the service announces, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Order, Event]] = []

    async def __call__(self, order: Order, event: Event) -> None:
        self.seen.append((order, event))

    def events(self, order_id: str) -> list[Event]:
        return [e for o, e in self.seen if o["order_id"] == order_id]


class Env:
    def __init__(self, store: MongoOrderStore, changes: Changes) -> None:
        self.store = store
        self.changes = changes
        self.orders = OrderService(store, changes, busy_wait_s=BOUND_S)
        self.customer = Actor(uid("c-"), "customer")
        self.tech = Actor(uid("t-"), "technician")

    def spec(self, **over: Any) -> dict[str, Any]:
        return {
            "order_id": uid("o-"), "customer_id": self.customer.id,
            "service": {"code": "aircon_repair", "name": "空调维修"},
            "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
            "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000},
            "skills": ["aircon"], **over,
        }

    async def order_in(self, state: str) -> str:
        """A new order of this env's customer, moved to `state` the usual way."""
        order, _ = await self.orders.create(BACKEND, self.spec())
        oid = order["order_id"]
        path = {
            "created": [],
            "assigned": ["assigned"],
            "en_route": ["assigned", "en_route"],
            "completed": ["assigned", "en_route", "arrived", "in_service", "completed"],
        }[state]
        for target in path:
            if target == "assigned":
                await self.orders.transition(BACKEND, oid, "assigned", {"technician_id": self.tech.id})
            else:
                await self.orders.transition(self.tech, oid, target)
        return oid


@pytest.fixture
async def store(mongo_server: MongoServer) -> AsyncIterator[MongoOrderStore]:
    async with own_database(mongo_server, "orders_") as own:
        yield MongoOrderStore(own.client, own.db, gate=own.gate)


@pytest.fixture
def env(store: MongoOrderStore) -> Env:
    return Env(store, Changes())


def seqs(events: list[Event]) -> list[int]:
    return [e["seq"] for e in events]


# -- create -----------------------------------------------------------------------------------------

async def test_create_stores_seq_1_and_announces_it_once(env: Env) -> None:
    spec = env.spec()
    order, created = await env.orders.create(BACKEND, spec)
    assert created is True
    assert (order["order_id"], order["state"], order["seq"]) == (spec["order_id"], "created", 1)
    assert order["technician_id"] is None and order["rating"] is None
    assert order["customer_id"] == env.customer.id and order["skills"] == ["aircon"]
    [(announced, event)] = env.changes.seen
    assert announced["order_id"] == spec["order_id"]
    assert {k: event[k] for k in ("order_id", "seq", "type", "state", "actor", "data")} == {
        "order_id": spec["order_id"], "seq": 1, "type": "state_changed", "state": "created",
        "actor": {"id": "backend", "role": "service"}, "data": {}}
    assert await env.orders.events_since(spec["order_id"]) == [event]


async def test_create_is_idempotent_on_order_id(env: Env) -> None:
    spec = env.spec()
    first, created = await env.orders.create(BACKEND, spec)
    again, created_again = await env.orders.create(BACKEND, dict(spec))
    assert (created, created_again) == (True, False)
    assert again["order_id"] == first["order_id"] and again["seq"] == 1
    assert again["created_ts"] == first["created_ts"]  # the stored one, not a new one
    assert len(env.changes.seen) == 1  # a retry announces nothing
    assert seqs(await env.orders.events_since(spec["order_id"])) == [1]


async def test_same_order_id_with_other_content_is_a_conflict(env: Env) -> None:
    spec = env.spec()
    await env.orders.create(BACKEND, spec)
    with pytest.raises(Conflict):
        await env.orders.create(BACKEND, {**spec, "address": {"lat": 0, "lng": 0, "text": "x"}})
    order = await env.orders.get(spec["order_id"])
    assert order["address"] == spec["address"] and order["seq"] == 1


# -- transitions and the event stream ---------------------------------------------------------------

async def test_a_full_job_gives_contiguous_events_in_order(env: Env) -> None:
    oid = await env.order_in("completed")
    events = await env.orders.events_since(oid)
    assert seqs(events) == [1, 2, 3, 4, 5, 6]
    assert [e["state"] for e in events] == ["created", "assigned", "en_route", "arrived",
                                            "in_service", "completed"]
    assert [e["actor"]["role"] for e in events] == ["service", "service"] + ["technician"] * 4
    assert events[1]["data"] == {"technician_id": env.tech.id}
    # What was announced is exactly what was stored, in the same order.
    assert env.changes.events(oid) == events
    order = await env.orders.get(oid)
    assert (order["state"], order["seq"], order["technician_id"]) == ("completed", 6, env.tech.id)
    assert isinstance(order["completed_ts"], int)


async def test_events_since_returns_only_later_events_up_to_the_limit(env: Env) -> None:
    oid = await env.order_in("completed")
    assert seqs(await env.orders.events_since(oid, since_seq=3)) == [4, 5, 6]
    assert seqs(await env.orders.events_since(oid, since_seq=1, limit=2)) == [2, 3]
    assert await env.orders.events_since(oid, since_seq=6) == []
    assert await env.orders.events_since(uid("o-missing-")) == []


async def test_a_stranger_gets_not_found_exactly_as_for_a_missing_order(env: Env) -> None:
    oid = await env.order_in("assigned")
    missing = uid("o-missing-")
    before = len(env.changes.seen)
    for stranger in (Actor(uid("c-"), "customer"), Actor(uid("t-"), "technician")):
        # Even a move this actor could never make answers not_found, not forbidden.
        for target in ("cancelled", "en_route", "refunded"):
            with pytest.raises(NotFound) as real:
                await env.orders.transition(stranger, oid, target)
            with pytest.raises(NotFound) as fake:
                await env.orders.transition(stranger, missing, target)
            assert real.value.message.replace(oid, "?") == fake.value.message.replace(missing, "?")
        with pytest.raises(NotFound):
            await env.orders.visible(stranger, oid)
    assert len(env.changes.seen) == before
    assert (await env.orders.get(oid))["seq"] == 2


async def test_permission_comes_before_legality_for_those_who_may_know(env: Env) -> None:
    """The customer may see the order but not move it to en_route: forbidden,
    whatever its state (a conflict would tell the state)."""
    oid = await env.order_in("completed")
    with pytest.raises(Forbidden):
        await env.orders.transition(env.customer, oid, "en_route")
    with pytest.raises(Forbidden):
        await env.orders.transition(env.tech, oid, "refunded")
    assert (await env.orders.get(oid))["seq"] == 6


async def test_an_illegal_transition_is_a_conflict_and_stores_nothing(env: Env) -> None:
    oid = await env.order_in("assigned")
    with pytest.raises(Conflict) as info:
        await env.orders.transition(env.tech, oid, "in_service")
    assert info.value.details == {"state": "assigned"}
    with pytest.raises(Conflict):
        await env.orders.transition(env.customer, oid, "refund_requested")
    assert seqs(await env.orders.events_since(oid)) == [1, 2]
    assert len(env.changes.events(oid)) == 2


async def test_the_customer_cancels_only_before_the_technician_sets_off(env: Env) -> None:
    early = await env.order_in("assigned")
    order, event = await env.orders.transition(env.customer, early, "cancelled", {"reason": "plans"})
    assert (order["state"], event["seq"], event["data"]) == ("cancelled", 3, {"reason": "plans"})

    late = await env.order_in("en_route")
    with pytest.raises(Conflict) as info:
        await env.orders.transition(env.customer, late, "cancelled")
    assert info.value.details == {"state": "en_route"}
    order, _ = await env.orders.transition(AGENT, late, "cancelled")  # support may
    assert order["state"] == "cancelled"
    # Afterwards the customer asks for a refund; an agent resolves it.
    await env.orders.transition(env.customer, late, "refund_requested")
    order, event = await env.orders.transition(AGENT, late, "refunded")
    assert (order["state"], event["seq"]) == ("refunded", 6)


async def test_reassignment_moves_the_order_to_the_new_technician(env: Env) -> None:
    oid = await env.order_in("assigned")
    new_tech = Actor(uid("t-"), "technician")
    with pytest.raises(Conflict):  # to the same technician again
        await env.orders.transition(BACKEND, oid, "assigned", {"technician_id": env.tech.id})
    order, event = await env.orders.transition(BACKEND, oid, "assigned",
                                               {"technician_id": new_tech.id})
    assert event["type"] == "reassigned" and event["seq"] == 3
    assert event["data"] == {"technician_id": new_tech.id, "previous_technician_id": env.tech.id}
    assert order["technician_id"] == new_tech.id
    # The previous technician no longer sees the order at all.
    with pytest.raises(NotFound):
        await env.orders.visible(env.tech, oid)
    with pytest.raises(NotFound):
        await env.orders.transition(env.tech, oid, "en_route")
    order, _ = await env.orders.transition(new_tech, oid, "en_route")
    assert order["state"] == "en_route"


async def test_assigning_needs_a_technician_id(env: Env) -> None:
    oid = await env.order_in("created")
    for data in (None, {}, {"technician_id": ""}, {"technician_id": 7}):
        with pytest.raises(Conflict):
            await env.orders.transition(BACKEND, oid, "assigned", data)
    assert seqs(await env.orders.events_since(oid)) == [1]


async def test_expect_state_refuses_a_move_from_another_state(env: Env) -> None:
    oid = await env.order_in("assigned")
    with pytest.raises(Conflict) as info:
        await env.orders.transition(DISPATCH, oid, "assigned", {"technician_id": uid("t-")},
                                    expect_state="created")
    assert info.value.details == {"state": "assigned"}
    assert (await env.orders.get(oid))["technician_id"] == env.tech.id


async def test_rating_by_the_own_customer_once_after_completion(env: Env) -> None:
    oid = await env.order_in("en_route")
    with pytest.raises(Conflict):  # not completed yet
        await env.orders.rate(env.customer, oid, {"stars": 5})
    for target in ("arrived", "in_service", "completed"):
        await env.orders.transition(env.tech, oid, target)
    with pytest.raises(Forbidden):
        await env.orders.rate(AGENT, oid, {"stars": 5})
    order, event = await env.orders.rate(env.customer, oid, {"stars": 4, "comment": None})
    assert event["type"] == "rated" and event["data"] == {"stars": 4} and event["seq"] == 7
    rating = order["rating"]
    assert rating is not None and rating["stars"] == 4 and "comment" not in rating
    with pytest.raises(Conflict):
        await env.orders.rate(env.customer, oid, {"stars": 1})


async def test_a_note_takes_the_next_seq_and_keeps_the_state(env: Env) -> None:
    oid = await env.order_in("created")
    order, event = await env.orders.note(DISPATCH, oid, "dispatch_failed", {"considered": 0})
    assert (order["state"], order["seq"]) == ("created", 2)
    assert (event["type"], event["state"], event["data"]) == ("dispatch_failed", "created",
                                                              {"considered": 0})


# -- concurrency ------------------------------------------------------------------------------------

async def test_two_nodes_racing_on_one_order_keep_seqs_gap_free(env: Env) -> None:
    """Two services on one store (two nodes): their writes to one order race
    optimistically; every event gets its own seq, none is lost or doubled."""
    other_node = OrderService(env.store, env.changes, busy_wait_s=BOUND_S)
    oid = await env.order_in("created")
    nodes = (env.orders, other_node)
    await asyncio.gather(*(nodes[i % 2].note(BACKEND, oid, "note", {"n": i}) for i in range(12)))
    events = await env.orders.events_since(oid)
    assert seqs(events) == list(range(1, 14))
    assert sorted(e["data"]["n"] for e in events[1:]) == list(range(12))
    assert (await env.orders.get(oid))["seq"] == 13


async def test_racing_identical_moves_on_two_nodes_give_one_winner(env: Env) -> None:
    other_node = OrderService(env.store, env.changes, busy_wait_s=BOUND_S)
    oid = await env.order_in("assigned")
    results = await asyncio.gather(env.orders.transition(env.tech, oid, "en_route"),
                                   other_node.transition(env.tech, oid, "en_route"),
                                   return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], Conflict) and losers[0].details == {"state": "en_route"}
    assert seqs(await env.orders.events_since(oid)) == [1, 2, 3]


async def test_a_change_stuck_behind_another_on_the_same_order_is_unavailable(
        store: MongoOrderStore) -> None:
    """The on-change callback runs under the order's lock: while it hangs, the
    next change of that order waits at most busy_wait_s, then `unavailable`;
    other orders are not held up."""
    release, holding = asyncio.Event(), asyncio.Event()

    async def slow_notify(order: Order, event: Event) -> None:
        if event["type"] == "hold":
            holding.set()
            await release.wait()

    orders = OrderService(store, slow_notify, busy_wait_s=0.1)
    env = Env(store, Changes())
    a, _ = await orders.create(BACKEND, env.spec())
    b, _ = await orders.create(BACKEND, env.spec())
    stuck = asyncio.create_task(orders.note(BACKEND, a["order_id"], "hold", {}))
    await holding.wait()
    with pytest.raises(Unavailable) as info:
        await orders.note(BACKEND, a["order_id"], "next", {})
    assert info.value.message == "the order is busy; retry"
    _, other = await orders.note(BACKEND, b["order_id"], "next", {})
    assert other["seq"] == 2
    release.set()
    await stuck
    assert seqs(await orders.events_since(a["order_id"])) == [1, 2]


# -- reads ------------------------------------------------------------------------------------------

async def test_who_may_see_an_order(env: Env) -> None:
    oid = await env.order_in("assigned")
    for viewer in (env.customer, env.tech, AGENT, Actor("x", "admin"), BACKEND, DISPATCH):
        assert (await env.orders.visible(viewer, oid))["order_id"] == oid
    with pytest.raises(NotFound):
        await env.orders.get(uid("o-missing-"))


async def test_overlapping_reads_share_one_result(env: Env) -> None:
    oid = await env.order_in("created")
    first, second = await asyncio.gather(env.orders.read_shared(oid), env.orders.read_shared(oid))
    assert first is second and first["order_id"] == oid
    later = await env.orders.read_shared(oid)
    assert later is not first and later == first  # a read after them is a new one
    with pytest.raises(NotFound):
        await env.orders.read_shared(uid("o-missing-"))
