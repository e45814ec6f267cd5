"""/booking pushes: a watcher's view moved (`availability_changed`), a
customer's hold ended (`hold_ended`); and the signals every node acts on
when a schedule or a calendar changed (docs/scheduling.md, Live)."""

from __future__ import annotations

from realtime import rooms
from realtime.context import Edge
from scheduling.schedule import Hold

NS = rooms.BOOKING
SCHEDULE_CHANGED = "schedule_changed"
CALENDAR_CHANGED = "calendar_changed"


class BookingFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio
        self.bus = edge.engine.bus
        self.metrics = edge.metrics

    async def changed(self, technician_ids: list[str]) -> None:
        """Tell every node these schedules moved: the others first (queued,
        not awaited), then this one, whose re-read and views the caller
        waits for."""
        data = {"technicians": technician_ids}
        self.bus.to_others(SCHEDULE_CHANGED, data)
        await self.bus.dispatch(SCHEDULE_CHANGED, data)

    async def calendar_set(self, technician_id: str) -> None:
        await self.bus.publish(CALENDAR_CHANGED, {"technician_id": technician_id})

    async def view_changed(self, sid: str, changes: dict[int, int]) -> None:
        body = {"changes": [{"start_ts": t, "count": n} for t, n in changes.items()]}
        await self.sio.emit("availability_changed", body, to=sid, namespace=NS)

    async def hold_ended(self, hold: Hold, reason: str) -> None:
        """To the customer's /booking sockets, wherever they are connected."""
        self.metrics.holds.labels(reason).inc()
        body = {"hold_id": hold.hold_id, "reason": reason, "start_ts": hold.start_ms,
                "end_ts": hold.end_ms, "order_id": hold.order_id}
        await self.sio.emit("hold_ended", body, to=rooms.user_room(hold.customer_id), namespace=NS)
