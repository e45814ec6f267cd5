"""/chat: support chat (customers and agents, with a live queue) and order
chat (customer and technician; agents may join)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, StringConstraints

from feedback.model import STAFF, staff_view, user_event, user_view
from kernel.errors import Forbidden, Invalid
from realtime import rooms
from realtime.auth import Principal
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Id, Inbound, Seq
from realtime.namespaces.orders import actor_of
from realtime.rooms import staff_room

if TYPE_CHECKING:
    from chat.service import ChatService
    from realtime.context import Context

NAMESPACE = rooms.CHAT
Body = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
REPLAY_LIMIT = 500
ClientMsgId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class OpenIn(Inbound):
    kind: Literal["support", "order"]
    order_id: Id | None = None
    topic: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None


class SendIn(Inbound):
    conversation_id: Id
    client_msg_id: ClientMsgId
    body: Body
    kind: Literal["text", "image"] = "text"


class JoinIn(Inbound):
    conversation_id: Id
    since_seq: Seq | None = None


class HistoryIn(Inbound):
    conversation_id: Id
    before_seq: Seq | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 50


class TypingIn(Inbound):
    conversation_id: Id
    typing: bool


class ReadIn(Inbound):
    conversation_id: Id
    seq: Seq


class ConvRef(Inbound):
    conversation_id: Id


class RateIn(Inbound):
    conversation_id: Id
    stars: Annotated[int, Field(ge=1, le=5)]
    comment: Annotated[str, StringConstraints(max_length=1000)] | None = None


class StatusIn(Inbound):
    status: Literal["available", "away"]


class TransferIn(Inbound):
    conversation_id: Id
    to_agent_id: Id


class ListIn(Inbound):
    pass


class QueueIn(Inbound):
    limit: Annotated[int, Field(ge=1, le=100)] = 50


class FeedbackReplayIn(Inbound):
    feedback_id: Id
    since_seq: Seq = 0


class FeedbackReplyIn(Inbound):
    feedback_id: Id
    body: Body


class FeedbackMineIn(Inbound):
    limit: Annotated[int, Field(ge=1, le=100)] = 20


class ChatNamespace(BaseNamespace):
    roles = frozenset({"customer", "technician", "agent", "admin"})

    def __init__(self, ctx: Context) -> None:
        super().__init__(NAMESPACE, ctx)
        self.chat: ChatService = ctx.services.chat
        self.feed = ctx.feeds.chat
        # One send at a time per socket, in the order they arrived: a client
        # that sends twice without waiting for the first ack gets its
        # messages stored (and numbered) in the order it sent them. The lock
        # is fair, so waiting sends go in arrival order.
        self._send_order: dict[str, asyncio.Lock] = {}

    async def connected(self, sid: str, p: Principal) -> None:
        if p.role in ("agent", "admin"):
            await self.enter_room(sid, rooms.FEEDBACK_ROOM)
        if p.role == "agent":
            came_online = await self.ctx.engine.agent_presence.connect(p.id)
            status = await self.chat.router.agent_connected(p.id)
            if came_online:
                await self.ctx.feeds.ops.announce("agent", p.id, True, status)

    async def disconnected(self, sid: str, p: Principal) -> None:
        self._send_order.pop(sid, None)
        if p.role == "agent":
            if await self.ctx.engine.agent_presence.disconnect(p.id):
                self.chat.router.agent_offline(p.id)
                await self.ctx.feeds.ops.announce("agent", p.id, False)

    # -- events ------------------------------------------------------------
    @handles("open", OpenIn)
    async def open(self, p: Principal, sid: str, body: OpenIn) -> dict[str, Any]:
        actor = actor_of(p)
        if body.kind == "support":
            conv, position = await self.chat.open_support(actor, body.order_id, body.topic)
            out: dict[str, Any] = {"conversation": await self.chat.view(actor, conv)}
            if position is not None:
                out["queue_position"] = position
            return out
        if body.order_id is None:
            raise Invalid("an order conversation needs order_id",
                          [{"field": "order_id", "error": "required when kind is order"}])
        conv = await self.chat.open_order(actor, body.order_id)
        if p.role in ("agent", "admin"):
            await self.enter_room(sid, staff_room(conv["conversation_id"]))
        return {"conversation": await self.chat.view(actor, conv)}

    @handles("send", SendIn)
    async def send(self, p: Principal, sid: str, body: SendIn) -> dict[str, Any]:
        t0 = time.perf_counter()
        lock = self._send_order.get(sid)
        if lock is None:  # (setdefault would build a lock on every send)
            lock = self._send_order[sid] = asyncio.Lock()
        async with lock:
            msg = await self.chat.send(actor_of(p), p.name, body.conversation_id,
                                       body.client_msg_id, body.body, body.kind, origin=sid)
        self.ctx.metrics.send_latency.observe(time.perf_counter() - t0)
        return {"message": msg}

    @handles("join", JoinIn)
    async def join(self, p: Principal, sid: str, body: JoinIn) -> dict[str, Any]:
        out = await self.chat.join(actor_of(p), body.conversation_id, body.since_seq or 0)
        if p.role in ("agent", "admin"):
            await self.enter_room(sid, staff_room(body.conversation_id))
        return out

    @handles("leave", ConvRef)
    async def leave(self, p: Principal, sid: str, body: ConvRef) -> dict[str, Any]:
        await self.leave_room(sid, staff_room(body.conversation_id))
        return {"conversation_id": body.conversation_id}

    @handles("history", HistoryIn)
    async def history(self, p: Principal, sid: str, body: HistoryIn) -> dict[str, Any]:
        return await self.chat.history(actor_of(p), body.conversation_id, body.before_seq, body.limit)

    @handles("typing", TypingIn)
    async def typing(self, p: Principal, sid: str, body: TypingIn) -> dict[str, Any]:
        conv = await self.chat.readable(actor_of(p), body.conversation_id)
        await self.feed.relay(conv, "typing", {"conversation_id": body.conversation_id, "user_id": p.id,
                                           "typing": body.typing}, sid)
        return {}

    @handles("read", ReadIn)
    async def read(self, p: Principal, sid: str, body: ReadIn) -> dict[str, Any]:
        conv, seq = await self.chat.mark_read(actor_of(p), body.conversation_id, body.seq)
        await self.feed.relay(conv, "read", {"conversation_id": body.conversation_id, "user_id": p.id,
                                         "seq": seq}, sid)
        return {"conversation_id": body.conversation_id, "seq": seq}

    @handles("close", ConvRef)
    async def close(self, p: Principal, sid: str, body: ConvRef) -> dict[str, Any]:
        conv = await self.chat.close(actor_of(p), body.conversation_id)
        await self.feed.conversation_changed(conv)
        return {"conversation": await self.chat.view(actor_of(p), conv)}

    @handles("rate", RateIn)
    async def rate(self, p: Principal, sid: str, body: RateIn) -> dict[str, Any]:
        conv = await self.chat.rate(actor_of(p), body.conversation_id, body.stars, body.comment)
        return {"conversation": await self.chat.view(actor_of(p), conv)}

    @handles("set_status", StatusIn)
    async def set_status(self, p: Principal, sid: str, body: StatusIn) -> dict[str, Any]:
        if p.role != "agent":
            raise Forbidden("only agents have a status")
        status, load = await self.chat.router.set_status(p.id, body.status)
        await self.ctx.feeds.ops.announce("agent", p.id, True, status)
        return {"status": status, "load": load, "cap": self.chat.router.cap}

    @handles("transfer", TransferIn)
    async def transfer(self, p: Principal, sid: str, body: TransferIn) -> dict[str, Any]:
        conv = await self.chat.transfer(actor_of(p), body.conversation_id, body.to_agent_id)
        await self.feed.conversation_changed(conv, also=(conv.get("transferred_from") or "",))
        return {"conversation": await self.chat.view(actor_of(p), conv)}

    @handles("list", ListIn)
    async def list_conversations(self, p: Principal, sid: str, body: ListIn) -> dict[str, Any]:
        return {"conversations": await self.chat.conversations(actor_of(p))}

    @handles("queue", QueueIn)
    async def queue(self, p: Principal, sid: str, body: QueueIn) -> dict[str, Any]:
        """Extension: the support queue for agents' consoles (oldest first)."""
        convs = await self.chat.queue(actor_of(p), body.limit)
        out: dict[str, Any] = {"conversations": convs, "has_more": len(convs) == body.limit}
        if p.role == "agent":  # the console's header: the caller's own status, across tabs
            status, load = await self.chat.agent_status(p.id)
            out["agent"] = {"status": status, "load": load, "cap": self.chat.router.cap}
        return out

    # -- feedback (docs/feedback.md) --------------------------------------
    @handles("feedback_mine", FeedbackMineIn)
    async def feedback_mine(self, p: Principal, sid: str, body: FeedbackMineIn) -> dict[str, Any]:
        """The caller's own feedback items, newest first (their thread's seq each)."""
        items = await self.ctx.services.feedback.mine(actor_of(p), body.limit)
        return {"feedback": [user_view(i) for i in items]}

    @handles("feedback_replay", FeedbackReplayIn)
    async def feedback_replay(self, p: Principal, sid: str, body: FeedbackReplayIn) -> dict[str, Any]:
        """An item's steps after since_seq: the author's thread for the
        author, every step for staff."""
        item, events = await self.ctx.services.feedback.thread(actor_of(p), body.feedback_id,
                                                              body.since_seq, REPLAY_LIMIT)
        view = staff_view(item) if p.role in STAFF else user_view(item)
        return {"feedback": view, "events": events, "last_seq": view["seq"],
                "has_more": len(events) == REPLAY_LIMIT}

    @handles("feedback_reply", FeedbackReplyIn)
    async def feedback_reply(self, p: Principal, sid: str, body: FeedbackReplyIn) -> dict[str, Any]:
        """The author answers support (or staff reply, as POST .../replies)."""
        item, event = await self.ctx.services.feedback.reply(actor_of(p), p.name, body.feedback_id,
                                                             body.body)
        if p.role in STAFF:
            return {"feedback": staff_view(item), "event": event}
        return {"feedback": user_view(item), "event": user_event(event)}
