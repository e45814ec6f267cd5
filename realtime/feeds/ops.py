"""/ops pushes: who came online or went offline (technicians and agents);
the jobs of technicians' days as they change."""

from __future__ import annotations

from typing import Any

from orders.model import Event, Order
from realtime import rooms
from realtime.context import Edge


class OpsFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio

    async def announce(self, kind: str, user_id: str, online: bool,
                       status: str | None = None) -> None:
        """A presence change, to every ops viewer on every node."""
        event: dict[str, Any] = {"kind": kind, "user_id": user_id, "online": online}
        if status is not None:
            event["status"] = status
        await self.sio.emit("presence", event, room=rooms.OPS_ROOM, namespace=rooms.OPS)

    async def job_changed(self, order: Order, event: Event) -> None:
        """An order of a technician's day changed (state, lateness, a move to
        another technician): to every ops viewer, for the day timeline."""
        await self.sio.emit("job", job_out(order, event), room=rooms.OPS_ROOM,
                            namespace=rooms.OPS)


def job_out(order: Order | dict[str, Any], event: Event | None = None) -> dict[str, Any]:
    """An order as a bar of a technician's day (docs/protocol.md, /ops)."""
    out = {k: order.get(k) for k in ("order_id", "technician_id", "state", "service", "window")}
    out["times"] = order.get("times") or {}
    out["late"] = order.get("late")
    prev = event["data"].get("previous_technician_id") if event is not None else None
    if prev:
        out["previous_technician_id"] = prev
    return out
