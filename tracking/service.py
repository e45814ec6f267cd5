"""Tracking service: ingest technicians' points, keep the latest position,
compute ETA, fire the arrival geofence, decide who may watch.

Nothing here waits on MongoDB on the GPS path: the technician's active
order is cached (refreshed in the background, updated by order events), the
latest position lives in the position store (memory or Redis), and trails
go to a background writer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, RateLimited
from kernel.tasks import BackgroundTasks
from orders.lifecycle import TECHNICIAN_PHASE
from orders.model import Order
from orders.service import OrderService, may_know, not_found
from tracking.eta import EtaConfig, EtaEstimator
from tracking.geo import haversine_m
from tracking.locations import INVALID_REASONS, FilterConfig, Point, check_point
from tracking.positions import Position, PositionStore

log = logging.getLogger(__name__)

# The phases in which the customer may see the technician (PIPL: show a
# worker's location only while it serves this customer).
VISIBLE: Final = frozenset({"assigned", "en_route", "arrived"})
GEOFENCE_ACTOR: Final = Actor("geofence", "system")
# How long a cached "which order is this technician on" is trusted before a
# background refresh. Order changes on every node update it at once (the
# node bus); the refresh only repairs what an outage of the bus lost.
ACTIVE_ORDER_TTL_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    eta: EtaConfig = field(default_factory=EtaConfig)
    arrival_radius_m: float = 100.0
    # Consecutive accepted fixes inside the radius before `arrived` fires:
    # one fix can be a GPS jump, two in a row is the technician at the door.
    arrival_fixes: int = 2


class RateLimiter(Protocol):
    def take(self, key: str) -> int:
        """0 when the key may go on, else milliseconds until it may."""


class TrailSink(Protocol):
    def add(self, technician_id: str, order_id: str | None, points: list[Point]) -> None: ...


class ActiveOrders(Protocol):
    async def active_for_technician(self, technician_id: str) -> Order | None: ...


@dataclass
class _ActiveOrder:
    order_id: str
    state: str
    customer_id: str
    lat: float
    lng: float

    @classmethod
    def of(cls, order: Order) -> _ActiveOrder:
        return cls(order["order_id"], order["state"], order["customer_id"],
                   float(order["address"]["lat"]), float(order["address"]["lng"]))


@dataclass
class _TechState:
    eta: EtaEstimator
    active: _ActiveOrder | None = None
    active_at: float = 0.0  # monotonic time of the last authoritative read
    refreshing: bool = False
    must_refresh: bool = False  # the cache may have missed changes (an outage)
    inside: int = 0  # consecutive fixes inside the arrival radius
    arrival_fired: str | None = None  # order id the geofence already moved
    order_id: str | None = None  # the order the ETA and the geofence count belong to
    last_point: Point | None = field(default=None)
    # The shared store's last position when this connection began (what its
    # first point is filtered against), once `primed`.
    known: Point | None = None
    primed: bool = False


@dataclass(frozen=True, slots=True)
class PointResult:
    status: str  # accepted | dropped | invalid
    reason: str | None = None
    ts: int | None = None
    details: Any = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.ts is not None:
            out["ts"] = self.ts
        if self.reason is not None:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        return out


# (the new latest position, the `position` payload for the watchers of the
# order it belongs to, or None when the order's watchers may not see it)
PositionOut = Callable[[Position, dict[str, Any] | None], None]
Counter = Callable[[str], None]


class TrackingService:
    def __init__(
        self,
        *,
        positions: PositionStore,
        orders: OrderService,
        active_orders: ActiveOrders,
        trails: TrailSink,
        limiter: RateLimiter,
        position_out: PositionOut,
        count: Counter,
        config: TrackingConfig | None = None,
    ) -> None:
        self.positions = positions
        self.orders = orders
        self._active_orders = active_orders
        self._trails = trails
        self._limiter = limiter
        self._position_out = position_out
        self._count = count
        self.cfg = config or TrackingConfig()
        self._techs: dict[str, _TechState] = {}
        self._background = BackgroundTasks("tracking")

    # -- technicians' state ----------------------------------------------
    def _tech(self, technician_id: str) -> _TechState:
        st = self._techs.get(technician_id)
        if st is None:
            st = self._techs[technician_id] = _TechState(EtaEstimator(self.cfg.eta))
        return st

    async def technician_connected(self, technician_id: str) -> None:
        """Load the technician's active order and last known position once, at
        connect: then every point, the first included, takes the fast path.
        (Were the first points left to look these up, a fleet reconnecting
        at once would send each point's lookup to the stores until the first
        came back: seconds of backlog after a restart.)"""
        st = self._tech(technician_id)
        await self._refresh(technician_id)
        await self._prime(st, technician_id)

    async def _prime(self, st: _TechState, technician_id: str) -> None:
        latest = await self.positions.get(technician_id)
        st.known = Point(latest.lat, latest.lng, latest.ts) if latest else None
        st.primed = True

    def technician_gone(self, technician_id: str) -> None:
        self._techs.pop(technician_id, None)
        self.positions.forget(technician_id)

    async def _refresh(self, technician_id: str) -> None:
        st = self._tech(technician_id)
        st.refreshing = True
        try:
            order = await self._active_orders.active_for_technician(technician_id)
            st.active = _ActiveOrder.of(order) if order else None
            st.active_at = time.monotonic()
        finally:
            st.refreshing = False

    def _active(self, technician_id: str) -> _ActiveOrder | None:
        st = self._tech(technician_id)
        if not st.refreshing and time.monotonic() - st.active_at > ACTIVE_ORDER_TTL_S:
            st.refreshing = True
            self._background.spawn(self._refresh(technician_id))
        return st.active

    def invalidate_all(self) -> None:
        """Order changes may have been missed (the node bus was down): every
        technician's next point re-reads their active order first."""
        for st in self._techs.values():
            st.must_refresh = True

    def on_order_event(self, order: Order, event: Mapping[str, Any]) -> None:
        """Keep the active-order cache exact for changes made on this node."""
        tech = order.get("technician_id")
        if tech and tech in self._techs:
            st = self._techs[tech]
            if order["state"] in TECHNICIAN_PHASE:
                st.active = _ActiveOrder.of(order)
                st.active_at = time.monotonic()
            elif st.active and st.active.order_id == order["order_id"]:
                st.active = None
                st.active_at = time.monotonic()
        prev = event.get("data", {}).get("previous_technician_id")
        if prev and prev in self._techs:
            st = self._techs[prev]
            if st.active and st.active.order_id == order["order_id"]:
                st.active = None
                st.active_at = time.monotonic()

    # -- ingest ----------------------------------------------------------
    async def ingest(self, tech: Actor, name: str | None, items: list[Point | PointResult],
                     skills: tuple[str, ...] = ()) -> list[PointResult]:
        """Filter and store a technician's points (oldest first). Items that
        already failed validation at the edge come in as PointResults."""
        self._take_token(tech.id)
        st = self._tech(tech.id)
        if st.must_refresh:
            st.must_refresh = False
            try:
                await self._refresh(tech.id)
            except Exception as exc:  # store away too: go on with what we know
                log.warning("active order refresh failed: %s", type(exc).__name__)
                st.must_refresh = True
        if not st.primed:
            await self._prime(st, tech.id)
        return self._process(st, tech.id, name, skills, items)

    def ingest_now(self, technician_id: str, name: str | None, point: Point,
                   skills: tuple[str, ...] = ()) -> PointResult | None:
        """One point of a technician connected to this node, without waiting on
        anything (the GPS fast path); None when it needs `ingest` (what the
        connect loads is missing, or the order cache lapsed)."""
        st = self._techs.get(technician_id)
        if st is None or not st.primed or st.must_refresh:
            return None
        self._take_token(technician_id)
        return self._process(st, technician_id, name, skills, [point])[0]

    def _take_token(self, technician_id: str) -> None:
        wait_ms = self._limiter.take(technician_id)
        if wait_ms:
            self._count("rate_limited")
            raise RateLimited("too many location messages", wait_ms)

    def _process(self, st: _TechState, technician_id: str, name: str | None,
                 skills: tuple[str, ...], items: list[Point | PointResult]) -> list[PointResult]:
        # Filtered against this connection's last accepted point, or before
        # the first, the shared store's (loaded at connect).
        last = st.last_point or st.known
        now = now_ms()
        results: list[PointResult] = []
        accepted: list[Point] = []
        for item in items:
            if isinstance(item, PointResult):
                results.append(item)
                self._count(item.reason or "invalid")
                continue
            reason = check_point(item, last, self.cfg.filters, now)
            if reason is None:
                accepted.append(item)
                last = item
                results.append(PointResult("accepted", ts=item.ts))
                self._count("accepted")
            elif reason in INVALID_REASONS:
                results.append(PointResult("invalid", "invalid", ts=item.ts,
                                           details=[INVALID_REASONS[reason]]))
                self._count("invalid")
            else:
                results.append(PointResult("dropped", reason, ts=item.ts))
                self._count(reason)
        if accepted:
            self._accept(st, technician_id, name, skills, accepted)
        return results

    def _accept(self, st: _TechState, technician_id: str, name: str | None,
                skills: tuple[str, ...], points: list[Point]) -> None:
        active = self._active(technician_id)
        active_id = active.order_id if active else None
        if active_id != st.order_id:
            # A new job: its ETA and arrival count start afresh (the pace is
            # the technician's and carries over).
            st.order_id = active_id
            st.eta.reset()
            st.inside = 0
        prev = st.last_point
        for p in points:
            speed = p.speed
            if speed is None and prev is not None and p.ts > prev.ts:
                speed = haversine_m(prev.lat, prev.lng, p.lat, p.lng) / ((p.ts - prev.ts) / 1000)
            st.eta.observe_speed(speed)
            prev = p
        st.last_point = points[-1]
        self._trails.add(technician_id, active.order_id if active else None, points)

        newest = points[-1]
        if active is not None:
            dist = haversine_m(newest.lat, newest.lng, active.lat, active.lng)
            eta = st.eta.estimate(dist, newest.ts, self.cfg.arrival_radius_m)
            pos = Position(technician_id, newest.lat, newest.lng, newest.ts, name, newest.speed,
                           newest.heading, newest.accuracy, active.order_id, eta, round(dist),
                           "busy", skills)
        else:
            pos = Position(technician_id, newest.lat, newest.lng, newest.ts, name, newest.speed,
                           newest.heading, newest.accuracy, status="available", skills=skills)
        # Latest wins: a newer fix may have come meanwhile (another connection or node).
        if not self.positions.put(pos):
            return
        visible = active is not None and active.state in VISIBLE
        self._position_out(pos, self.position_payload(pos) if visible else None)
        if active is not None and active.state == "en_route":
            self._check_arrival(st, active, points)

    def _check_arrival(self, st: _TechState, active: _ActiveOrder, points: list[Point]) -> None:
        if st.arrival_fired == active.order_id:
            return
        for p in points:
            inside = haversine_m(p.lat, p.lng, active.lat, active.lng) <= self.cfg.arrival_radius_m
            st.inside = st.inside + 1 if inside else 0
            if st.inside >= self.cfg.arrival_fixes:
                st.arrival_fired = active.order_id
                st.inside = 0
                self._background.spawn(self._arrive(active.order_id, p))
                return

    async def _arrive(self, order_id: str, p: Point) -> None:
        with contextlib.suppress(Conflict):  # already arrived, cancelled, ...
            await self.orders.transition(GEOFENCE_ACTOR, order_id, "arrived",
                                         {"lat": p.lat, "lng": p.lng, "fix_ts": p.ts})

    @staticmethod
    def position_payload(pos: Position) -> dict[str, Any]:
        out: dict[str, Any] = {
            "order_id": pos.order_id, "technician_id": pos.technician_id,
            "lat": pos.lat, "lng": pos.lng, "ts": pos.ts,
            "eta_s": pos.eta_s, "distance_m": pos.distance_m,
        }
        if pos.speed is not None:
            out["speed"] = pos.speed
        if pos.heading is not None:
            out["heading"] = pos.heading
        return out

    # -- watching --------------------------------------------------------
    async def watch(self, viewer: Actor, order_id: str) -> dict[str, Any]:
        """Authorize a viewer for an order's technician; the current view (WGS-84)."""
        if viewer.role not in ("customer", "agent", "admin"):
            raise Forbidden("only the order's customer, agents and admins may watch")
        order = await self.orders.read_shared(order_id)
        if not may_know(viewer, order):
            raise not_found(order_id)  # not theirs: as if it did not exist
        if order["state"] not in VISIBLE or not order.get("technician_id"):
            raise Forbidden(
                f"the technician's position is shown only while the order is assigned, "
                f"en route or arrived (it is {order['state']})", {"state": order["state"]})
        tech_id = order["technician_id"]
        assert tech_id is not None  # checked above
        pos = await self.positions.get(tech_id)
        view: dict[str, Any] = {
            "order_id": order_id,
            "state": order["state"],
            "technician": {"id": tech_id, "name": pos.name if pos else None},
            "position": None, "eta_s": None, "distance_m": None,
        }
        if pos is not None:
            addr = order["address"]
            dist = haversine_m(pos.lat, pos.lng, addr["lat"], addr["lng"])
            if pos.order_id == order_id and pos.eta_s is not None:
                eta = pos.eta_s
            elif dist <= self.cfg.arrival_radius_m:
                eta = 0
            else:
                eta = round(dist * self.cfg.eta.road_factor / self.cfg.eta.default_speed_mps)
            view["position"] = {"lat": pos.lat, "lng": pos.lng, "ts": pos.ts,
                                "speed": pos.speed, "heading": pos.heading}
            view["eta_s"], view["distance_m"] = eta, round(dist)
        return view

    async def close(self) -> None:
        await self._background.close()

    async def settled(self) -> None:
        """The background work of the fixes so far (arrivals, refreshes) is done."""
        await self._background.settled()
