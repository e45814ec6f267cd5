"""Outbox records: one per change worth telling, written in the change's own
transaction (docs/webhooks.md, "The outbox").

A record names its `topic` (the webhook event type), its ordering `key` (an
order, a conversation, a dispatch round) and its `pos` in that key (the
order's seq, the message's seq): deliveries of one key to one endpoint go out
in `pos` order. `part` spreads keys over the relay's partitions (leases)."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Mapping
from typing import Any, Final

# Leases are per partition: one node works a partition's records at a time.
# A key always falls in the same partition, so one node orders its deliveries.
PARTITIONS: Final = 32
# What of an order a webhook carries besides the event (the backend owns the
# rest: prices, payment, profiles).
ORDER_FIELDS: Final = ("order_id", "state", "seq", "customer_id", "technician_id", "service",
                       "window", "created_ts", "updated_ts")
# Topics a webhook endpoint may subscribe to (`*` and `prefix.*` patterns too).
TOPIC_PREFIXES: Final = ("order.", "chat.", "dispatch.", "feedback.", "notification.")


def new_id() -> str:
    """A record's id: the `webhook-id` of each of its deliveries, retries included."""
    return "msg_" + uuid.uuid4().hex


def partition(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


def record(topic: str, key: str, pos: int, ts: int, data: dict[str, Any]) -> dict[str, Any]:
    """A record as stored (`_id` is its id)."""
    return {"_id": new_id(), "topic": topic, "key": key, "pos": pos, "ts": ts, "data": data,
            "part": partition(key), "done": False}


def order_topic(event: Mapping[str, Any]) -> str:
    """`order.<state>` for a state change (order.en_route), else
    `order.<event type>` (order.reassigned, order.rated, order.late_risk)."""
    if event["type"] == "state_changed":
        return f"order.{event['state']}"
    return f"order.{event['type']}"


def order_record(order: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    oid = order.get("order_id") or order.get("_id")
    summary = {k: order.get(k) for k in ORDER_FIELDS}
    summary["order_id"] = oid
    return record(order_topic(event), f"order:{oid}", int(event["seq"]), int(event["ts"]),
                  {"order": summary, "event": dict(event)})


def message_record(conv: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    """A chat message addressed to people (system cards of order events are
    not: the order event itself is the record)."""
    cid = conv.get("conversation_id") or conv.get("_id")
    view = {k: message.get(k) for k in ("id", "conversation_id", "seq", "sender", "kind", "ts")}
    # Contacts masked as the other side sees them (防飞单): the webhook and the
    # notification carry what the reader would read.
    view["body"] = message.get("masked_body") or message.get("body")
    conversation = {"conversation_id": cid, "kind": conv.get("kind"),
                    "order_id": conv.get("order_id"), "customer_id": conv.get("customer_id"),
                    "technician_id": conv.get("technician_id")}
    return record("chat.message", f"conversation:{cid}", int(message["seq"]), int(message["ts"]),
                  {"conversation": conversation, "message": view})


def csat_record(conv: dict[str, Any], csat: dict[str, Any]) -> dict[str, Any]:
    cid = conv.get("conversation_id") or conv.get("_id")
    return record("chat.csat", f"csat:{cid}", 1, int(csat["ts"]),
                  {"conversation_id": cid, "customer_id": conv.get("customer_id"),
                   "agent_id": conv.get("assignee"), "csat": csat})


def feedback_record(item: dict[str, Any], event: dict[str, Any] | None = None) -> dict[str, Any]:
    """A feedback item's step (`feedback.created`, `.replied`, `.status`...):
    the item as the staff see it, and the step; in order per item by its seq."""
    fid = item.get("id") or item.get("_id")
    view = {k: v for k, v in item.items() if k not in ("_id", "terms", "day")}
    if event is None:  # pragma: no cover - every step has its event
        return record("feedback.created", f"feedback:{fid}", 1, int(item["ts"]), {**view, "id": fid})
    return record(f"feedback.{event['type']}", f"feedback:{fid}", int(event["seq"]), int(event["ts"]),
                  {**view, "id": fid, "event": event})


def offer_record(technician_id: str, offer: dict[str, Any], n: int, ts: int) -> dict[str, Any]:
    """An offer to a technician (n: when it was made, which orders the
    round's offers; offers made in the same millisecond go out side by side)."""
    return record("dispatch.offer", f"dispatch:{offer['dispatch_id']}", n, ts,
                  {"technician_id": technician_id, "offer": offer})


def topic_matches(patterns: list[str], topic: str) -> bool:
    """`*` (every topic), `order.*` (a family) or an exact topic."""
    for p in patterns:
        if p == "*" or p == topic or (p.endswith(".*") and topic.startswith(p[:-1])):
            return True
    return False


def check_pattern(pattern: str) -> str | None:
    """Why a topic pattern is refused, or None."""
    if pattern == "*":
        return None
    if not 1 <= len(pattern) <= 64 or not pattern.startswith(TOPIC_PREFIXES):
        return f"must be '*' or start with one of {', '.join(TOPIC_PREFIXES)}"
    stem = pattern[:-2] if pattern.endswith(".*") else pattern
    if "*" in stem or not all(part and part.replace("_", "").isalnum() for part in stem.split(".")):
        return "letters, digits and _ in dot-separated parts, optionally ending in .*"
    return None
