"""The names clients and nodes agree on: the namespaces, and the rooms in
them. A room is where one emit reaches every socket that should see it, on
every node."""

from __future__ import annotations

from typing import Final

ORDERS: Final = "/orders"
TRACKING: Final = "/tracking"
CHAT: Final = "/chat"
OPS: Final = "/ops"
BOOKING: Final = "/booking"
OPS_ROOM: Final = "ops"  # every agent's and admin's live view
FEEDBACK_ROOM: Final = "feedback"  # /chat: every agent's and admin's feedback inbox


def user_room(user_id: str) -> str:
    """Every socket of one user in a namespace."""
    return f"user:{user_id}"


def order_room(order_id: str) -> str:
    """/orders: the order's subscribers."""
    return f"order:{order_id}"


def watch_room(order_id: str, cs: str) -> str:
    """/tracking: who watches the order's technician, in coordinate system `cs`."""
    return f"watch:{order_id}:{cs}"


def staff_room(conv_id: str) -> str:
    """/chat: agents and admins who joined the conversation."""
    return f"staff:{conv_id}"
