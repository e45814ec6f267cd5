"""Conversations and messages as plain dicts, and who may do what with them."""

from __future__ import annotations

from typing import Any, Final, Required, TypedDict, cast

from kernel.actor import Actor, ActorRef
from kernel.errors import Forbidden


class Sender(TypedDict):
    id: str
    role: str
    name: str | None


class Csat(TypedDict, total=False):
    stars: Required[int]
    comment: str | None
    ts: int


class Conversation(TypedDict, total=False):
    """A conversation as stored (docs/protocol.md, Conversations); the
    bookkeeping fields (_INTERNAL) never reach the wire."""

    conversation_id: Required[str]
    kind: Required[str]  # support | order
    status: Required[str]  # queued | assigned | open | closed
    customer_id: Required[str]
    order_id: str | None
    technician_id: str | None
    topic: str | None
    assignee: str | None
    staff: list[str]
    last_seq: int
    created_ts: int
    updated_ts: int
    assigned_ts: int
    waiting_since_ts: int
    transferred_from: str | None
    closed_ts: int
    closed_by: ActorRef
    csat: Csat | None
    queue_rank: int | None
    open_key: str | None
    # the requesting user's, in replies to that user
    last_read_seq: int
    unread: int
    position: int  # in the support queue's listing (`queue`)


class Message(TypedDict, total=False):
    """A chat message as stored (docs/protocol.md, Messages)."""

    id: Required[str]
    conversation_id: Required[str]
    seq: int  # given by the store: 1, 2, 3, ... with no gaps
    client_msg_id: Required[str]
    sender: Required[Sender]
    kind: Required[str]  # text | image | system
    body: Required[str]
    ts: Required[int]
    masked_body: str  # stored only: what the other party of an order chat sees
    masked: bool  # staff's view: the other party saw masked_body
    order_event: dict[str, Any]  # system cards: the order event's seq, type, state, ts, actor

STAFF: Final = frozenset({"agent", "admin"})
# Who sees originals (and the `masked` flag): staff and the business backend.
SEES_ORIGINALS: Final = frozenset({"agent", "admin", "service"})
# Fields of a stored conversation that are bookkeeping, not for the wire
# (`read`: the read markers of earlier versions, now ignored; storage/chat.py).
_INTERNAL: Final = ("read", "queue_rank", "open_key", "_id")


def conversation_view(conv: Conversation, last_read: int | None = None) -> Conversation:
    """The conversation on the wire; with `last_read` (the viewer's marker) also
    `last_read_seq` and `unread`."""
    out = cast(Conversation, {k: v for k, v in conv.items() if k not in _INTERNAL})
    if last_read is not None:
        out["last_read_seq"] = last_read
        out["unread"] = max(0, int(conv.get("last_seq", 0)) - last_read)
    return out


def message_view(msg: Message, viewer: Actor) -> Message:
    """What `viewer` sees: the other party of an order chat gets contact
    details masked; the sender and staff see the original (staff also see
    that it was masked)."""
    out = cast(Message, {k: v for k, v in msg.items() if k not in ("masked_body", "_id")})
    masked = msg.get("masked_body")
    if masked is not None:
        if viewer.role in SEES_ORIGINALS:
            out["masked"] = True
        elif viewer.id != msg["sender"]["id"]:
            out["body"] = masked
    return out


def is_participant(actor: Actor, conv: Conversation) -> bool:
    if actor.role == "customer":
        return bool(conv["customer_id"] == actor.id)
    if actor.role == "technician":
        return conv["kind"] == "order" and conv.get("technician_id") == actor.id
    return False


def can_read(actor: Actor, conv: Conversation) -> bool:
    """Participants, and staff (agents may open any conversation to help)."""
    return actor.role in STAFF or is_participant(actor, conv)


def check_write(actor: Actor, conv: Conversation) -> None:
    """Who may post: participants; in a support chat its assigned agent; in
    an order chat any agent who joined; admins always."""
    if actor.role == "admin" or is_participant(actor, conv):
        return
    if actor.role == "agent":
        if conv["kind"] == "support" and conv.get("assignee") == actor.id:
            return
        if conv["kind"] == "order" and actor.id in conv.get("staff", []):
            return
    raise Forbidden("you may not post in this conversation")
