"""DispatchService called directly: no socket, no HTTP. Built as realtime/app.py
builds it, with the memory engine's positions and presence, the real order
service and dispatch store (SecantusDB, one database per test). The offers and
withdrawals it sends are recorded; after an answer the test wakes the round's
driver as the app's bus does (`dispatch_answer` -> `wake`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden
from orders.model import Event, Order
from orders.service import OrderService
from realtime.presence.memory import MemoryPresence
from storage.dispatch import MongoDispatchStore
from storage.mongo import MongoOrderStore
from tests.harness import MongoServer, uid, until
from tests.stores import BOUND_S, own_database
from tracking.dispatch import NO_OFFER, DispatchConfig, DispatchService
from tracking.geo import haversine_m
from tracking.positions import MemoryPositions, Position

ADDR = (31.2304, 121.4737)
M_PER_DEG = haversine_m(0, 0, 1, 0)
BACKEND = Actor("backend", "service")
AGENT = Actor("a-1", "agent")
DISPATCH = {"id": "dispatch", "role": "system"}
WAIT_S = 3.0


def at(north_m: float = 0.0, east_m: float = 0.0) -> tuple[float, float]:
    return (ADDR[0] + north_m / M_PER_DEG,
            ADDR[1] + east_m / (M_PER_DEG * math.cos(math.radians(ADDR[0]))))


class Offers:
    """send_offer and withdraw: what each technician was sent, in order."""

    def __init__(self) -> None:
        self.offers: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.withdrawals: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def send_offer(self, technician_id: str, payload: dict[str, Any]) -> None:
        self.offers.put_nowait((technician_id, payload))

    async def withdraw(self, technician_id: str, payload: dict[str, Any]) -> None:
        self.withdrawals.put_nowait((technician_id, payload))

    async def next_offer(self) -> tuple[str, dict[str, Any]]:
        return await asyncio.wait_for(self.offers.get(), WAIT_S)

    async def next_withdrawal(self) -> tuple[str, dict[str, Any]]:
        return await asyncio.wait_for(self.withdrawals.get(), WAIT_S)


class Env:
    def __init__(self, order_store: MongoOrderStore, dispatch_store: MongoDispatchStore) -> None:
        self.order_store = order_store
        self.dispatch_store = dispatch_store
        self.changes: list[Event] = []
        self.orders = OrderService(order_store, self._changed, busy_wait_s=BOUND_S)
        self.positions = MemoryPositions()
        self.presence = MemoryPresence()
        self.sent = Offers()
        self.services: list[DispatchService] = []

    async def _changed(self, order: Order, event: Event) -> None:
        self.changes.append(event)

    def service(self, **cfg: Any) -> DispatchService:
        svc = DispatchService(
            orders=self.orders, positions=self.positions, presence=self.presence,
            busy=self.order_store, store=self.dispatch_store, send_offer=self.sent.send_offer,
            withdraw=self.sent.withdraw, config=DispatchConfig(**cfg))
        self.services.append(svc)
        return svc

    async def technician(self, north_m: float, skills: tuple[str, ...] = ("aircon",), *,
                         age_s: float = 0.0, online: bool = True) -> str:
        """A technician with one fix `north_m` from the address, `age_s` old."""
        tid = uid("t-")
        self.positions.put(Position(tid, *at(north_m), now_ms() - int(age_s * 1000),
                                    f"name-{tid}", skills=skills))
        if online:
            await self.presence.connect(tid)
        return tid

    async def order(self, skills: tuple[str, ...] = ("aircon",)) -> Order:
        order, _ = await self.orders.create(BACKEND, {
            "order_id": uid("o-"), "customer_id": uid("c-"),
            "service": {"code": "aircon_repair"},
            "address": {"lat": ADDR[0], "lng": ADDR[1], "text": "人民广场"},
            "window": {"start_ts": 1, "end_ts": 2}, "skills": list(skills)})
        return order

    async def busy_technician(self, north_m: float) -> str:
        """Online, fresh, skilled, but working on another order."""
        tid = await self.technician(north_m)
        other = await self.order()
        await self.orders.transition(BACKEND, other["order_id"], "assigned", {"technician_id": tid})
        return tid

    async def round_(self, dispatch_id: str) -> dict[str, Any]:
        doc = await self.dispatch_store.get(dispatch_id)
        assert doc is not None
        return doc

    async def until_round(self, dispatch_id: str, status: str) -> dict[str, Any]:
        async def reached() -> bool:
            return bool((await self.round_(dispatch_id))["status"] == status)

        await until(reached, WAIT_S, every=0.01, what=f"round {status}")
        return await self.round_(dispatch_id)


@pytest.fixture
async def env(mongo_server: MongoServer) -> AsyncIterator[Env]:
    async with own_database(mongo_server, "dispatch_") as own:
        dispatch_store = MongoDispatchStore(own.db, own.gate)
        await dispatch_store.ensure_indexes()
        e = Env(MongoOrderStore(own.client, own.db, gate=own.gate), dispatch_store)
        try:
            yield e
        finally:
            for svc in e.services:
                await svc.close()


def by_tech(round_: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {c["technician_id"]: (c["status"], c.get("reason")) for c in round_["candidates"]}


# -- nearby -----------------------------------------------------------------------------------------

async def test_nearby_lists_online_fresh_free_skilled_technicians_nearest_first(env: Env) -> None:
    svc = env.service(stale_after_s=300)
    near = await env.technician(200)
    farther = await env.technician(-1500)
    await env.technician(100, online=False)
    await env.technician(150, age_s=600)  # its fix says nothing any more
    await env.busy_technician(120)
    plumber = await env.technician(300, ("plumbing",))
    await env.technician(9000)  # beyond the radius
    found = await svc.nearby(*ADDR, 5000, "aircon", 10)
    assert [t["id"] for t in found] == [near, farther]
    assert [t["distance_m"] for t in found] == [200, 1500]
    assert found[0]["name"] == f"name-{near}" and found[0]["skills"] == ["aircon"]
    assert found[0]["status"] == "available"
    assert [t["id"] for t in await svc.nearby(*ADDR, 5000, "aircon", 1)] == [near]
    assert [t["id"] for t in await svc.nearby(*ADDR, 5000, None, 10)] == [near, plumber, farther]


# -- rounds -----------------------------------------------------------------------------------------

async def test_the_round_records_why_each_technician_was_or_was_not_offered(env: Env) -> None:
    svc = env.service(strategy="broadcast", count=2, timeout_s=30, radius_m=5000)
    first, second, third = [await env.technician(m) for m in (100, 400, 900)]
    offline = await env.technician(50, online=False)
    stale = await env.technician(60, age_s=600)
    busy = await env.busy_technician(70)
    plumber = await env.technician(80, ("plumbing",))
    outside = await env.technician(7000)  # inside twice the radius: considered, then refused
    order = await env.order()
    doc = await svc.start(BACKEND, order["order_id"])
    assert (doc["strategy"], doc["count"], doc["status"], doc["assigned_to"]) == (
        "broadcast", 2, "running", None)
    assert doc["started_by"] == {"id": "backend", "role": "service"}
    assert by_tech(doc) == {
        first: ("eligible", None), second: ("eligible", None),
        third: ("not_offered", "beyond_count"),
        offline: ("skipped", "offline"), stale: ("skipped", "stale_position"),
        busy: ("skipped", "busy"), plumber: ("skipped", "skill_mismatch"),
        outside: ("skipped", "out_of_radius"),
    }
    offered = dict([await env.sent.next_offer(), await env.sent.next_offer()])
    assert set(offered) == {first, second}
    payload = offered[first]
    assert {k: payload[k] for k in ("order_id", "dispatch_id", "service", "address", "window")} == {
        "order_id": order["order_id"], "dispatch_id": doc["dispatch_id"],
        "service": order["service"], "address": order["address"], "window": order["window"]}
    assert 25_000 < payload["expires_ts"] - now_ms() <= 30_000
    stored = await env.round_(doc["dispatch_id"])
    assert by_tech(stored)[first] == ("offered", None) and by_tech(stored)[second] == ("offered", None)


async def test_broadcast_first_accept_wins_and_the_others_are_withdrawn(env: Env) -> None:
    svc = env.service(strategy="broadcast", count=3, timeout_s=30)
    techs = [await env.technician(m) for m in (100, 200, 300)]
    order = await env.order()
    oid = order["order_id"]
    doc = await svc.start(BACKEND, oid)
    for _ in techs:
        await env.sent.next_offer()
    winner = Actor(techs[1], "technician")
    result = await svc.answer(winner, oid, True)
    svc.wake(doc["dispatch_id"])
    assert result["status"] == "accepted" and result["dispatch_id"] == doc["dispatch_id"]
    assert (result["order"]["state"], result["order"]["technician_id"]) == ("assigned", techs[1])
    assigned = env.changes[-1]
    assert (assigned["seq"], assigned["state"], assigned["actor"]) == (2, "assigned", DISPATCH)
    assert assigned["data"] == {"technician_id": techs[1], "dispatch_id": doc["dispatch_id"]}
    withdrawn = dict([await env.sent.next_withdrawal(), await env.sent.next_withdrawal()])
    assert set(withdrawn) == {techs[0], techs[2]}
    assert withdrawn[techs[0]] == {"order_id": oid, "dispatch_id": doc["dispatch_id"], "reason": "taken"}
    final = await env.round_(doc["dispatch_id"])
    assert (final["status"], final["assigned_to"]) == ("assigned", techs[1])
    assert by_tech(final) == {techs[0]: ("withdrawn", None), techs[1]: ("accepted", None),
                              techs[2]: ("withdrawn", None)}
    with pytest.raises(Conflict) as late:  # the round is over: no open offer any more
        await svc.answer(Actor(techs[0], "technician"), oid, True)
    assert late.value.message == NO_OFFER
    assert (await env.orders.get(oid))["seq"] == 2


async def test_sequential_decline_then_timeout_then_accept(env: Env) -> None:
    svc = env.service(strategy="sequential", count=3, timeout_s=0.3)
    a, b, c = [await env.technician(m) for m in (100, 200, 300)]
    oid = (await env.order())["order_id"]
    doc = await svc.start(BACKEND, oid)
    did = doc["dispatch_id"]
    assert (await env.sent.next_offer())[0] == a  # the nearest first, alone
    assert env.sent.offers.empty()
    declined = await svc.answer(Actor(a, "technician"), oid, False)
    svc.wake(did)
    assert declined == {"order_id": oid, "dispatch_id": did, "status": "declined"}
    assert (await env.sent.next_offer())[0] == b
    # b says nothing: past the timeout the offer is withdrawn and c asked.
    assert await env.sent.next_withdrawal() == (b, {"order_id": oid, "dispatch_id": did,
                                                    "reason": "timed_out"})
    assert (await env.sent.next_offer())[0] == c
    with pytest.raises(Conflict) as late:
        await svc.answer(Actor(b, "technician"), oid, True)
    assert late.value.message == "your offer is timed_out"
    await svc.answer(Actor(c, "technician"), oid, True)
    svc.wake(did)
    final = await env.round_(did)
    assert (final["status"], final["assigned_to"]) == ("assigned", c)
    assert by_tech(final) == {a: ("declined", "declined"), b: ("timed_out", "timed_out"),
                              c: ("accepted", None)}
    assert (await env.orders.get(oid))["technician_id"] == c


async def test_a_round_without_candidates_fails_and_notes_why_on_the_order(env: Env) -> None:
    svc = env.service(timeout_s=30)
    await env.technician(100, online=False)
    await env.technician(200, ("plumbing",))
    oid = (await env.order())["order_id"]
    doc = await svc.start(BACKEND, oid)
    final = await env.until_round(doc["dispatch_id"], "failed")
    assert isinstance(final["finished_ts"], int)
    await until(lambda: _has_note(env, oid), WAIT_S, every=0.01, what="dispatch_failed note")
    events = await env.orders.events_since(oid)
    assert [(e["seq"], e["type"], e["state"]) for e in events] == [
        (1, "state_changed", "created"), (2, "dispatch_failed", "created")]
    assert events[1]["actor"] == DISPATCH
    assert events[1]["data"] == {"dispatch_id": doc["dispatch_id"], "considered": 2,
                                 "reasons": {"offline": 1, "skill_mismatch": 1}}
    assert env.sent.offers.empty()


async def _has_note(env: Env, oid: str) -> bool:
    return len(await env.orders.events_since(oid)) == 2


async def test_accepting_after_the_order_was_cancelled_is_refused(env: Env) -> None:
    svc = env.service(strategy="broadcast", timeout_s=30)
    tech = await env.technician(100)
    oid = (await env.order())["order_id"]
    doc = await svc.start(BACKEND, oid)
    await env.sent.next_offer()
    await env.orders.transition(AGENT, oid, "cancelled")
    with pytest.raises(Conflict):
        await svc.answer(Actor(tech, "technician"), oid, True)
    final = await env.round_(doc["dispatch_id"])
    assert (final["status"], final["assigned_to"], final["error"]) == ("failed", None, "order_changed")
    assert by_tech(final)[tech] == ("too_late", "order_changed")
    order = await env.orders.get(oid)
    assert (order["state"], order["technician_id"]) == ("cancelled", None)


async def test_who_may_start_and_answer_and_when(env: Env) -> None:
    svc = env.service(strategy="broadcast", timeout_s=30)
    tech = await env.technician(100)
    oid = (await env.order())["order_id"]
    for role in ("customer", "technician"):
        with pytest.raises(Forbidden):
            await svc.start(Actor(uid(), role), oid)
    doc = await svc.start(Actor("adm", "admin"), oid)
    with pytest.raises(Conflict) as again:
        await svc.start(BACKEND, oid)
    assert again.value.details == {"dispatch_id": doc["dispatch_id"]}
    await env.sent.next_offer()
    with pytest.raises(Forbidden):
        await svc.answer(Actor(uid("c-"), "customer"), oid, True)
    # Never offered, or no such order: the same answer, telling nothing.
    for who, order_id in ((uid("t-"), oid), (tech, uid("o-missing-"))):
        with pytest.raises(Conflict) as refused:
            await svc.answer(Actor(who, "technician"), order_id, True)
        assert refused.value.message == NO_OFFER
    going = await env.order()
    await env.orders.transition(BACKEND, going["order_id"], "assigned",
                                {"technician_id": uid("t-")})
    await env.orders.transition(BACKEND, going["order_id"], "en_route")
    with pytest.raises(Conflict) as not_created:
        await svc.start(BACKEND, going["order_id"])
    assert not_created.value.details == {"state": "en_route"}
