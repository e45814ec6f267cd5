"""TrackingService called directly: no socket. Built as realtime/app.py builds
it with the memory engine's pieces (MemoryPositions, MemoryRateLimiter), the
real order service and store (SecantusDB, one database per test) and the
real trail writer; order changes reach the service's active-order cache as
the app's bus delivers them (`on_order_event`). What it hands the edge
(`position_out`) and its point counter are recorded."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Forbidden, NotFound, RateLimited
from kernel.rate import MemoryRateLimiter
from orders.model import Event, Order
from orders.service import OrderService
from storage.mongo import MongoOrderStore
from storage.trails import TrailWriter, ensure_trail_indexes, trail_for_order
from tests.harness import MongoServer, uid, until
from tests.stores import BOUND_S, own_database
from tracking.geo import haversine_m
from tracking.locations import Point
from tracking.positions import MemoryPositions, Position
from tracking.service import PointResult, TrackingConfig, TrackingService

ADDR = (31.2304, 121.4737)  # the order address (WGS-84)
M_PER_DEG = haversine_m(0, 0, 1, 0)
BACKEND = Actor("backend", "service")
GEOFENCE = {"id": "geofence", "role": "system"}
# The app's defaults (tracking_config(settings)): 25 km/h default pace, road factor 1.35.
CFG = TrackingConfig()
STEP_MS = 60_000  # between a test's fixes: no jump here is a teleport


def at(north_m: float) -> tuple[float, float]:
    return ADDR[0] + north_m / M_PER_DEG, ADDR[1]


def fix(north_m: float, ts: int, **kw: Any) -> Point:
    lat, lng = at(north_m)
    return Point(lat, lng, ts, **kw)


def first_eta(distance_m: float) -> int:
    """The ETA of a job's first fix: the distance by road at the default pace."""
    return round(distance_m * CFG.eta.road_factor / CFG.eta.default_speed_mps)


@dataclass
class Backing:
    """The durable side of a test: its own database, the order store, the trail writer."""

    db: AsyncDatabase[dict[str, Any]]
    store: MongoOrderStore
    trails: TrailWriter


class Env:
    def __init__(self, backing: Backing, limiter: MemoryRateLimiter) -> None:
        self.db, self.store, self.trails = backing.db, backing.store, backing.trails
        self.positions = MemoryPositions()
        self.out: list[tuple[Position, dict[str, Any] | None]] = []
        self.counted: list[str] = []
        self.orders = OrderService(self.store, self._order_changed, busy_wait_s=BOUND_S)
        self.tracking = TrackingService(
            positions=self.positions, orders=self.orders, jobs=self.store,
            trails=self.trails,
            limiter=limiter, position_out=lambda pos, payload: self.out.append((pos, payload)),
            count=self.counted.append, config=CFG)
        self.customer = Actor(uid("c-"), "customer")
        self.tech = Actor(uid("t-"), "technician")
        self.t0 = now_ms() - 20 * STEP_MS  # fixes of the recent past

    async def _order_changed(self, order: Order, event: Event) -> None:
        self.tracking.on_order_event(order, event)

    def ts(self, step: int) -> int:
        return self.t0 + step * STEP_MS

    async def order_in(self, state: str) -> str:
        order, _ = await self.orders.create(BACKEND, {
            "order_id": uid("o-"), "customer_id": self.customer.id,
            "service": {"code": "aircon_repair"},
            "address": {"lat": ADDR[0], "lng": ADDR[1], "text": "人民广场"},
            "window": {"start_ts": 1, "end_ts": 2}})
        oid = order["order_id"]
        path = ["created", "assigned", "en_route", "arrived", "in_service"]
        for target in path[1:path.index(state) + 1]:
            if target == "assigned":
                await self.orders.transition(BACKEND, oid, target, {"technician_id": self.tech.id})
            else:
                await self.orders.transition(self.tech, oid, target)
        return oid

    async def send(self, *points: Point | PointResult) -> list[str]:
        results = await self.tracking.ingest(self.tech, "师傅", list(points))
        return [r.status if r.reason is None else f"{r.status}:{r.reason}" for r in results]

    async def state_of(self, oid: str) -> str:
        return str((await self.orders.get(oid))["state"])


@pytest.fixture
async def backing(mongo_server: MongoServer) -> AsyncIterator[Backing]:
    async with own_database(mongo_server, "tracking_") as own:
        await ensure_trail_indexes(own.db, 30)
        trails = TrailWriter(own.db)  # not started: the tests flush it when they look
        try:
            yield Backing(own.db, MongoOrderStore(own.client, own.db, gate=own.gate), trails)
        finally:
            await trails.close()


def make_env(backing: Backing, limiter: MemoryRateLimiter | None = None) -> Env:
    # The app's location limit by default: 5 per second, bursts of 10.
    return Env(backing, limiter or MemoryRateLimiter(5.0, 10.0))


@pytest.fixture
async def env(backing: Backing) -> AsyncIterator[Env]:
    e = make_env(backing)
    try:
        yield e
    finally:
        await e.tracking.close()


async def until_state(env: Env, oid: str, state: str, timeout: float = 3.0) -> None:
    async def reached() -> bool:
        return await env.state_of(oid) == state

    await until(reached, timeout, every=0.01, what=f"order {oid} {state}")


# -- ingest and its filters -------------------------------------------------------------------------

async def test_an_accepted_point_becomes_the_latest_position(env: Env) -> None:
    await env.tracking.technician_connected(env.tech.id)
    p = fix(300, env.ts(0), speed=5.0, heading=90.0, accuracy=8.0)
    results = await env.tracking.ingest(env.tech, "师傅", [p], ("aircon",))
    assert [r.as_dict() for r in results] == [{"status": "accepted", "ts": p.ts}]
    pos = await env.positions.get(env.tech.id)
    assert pos == Position(env.tech.id, p.lat, p.lng, p.ts, "师傅", 5.0, 90.0, 8.0,
                           status="available", skills=("aircon",))
    # Without an order nobody watches the technician: out to the area views only.
    assert env.out == [(pos, None)]
    assert env.counted == ["accepted"]


async def test_old_and_impossible_points_are_dropped_and_never_move_the_marker(env: Env) -> None:
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(0, env.ts(5))) == ["accepted"]
    statuses = await env.send(
        fix(10, env.ts(4)),  # older than the last accepted
        fix(10, env.ts(5)),  # the same instant again
        fix(10, env.ts(5) + 1000),
        fix(5000, env.ts(5) + 2000),  # 5 km in a second: a GPS jump
        fix(20, env.ts(6), accuracy=500.0),  # too vague to use
        fix(20, env.ts(6)),
    )
    assert statuses == ["dropped:stale", "dropped:stale", "accepted", "dropped:teleport",
                        "dropped:inaccurate", "accepted"]
    pos = await env.positions.get(env.tech.id)
    assert pos is not None and pos.ts == env.ts(6) and pos.lat == at(20)[0]
    assert env.counted == ["accepted", "stale", "stale", "accepted", "teleport", "inaccurate",
                           "accepted"]
    # Each batch hands out only its newest accepted fix.
    assert [p.ts for p, _ in env.out] == [env.ts(5), env.ts(6)]


async def test_future_and_out_of_range_points_are_invalid_and_say_which_field(env: Env) -> None:
    await env.tracking.technician_connected(env.tech.id)
    ahead = now_ms() + 120_000
    edge_refusal = PointResult("invalid", "invalid", details=[{"field": "lat", "error": "missing"}])
    results = await env.tracking.ingest(env.tech, None, [
        fix(0, ahead), Point(math.nan, ADDR[1], env.ts(1)), edge_refusal])
    assert [r.as_dict() for r in results] == [
        {"status": "invalid", "reason": "invalid", "ts": ahead,
         "details": [{"field": "ts", "error": "more than 30 s in the future"}]},
        {"status": "invalid", "reason": "invalid", "ts": env.ts(1),
         "details": [{"field": "lat/lng",
                      "error": "must be finite, lat within ±90, lng within ±180"}]},
        edge_refusal.as_dict(),
    ]
    assert await env.positions.get(env.tech.id) is None
    assert env.out == [] and env.counted == ["invalid", "invalid", "invalid"]


async def test_a_technician_over_the_rate_is_refused_before_any_work(backing: Backing) -> None:
    env = make_env(backing, MemoryRateLimiter(rate=0.01, burst=3))  # nothing refills meanwhile
    try:
        await env.tracking.technician_connected(env.tech.id)
        for step in range(3):
            assert await env.send(fix(step, env.ts(step))) == ["accepted"]
        with pytest.raises(RateLimited) as info:
            await env.send(fix(3, env.ts(3)))
        assert 90_000 <= info.value.retry_after_ms <= 100_000  # one token at 0.01/s
        with pytest.raises(RateLimited):  # the fast path counts the same bucket
            env.tracking.ingest_now(env.tech.id, None, fix(3, env.ts(3)))
        pos = await env.positions.get(env.tech.id)
        assert pos is not None and pos.ts == env.ts(2)
        assert env.counted == ["accepted"] * 3 + ["rate_limited"] * 2
        # Another technician has a bucket of their own.
        other = Actor(uid("t-"), "technician")
        await env.tracking.technician_connected(other.id)
        assert (await env.tracking.ingest(other, None, [fix(0, env.ts(0))]))[0].status == "accepted"
    finally:
        await env.tracking.close()


async def test_latest_wins_against_a_newer_fix_from_another_node(env: Env) -> None:
    """A fix stored by another node (or connection) first: this connection's
    older point is stale, and the newer position stays."""
    newer = Position(env.tech.id, *at(50), env.ts(10), "elsewhere")
    assert env.positions.put(newer) is True
    assert env.positions.put(Position(env.tech.id, *at(0), env.ts(9))) is False
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(0, env.ts(9))) == ["dropped:stale"]
    assert await env.positions.get(env.tech.id) == newer
    assert await env.send(fix(60, env.ts(11))) == ["accepted"]
    pos = await env.positions.get(env.tech.id)
    assert pos is not None and pos.ts == env.ts(11)


async def test_the_fast_path_waits_for_the_connect(env: Env) -> None:
    assert env.tracking.ingest_now(env.tech.id, None, fix(0, env.ts(0))) is None
    await env.tracking.technician_connected(env.tech.id)
    result = env.tracking.ingest_now(env.tech.id, None, fix(0, env.ts(0)))
    assert result == PointResult("accepted", ts=env.ts(0))
    env.tracking.technician_gone(env.tech.id)
    assert env.tracking.ingest_now(env.tech.id, None, fix(0, env.ts(1))) is None


# -- the active order: ETA, who may see it, arrival --------------------------------------------------

async def test_a_fix_before_setting_off_goes_to_nobody(env: Env) -> None:
    await env.order_in("assigned")  # a queued job: when, never where (docs/tracking.md)
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(2000, env.ts(0))) == ["accepted"]
    [(pos, payload)] = env.out
    assert (pos.order_id, pos.status, payload) == (None, "available", None)


async def test_a_fix_on_the_current_job_carries_distance_and_eta_to_its_watchers(env: Env) -> None:
    oid = await env.order_in("en_route")
    await env.tracking.technician_connected(env.tech.id)
    p = fix(2000, env.ts(0))
    assert await env.send(p) == ["accepted"]
    dist = haversine_m(p.lat, p.lng, *ADDR)
    pos = await env.positions.get(env.tech.id)
    assert pos is not None
    assert (pos.order_id, pos.status, pos.distance_m, pos.eta_s) == (
        oid, "busy", round(dist), first_eta(dist))
    [(out, payload)] = env.out
    assert out == pos
    assert payload == {"order_id": oid, "technician_id": env.tech.id, "lat": p.lat, "lng": p.lng,
                       "ts": p.ts, "eta_s": first_eta(dist), "distance_m": round(dist)}


async def test_fixes_during_the_service_are_not_shown_to_watchers(env: Env) -> None:
    oid = await env.order_in("in_service")
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(10, env.ts(0))) == ["accepted"]
    [(pos, payload)] = env.out
    assert pos.order_id == oid and pos.status == "busy"
    assert payload is None  # privacy: shown only while assigned, en route or arrived


async def test_order_changes_keep_the_active_order_cache_exact(env: Env) -> None:
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(3000, env.ts(0))) == ["accepted"]
    oid = await env.order_in("en_route")  # set off after the connect
    assert await env.send(fix(2900, env.ts(1))) == ["accepted"]
    busy = await env.positions.get(env.tech.id)
    assert busy is not None and (busy.order_id, busy.status) == (oid, "busy")
    await env.orders.transition(Actor("a-1", "agent"), oid, "cancelled")
    assert await env.send(fix(2800, env.ts(2))) == ["accepted"]
    free = await env.positions.get(env.tech.id)
    assert free is not None and (free.order_id, free.status) == (None, "available")
    assert [payload is not None for _, payload in env.out] == [False, True, False]


async def test_two_fixes_in_a_row_inside_the_radius_mark_arrival_once(env: Env) -> None:
    oid = await env.order_in("en_route")
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(1500, env.ts(0))) == ["accepted"]
    assert await env.send(fix(60, env.ts(1))) == ["accepted"]  # one fix inside: not yet
    await env.tracking.settled()
    assert await env.state_of(oid) == "en_route"
    last = fix(30, env.ts(2))
    assert await env.send(last) == ["accepted"]
    await until_state(env, oid, "arrived")
    assert await env.send(fix(10, env.ts(3)), fix(5, env.ts(4))) == ["accepted", "accepted"]
    await env.tracking.settled()
    events = await env.orders.events_since(oid)
    arrivals = [e for e in events if e["state"] == "arrived"]
    assert len(arrivals) == 1 and events[-1] == arrivals[0]
    assert arrivals[0]["actor"] == GEOFENCE
    assert arrivals[0]["data"] == {"lat": last.lat, "lng": last.lng, "fix_ts": last.ts}
    pos = await env.positions.get(env.tech.id)
    assert pos is not None and pos.eta_s == 0


async def test_arrival_needs_consecutive_fixes_and_an_en_route_order(env: Env) -> None:
    oid = await env.order_in("en_route")
    await env.tracking.technician_connected(env.tech.id)
    # inside, outside, inside: never two in a row.
    assert await env.send(fix(50, env.ts(0)), fix(400, env.ts(1)),
                          fix(50, env.ts(2))) == ["accepted"] * 3
    env.tech = Actor(uid("t-"), "technician")  # another technician, on an order
    assigned = await env.order_in("assigned")  # not on the way yet: no geofence
    await env.tracking.technician_connected(env.tech.id)
    assert await env.send(fix(20, env.ts(0)), fix(10, env.ts(1)),
                          fix(5, env.ts(2))) == ["accepted"] * 3
    await env.tracking.settled()
    assert await env.state_of(oid) == "en_route"
    assert await env.state_of(assigned) == "assigned"


async def test_accepted_points_and_only_those_go_to_the_orders_trail(env: Env) -> None:
    oid = await env.order_in("en_route")
    await env.tracking.technician_connected(env.tech.id)
    await env.send(fix(900, env.ts(0)), fix(900, env.ts(0)), fix(800, env.ts(1)))
    await env.trails.flush()
    trail = await trail_for_order(env.db, oid, 0, 100)
    assert [(t["technician_id"], t["ts"]) for t in trail] == [(env.tech.id, env.ts(0)),
                                                             (env.tech.id, env.ts(1))]


# -- watching ---------------------------------------------------------------------------------------

async def test_the_customer_watches_the_technician_with_eta(env: Env) -> None:
    oid = await env.order_in("en_route")
    view = await env.tracking.watch(env.customer, oid)
    assert view == {"order_id": oid, "state": "en_route",
                    "technician": {"id": env.tech.id, "name": None},
                    "position": None, "eta_s": None, "distance_m": None,
                    "technician_status": "on_this_job", "eta_basis": "no_position"}
    await env.tracking.technician_connected(env.tech.id)
    p = fix(1200, env.ts(0), speed=7.5, heading=180.0)
    await env.send(p)
    pos = await env.positions.get(env.tech.id)
    assert pos is not None and pos.eta_s is not None
    for viewer in (env.customer, Actor("a-1", "agent"), Actor("adm", "admin")):
        view = await env.tracking.watch(viewer, oid)
        assert view["technician"] == {"id": env.tech.id, "name": "师傅"}
        assert view["position"] == {"lat": p.lat, "lng": p.lng, "ts": p.ts, "speed": 7.5,
                                    "heading": 180.0}
        assert (view["eta_s"], view["distance_m"]) == (pos.eta_s, pos.distance_m)


async def test_without_a_live_eta_the_watch_estimates_from_the_distance(env: Env) -> None:
    env.positions.put(Position(env.tech.id, *at(5000), env.ts(0)))  # before setting off
    oid = await env.order_in("en_route")
    view = await env.tracking.watch(env.customer, oid)  # that fix may be at another home
    assert (view["position"], view["distance_m"], view["eta_basis"]) == (None, None, "no_position")
    far = Position(env.tech.id, *at(3000), now_ms())  # since, with no ETA of its own
    env.positions.put(far)
    view = await env.tracking.watch(env.customer, oid)
    dist = haversine_m(far.lat, far.lng, *ADDR)
    assert (view["eta_s"], view["distance_m"]) == (first_eta(dist), round(dist))
    env.positions.put(Position(env.tech.id, *at(40), now_ms() + 1))
    view = await env.tracking.watch(env.customer, oid)
    assert (view["eta_s"], view["distance_m"]) == (0, 40)  # inside the arrival radius


async def test_who_may_not_watch(env: Env) -> None:
    oid = await env.order_in("assigned")
    with pytest.raises(Forbidden):  # technicians and the backend never watch
        await env.tracking.watch(env.tech, oid)
    with pytest.raises(Forbidden):
        await env.tracking.watch(BACKEND, oid)
    with pytest.raises(NotFound):  # someone else's order is as good as missing
        await env.tracking.watch(Actor(uid("c-"), "customer"), oid)
    with pytest.raises(NotFound):
        await env.tracking.watch(env.customer, uid("o-missing-"))
    created = await env.order_in("created")
    with pytest.raises(Forbidden) as info:
        await env.tracking.watch(env.customer, created)
    assert info.value.details == {"state": "created"}
    serving = await env.order_in("in_service")
    with pytest.raises(Forbidden) as info:
        await env.tracking.watch(env.customer, serving)
    assert info.value.details == {"state": "in_service"}
