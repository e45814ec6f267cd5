"""/orders: live order state. Subscribe with replay, and the actions of the
customer, technician and agent on an order."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from kernel.actor import Actor
from kernel.clock import now_ms
from orders.model import Event, Order
from outbox.relay import notification_out
from realtime import rooms
from realtime.auth import Principal
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Id, Inbound, Seq, ShortText, Text
from realtime.rooms import order_room

if TYPE_CHECKING:
    from realtime.context import Context

log = logging.getLogger(__name__)
NAMESPACE = rooms.ORDERS
Stars = Annotated[int, Field(ge=1, le=5)]


def actor_of(p: Principal) -> Actor:
    return Actor(p.id, p.role)


class SubscribeIn(Inbound):
    order_id: Id
    since_seq: Seq | None = None


class OrderRef(Inbound):
    order_id: Id


class ProgressIn(Inbound):
    order_id: Id
    state: Literal["en_route", "arrived", "in_service", "completed"]


class CancelIn(Inbound):
    order_id: Id
    reason: ShortText | None = None


class RefundIn(Inbound):
    order_id: Id
    reason: Text


class ResolveRefundIn(Inbound):
    order_id: Id
    approve: bool
    note: ShortText | None = None


class AnswerIn(Inbound):
    order_id: Id


class RateIn(Inbound):
    order_id: Id
    stars: Stars
    quality: Stars | None = None
    attitude: Stars | None = None
    efficiency: Stars | None = None
    comment: Annotated[str, Field(max_length=1000)] | None = None


def changed(order: Order, event: Event) -> dict[str, Any]:
    return {"order": order, "event": event}


class NotificationsIn(Inbound):
    unread_only: bool = False
    before_ts: Annotated[int, Field(ge=0, le=2**53)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50


# Most missed notifications pushed on connect (the rest stay in the inbox).
MISSED_MAX = 100


class OrdersNamespace(BaseNamespace):
    roles = frozenset({"customer", "technician", "agent", "admin", "service"})

    def __init__(self, ctx: Context) -> None:
        super().__init__(NAMESPACE, ctx)
        self.orders = ctx.services.orders
        self.dispatch = ctx.services.dispatch
        self._missed: set[asyncio.Task[None]] = set()

    async def connected(self, sid: str, p: Principal) -> None:
        """The notifications this user missed while connected nowhere come
        once the connection stands (docs/notifications.md, "On connect")."""
        if p.role in ("customer", "technician"):
            task = asyncio.get_running_loop().create_task(self._send_missed(sid, p))
            self._missed.add(task)
            task.add_done_callback(self._missed.discard)

    async def _send_missed(self, sid: str, p: Principal) -> None:
        store = self.ctx.services.outbox_store
        try:
            items = await store.unread_of(p.id, MISSED_MAX)
            if not items:
                return
            await self.emit("notifications", {"notifications": [notification_out(d) for d in items],
                                              "unread": 0}, to=sid)
            # Shown by the app now: the inbox's unread count starts again at 0.
            await store.mark_read(p.id, [d["_id"] for d in items], now_ms())
        except Exception as exc:  # the inbox still holds them (GET /api/notifications)
            log.warning("missed notifications not sent: %s", type(exc).__name__)

    @handles("notifications", NotificationsIn)
    async def notifications(self, p: Principal, sid: str, body: NotificationsIn) -> dict[str, Any]:
        """The inbox over the socket: newest first, and the unread count."""
        items, unread = await self.ctx.services.outbox_store.inbox(p.id, body.unread_only, body.before_ts,
                                                                   body.limit)
        return {"notifications": [notification_out(d) for d in items], "unread": unread}

    @handles("subscribe", SubscribeIn)
    async def subscribe(self, p: Principal, sid: str, body: SubscribeIn) -> dict[str, Any]:
        orders = self.orders
        # Not theirs: `not_found`, as for an order that does not exist.
        order = await orders.visible(actor_of(p), body.order_id)
        # Join before reading: an event committed in between arrives both in
        # the reply and as a push, never in neither. Clients drop seq <= last.
        await self.enter_room(sid, order_room(body.order_id))
        events = await orders.events_since(body.order_id, body.since_seq or 0)
        if events and events[-1]["seq"] > order["seq"]:
            order = await orders.get(body.order_id)  # changed while we read
        last = events[-1]["seq"] if events else (body.since_seq or 0)
        return {"order": order, "events": events, "has_more": last < order["seq"]}

    @handles("unsubscribe", OrderRef)
    async def unsubscribe(self, p: Principal, sid: str, body: OrderRef) -> dict[str, Any]:
        await self.leave_room(sid, order_room(body.order_id))
        return {"order_id": body.order_id}

    @handles("progress", ProgressIn)
    async def progress(self, p: Principal, sid: str, body: ProgressIn) -> dict[str, Any]:
        return changed(*await self.orders.transition(actor_of(p), body.order_id, body.state))

    @handles("cancel", CancelIn)
    async def cancel(self, p: Principal, sid: str, body: CancelIn) -> dict[str, Any]:
        data = {"reason": body.reason} if body.reason else {}
        return changed(*await self.orders.transition(actor_of(p), body.order_id, "cancelled", data))

    @handles("request_refund", RefundIn)
    async def request_refund(self, p: Principal, sid: str, body: RefundIn) -> dict[str, Any]:
        return changed(*await self.orders.transition(
            actor_of(p), body.order_id, "refund_requested", {"reason": body.reason}))

    @handles("resolve_refund", ResolveRefundIn)
    async def resolve_refund(self, p: Principal, sid: str, body: ResolveRefundIn) -> dict[str, Any]:
        target = "refunded" if body.approve else "refund_rejected"
        data = {"note": body.note} if body.note else {}
        return changed(*await self.orders.transition(actor_of(p), body.order_id, target, data))

    @handles("rate", RateIn)
    async def rate(self, p: Principal, sid: str, body: RateIn) -> dict[str, Any]:
        rating = body.model_dump(exclude={"order_id"}, exclude_none=True)
        return changed(*await self.orders.rate(actor_of(p), body.order_id, rating))

    # -- dispatch offers (sent by realtime/feeds/orders.py) ----------------
    async def _answer(self, p: Principal, order_id: str, accept: bool) -> dict[str, Any]:
        result = await self.dispatch.answer(actor_of(p), order_id, accept)
        # Wake the node driving the round, wherever it runs.
        await self.ctx.engine.bus.publish("dispatch_answer", {"dispatch_id": result["dispatch_id"]})
        return result

    @handles("accept", AnswerIn)
    async def accept(self, p: Principal, sid: str, body: AnswerIn) -> dict[str, Any]:
        return await self._answer(p, body.order_id, True)

    @handles("decline", AnswerIn)
    async def decline(self, p: Principal, sid: str, body: AnswerIn) -> dict[str, Any]:
        return await self._answer(p, body.order_id, False)
