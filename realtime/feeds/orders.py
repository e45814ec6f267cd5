"""/orders pushes: order events to subscribers, customer and technician;
dispatch offers to technicians."""

from __future__ import annotations

from typing import Any

from orders.model import Event, Order
from realtime import rooms
from realtime.context import Edge
from realtime.transport.rooms import LocalRooms

NS = rooms.ORDERS


class OrderFeed:
    def __init__(self, edge: Edge) -> None:
        self.sio = edge.sio
        self.bus = edge.engine.bus
        self.metrics = edge.metrics
        self.local = LocalRooms(edge.sio, NS)
        self.bus.on("leave_user", self.on_leave_user)

    async def publish(self, order: Order, event: Event) -> None:
        """Fan an order event out to the order's subscribers and, wherever they
        are connected, to its customer and technician (once each)."""
        to = [rooms.order_room(order["order_id"]), rooms.user_room(order["customer_id"])]
        if order["technician_id"]:
            to.append(rooms.user_room(order["technician_id"]))
        self.metrics.order_events.labels(event["type"]).inc()
        await self.sio.emit("order_event", event, to=to, namespace=NS)
        previous = event["data"].get("previous_technician_id") if event["type"] == "reassigned" else None
        if previous:
            # The order is no longer theirs: stop its stream to them, on every node.
            await self.bus.publish(
                "leave_user", {"user_id": previous, "room": rooms.order_room(order["order_id"])})

    async def on_leave_user(self, data: dict[str, Any]) -> None:
        """Bus signal: drop this node's sockets of a user from a room."""
        user, room = str(data.get("user_id")), str(data.get("room"))
        for sid in self.local.sids(rooms.user_room(user)):
            await self.sio.leave_room(sid, room, namespace=NS)

    async def rating_received(self, technician_id: str, data: dict[str, Any]) -> None:
        """The technician's rating and their aggregate after it (offline:
        the order.rated notification)."""
        await self.sio.emit("rating_received", data, to=rooms.user_room(technician_id), namespace=NS)

    async def send_offer(self, technician_id: str, offer: dict[str, Any]) -> None:
        await self.sio.emit("offer", offer, to=rooms.user_room(technician_id), namespace=NS)

    async def withdraw_offer(self, technician_id: str, data: dict[str, Any]) -> None:
        await self.sio.emit("offer_withdrawn", data, to=rooms.user_room(technician_id), namespace=NS)
