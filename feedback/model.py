"""A feedback item and its events (docs/feedback.md): the status table, who
may do what, and what the item's author sees of it. Pure."""

from __future__ import annotations

from typing import Any, Final

from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden

STATUSES: Final = ("new", "in_progress", "replied", "resolved", "closed")
# Waiting on support: these are the inbox's open items.
OPEN: Final = frozenset({"new", "in_progress", "replied"})
# What a status change (PATCH status) may do. `replied` is reached only by a
# reply; a staff reply moves new | in_progress | replied to `replied`, and
# the author's answer moves replied | resolved back to `in_progress`.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "new": frozenset({"in_progress", "resolved", "closed"}),
    "in_progress": frozenset({"resolved", "closed"}),
    "replied": frozenset({"in_progress", "resolved", "closed"}),
    "resolved": frozenset({"in_progress"}),
    "closed": frozenset({"in_progress"}),
}
REPLY_FROM: Final = frozenset({"new", "in_progress", "replied"})
AUTHOR_REPLY_FROM: Final = frozenset({"new", "in_progress", "replied", "resolved"})
PRIORITIES: Final = ("low", "normal", "high", "urgent")
STAFF: Final = frozenset({"agent", "admin", "service"})
MAX_TAGS: Final = 10
# The events the author sees (their thread): the rest are the staff's log.
PUBLIC: Final = frozenset({"created", "replied", "user_replied", "status"})
EVENT_TYPES: Final = ("created", "assigned", "status", "replied", "user_replied", "noted",
                      "tagged", "prioritized", "overdue")


def is_staff(actor: Actor) -> bool:
    return actor.role in STAFF


def check_status(current: str, target: str) -> None:
    if target == "replied":
        raise Conflict("an item becomes `replied` by a reply, not by setting it",
                       {"status": current})
    if target not in TRANSITIONS[current]:
        raise Conflict(f"a {current} item cannot become {target}",
                       {"status": current, "allowed": sorted(TRANSITIONS[current])})


def check_handler(actor: Actor, item: dict[str, Any]) -> None:
    """Replies and status changes: the assignee's, or anyone's while nobody
    has it; an admin (and the backend) always."""
    if actor.role in ("admin", "service"):
        return
    if actor.role != "agent":
        raise Forbidden("only support staff handle feedback")
    assignee = item.get("assignee")
    if assignee is not None and assignee != actor.id:
        raise Forbidden(f"this item is assigned to {assignee!r}", {"assignee": assignee})


def check_assign(actor: Actor, item: dict[str, Any], to: str | None) -> None:
    """An agent takes or hands on an item nobody or they themselves have; an
    admin moves any."""
    if actor.role in ("admin", "service"):
        return
    if actor.role != "agent":
        raise Forbidden("only support staff assign feedback")
    if item.get("assignee") not in (None, actor.id):
        raise Forbidden(f"this item is assigned to {item['assignee']!r}; an admin may move it",
                        {"assignee": item["assignee"]})


def staff_view(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("_id", "terms", "day")}


def user_view(item: dict[str, Any]) -> dict[str, Any]:
    """What the author sees of their item: no assignee, tags or notes; their
    thread's own seq."""
    return {"id": item["id"], "category": item["category"], "body": item["body"],
            "order_id": item.get("order_id"), "status": item["status"], "ts": item["ts"],
            "updated_ts": item.get("updated_ts", item["ts"]), "seq": item.get("user_seq", 0)}


def user_event(event: dict[str, Any]) -> dict[str, Any]:
    """An event of the author's thread: its seq is the thread's (gap-free
    over what they see), the staff's ids stay inside."""
    actor = event.get("actor") or {}
    by = {"role": actor.get("role"), "name": actor.get("name")}
    data = dict(event.get("data") or {})
    return {"feedback_id": event["feedback_id"], "seq": event["user_seq"], "type": event["type"],
            "status": event["status"], "by": by, "data": data, "ts": event["ts"]}
