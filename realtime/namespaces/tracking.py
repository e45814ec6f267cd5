"""/tracking: technicians stream positions; customers watch their technician
approach; agents and admins watch an area."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, ValidationError, model_validator

from kernel.errors import Forbidden
from realtime import rooms
from realtime.auth import Principal
from realtime.errors import ErrorReply, OkReply, WireError, ok, validation_details
from realtime.feeds.tracking import AREA_LIMIT, COORD_SYSTEMS, Box, area_item, convert
from realtime.namespaces.base import BaseNamespace, error_reply, handles
from realtime.namespaces.models import MAX_SAFE_INT, Id, Inbound, Lat, Lng, Ts
from realtime.namespaces.orders import actor_of
from realtime.presence import Presence
from realtime.rooms import watch_room
from tracking.geo import CoordSys, to_wgs84
from tracking.locations import Point
from tracking.positions import Position
from tracking.service import VISIBLE, PointResult, TrackingService

if TYPE_CHECKING:
    from realtime.context import Context

log = logging.getLogger(__name__)

NAMESPACE = rooms.TRACKING
MAX_BATCH = 500



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
    and words the error). tests/tracking/test_tracking_units.py checks that the two agree."""
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
        lat, lng = to_wgs84(lat, lng, cs)
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


class TrackingNamespace(BaseNamespace):
    roles = frozenset({"technician", "customer", "agent", "admin"})

    def __init__(self, ctx: Context) -> None:
        super().__init__(NAMESPACE, ctx)
        self.svc: TrackingService = ctx.services.tracking
        self.feed = ctx.feeds.tracking
        self._location_in = ctx.metrics.fast(ctx.metrics.events_in.labels(NAMESPACE, "location"))
        self._location_acks: dict[str, Any] = {}
        ctx.engine.bus.on("positions", self.on_positions)
        ctx.engine.bus.on("order_changed", self.on_order_changed)

    @property
    def presence(self) -> Presence:
        return self.ctx.engine.tech_presence

    async def connected(self, sid: str, p: Principal) -> None:
        if p.role == "technician":
            if await self.presence.connect(p.id):
                await self.ctx.feeds.ops.announce("technician", p.id, True)
            with contextlib.suppress(Exception):  # store down: the TTL refresh retries
                await self.svc.technician_connected(p.id)

    async def disconnected(self, sid: str, p: Principal) -> None:
        if p.role == "technician":
            if await self.presence.disconnect(p.id):
                self.svc.technician_gone(p.id)
                await self.ctx.feeds.ops.announce("technician", p.id, False)
            elif not self.presence.here(p.id):  # still connected, to other nodes
                self.svc.technician_left_node(p.id)
        self.feed.gone(sid)

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

    def fast_location(self, sid: str, body: dict[str, Any]) -> OkReply | ErrorReply | str | None:
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
        reply: OkReply | ErrorReply | str
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
    def on_positions(self, data: dict[str, Any]) -> None:
        """Bus signal from another node: [*Position.as_row(), visible] rows.
        A watcher's payload is made only where this node has watchers of
        the order (the row may be here for the area views alone)."""
        watched = self.feed.watchers_of
        for row in data["rows"]:
            pos = Position.from_row(row[:-1])
            visible = row[-1] is True and pos.order_id in watched
            self.feed.deliver(pos, self.svc.position_payload(pos) if visible else None)

    @handles("watch", WatchIn)
    async def watch(self, p: Principal, sid: str, body: WatchIn) -> dict[str, Any]:
        view = await self.svc.watch(actor_of(p), body.order_id)
        for cs in COORD_SYSTEMS:  # a re-watch may change the coordinate system
            if cs != body.coord_sys:
                await self.leave_room(sid, watch_room(body.order_id, cs))
        await self.enter_room(sid, watch_room(body.order_id, body.coord_sys))
        await self.feed.add_watch(sid, body.order_id)
        if view["position"] is not None:
            view["position"] = convert(view["position"], body.coord_sys)
        view["coord_sys"] = body.coord_sys
        return view

    @handles("unwatch", UnwatchIn)
    async def unwatch(self, p: Principal, sid: str, body: UnwatchIn) -> dict[str, Any]:
        for cs in COORD_SYSTEMS:
            await self.leave_room(sid, watch_room(body.order_id, cs))
        await self.feed.remove_watch(sid, body.order_id)
        return {"order_id": body.order_id}

    async def on_order_changed(self, data: dict[str, Any]) -> None:
        """Bus signal, on every node (this one included)."""
        order = data["order"]
        self.svc.on_order_event(order, data["event"])
        if order["state"] not in VISIBLE:  # its rooms are closed on every node
            self.feed.forget_order(order["order_id"])

    # -- agents, admins: an area ------------------------------------------
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
        await self.feed.add_area(sid, Box(box.min_lat, box.min_lng, box.max_lat, box.max_lng,
                                          body.coord_sys))
        return {"technicians": [area_item(x, online, body.coord_sys) for x in found]}

    @handles("unwatch_area", Empty)
    async def unwatch_area(self, p: Principal, sid: str, body: Empty) -> dict[str, Any]:
        self.feed.remove_area(sid)
        return {}
