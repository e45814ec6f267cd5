"""Tracking service: ingest technicians' points, keep the latest position,
compute ETA, fire the arrival geofence, decide who may watch.

Nothing here waits on MongoDB on the GPS path: the technician's active
order is cached (refreshed in the background, updated by order events), the
latest position lives in the position store (memory or Redis), and trails
go to a background writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, RateLimited
from kernel.shared import SharedReads
from kernel.tasks import BackgroundTasks
from orders.lifecycle import TECHNICIAN_PHASE
from orders.model import Order
from orders.service import OrderService, may_know, not_found
from tracking import day
from tracking.eta import EtaConfig, EtaEstimator
from tracking.geo import haversine_m
from tracking.locations import INVALID_REASONS, FilterConfig, Point, check_point
from tracking.positions import Position, PositionStore

log = logging.getLogger(__name__)

# The phases in which the customer may see the technician (PIPL: show a
# worker's location only while it serves this customer).
VISIBLE: Final = frozenset({"assigned", "en_route", "arrived"})
GEOFENCE_ACTOR: Final = Actor("geofence", "system")
LATENESS_ACTOR: Final = Actor("lateness", "system")
# Every this many projection rounds (30 s by default) each node looks for
# orders whose technician is connected nowhere; at most this many per look.
OVERDUE_EVERY: Final = 6
OVERDUE_LIMIT: Final = 500
# Technicians projected between two yields to the loop.
PROJECT_SLICE: Final = 200
# A queued job's ETA is pushed to its watchers when it moved by more than this.
ETA_PUSH_STEP_S: Final = 60
# The fields of an order a technician's day needs (what the node bus carries).
JOB_FIELDS: Final = ("order_id", "seq", "state", "customer_id", "technician_id", "address",
                     "window", "times", "late")
# Orders remembered per technician as gone (moved, ended), against stale reads.
MAX_GONE: Final = 256


def job_fields(order: Mapping[str, Any]) -> dict[str, Any]:
    return {k: order.get(k) for k in JOB_FIELDS}


def seq_of(job: Mapping[str, Any] | None) -> int:
    """A job's seq (-1: none known)."""
    return -1 if job is None else int(job.get("seq") or 0)


def jobs_by_id(orders: list[Order]) -> dict[str, dict[str, Any]]:
    return {o["order_id"]: job_fields(o) for o in orders}
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
    # Lateness (tracking/day.py): warn past the window's start by more than
    # this; the projection of every connected technician's day is redone
    # this often.
    late_grace_min: int = 10
    project_interval_s: float = 5.0


class RateLimiter(Protocol):
    def take(self, key: str) -> int:
        """0 when the key may go on, else milliseconds until it may."""


class TrailSink(Protocol):
    def add(self, technician_id: str, order_id: str | None, points: list[Point]) -> None: ...


class TechnicianJobs(Protocol):
    async def jobs_for_technician(self, technician_id: str) -> list[Order]: ...

    async def overdue_orders(self, started_after: int, started_before: int,
                             limit: int) -> list[Order]:
        """`assigned` / `en_route` orders whose window began between the two."""


Online = Callable[[list[str]], Awaitable[set[str]]]


# The `eta` push of a queued job, to its watchers on every node.
EtaOut = Callable[[str, dict[str, Any]], Awaitable[None]]


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
    # The technician's orders in the technician phase (order id -> its
    # JOB_FIELDS), and the one their positions belong to (tracking/day.py).
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    last_pos: Position | None = None  # the latest position this node stored or read
    asked_store: bool = False  # for a last position, when it had none of its own
    # Queued job -> the projected arrival last pushed to its watchers.
    eta_pushed: dict[str, int] = field(default_factory=dict)
    judging: set[str] = field(default_factory=set)  # orders whose lateness is being written
    changes: int = 0  # order events applied (a refresh read older than one is merged)
    # Orders that left this technician (moved, ended) at seq: a store read
    # older than that must not bring them back.
    gone: dict[str, int] = field(default_factory=dict)

    def set_jobs(self, jobs: dict[str, dict[str, Any]], merge: bool) -> None:
        """The store's read of the technician's jobs. When order events came
        in while it was read (`merge`), each order keeps whichever of the two
        is newer (by seq), and what the read lacks stays."""
        if merge:
            for oid, job in jobs.items():
                if self.gone.get(oid, -1) < seq_of(job) > seq_of(self.jobs.get(oid)):
                    self.jobs[oid] = job
        else:
            self.jobs = jobs
        self.active = self._current()

    def put_job(self, order: Mapping[str, Any]) -> None:
        """An order event (from any node, in any order): the newer seq wins."""
        oid = str(order["order_id"])
        seq = seq_of(order)
        self.changes += 1
        if seq_of(self.jobs.get(oid)) > seq or self.gone.get(oid, -1) >= seq:
            return  # an older event than what is known
        if order["state"] in TECHNICIAN_PHASE:
            self.jobs[oid] = job_fields(order)
        else:
            self._forget(oid, seq)
        self.active = self._current()

    def drop_job(self, order_id: str, seq: int) -> None:
        """The order moved to another technician at `seq`."""
        self.changes += 1
        if seq_of(self.jobs.get(order_id)) > seq:
            return
        self._forget(order_id, seq)
        self.active = self._current()

    def _forget(self, order_id: str, seq: int) -> None:
        self.jobs.pop(order_id, None)
        self.eta_pushed.pop(order_id, None)
        self.gone[order_id] = seq
        if len(self.gone) > MAX_GONE:  # the oldest go: a read that old is long done
            for oid in list(self.gone)[: len(self.gone) - MAX_GONE]:
                del self.gone[oid]

    def _current(self) -> _ActiveOrder | None:
        job = day.current_job(self.jobs.values())
        return _ActiveOrder.of(job) if job is not None else None  # type: ignore[arg-type]


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
        jobs: TechnicianJobs,
        trails: TrailSink,
        limiter: RateLimiter,
        position_out: PositionOut,
        count: Counter,
        config: TrackingConfig | None = None,
        eta_out: EtaOut | None = None,
        online: Online | None = None,
        watched: Callable[[str], bool] | None = None,
    ) -> None:
        self.positions = positions
        self.orders = orders
        self._jobs = jobs
        self._eta_out = eta_out
        self._online = online
        # Whether an order has watchers on any node (realtime/feeds/tracking.py).
        self._watched = watched or (lambda order_id: True)
        self._jobs_reads: SharedReads[list[Order]] = SharedReads()
        self._projector: asyncio.Task[None] | None = None
        self._closed = False
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

    def technician_left_node(self, technician_id: str) -> None:
        """Their last connection to this node closed (they may be connected
        elsewhere): this node stops projecting their day, so two nodes never
        judge one technician from two different last positions."""
        self._techs.pop(technician_id, None)

    async def _refresh(self, technician_id: str) -> None:
        st = self._tech(technician_id)
        st.refreshing = True
        try:
            before = st.changes
            jobs = await self._jobs.jobs_for_technician(technician_id)
            st.set_jobs(jobs_by_id(jobs), merge=st.changes != before)
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
            self._techs[tech].put_job(order)
        prev = event.get("data", {}).get("previous_technician_id")
        if prev and prev != tech and prev in self._techs:
            self._techs[prev].drop_job(str(order["order_id"]), seq_of(order))

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
        st.last_pos = pos
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
        jobs = await self.jobs_of(tech_id)
        if seq_of(jobs.get(order_id)) < order["seq"]:
            jobs[order_id] = job_fields(order)  # the read is newer
        view: dict[str, Any] = {
            "order_id": order_id,
            "state": order["state"],
            "technician": {"id": tech_id, "name": pos.name if pos else None},
            "position": None, "eta_s": None, "distance_m": None,
        }
        now = now_ms()
        current = day.current_job(jobs.values())
        if current is None or current["order_id"] != order_id:
            # A queued job: the technician has not set off to it (they are
            # on another job, or not yet on the way). When, never where
            # (docs/tracking.md, "Privacy").
            proj = day.project(jobs.values(), pos, now, self.cfg.eta).get(order_id)
            view["technician_status"] = "on_another_job" if current is not None else "not_started"
            view["eta_basis"] = proj.basis if proj else "no_position"
            # (`overdue` is a lower bound, not an ETA to show.)
            view["eta_s"] = proj.eta_s(now) if proj and proj.basis != "overdue" else None
            return view
        view["technician_status"] = "on_this_job"
        # Only a fix of this job: one taken before they set off may be at
        # another customer's door.
        set_off = (order.get("times") or {}).get("en_route")
        ours = pos is not None and (pos.order_id == order_id
                                    or (set_off is not None and pos.ts >= int(set_off)))
        view["eta_basis"] = ("arrived" if order["state"] == "arrived" else
                             "live" if ours else "no_position")
        if pos is not None and ours:
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

    async def projections(self, technician_id: str, now: int) -> dict[str, day.Projection]:
        """The projection of the technician's whole queue (jobs of other
        days come first too), from their latest position."""
        jobs = await self.jobs_of(technician_id)
        pos = await self.positions.get(technician_id)
        return day.project(jobs.values(), pos, now, self.cfg.eta)

    async def jobs_of(self, technician_id: str) -> dict[str, dict[str, Any]]:
        """The technician's jobs: this node's copy when it holds the
        technician (kept exact by order events), else the store's."""
        st = self._techs.get(technician_id)
        if st is not None and st.active_at and not st.must_refresh:
            return dict(st.jobs)
        # (After a deploy, every watcher of their orders asks at once.)
        orders = await self._jobs_reads.get(
            technician_id, lambda: self._jobs.jobs_for_technician(technician_id))
        return jobs_by_id(orders)

    # -- the day's projection ------------------------------------------------
    def start(self) -> None:
        """Project the day of every technician this node holds, every
        `project_interval_s`: queued jobs' ETAs to their watchers, lateness
        to the orders (tracking/day.py)."""
        self._projector = asyncio.get_running_loop().create_task(self._project_loop())

    async def _project_loop(self) -> None:
        rounds = 0
        while not self._closed:
            await asyncio.sleep(self.cfg.project_interval_s)
            rounds += 1
            try:
                await self.project_all()
                if rounds % OVERDUE_EVERY == 0:
                    await self.sweep_overdue()
            except Exception as exc:  # one failed round must not end the loop
                log.warning("projection failed: %s", type(exc).__name__)

    async def sweep_overdue(self) -> None:
        """Orders whose window has begun without their technician, who is
        connected nowhere (no node projects them): `overdue`, judged like
        any projection. Every node sweeps; the order's compare-and-set lets
        one of them record each step."""
        if self._online is None:
            return
        now = now_ms()
        grace_ms = self.cfg.late_grace_min * 60_000
        found = await self._jobs.overdue_orders(now - day.LATE_HORIZON_MIN * 60_000,
                                                now - grace_ms, OVERDUE_LIMIT)
        techs = list({str(o["technician_id"]) for o in found if o.get("technician_id")})
        online = await self._online(techs) if techs else set()
        for order in found:
            tech = order.get("technician_id")
            proj = day.overdue(order, now)
            if not tech or tech in online or proj is None:
                continue
            if day.judge(proj, order, self.cfg.late_grace_min) is None:
                continue
            await self._record_lateness(None, str(tech), order["order_id"], proj)

    async def project_all(self) -> None:
        now = now_ms()
        for n, (tech_id, st) in enumerate(list(self._techs.items())):
            if n % PROJECT_SLICE == PROJECT_SLICE - 1:
                await asyncio.sleep(0)  # a large fleet: let the GPS path in between
            if not st.jobs or self._closed:
                continue
            pos = st.last_pos
            if pos is None and st.primed and not st.asked_store:
                # Connected but silent so far: the shared store's last fix, once.
                st.asked_store = True
                pos = st.last_pos = await self.positions.get(tech_id)
            projections = day.project(st.jobs.values(), pos, now, self.cfg.eta)
            current = st.active.order_id if st.active else None
            for oid, proj in projections.items():
                job = st.jobs.get(oid)
                if job is None:
                    continue
                if oid != current:
                    await self._push_eta(st, oid, proj, now)
                verdict = day.judge(proj, job, self.cfg.late_grace_min)
                if verdict is not None and oid not in st.judging:
                    st.judging.add(oid)
                    self._background.spawn(self._record_lateness(st, tech_id, oid, proj))

    async def _push_eta(self, st: _TechState, order_id: str, proj: day.Projection,
                        now: int) -> None:
        """A queued job's ETA to its watchers, when its projected arrival
        moved by more than a minute (the ETA itself counts down by itself:
        that is no news) and somebody watches it."""
        if (proj.arrival_ts is None or proj.basis == "overdue" or self._eta_out is None
                or not self._watched(order_id)):
            return
        pushed = st.eta_pushed.get(order_id)
        if pushed is not None and abs(proj.arrival_ts - pushed) <= ETA_PUSH_STEP_S * 1000:
            return
        st.eta_pushed[order_id] = proj.arrival_ts
        await self._eta_out(order_id, {"order_id": order_id, "eta_s": proj.eta_s(now),
                                       "basis": proj.basis})

    async def _record_lateness(self, st: _TechState | None, technician_id: str, order_id: str,
                               proj: day.Projection) -> None:
        grace = self.cfg.late_grace_min

        def decide(order: Order) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
            # Decided again on the stored order: another node, or this one a
            # moment ago, may have recorded it already; and the projection
            # was of this technician's day (not of one it has just left).
            if order.get("technician_id") != technician_id:
                return None
            verdict = day.judge(proj, order, grace)
            if verdict is None:
                return None
            data = {"projected_arrival_ts": proj.arrival_ts, "minutes_late": verdict.minutes_late,
                    "basis": proj.basis}
            late = ({**data, "step": verdict.step, "ts": now_ms()}
                    if verdict.event == "late_risk" else None)
            return {"late": late}, verdict.event, data

        try:
            await self.orders.note_when(LATENESS_ACTOR, order_id, decide)
        except Exception as exc:  # the next round decides again
            log.warning("lateness of %s not recorded: %s", order_id, type(exc).__name__)
        finally:
            if st is not None:
                st.judging.discard(order_id)

    async def close(self) -> None:
        self._closed = True
        if self._projector is not None:
            self._projector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._projector
        await self._background.close()
        self._jobs_reads.cancel()

    async def settled(self) -> None:
        """The background work of the fixes so far (arrivals, refreshes) is done."""
        await self._background.settled()
