"""/chat pushes of feedback (docs/feedback.md): each step to the staff's
inbox room (every agent's and admin's /chat); the author's public steps to the author
(their thread's seq); an item past its SLA to the staff as
`feedback_overdue`."""

from __future__ import annotations

from typing import Any

from feedback.model import PUBLIC, staff_view, user_event, user_view
from realtime import rooms
from realtime.context import Edge

NS = rooms.CHAT


class FeedbackFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio

    async def changed(self, item: dict[str, Any], event: dict[str, Any]) -> None:
        view = staff_view(item)
        staff = [rooms.FEEDBACK_ROOM]
        await self.sio.emit("feedback_event", {"feedback": view, "event": event}, to=staff,
                            namespace=NS)
        if event["type"] == "overdue":
            await self.sio.emit("feedback_overdue", {"feedback": view}, to=staff, namespace=NS)
        author = (item.get("user") or {}).get("id")
        if event["type"] in PUBLIC and author:  # all their devices: the client keeps by seq
            await self.sio.emit("feedback_event",
                                {"feedback": user_view(item), "event": user_event(event)},
                                to=rooms.user_room(str(author)), namespace=NS)
