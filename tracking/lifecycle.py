"""The order state machine of PROTOCOL.md: which state may follow which, and who may move it.

Pure functions over plain values, so the table is testable on its own and
read in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from tracking.errors import Conflict, Forbidden

State = Literal[
    "created",
    "assigned",
    "en_route",
    "arrived",
    "in_service",
    "completed",
    "cancelled",
    "refund_requested",
    "refunded",
    "refund_rejected",
]

STATES: Final = (
    "created",
    "assigned",
    "en_route",
    "arrived",
    "in_service",
    "completed",
    "cancelled",
    "refund_requested",
    "refunded",
    "refund_rejected",
)

# Legal successors. `assigned -> assigned` is a re-assignment.
NEXT: Final[dict[str, frozenset[str]]] = {
    "created": frozenset({"assigned", "cancelled"}),
    "assigned": frozenset({"assigned", "en_route", "cancelled"}),
    "en_route": frozenset({"arrived", "cancelled"}),
    "arrived": frozenset({"in_service", "cancelled"}),
    "in_service": frozenset({"completed"}),
    "completed": frozenset({"refund_requested"}),
    "cancelled": frozenset({"refund_requested"}),
    "refund_requested": frozenset({"refunded", "refund_rejected"}),
    "refunded": frozenset(),
    "refund_rejected": frozenset(),
}

# States in which the technician's work is under way or ahead; the order
# "belongs" to its technician only in these.
TECHNICIAN_PHASE: Final = frozenset({"assigned", "en_route", "arrived", "in_service"})
# A customer may cancel on their own only before the technician sets off.
CUSTOMER_CANCELLABLE: Final = frozenset({"created", "assigned"})
STAFF: Final = frozenset({"admin", "service"})
# The server itself: dispatch assigns, the geofence marks arrival.
SYSTEM: Final = "system"


@dataclass(frozen=True, slots=True)
class Actor:
    id: str
    role: str  # customer | technician | agent | admin | service | system

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role}


def check_transition(
    actor: Actor,
    *,
    state: str,
    target: str,
    customer_id: str,
    technician_id: str | None,
) -> None:
    """Raise Conflict for a transition the table does not have, Forbidden for
    an actor who may not make it. Returns when the transition is allowed."""
    if target not in NEXT.get(state, frozenset()):
        raise Conflict(f"cannot go from {state!r} to {target!r}", {"state": state})
    role = actor.role
    if target == "assigned":
        if role in STAFF or (role == SYSTEM and actor.id == "dispatch"):
            return
    elif target in ("en_route", "arrived", "in_service", "completed"):
        if role in STAFF:
            return
        if role == "technician" and actor.id == technician_id:
            return
        if target == "arrived" and role == SYSTEM:
            return
    elif target == "cancelled":
        if role in STAFF or role == "agent":
            return
        if role == "customer" and actor.id == customer_id:
            if state in CUSTOMER_CANCELLABLE:
                return
            raise Conflict(
                "the technician is already on the way; ask support to cancel",
                {"state": state},
            )
    elif target == "refund_requested":
        if role == "customer" and actor.id == customer_id:
            return
    elif target in ("refunded", "refund_rejected"):
        if role in STAFF or role == "agent":
            return
    raise Forbidden(f"{role} {actor.id!r} may not move this order to {target!r}")
