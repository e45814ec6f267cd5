"""The order state machine of PROTOCOL.md: which state may follow which, and who may move it.

Pure functions over plain values, so the table is testable on its own and
read in one place.
"""

from __future__ import annotations

from typing import Final, Literal

from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden

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
# A technician's job under way: at most one per technician at a time.
UNDER_WAY: Final = frozenset({"en_route", "arrived", "in_service"})
# A customer may cancel on their own only before the technician sets off.
CUSTOMER_CANCELLABLE: Final = frozenset({"created", "assigned"})
STAFF: Final = frozenset({"admin", "service"})
# The server itself: dispatch assigns, the geofence marks arrival.
SYSTEM: Final = "system"


WORK: Final = frozenset({"en_route", "arrived", "in_service", "completed"})


def may_move(actor: Actor, *, target: str, customer_id: str, technician_id: str | None) -> bool:
    """Whether this actor may ever move the order to `target`, whatever its state
    (True for a target no transition leads to: the table answers that one)."""
    role = actor.role
    if target == "assigned":
        # Agents re-assign (check_transition: from `assigned` only).
        return role in STAFF or role == "agent" or (role == SYSTEM and actor.id == "dispatch")
    if target in WORK:
        return (role in STAFF or (role == "technician" and actor.id == technician_id)
                or (target == "arrived" and role == SYSTEM))
    if target == "cancelled":
        return role in STAFF or role == "agent" or (role == "customer" and actor.id == customer_id)
    if target == "refund_requested":
        return role == "customer" and actor.id == customer_id
    if target in ("refunded", "refund_rejected"):
        return role in STAFF or role == "agent"
    return True


def check_transition(
    actor: Actor,
    *,
    state: str,
    target: str,
    customer_id: str,
    technician_id: str | None,
) -> None:
    """Raise Forbidden for an actor who may not make this move, then Conflict for
    a transition the table does not have. Permission comes first: the state is
    told only to whoever may move the order there (docs/protocol.md, Orders)."""
    if not may_move(actor, target=target, customer_id=customer_id, technician_id=technician_id):
        raise Forbidden(f"{actor.role} {actor.id!r} may not move this order to {target!r}")
    if target == "assigned" and actor.role == "agent" and state != "assigned":
        # (Agents see every order: the state tells them nothing new.)
        raise Forbidden("agents move an assigned order to another technician; the first "
                        "assignment is the backend's or dispatch's")
    if target not in NEXT.get(state, frozenset()):
        raise Conflict(f"cannot go from {state!r} to {target!r}", {"state": state})
    if target == "cancelled" and actor.role == "customer" and state not in CUSTOMER_CANCELLABLE:
        raise Conflict("the technician is already on the way; ask support to cancel",
                       {"state": state})
