"""/chat pushes: messages (each audience its own view), conversation
changes, queue positions, typing and read relays."""

from __future__ import annotations

from typing import Any

from chat.model import Conversation, Message, conversation_view, message_view
from kernel.actor import Actor
from realtime import rooms
from realtime.context import Edge

NS = rooms.CHAT


def audience(conv: Conversation) -> tuple[list[tuple[Actor, str]], list[str]]:
    """(participants with their rooms, staff rooms) of a conversation."""
    parts = [(Actor(conv["customer_id"], "customer"), rooms.user_room(conv["customer_id"]))]
    technician, assignee = conv.get("technician_id"), conv.get("assignee")
    if technician:
        parts.append((Actor(technician, "technician"), rooms.user_room(technician)))
    staff = [rooms.staff_room(conv["conversation_id"])]
    if assignee:
        staff.append(rooms.user_room(assignee))
    return parts, staff


class ChatFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio
        self.metrics = edge.metrics

    async def delivered(self, conv: Conversation, msg: Message, origin: str | None) -> None:
        """Each audience gets its own view (masked for the other party of an
        order chat); the sending connection has the message in its ack."""
        self.metrics.messages.labels(msg["kind"]).inc()
        parts, staff = audience(conv)
        await self.sio.emit("message", message_view(msg, Actor("staff", "agent")), to=staff,
                            skip_sid=origin, namespace=NS)
        for actor, room in parts:
            await self.sio.emit("message", message_view(msg, actor), to=room, skip_sid=origin,
                                namespace=NS)

    async def conversation_changed(self, conv: Conversation, also: tuple[str, ...] = ()) -> None:
        """To the conversation's audience, and `also` these users (the agent a
        conversation was just transferred away from)."""
        parts, staff = audience(conv)
        to = [room for _, room in parts] + staff + [rooms.user_room(u) for u in also if u]
        await self.sio.emit("conversation", conversation_view(conv), to=to, namespace=NS)

    async def queue_position(self, conv: Conversation, position: int) -> None:
        await self.sio.emit("queue_position",
                            {"conversation_id": conv["conversation_id"], "position": position},
                            to=rooms.user_room(conv["customer_id"]), namespace=NS)

    async def relay(self, conv: Conversation, event: str, data: dict[str, Any], sid: str) -> None:
        """Typing and read markers: to the others of the conversation."""
        parts, staff = audience(conv)
        await self.sio.emit(event, data, to=[room for _, room in parts] + staff, skip_sid=sid,
                            namespace=NS)
