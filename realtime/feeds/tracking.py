"""/tracking pushes: a technician's new position to the order's watchers (in
the coordinate system each asked for) and to the other nodes that have
watchers; changed technicians to area views, batched per second. Also who
watches what on this node, both ways: a disconnect drops a socket's orders,
an order leaving the visible phases drops its watchers, neither by a scan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from orders.model import Event, Order
from realtime import rooms
from realtime.context import Edge
from realtime.interest import Interest
from realtime.transport.rooms import LocalRooms
from tracking.geo import CoordSys, from_wgs84
from tracking.positions import Position
from tracking.service import VISIBLE, job_fields

log = logging.getLogger(__name__)

NS = rooms.TRACKING
COORD_SYSTEMS: tuple[CoordSys, ...] = ("wgs84", "gcj02", "bd09")
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


@dataclass(frozen=True, slots=True)
class Box:
    """An area view, in WGS-84 (what positions are kept in)."""

    min_lat: float
    min_lng: float
    max_lat: float
    max_lng: float
    coord_sys: CoordSys

    def holds(self, pos: Position) -> bool:
        return self.min_lat <= pos.lat <= self.max_lat and self.min_lng <= pos.lng <= self.max_lng


def convert(payload: dict[str, Any], cs: CoordSys) -> dict[str, Any]:
    if cs == "wgs84":
        return payload
    lat, lng = from_wgs84(payload["lat"], payload["lng"], cs)
    return {**payload, "lat": lat, "lng": lng}


def area_item(pos: Position, online: set[str], cs: CoordSys) -> dict[str, Any]:
    lat, lng = from_wgs84(pos.lat, pos.lng, cs)
    return {
        "id": pos.technician_id, "name": pos.name, "lat": lat, "lng": lng, "ts": pos.ts,
        "speed": pos.speed, "heading": pos.heading,
        "status": pos.status if pos.technician_id in online else "offline",
        "order_id": pos.order_id,
    }


class TrackingFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio
        self.gather = edge.sio.gather
        self.bus = edge.engine.bus
        self.presence = edge.engine.tech_presence
        self.local = LocalRooms(edge.sio, NS)
        self.watching: dict[str, set[str]] = {}  # sid -> order ids watched
        self.watchers_of: dict[str, set[str]] = {}  # order id -> sids watching it
        self.areas: dict[str, Box] = {}  # sid -> its area view
        self._dirty: dict[str, Position] = {}  # changed since the last area batch
        self._area_task: asyncio.Task[None] | None = None
        # Which other nodes want which positions (Redis engine; None: one node).
        node = self.bus.node
        self.interest = Interest(node, self.bus.to_others) if node is not None else None
        if self.interest is not None:
            self.bus.on("interest", self.interest.on_interest)
            self.bus.on("interest_query", self.interest.on_query)
        # Counted when scraped: a count kept on every watch would cost O(watchers) each time.
        edge.metrics.watchers.labels("order").set_function(
            lambda: sum(len(v) for v in self.watching.values()))
        edge.metrics.watchers.labels("area").set_function(lambda: len(self.areas))

    # -- one order's watchers ---------------------------------------------
    def position_out(self, pos: Position, payload: dict[str, Any] | None) -> None:
        """A new latest position from this node's technician: to the watchers
        here at once, and to the other nodes (one message, queued). Fixes of
        one technician read together (a backlog) go out in one step, without
        those a newer fix of the read supersedes (SUPERSEDED_MS)."""
        self.gather(("position", pos.technician_id), (pos, payload), self._positions_now)

    def _positions_now(self, fixes: list[tuple[Position, dict[str, Any] | None]]) -> None:
        newest = fixes[-1][0].ts  # the store accepts a technician's fixes in ts order only
        for pos, payload in fixes:
            if newest - pos.ts < SUPERSEDED_MS:
                self._position_now(pos, payload)

    def _position_now(self, pos: Position, payload: dict[str, Any] | None) -> None:
        self.deliver(pos, payload)
        if self.interest is None:
            return
        nodes = self.interest.targets(payload["order_id"] if payload else None)
        if nodes:  # only the nodes whose clients watch this
            # Gathered per node until the next publish: a message costs both
            # nodes far more than a row in it.
            self.bus.row_to_nodes(nodes, "positions", [*pos.as_row(), payload is not None])

    def deliver(self, pos: Position, payload: dict[str, Any] | None) -> None:
        """The area views' batch, and the order's watchers in the coordinate
        system each asked for. Rooms with no member on this node cost nothing
        (no conversion, no encoding)."""
        if self.areas:
            self._dirty[pos.technician_id] = pos
        if not payload:
            return
        local = self.local
        for cs in COORD_SYSTEMS:
            room = rooms.watch_room(payload["order_id"], cs)
            if local.has_members(room):
                local.emit("position", convert(payload, cs), room)

    async def add_watch(self, sid: str, order_id: str) -> None:
        watched = self.watching.setdefault(sid, set())
        if order_id not in watched:
            watched.add(order_id)
            self.watchers_of.setdefault(order_id, set()).add(sid)
            if self.interest is not None and self.interest.add_order(order_id):
                await self.announced()

    async def remove_watch(self, sid: str, order_id: str) -> None:
        if self._forget_watch(sid, order_id):
            await self.announced()

    async def announced(self) -> None:
        """This node's new interest has reached Redis (see realtime/interest.py)."""
        await self.bus.flush()

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

    def forget_order(self, order_id: str) -> None:
        """The order left the visible phases: its watchers here are dropped."""
        for sid in list(self.watchers_of.get(order_id, ())):
            self._forget_watch(sid, order_id)

    def gone(self, sid: str) -> None:
        """A socket disconnected: what it watched is forgotten."""
        for order_id in list(self.watching.get(sid, ())):
            self._forget_watch(sid, order_id)
        self.watching.pop(sid, None)
        self.remove_area(sid)

    async def order_changed(self, order: Order, event: Event) -> None:
        """Privacy: once an order leaves the visible phases, its watchers are
        dropped (on every node) and must not see the technician again."""
        # Every node's cache of "which order is this technician on" (nothing
        # on the GPS path reads MongoDB for it).
        await self.bus.publish("order_changed", {
            "order": job_fields(order),
            "event": {"type": event["type"], "data": {
                "previous_technician_id": event["data"].get("previous_technician_id")}},
        })
        if order["state"] not in VISIBLE:
            for cs in COORD_SYSTEMS:
                await self.sio.close_room(rooms.watch_room(order["order_id"], cs), namespace=NS)

    def watched(self, order_id: str) -> bool:
        """Whether the order has watchers here or (as far as this node was
        told) on another node."""
        if order_id in self.watchers_of:
            return True
        return self.interest is not None and self.interest.wants_order(order_id)

    async def eta_out(self, order_id: str, payload: dict[str, Any]) -> None:
        """A queued job's new ETA, to its watchers on every node (rare: a
        change of more than a minute; no position in it)."""
        for cs in COORD_SYSTEMS:
            await self.sio.emit("eta", payload, room=rooms.watch_room(order_id, cs), namespace=NS)

    # -- area views ---------------------------------------------------------
    async def add_area(self, sid: str, box: Box) -> None:
        first = sid not in self.areas
        self.areas[sid] = box
        if first and self.interest is not None and self.interest.add_area():
            await self.announced()

    def remove_area(self, sid: str) -> None:
        if self.areas.pop(sid, None) is not None and self.interest is not None:
            self.interest.remove_area()

    def start(self) -> None:
        self._area_task = asyncio.get_running_loop().create_task(self._area_ticker())

    async def stop(self) -> None:
        if self._area_task is not None:
            self._area_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._area_task

    async def _area_ticker(self) -> None:
        while True:
            await asyncio.sleep(AREA_INTERVAL_S)
            if not self._dirty:
                continue
            batch, self._dirty = list(self._dirty.values()), {}
            try:
                await self._send_areas(batch)
            except Exception as exc:  # a failed push must not end the ticker
                log.warning("area push failed: %s", type(exc).__name__)

    async def _send_areas(self, batch: list[Position]) -> None:
        online = await self.presence.online([p.technician_id for p in batch])
        for sid, box in list(self.areas.items()):
            items = [area_item(p, online, box.coord_sys) for p in batch if box.holds(p)][:AREA_LIMIT]
            if items:
                # This node's own watchers, from every node's positions (the bus).
                self.local.emit("positions", {"technicians": items}, sid)
