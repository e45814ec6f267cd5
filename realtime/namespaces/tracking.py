"""/tracking: technicians stream positions; customers watch their technician
approach; agents and admins watch an area."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import Field, ValidationError, model_validator

from kernel.errors import Forbidden
from realtime.auth import Principal
from realtime.errors import WireError, ok, validation_details
from realtime.interest import Interest
from realtime.namespaces.base import BaseNamespace, error_reply, handles
from realtime.namespaces.models import MAX_SAFE_INT, Id, Inbound, Ts
from realtime.namespaces.orders import actor_of
from realtime.presence import Presence
from realtime.transport.wsdirect import gather
from tracking.geo import CoordSys, from_wgs84, to_wgs84
from tracking.locations import Point
from tracking.positions import Position
from tracking.service import VISIBLE, PointResult, TrackingService

if TYPE_CHECKING:
    from realtime.context import Context

log = logging.getLogger(__name__)

NAMESPACE = "/tracking"
COORD_SYSTEMS: tuple[CoordSys, ...] = ("wgs84", "gcj02", "bd09")
MAX_BATCH = 500
# Area batches: at most one per second per watcher (PROTOCOL.md), and a cap
# on technicians per batch so one huge box cannot produce a huge frame.
AREA_INTERVAL_S = 1.0
AREA_LIMIT = 500
# Fixes of one technician read together (a backlog): one that a newer fix of
# the same read is at least this much newer than (by the fixes' own ts) is
# acked and kept in the trail but not pushed to watchers. A server a little
# behind thus still delivers every fix; one far behind skips what would
# arrive stale anyway, and catches up in bounded steps (docs/protocol.md).
SUPERSEDED_MS = 100

Lat = Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
Lng = Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]


class PointIn(Inbound):
    lat: Lat
    lng: Lng
    ts: Ts
    accuracy: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    speed: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] | None = None
    heading: Annotated[float, Field(ge=0, le=360, allow_inf_nan=False)] | None = None
    coord_sys: CoordSys = "wgs84"

    def to_point(self, default_sys: CoordSys | None = None) -> Point:
        lat, lng = to_wgs84(self.lat, self.lng, default_sys or self.coord_sys)
        return Point(lat, lng, self.ts, self.accuracy, self.speed, self.heading)


_POINT_KEYS = frozenset(PointIn.model_fields)
_MISSING = object()


def _bounded(v: Any, lo: float, hi: float) -> float | None:
    """A strict-mode float within [lo, hi] (an int counts, a bool does not;
    NaN and infinities fail the bounds), as the float pydantic would make."""
    kind = type(v)
    if (kind is float or kind is int) and lo <= v <= hi:
        return float(v)
    return None


def _optional(body: dict[str, Any], key: str, hi: float) -> float | object | None:
    v = body.get(key)
    if v is None:
        return None
    out = _bounded(v, 0, hi)
    return _MISSING if out is None else out


def fast_point(body: Any) -> Point | None:
    """PointIn.model_validate(body).to_point() for the shape every app sends,
    without building a model; None for anything else (then pydantic decides
    and words the error). tests/test_tracking_units.py checks that the two agree."""
    if type(body) is not dict or not body.keys() <= _POINT_KEYS:
        return None
    lat = _bounded(body.get("lat"), -90, 90)
    lng = _bounded(body.get("lng"), -180, 180)
    ts = body.get("ts")
    if lat is None or lng is None or type(ts) is not int or not 0 <= ts <= MAX_SAFE_INT:
        return None
    accuracy = _optional(body, "accuracy", 100_000)
    speed = _optional(body, "speed", 1000)
    heading = _optional(body, "heading", 360)
    if accuracy is _MISSING or speed is _MISSING or heading is _MISSING:
        return None
    cs = body.get("coord_sys", "wgs84")
    if cs != "wgs84":
        if type(cs) is not str or cs not in COORD_SYSTEMS:
            return None
        lat, lng = to_wgs84(lat, lng, cast(CoordSys, cs))
    return Point(lat, lng, ts, accuracy, speed, heading)  # type: ignore[arg-type]


class LocationsIn(Inbound):
    # Each point is validated on its own: one bad point does not sink the batch.
    points: Annotated[list[Any], Field(min_length=1, max_length=MAX_BATCH)]
    coord_sys: CoordSys | None = None


class WatchIn(Inbound):
    order_id: Id
    coord_sys: CoordSys = "wgs84"


class UnwatchIn(Inbound):
    order_id: Id


class AreaIn(Inbound):
    min_lat: Lat
    min_lng: Lng
    max_lat: Lat
    max_lng: Lng
    coord_sys: CoordSys = "wgs84"

    @model_validator(mode="after")
    def _ordered(self) -> AreaIn:
        if self.min_lat > self.max_lat or self.min_lng > self.max_lng:
            raise ValueError("min_lat/min_lng must not exceed max_lat/max_lng")
        return self


class Empty(Inbound):
    pass


def watch_room(order_id: str, cs: str) -> str:
    return f"watch:{order_id}:{cs}"


def convert(payload: dict[str, Any], cs: CoordSys) -> dict[str, Any]:
    if cs == "wgs84":
        return payload
    lat, lng = from_wgs84(payload["lat"], payload["lng"], cs)
    return {**payload, "lat": lat, "lng": lng}


class AreaWatch:
    """Agents' and admins' area views: changed technicians, batched per second."""

    def __init__(self, ns: TrackingNamespace) -> None:
        self.ns = ns
        self.watchers: dict[str, AreaIn] = {}
        self.dirty: dict[str, Position] = {}
        self._task: asyncio.Task[None] | None = None

    def changed(self, pos: Position) -> None:
        if self.watchers:
            self.dirty[pos.technician_id] = pos

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(AREA_INTERVAL_S)
            if not self.dirty:
                continue
            batch, self.dirty = list(self.dirty.values()), {}
            try:
                await self._send(batch)
            except Exception as exc:  # a failed push must not end the ticker
                log.warning("area push failed: %s", type(exc).__name__)

    async def _send(self, batch: list[Position]) -> None:
        online = await self.ns.presence.online([p.technician_id for p in batch])
        for sid, box in list(self.watchers.items()):
            items = [
                self.ns.area_item(p, online, box.coord_sys) for p in batch
                if box.min_lat <= p.lat <= box.max_lat and box.min_lng <= p.lng <= box.max_lng
            ][:AREA_LIMIT]
            if items:
                # This node's own watchers, from every node's positions (the bus).
                self.ns.local.emit("positions", {"technicians": items}, sid)


class TrackingNamespace(BaseNamespace):
    roles = frozenset({"technician", "customer", "agent", "admin"})

    def __init__(self, namespace: str, ctx: Context) -> None:
        super().__init__(namespace, ctx)
        self.area = AreaWatch(self)
        # Who watches what, both ways: a disconnect drops a socket's orders, an
        # order leaving the visible states drops its watchers, neither by a scan.
        self.watching: dict[str, set[str]] = {}  # sid -> order ids watched
        self.watchers_of: dict[str, set[str]] = {}  # order id -> sids watching it
        # Counted when scraped: a count kept on every watch would cost O(watchers) each time.
        ctx.metrics.watchers.labels("order").set_function(
            lambda: sum(len(v) for v in self.watching.values()))
        ctx.metrics.watchers.labels("area").set_function(lambda: len(self.area.watchers))
        # Which other nodes want which positions (Redis engine; None: one node).
        self.interest: Interest | None = None
        self._location_in = ctx.metrics.fast(ctx.metrics.events_in.labels(namespace, "location"))
        self._location_acks: dict[str, Any] = {}

    @property
    def svc(self) -> TrackingService:
        return self.ctx.tracking

    @property
    def presence(self) -> Presence:
        return self.ctx.engine.tech_presence

    async def connected(self, sid: str, p: Principal) -> None:
        if p.role == "technician":
            if await self.presence.connect(p.id):
                await self.ctx.ops.announce("technician", p.id, True)
            with contextlib.suppress(Exception):  # store down: the TTL refresh retries
                await self.svc.technician_connected(p.id)

    async def disconnected(self, sid: str, p: Principal) -> None:
        if p.role == "technician" and await self.presence.disconnect(p.id):
            self.svc.technician_gone(p.id)
            await self.ctx.ops.announce("technician", p.id, False)
        for order_id in list(self.watching.get(sid, ())):
            self._forget_watch(sid, order_id)
        self.watching.pop(sid, None)
        if self.area.watchers.pop(sid, None) is not None and self.interest is not None:
            self.interest.remove_area()

    # -- technicians -----------------------------------------------------
    def _only_technicians(self, p: Principal) -> None:
        if p.role != "technician":
            raise Forbidden("only technicians send locations")

    @handles("location", PointIn)
    async def location(self, p: Principal, sid: str, body: PointIn) -> dict[str, Any]:
        self._only_technicians(p)
        [result] = await self.svc.ingest(actor_of(p), p.name, [body.to_point()], p.skills)
        if result.status == "invalid":
            raise WireError("invalid", "point rejected", result.details)
        return result.as_dict()

    @handles("locations", LocationsIn)
    async def locations(self, p: Principal, sid: str, body: LocationsIn) -> dict[str, Any]:
        self._only_technicians(p)
        items: list[Point | PointResult] = []
        for raw in body.points:
            try:
                if not isinstance(raw, dict):
                    raise WireError("invalid", "a point must be an object")
                items.append(PointIn.model_validate(raw).to_point(body.coord_sys))
            except ValidationError as exc:
                items.append(PointResult("invalid", "invalid", details=validation_details(exc)))
            except WireError as exc:
                items.append(PointResult("invalid", "invalid", details=exc.message))
        results = await self.svc.ingest(actor_of(p), p.name, items, p.skills)
        counts = {"accepted": 0, "dropped": 0, "invalid": 0}
        for r in results:
            counts[r.status] += 1
        return {**counts, "results": [r.as_dict() for r in results]}

    def fast_location(self, sid: str, body: dict[str, Any]) -> dict[str, Any] | str | None:
        """`location` where its frame is parsed (realtime/transport/wsdirect.py): a
        technician already streaming here. None hands the message to the
        regular handler (first point, bad payload, not a technician), which
        also words every error. An accepted point's reply comes back as its
        JSON text (the one reply of every GPS fix: no dict, no encoder)."""
        p = self.principals.get(sid)
        if p is None or p.role != "technician":
            return None
        point = fast_point(body)
        if point is None:
            try:
                point = PointIn.model_validate(body).to_point()
            except ValidationError:
                return None
        reply: dict[str, Any] | str
        try:
            result = self.svc.ingest_now(p.id, p.name, point, p.skills)
            if result is None:
                return None
            if result.status == "accepted":
                reply, code = f'{{"ok":true,"data":{{"status":"accepted","ts":{result.ts}}}}}', "ok"
            elif result.status == "invalid":
                raise WireError("invalid", "point rejected", result.details)
            else:
                reply, code = ok(result.as_dict()), "ok"
        except Exception as exc:
            reply, code = error_reply(exc)  # (no reference cycle per refused fix)
        self._location_in.inc()
        counter = self._location_acks.get(code)
        if counter is None:
            counter = self._location_acks[code] = self.ctx.metrics.fast(
                self.ctx.metrics.acks.labels(self.namespace, "location", code))
        counter.inc()
        return reply

    # -- customers, agents: one order ------------------------------------
    def position_out(self, pos: Position, payload: dict[str, Any] | None) -> None:
        """A new latest position from this node's technician: to the watchers
        here at once, and to the other nodes (one message, queued). Fixes of
        one technician read together (a backlog) go out in one step, without
        those a newer fix of the read supersedes (SUPERSEDED_MS)."""
        gather(("position", pos.technician_id), (pos, payload), self._positions_now)

    def _positions_now(self, fixes: list[tuple[Position, dict[str, Any] | None]]) -> None:
        newest = fixes[-1][0].ts  # the store accepts a technician's fixes in ts order only
        for pos, payload in fixes:
            if newest - pos.ts < SUPERSEDED_MS:
                self._position_now(pos, payload)

    def _position_now(self, pos: Position, payload: dict[str, Any] | None) -> None:
        self._deliver(pos, payload)
        if self.interest is None:
            return
        nodes = self.interest.targets(payload["order_id"] if payload else None)
        send = self.ctx.engine.bus.row_to_nodes
        if nodes and send is not None:  # only the nodes whose clients watch this
            # Gathered per node until the next publish: a message costs both
            # nodes far more than a row in it.
            send(nodes, "positions", [*pos.as_row(), payload is not None])

    def on_positions(self, data: dict[str, Any]) -> None:
        """Bus signal from another node: [*Position.as_row(), visible] rows.
        A watcher's payload is made only where this node has watchers of
        the order (the row may be here for the area views alone)."""
        for row in data["rows"]:
            pos = Position.from_row(row[:-1])
            visible = row[-1] is True and pos.order_id in self.watchers_of
            self._deliver(pos, self.svc.position_payload(pos) if visible else None)

    def _deliver(self, pos: Position, payload: dict[str, Any] | None) -> None:
        """The area views' batch, and the order's watchers in the coordinate
        system each asked for. Rooms with no member on this node cost nothing
        (no conversion, no encoding)."""
        self.area.changed(pos)
        if not payload:
            return
        local = self.local
        for cs in COORD_SYSTEMS:
            room = watch_room(payload["order_id"], cs)
            if local.has_members(room):
                local.emit("position", convert(payload, cs), room)

    @handles("watch", WatchIn)
    async def watch(self, p: Principal, sid: str, body: WatchIn) -> dict[str, Any]:
        view = await self.svc.watch(actor_of(p), body.order_id)
        for cs in COORD_SYSTEMS:  # a re-watch may change the coordinate system
            if cs != body.coord_sys:
                await self.leave_room(sid, watch_room(body.order_id, cs))
        await self.enter_room(sid, watch_room(body.order_id, body.coord_sys))
        watched = self.watching.setdefault(sid, set())
        if body.order_id not in watched:
            watched.add(body.order_id)
            self.watchers_of.setdefault(body.order_id, set()).add(sid)
            if self.interest is not None and self.interest.add_order(body.order_id):
                await self._announced()
        if view["position"] is not None:
            view["position"] = convert(view["position"], body.coord_sys)
        view["coord_sys"] = body.coord_sys
        return view

    @handles("unwatch", UnwatchIn)
    async def unwatch(self, p: Principal, sid: str, body: UnwatchIn) -> dict[str, Any]:
        for cs in COORD_SYSTEMS:
            await self.leave_room(sid, watch_room(body.order_id, cs))
        if self._forget_watch(sid, body.order_id):
            await self._announced()
        return {"order_id": body.order_id}

    async def _announced(self) -> None:
        """This node's new interest has reached Redis (see realtime/interest.py)."""
        flush = self.ctx.engine.bus.flush
        if flush is not None:
            await flush()

    def _forget_watch(self, sid: str, order_id: str) -> bool:
        """True when this node's interest changed (its last watcher of the order)."""
        watched = self.watching.get(sid)
        if watched is None or order_id not in watched:
            return False
        watched.discard(order_id)
        sids = self.watchers_of[order_id]
        sids.discard(sid)
        if not sids:
            del self.watchers_of[order_id]
        return self.interest is not None and self.interest.remove_order(order_id)

    async def order_changed(self, order: dict[str, Any], event: dict[str, Any]) -> None:
        """Privacy: once an order leaves the visible phases, its watchers are
        dropped (on every node) and must not see the technician again."""
        # Every node's cache of "which order is this technician on" (nothing
        # on the GPS path reads MongoDB for it).
        await self.ctx.engine.bus.publish("order_changed", {
            "order": {k: order.get(k) for k in (
                "order_id", "state", "customer_id", "technician_id", "address")},
            "event": {"type": event["type"], "data": {
                "previous_technician_id": event.get("data", {}).get("previous_technician_id")}},
        })
        if order["state"] not in VISIBLE:
            for cs in COORD_SYSTEMS:
                await self.close_room(watch_room(order["order_id"], cs))

    async def on_order_changed(self, data: dict[str, Any]) -> None:
        """Bus signal, on every node (this one included)."""
        order = data["order"]
        self.svc.on_order_event(order, data["event"])
        if order["state"] not in VISIBLE:  # its rooms are closed on every node
            for sid in list(self.watchers_of.get(order["order_id"], ())):
                self._forget_watch(sid, order["order_id"])

    # -- agents, admins: an area ------------------------------------------
    def area_item(self, pos: Position, online: set[str], cs: CoordSys) -> dict[str, Any]:
        lat, lng = from_wgs84(pos.lat, pos.lng, cs)
        return {
            "id": pos.technician_id, "name": pos.name, "lat": lat, "lng": lng, "ts": pos.ts,
            "speed": pos.speed, "heading": pos.heading,
            "status": pos.status if pos.technician_id in online else "offline",
            "order_id": pos.order_id,
        }

    @handles("watch_area", AreaIn)
    async def watch_area(self, p: Principal, sid: str, body: AreaIn) -> dict[str, Any]:
        if p.role not in ("agent", "admin"):
            raise Forbidden("only agents and admins watch an area")
        box = body
        if body.coord_sys != "wgs84":
            (a, b), (c, d) = (to_wgs84(body.min_lat, body.min_lng, body.coord_sys),
                              to_wgs84(body.max_lat, body.max_lng, body.coord_sys))
            box = AreaIn(min_lat=a, min_lng=b, max_lat=c, max_lng=d, coord_sys=body.coord_sys)
        found = await self.svc.positions.in_box(box.min_lat, box.min_lng, box.max_lat,
                                                box.max_lng, AREA_LIMIT)
        online = await self.presence.online([x.technician_id for x in found])
        first = sid not in self.area.watchers
        self.area.watchers[sid] = box
        if first and self.interest is not None and self.interest.add_area():
            await self._announced()
        return {"technicians": [self.area_item(x, online, body.coord_sys) for x in found]}

    @handles("unwatch_area", Empty)
    async def unwatch_area(self, p: Principal, sid: str, body: Empty) -> dict[str, Any]:
        if self.area.watchers.pop(sid, None) is not None and self.interest is not None:
            self.interest.remove_area()
        return {}
