"""MongoDB store of conversations and messages.

A message and its conversation's `last_seq` are written in one transaction,
so seqs are gap-free; `(conversation_id, sender.id, client_msg_id)` is a
unique index, so a retried send stores nothing twice, ever.

Read markers live in `chat_reads`, one record per (conversation, user): a
user id is only ever a value, never a field name, so any string is a valid
id. (Conversations of earlier versions kept them as `read.<user id>`; those
fields are ignored: markers start again from 0.) A marker is written apart
from the conversation, so marking read never conflicts with the transaction
that appends a message.
"""

from __future__ import annotations

import time
from typing import Any, cast

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from chat.model import Conversation, Message
from outbox.records import csat_record, message_record
from storage.gate import GatedStore, StoreGate
from storage.mongo import Observe, _no_observe, run_txn, stage

CHAT_INDEXES: dict[str, list[IndexModel]] = {
    "conversations": [
        # One open support conversation per customer: open_key is the
        # customer id while open and absent once closed.
        IndexModel([("open_key", ASCENDING)], unique=True, sparse=True),
        IndexModel([("status", ASCENDING), ("queue_rank", ASCENDING)]),
        IndexModel([("assignee", ASCENDING), ("status", ASCENDING)]),
        IndexModel([("customer_id", ASCENDING), ("updated_ts", DESCENDING)]),
        IndexModel([("technician_id", ASCENDING), ("updated_ts", DESCENDING)]),
        # CSAT per agent and week (GET /api/chat/csat).
        IndexModel([("csat.ts", ASCENDING)]),
    ],
    "messages": [
        IndexModel([("conversation_id", ASCENDING), ("seq", ASCENDING)], unique=True),
        IndexModel([("conversation_id", ASCENDING), ("sender.id", ASCENDING),
                    ("client_msg_id", ASCENDING)], unique=True),
    ],
    "chat_reads": [
        IndexModel([("conversation_id", ASCENDING), ("user", ASCENDING)], unique=True),
    ],
}


def _out(doc: dict[str, Any] | None) -> Conversation | None:
    if doc is None:
        return None
    doc = dict(doc)
    doc["conversation_id"] = doc.pop("_id")
    return cast(Conversation, doc)


def _conv(doc: dict[str, Any]) -> Conversation:
    doc = dict(doc)
    doc["conversation_id"] = doc.pop("_id")
    return cast(Conversation, doc)


def _msg(doc: dict[str, Any]) -> Message:
    doc = dict(doc)
    doc["id"] = doc.pop("_id")
    return cast(Message, doc)


class MongoChatStore(GatedStore):  # every public method goes through the store gate
    def __init__(self, client: AsyncMongoClient[dict[str, Any]],
                 db: AsyncDatabase[dict[str, Any]], observe: Observe = _no_observe,
                 gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._client = client
        self._db = db
        self._convs = db["conversations"]
        self._msgs = db["messages"]
        self._reads = db["chat_reads"]
        self._observe = observe

    async def ensure_indexes(self) -> None:
        for name, models in CHAT_INDEXES.items():
            await self._convs.database[name].create_indexes(models)

    # -- conversations ---------------------------------------------------
    async def get(self, conv_id: str) -> Conversation | None:
        return _out(await self._convs.find_one({"_id": conv_id}))

    async def insert_open(self, conv: Conversation) -> tuple[Conversation, bool]:
        """Insert unless the same open_key (or id) exists; returns (conv, created)."""
        doc = dict(conv)
        doc["_id"] = doc.pop("conversation_id")
        try:
            await self._convs.insert_one(doc)
            return _out(doc) or conv, True
        except DuplicateKeyError:
            query = {"open_key": conv["open_key"]} if conv.get("open_key") else {"_id": doc["_id"]}
            existing = await self._convs.find_one(query)
            if existing is None:  # closed in between: try once more
                await self._convs.insert_one(doc)
                return _out(doc) or conv, True
            return _out(existing) or conv, False

    async def update(self, conv_id: str, expect: dict[str, Any], changes: dict[str, Any],
                     unset: tuple[str, ...] = ()) -> Conversation | None:
        """Apply changes only if the conversation still matches `expect`."""
        update: dict[str, Any] = {"$set": changes}
        if unset:
            update["$unset"] = dict.fromkeys(unset, "")
        return _out(await self._convs.find_one_and_update(
            {"_id": conv_id, **expect}, update, return_document=ReturnDocument.AFTER))

    async def add_staff(self, conv_id: str, agent_id: str) -> None:
        await self._convs.update_one({"_id": conv_id}, {"$addToSet": {"staff": agent_id}})

    async def set_read(self, conv_id: str, user_id: str, seq: int) -> int:
        """Move the user's marker forward only; returns the marker now stored."""
        query = {"conversation_id": conv_id, "user": user_id}
        try:
            doc = await self._set_read(query, seq)
        except DuplicateKeyError:
            # Two first markers of one user raced to insert: the record exists now.
            doc = await self._set_read(query, seq)
        return int(doc["seq"]) if doc else 0

    async def _set_read(self, query: dict[str, Any], seq: int) -> dict[str, Any] | None:
        return await self._reads.find_one_and_update(
            query, {"$max": {"seq": seq}}, projection={"_id": 0, "seq": 1}, upsert=True,
            return_document=ReturnDocument.AFTER)

    async def read_markers(self, user_id: str, conv_ids: list[str]) -> dict[str, int]:
        """The user's markers in these conversations (absent: nothing read)."""
        if not conv_ids:
            return {}
        cursor = self._reads.find({"conversation_id": {"$in": conv_ids}, "user": user_id},
                                  projection={"_id": 0, "conversation_id": 1, "seq": 1})
        return {d["conversation_id"]: int(d["seq"]) async for d in cursor}

    async def queued(self, limit: int) -> list[Conversation]:
        cursor = self._convs.find({"status": "queued"}).sort("queue_rank", ASCENDING).limit(limit)
        return [_conv(d) async for d in cursor]

    async def queue_position(self, conv: Conversation) -> int:
        ahead = await self._convs.count_documents(
            {"status": "queued", "queue_rank": {"$lt": conv["queue_rank"]}})
        return ahead + 1

    async def assigned_to(self, agent_id: str) -> list[Conversation]:
        cursor = self._convs.find({"assignee": agent_id, "status": "assigned"})
        return [_conv(d) async for d in cursor]

    async def load_by_agent(self) -> dict[str, int]:
        """Assigned (open) support conversations per agent."""
        cursor = await self._convs.aggregate([
            {"$match": {"status": "assigned"}},
            {"$group": {"_id": "$assignee", "n": {"$sum": 1}}},
        ])
        return {d["_id"]: int(d["n"]) async for d in cursor if d["_id"]}

    async def for_user(self, field: str, user_id: str, limit: int) -> list[Conversation]:
        cursor = self._convs.find({field: user_id}).sort("updated_ts", DESCENDING).limit(limit)
        return [_conv(d) async for d in cursor]

    # -- messages --------------------------------------------------------
    async def find_by_client_id(self, conv_id: str, sender_id: str, cmid: str) -> Message | None:
        doc = await self._msgs.find_one(
            {"conversation_id": conv_id, "sender.id": sender_id, "client_msg_id": cmid})
        return _msg(doc) if doc else None

    async def append(self, conv_id: str, msg: Message) -> tuple[Message, bool]:
        """Store msg with the conversation's next seq; (stored, created). A
        duplicate client_msg_id returns the stored one and stores nothing."""
        doc = dict(msg)
        doc["_id"] = doc.pop("id")

        async def txn(session: AsyncClientSession) -> dict[str, Any]:
            conv = await self._convs.find_one_and_update(
                {"_id": conv_id}, {"$inc": {"last_seq": 1}, "$set": {"updated_ts": msg["ts"]}},
                projection={"last_seq": 1, "kind": 1, "order_id": 1, "customer_id": 1,
                            "technician_id": 1}, return_document=ReturnDocument.AFTER,
                session=session)
            if conv is None:
                raise LookupError(conv_id)
            stored = {**doc, "seq": conv["last_seq"]}
            await self._msgs.insert_one(stored, session=session)
            if stored.get("kind") != "system":
                # Order cards are announced as the order's own events.
                await stage(self._db, session, [message_record(conv, stored)])
            return stored

        t0 = time.perf_counter()
        try:
            stored = await run_txn(self._client, txn)
        except DuplicateKeyError:
            cmid = msg.get("client_msg_id")
            existing = await self.find_by_client_id(conv_id, msg["sender"]["id"], cmid) if cmid else None
            if existing is None:
                raise
            return existing, False
        finally:
            self._observe("message_append", time.perf_counter() - t0)
        return _msg(stored), True

    async def messages_after(self, conv_id: str, since_seq: int, limit: int) -> list[Message]:
        cursor = self._msgs.find({"conversation_id": conv_id, "seq": {"$gt": since_seq}}) \
            .sort("seq", ASCENDING).limit(limit)
        return [_msg(d) async for d in cursor]

    async def messages_before(self, conv_id: str, before_seq: int, limit: int) -> list[Message]:
        cursor = self._msgs.find({"conversation_id": conv_id, "seq": {"$lt": before_seq}}) \
            .sort("seq", DESCENDING).limit(limit)
        out = [_msg(d) async for d in cursor]
        out.reverse()
        return out

    async def set_csat(self, conv_id: str, csat: dict[str, Any]) -> Conversation | None:
        """Rate a closed conversation once, and announce it, in one transaction."""

        async def txn(session: AsyncClientSession) -> dict[str, Any] | None:
            doc = await self._convs.find_one_and_update(
                {"_id": conv_id, "status": "closed", "csat": None}, {"$set": {"csat": csat}},
                return_document=ReturnDocument.AFTER, session=session)
            if doc is not None:
                await stage(self._db, session, [csat_record(doc, csat)])
            return doc

        return _out(await run_txn(self._client, txn))

    async def csat_between(self, from_ts: int, to_ts: int,
                           agent_id: str | None) -> list[dict[str, Any]]:
        """The CSAT ratings given in [from_ts, to_ts): agent, stars, time."""
        query: dict[str, Any] = {"csat.ts": {"$gte": from_ts, "$lt": to_ts}}
        if agent_id is not None:
            query["assignee"] = agent_id
        cursor = self._convs.find(query, {"assignee": 1, "csat": 1})
        return [{"agent_id": d.get("assignee"), "stars": d["csat"]["stars"], "ts": d["csat"]["ts"]}
                async for d in cursor]
