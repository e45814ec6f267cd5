"""/ops pushes: who came online or went offline (technicians and agents)."""

from __future__ import annotations

from typing import Any

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
