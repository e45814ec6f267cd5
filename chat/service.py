"""Chat service: support and order conversations, durable messages with
gap-free seqs, idempotent sends, send rate limits, read markers, CSAT,
order timeline cards."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from chat.limits import Limiter, SendLimits
from chat.masking import mask_contacts
from chat.model import (
    STAFF,
    Conversation,
    Message,
    Sender,
    can_read,
    check_write,
    conversation_view,
    message_view,
)
from chat.routing import FRONT_OFFSET, Router
from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, NotFound, RateLimited
from kernel.locks import KeyedLocks
from orders.model import Event, Order
from orders.service import OrderService

log = logging.getLogger(__name__)

MAX_JOIN: Final = 500  # messages a join returns; more pages via since_seq
MAX_LIST: Final = 100
SYSTEM_SENDER: Final[Sender] = {"id": "system", "role": "system", "name": None}
# Chinese labels for the order timeline card (the seed's terms).
STATE_LABELS: Final = {
    "created": "已预约", "assigned": "已分配", "en_route": "在路上", "arrived": "已到达",
    "in_service": "服务中", "completed": "已完成", "cancelled": "已取消",
    "refund_requested": "退款申请中", "refunded": "已退款", "refund_rejected": "退款被拒绝",
}


class ChatStore(Protocol):
    async def get(self, conv_id: str) -> Conversation | None: ...
    async def insert_open(self, conv: Conversation) -> tuple[Conversation, bool]: ...
    async def update(self, conv_id: str, expect: dict[str, Any], changes: dict[str, Any],
                     unset: tuple[str, ...] = ()) -> Conversation | None: ...
    async def add_staff(self, conv_id: str, agent_id: str) -> None: ...
    async def set_read(self, conv_id: str, user_id: str, seq: int) -> int: ...
    async def read_markers(self, user_id: str, conv_ids: list[str]) -> dict[str, int]: ...
    async def queue_position(self, conv: Conversation) -> int: ...
    async def queued(self, limit: int) -> list[Conversation]: ...
    async def load_by_agent(self) -> dict[str, int]: ...
    async def for_user(self, field: str, user_id: str, limit: int) -> list[Conversation]: ...
    async def assigned_to(self, agent_id: str) -> list[Conversation]: ...
    async def find_by_client_id(self, conv_id: str, sender_id: str, cmid: str) -> Message | None: ...
    async def append(self, conv_id: str, msg: Message) -> tuple[Message, bool]: ...
    async def set_csat(self, conv_id: str, csat: dict[str, Any]) -> Conversation | None:
        """Set the CSAT of a closed, unrated conversation (None: it was not so)."""
    async def messages_after(self, conv_id: str, since_seq: int, limit: int) -> list[Message]: ...
    async def messages_before(self, conv_id: str, before_seq: int, limit: int) -> list[Message]: ...


# (conversation, message, origin): origin is the sending connection, opaque
# to the domain, so the fan-out can spare it the echo of its own ack.
Delivered = Callable[[Conversation, Message, str | None], Awaitable[None]]


def order_conversation_id(order_id: str) -> str:
    return f"order:{order_id}"


class ChatService:
    def __init__(self, store: ChatStore, orders: OrderService, router: Router,
                 delivered: Delivered, *, limits: SendLimits,
                 busy_wait_s: float | None = None) -> None:
        self.store = store
        self.limits = limits
        self.orders = orders
        self.router = router
        self._delivered = delivered
        self._lock = KeyedLocks()  # sends to one conversation leave this node in seq order
        # How long a send waits for the conversation's lock (the store's bound:
        # a stalled store must not queue sends one timeout after another).
        self._busy_wait_s = busy_wait_s

    async def get(self, conv_id: str) -> Conversation:
        conv = await self.store.get(conv_id)
        if conv is None:
            raise NotFound(f"conversation {conv_id!r} not found")
        return conv

    # -- opening ---------------------------------------------------------
    async def open_support(self, actor: Actor, order_id: str | None,
                           topic: str | None) -> tuple[Conversation, int | None]:
        if actor.role != "customer":
            raise Forbidden("support conversations are opened by customers")
        if order_id is not None:
            # Someone else's order looks exactly like a missing one.
            await self.orders.visible(actor, order_id)
        ts = now_ms()
        conv: Conversation = {
            "conversation_id": "s-" + uuid.uuid4().hex, "kind": "support", "status": "queued",
            "customer_id": actor.id, "order_id": order_id, "topic": topic, "technician_id": None,
            "assignee": None, "staff": [], "last_seq": 0, "created_ts": ts, "updated_ts": ts,
            "queue_rank": ts, "open_key": actor.id, "csat": None,
        }
        conv, created = await self.store.insert_open(conv)
        if created:
            try:
                await self.router.pump()
            except Exception as exc:  # stored and queued: routing retries on the next change
                log.warning("routing after open failed: %s", type(exc).__name__)
            conv = await self.get(conv["conversation_id"])
        position = await self.store.queue_position(conv) if conv["status"] == "queued" else None
        return conv, position

    async def open_order(self, actor: Actor, order_id: str) -> Conversation:
        if actor.role not in ("customer", "technician", *STAFF):
            raise Forbidden("order chats are for the order's customer, technician and staff")
        # Someone else's order looks exactly like a missing one.
        order = await self.orders.visible(actor, order_id)
        conv = await self._order_conversation(order)
        if actor.role == "agent" and actor.id not in conv.get("staff", []):
            await self.store.add_staff(conv["conversation_id"], actor.id)
            conv = await self.get(conv["conversation_id"])
        return conv

    async def _order_conversation(self, order: Order) -> Conversation:
        conv_id = order_conversation_id(order["order_id"])
        conv = await self.store.get(conv_id)
        if conv is None:
            ts = now_ms()
            conv, _ = await self.store.insert_open({
                "conversation_id": conv_id, "kind": "order", "status": "open",
                "customer_id": order["customer_id"], "order_id": order["order_id"],
                "technician_id": order.get("technician_id"), "topic": None, "assignee": None,
                "staff": [], "last_seq": 0, "created_ts": ts, "updated_ts": ts, "csat": None,
            })
        elif conv.get("technician_id") != order.get("technician_id"):
            conv = await self.store.update(
                conv_id, {}, {"technician_id": order.get("technician_id")}) or conv
        return conv

    # -- messages --------------------------------------------------------
    async def send(self, actor: Actor, name: str | None, conv_id: str, client_msg_id: str,
                   body: str, kind: str, origin: str | None = None) -> Message:
        # The sender's own limit first, before any store call: a flood costs
        # the store nothing. Every attempt counts, retries too (knowing that
        # one is a retry takes a look-up).
        await _admit(self.limits.per_user, actor.id, "you are sending messages too fast")
        conv = await self.readable(actor, conv_id)
        check_write(actor, conv)
        if conv["status"] == "closed":
            # A retry of a send that was stored before the close still gets its message.
            existing = await self.store.find_by_client_id(conv_id, actor.id, client_msg_id)
            if existing is not None:
                return message_view(existing, actor)
            raise Conflict("this conversation is closed")
        # The conversation's limit only once the sender may post there: no
        # outsider can spend a conversation's allowance.
        await _admit(self.limits.per_conversation, conv_id, "too many messages in this conversation")
        # No look-up first: the unique index turns a retry into "return the
        # stored one" (one round trip fewer on every first send).
        msg: Message = {
            "id": uuid.uuid4().hex, "conversation_id": conv_id, "client_msg_id": client_msg_id,
            "sender": {"id": actor.id, "role": actor.role, "name": name},
            "kind": kind, "body": body, "ts": now_ms(),
        }
        if conv["kind"] == "order" and actor.role in ("customer", "technician") and kind == "text":
            masked = mask_contacts(body)
            if masked != body:
                msg["masked_body"] = masked
        async with self._lock.hold(conv_id, self._busy_wait_s, "the conversation is busy; retry"):
            stored, created = await self.store.append(conv_id, msg)
            if created:
                await self._delivered(conv, stored, origin)
        return message_view(stored, actor)

    async def append_order_event(self, order: Order, event: Event) -> None:
        """The order's timeline inside its chat: one system card per event (never
        rate limited: the order's own changes are already authorized and few)."""
        conv = await self._order_conversation(order)
        label = STATE_LABELS.get(event["state"], event["state"])
        body = f"订单状态：{label}" if event["type"] != "rated" else "客户已评价"
        msg: Message = {
            "id": uuid.uuid4().hex, "conversation_id": conv["conversation_id"],
            "client_msg_id": f"order-event:{event['seq']}", "sender": SYSTEM_SENDER.copy(),
            "kind": "system", "body": body, "ts": event["ts"],
            "order_event": {k: event[k] for k in ("seq", "type", "state", "ts", "actor")},
        }
        async with self._lock.hold(conv["conversation_id"], self._busy_wait_s,
                                   "the conversation is busy; retry"):
            stored, created = await self.store.append(conv["conversation_id"], msg)
            if created:
                await self._delivered(conv, stored, None)

    async def join(self, actor: Actor, conv_id: str, since_seq: int) -> dict[str, Any]:
        conv = await self.readable(actor, conv_id)
        if actor.role == "agent" and conv["kind"] == "order" and actor.id not in conv.get("staff", []):
            await self.store.add_staff(conv_id, actor.id)
            conv = await self.get(conv_id)
        msgs, marks = await asyncio.gather(self.store.messages_after(conv_id, since_seq, MAX_JOIN),
                                           self.store.read_markers(actor.id, [conv_id]))
        last = msgs[-1]["seq"] if msgs else since_seq
        return {
            "conversation": conversation_view(conv, marks.get(conv_id, 0)),
            "messages": [message_view(m, actor) for m in msgs],
            "has_more": last < int(conv["last_seq"]) and len(msgs) == MAX_JOIN,
        }

    async def history(self, actor: Actor, conv_id: str, before_seq: int | None,
                      limit: int) -> dict[str, Any]:
        conv = await self.readable(actor, conv_id)
        before = before_seq if before_seq is not None else int(conv["last_seq"]) + 1
        msgs = await self.store.messages_before(conv_id, before, limit)
        return {"messages": [message_view(m, actor) for m in msgs],
                "has_more": bool(msgs) and msgs[0]["seq"] > 1}

    async def readable(self, actor: Actor, conv_id: str) -> Conversation:
        """The conversation, if `actor` may read it; else the same `not_found`
        as for one that does not exist. An order's chat has the predictable id
        `order:<order_id>` and exists once the order has an event: a
        `forbidden` here would tell a stranger which orders exist."""
        conv = await self.store.get(conv_id)
        if conv is None or not can_read(actor, conv):
            raise NotFound(f"conversation {conv_id!r} not found")
        return conv

    async def mark_read(self, actor: Actor, conv_id: str, seq: int) -> tuple[Conversation, int]:
        conv = await self.readable(actor, conv_id)
        stored = await self.store.set_read(conv_id, actor.id, min(seq, int(conv["last_seq"])))
        return conv, stored

    async def view(self, actor: Actor, conv: Conversation) -> Conversation:
        """The conversation as `actor` sees it: with their own read marker."""
        marks = await self.store.read_markers(actor.id, [conv["conversation_id"]])
        return conversation_view(conv, marks.get(conv["conversation_id"], 0))

    async def conversations(self, actor: Actor) -> list[Conversation]:
        field = {"customer": "customer_id", "technician": "technician_id"}.get(actor.role, "assignee")
        convs = await self.store.for_user(field, actor.id, MAX_LIST)
        marks = await self.store.read_markers(actor.id, [c["conversation_id"] for c in convs])
        return [conversation_view(c, marks.get(c["conversation_id"], 0)) for c in convs]

    async def queue(self, actor: Actor, limit: int) -> list[Conversation]:
        """Extension: the waiting support conversations, first in line first, for
        agents and admins; each with its `position` and `waiting_since_ts`."""
        if actor.role not in STAFF:
            raise Forbidden("only agents and admins see the support queue")
        out = []
        for position, conv in enumerate(await self.store.queued(limit), start=1):
            rank = int(conv.get("queue_rank") or conv["created_ts"])
            # A requeued conversation ranks FRONT_OFFSET ahead of its requeue time.
            since = rank + FRONT_OFFSET if rank < 0 else rank
            view = conversation_view(conv)
            view["position"] = position
            view["waiting_since_ts"] = since
            out.append(view)
        return out

    async def agent_status(self, agent_id: str) -> tuple[str, int]:
        """An agent's status as routing sees it (away until they say otherwise) and load."""
        status = await self.router.directory.status(agent_id) or "away"
        return status, (await self.store.load_by_agent()).get(agent_id, 0)

    # -- lifecycle -------------------------------------------------------
    async def close(self, actor: Actor, conv_id: str) -> Conversation:
        conv = await self.readable(actor, conv_id)
        allowed = (actor.role == "admin"
                   or (conv["kind"] == "support" and (
                       (actor.role == "customer" and conv["customer_id"] == actor.id)
                       or (actor.role == "agent" and conv.get("assignee") == actor.id)))
                   or (conv["kind"] == "order" and actor.role == "agent"))
        if not allowed:
            raise Forbidden("you may not close this conversation")
        if conv["status"] == "closed":
            raise Conflict("already closed")
        closed = await self.store.update(
            conv_id, {"status": conv["status"]},
            {"status": "closed", "closed_ts": now_ms(), "updated_ts": now_ms(),
             "closed_by": actor.as_dict()}, unset=("open_key",))
        if closed is None:
            raise Conflict("the conversation changed meanwhile; retry")
        await self.router.pump()
        return closed

    async def rate(self, actor: Actor, conv_id: str, stars: int, comment: str | None) -> Conversation:
        conv = await self.readable(actor, conv_id)
        if actor.role != "customer" or conv["customer_id"] != actor.id:
            raise Forbidden("only the conversation's customer may rate it")
        if conv["status"] != "closed":
            raise Conflict("a conversation can be rated after it is closed")
        if conv.get("csat"):
            raise Conflict("already rated")
        csat = {"stars": stars, "comment": comment, "ts": now_ms()}
        rated = await self.store.set_csat(conv_id, csat)
        if rated is None:
            raise Conflict("already rated")
        return rated

    async def transfer(self, actor: Actor, conv_id: str, to_agent: str) -> Conversation:
        conv = await self.readable(actor, conv_id)
        if not (actor.role == "admin" or (actor.role == "agent" and conv.get("assignee") == actor.id)):
            raise Forbidden("only the assigned agent or an admin may transfer")
        if conv["kind"] != "support":
            raise Conflict("only support conversations are transferred")
        if conv["status"] == "closed":
            raise Conflict("this conversation is closed")
        if not await self.router.is_online(to_agent):
            raise Conflict(f"agent {to_agent!r} is not online")
        if to_agent == conv.get("assignee"):
            raise Conflict(f"already assigned to {to_agent!r}")
        moved = await self.store.update(
            conv_id, {"status": conv["status"], "assignee": conv.get("assignee")},
            {"status": "assigned", "assignee": to_agent, "updated_ts": now_ms(),
             "transferred_from": conv.get("assignee")})
        if moved is None:
            raise Conflict("the conversation changed meanwhile; retry")
        await self.router.pump()  # the previous agent may have room for a waiting customer
        return moved



async def _admit(limiter: Limiter, key: str, message: str) -> None:
    wait_ms = await limiter.take(key)
    if wait_ms:
        raise RateLimited(message, wait_ms)
