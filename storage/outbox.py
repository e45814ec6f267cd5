"""The outbox in MongoDB: records, leases, deliveries, webhook endpoints,
notifications, push subscriptions and preferences (docs/webhooks.md,
docs/notifications.md).

The other stores write records inside their own transactions with
`storage.mongo.stage`: a record exists exactly when its change does. This
store serves the relay (outbox/relay.py) and the HTTP API.

Deliveries of one chain (an endpoint and an order, say) go out in `pos`
order: the head is `pending` (due at `next_ts`), the ones behind it
`waiting`; a finished head (delivered or dead) promotes the next. `open`
marks the chain's unfinished ones (a partial index finds a chain's state in
one look)."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable
from typing import Any, Final

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from storage.gate import GatedStore, StoreGate
from storage.mongo import run_txn

# How long finished records and deliveries are kept (the deliveries log,
# replay): delivered a week, dead letters a month.
KEEP_DONE: Final = dt.timedelta(days=7)
KEEP_DEAD: Final = dt.timedelta(days=30)
# Notifications stay in the inbox this long, read or not.
KEEP_NOTIFICATIONS: Final = dt.timedelta(days=30)
# Attempts kept per delivery (the newest).
MAX_ATTEMPTS_KEPT: Final = 20
# Most notifications one user's inbox keeps unread: past it, the count says
# 500 and reading the inbox marks the older ones read (a user away for
# months does not grow an unbounded badge).
MAX_INBOX: Final = 500

# Compound indexes led by the state field rather than partial ones: the
# open records and deliveries are few and found as well, and every store
# serves them (the embedded one plans no partial index).
INDEXES: dict[str, list[IndexModel]] = {
    "outbox": [
        IndexModel([("done", ASCENDING), ("part", ASCENDING), ("ts", ASCENDING)], name="undone"),
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0),
    ],
    "outbox_leases": [],
    "outbox_nodes": [],
    "deliveries": [
        # Due heads of a node's partitions; waiting ones (repair).
        IndexModel([("status", ASCENDING), ("part", ASCENDING), ("next_ts", ASCENDING)], name="due"),
        # A chain's open deliveries, in order.
        IndexModel([("chain", ASCENDING), ("open", ASCENDING), ("pos", ASCENDING)], name="chain"),
        IndexModel([("target", ASCENDING), ("ts", DESCENDING)]),
        IndexModel([("target", ASCENDING), ("status", ASCENDING), ("ts", ASCENDING)]),
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0),
    ],
    "webhook_endpoints": [],
    "notifications": [
        IndexModel([("user_id", ASCENDING), ("ts", DESCENDING)]),
        IndexModel([("user_id", ASCENDING), ("read", ASCENDING), ("ts", ASCENDING)], name="unread"),
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0),
    ],
    "push_subscriptions": [IndexModel([("user_id", ASCENDING)])],
    "notification_prefs": [],
}


def _later(delta: dt.timedelta) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None) + delta


def subscription_id(endpoint: str) -> str:
    return "sub_" + hashlib.sha256(endpoint.encode()).hexdigest()[:24]


class MongoOutboxStore(GatedStore):
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
                 gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._client = client
        self._db = db
        self._records = db["outbox"]
        self._leases = db["outbox_leases"]
        self._nodes = db["outbox_nodes"]
        self._deliveries = db["deliveries"]
        self._endpoints = db["webhook_endpoints"]
        self._notes = db["notifications"]
        self._subs = db["push_subscriptions"]
        self._prefs = db["notification_prefs"]

    async def ensure_indexes(self) -> None:
        for coll, models in INDEXES.items():
            if models:
                await self._db[coll].create_indexes(models)

    # -- leases ------------------------------------------------------------
    async def heartbeat(self, node: str, now: int, until: int) -> int:
        """Say this node is alive until `until`; how many nodes are alive."""
        await self._nodes.update_one({"_id": node}, {"$set": {"until": until}}, upsert=True)
        await self._nodes.delete_many({"until": {"$lt": now - 60_000}})
        return await self._nodes.count_documents({"until": {"$gte": now}})

    async def leave(self, node: str) -> None:
        await self._nodes.delete_one({"_id": node})
        await self._leases.update_many({"owner": node}, {"$set": {"until": 0}})

    async def renew(self, node: str, now: int, until: int) -> set[int]:
        """Extend this node's unexpired leases; the partitions it holds."""
        await self._leases.update_many({"owner": node, "until": {"$gte": now}},
                                       {"$set": {"until": until}})
        return {int(d["_id"]) async for d in self._leases.find({"owner": node, "until": {"$gte": until}})}

    async def claim(self, part: int, node: str, now: int, until: int) -> bool:
        """Take a partition whose lease expired (or was never taken)."""
        res = await self._leases.update_one(
            {"_id": part, "$or": [{"owner": node}, {"until": {"$lt": now}}]},
            {"$set": {"owner": node, "until": until}})
        if res.matched_count:
            return True
        try:
            await self._leases.insert_one({"_id": part, "owner": node, "until": until})
        except DuplicateKeyError:
            return False
        return True

    async def release(self, part: int, node: str) -> None:
        await self._leases.update_one({"_id": part, "owner": node}, {"$set": {"until": 0}})

    async def free_parts(self, now: int) -> set[int]:
        """Partitions held by nobody now (expired or released); never-taken
        ones are not listed (the caller knows the whole range)."""
        return {int(d["_id"]) async for d in self._leases.find({"until": {"$lt": now}}, {"_id": 1})}

    async def held_parts(self, now: int) -> set[int]:
        return {int(d["_id"]) async for d in self._leases.find({"until": {"$gte": now}}, {"_id": 1})}

    # -- records -----------------------------------------------------------
    async def undone(self, parts: Iterable[int], limit: int) -> list[dict[str, Any]]:
        cursor = self._records.find({"done": False, "part": {"$in": list(parts)}}) \
            .sort("ts", ASCENDING).limit(limit)
        return [d async for d in cursor]

    async def give_up(self, rec_id: str, reason: str) -> None:
        await self._records.update_one(
            {"_id": rec_id}, {"$set": {"done": True, "failed": reason, "expire_at": _later(KEEP_DEAD)}})

    async def notification_read(self, note_id: str) -> bool:
        doc = await self._notes.find_one({"_id": note_id}, {"read": 1})
        return bool(doc and doc.get("read"))

    async def oldest_undone_ts(self) -> int | None:
        doc = await self._records.find_one({"done": False}, {"ts": 1}, sort=[("ts", ASCENDING)])
        return int(doc["ts"]) if doc else None

    async def fan_out(self, rec_ids: list[str], deliveries: list[dict[str, Any]],
                      notifications: list[dict[str, Any]]) -> None:
        """In one transaction: the records' deliveries, their notifications,
        and the records marked done. Records done meanwhile (another node,
        during a lease hand-over) are left out. A delivery of an ordered
        chain that has an open delivery (or an earlier one in this batch)
        waits behind it; otherwise it is the head."""

        token = uuid.uuid4().hex

        async def txn(session: AsyncClientSession) -> None:
            marked = await self._records.update_many(
                {"_id": {"$in": rec_ids}, "done": False},
                {"$set": {"done": True, "expire_at": _later(KEEP_DONE), "by": token}},
                session=session)
            if marked.modified_count == len(rec_ids):
                undone = set(rec_ids)
            elif not marked.modified_count:
                return
            else:  # some were done meanwhile (a lease hand-over): only ours
                undone = {d["_id"] async for d in self._records.find(
                    {"_id": {"$in": rec_ids}, "by": token}, {"_id": 1}, session=session)}
            stored = [{k: v for k, v in d.items() if k != "source"} for d in deliveries
                      if d.get("source", d["msg_id"]) in undone]
            chains = sorted({d["chain"] for d in stored if d.get("ordered")})
            busy = {d["chain"] async for d in self._deliveries.find(
                {"chain": {"$in": chains}, "open": True}, {"chain": 1}, session=session)} \
                if chains else set()
            if busy:
                # Written, not only read: a head that finishes meanwhile
                # (storage's `_finish`, outside any transaction) conflicts
                # with this write, so either this transaction sees it
                # finished (and retries), or its finishing waits for this
                # commit and then promotes the deliveries inserted here.
                await self._deliveries.update_many(
                    {"chain": {"$in": sorted(busy)}, "open": True}, {"$set": {"behind": True}},
                    session=session)
            last: dict[str, dict[str, Any]] = {}
            for doc in stored:  # the caller gives each key's deliveries in pos order
                if doc.get("ordered"):
                    doc["status"] = "waiting" if doc["chain"] in busy else "pending"
                    busy.add(doc["chain"])
                    if doc["chain"] in last:  # an earlier one of this batch has this behind it
                        last[doc["chain"]]["behind"] = True
                    last[doc["chain"]] = doc
            if stored:
                await self._deliveries.insert_many(stored, session=session)
            notes = [n for n in notifications if n["source"] in undone]
            if notes:
                keep = _later(KEEP_NOTIFICATIONS)
                await self._notes.insert_many([{**n, "expire_at": keep} for n in notes],
                                              session=session)

        await run_txn(self._client, txn)

    # -- deliveries --------------------------------------------------------
    async def take_due(self, parts: Iterable[int], now: int, limit: int, node: str,
                       hold_ms: int, skip: list[str]) -> list[dict[str, Any]]:
        """Claim up to `limit` due heads of these partitions for `hold_ms`
        (their next_ts moves past the send's bound: no other node takes one
        while this one works on it)."""
        token = uuid.uuid4().hex
        query: dict[str, Any] = {"status": "pending", "part": {"$in": list(parts)},
                                 "next_ts": {"$lte": now}}
        if skip:
            query["target"] = {"$nin": skip}
        docs = [d async for d in self._deliveries.find(query).sort("next_ts", ASCENDING).limit(limit)]
        if not docs:
            return []
        ids = [d["_id"] for d in docs]
        res = await self._deliveries.update_many(
            {"_id": {"$in": ids}, "status": "pending", "next_ts": {"$lte": now}},
            {"$set": {"next_ts": now + hold_ms, "claim": token, "owner": node}})
        if res.modified_count == len(ids):
            return docs
        # Another node took some meanwhile (a lease hand-over): only ours.
        return [d async for d in self._deliveries.find({"_id": {"$in": ids}, "claim": token})]

    async def unclaim(self, ids: list[str], now: int) -> None:
        await self._deliveries.update_many({"_id": {"$in": ids}},
                                           {"$set": {"next_ts": now}, "$unset": {"claim": ""}})

    async def delivered(self, delivery: dict[str, Any], attempt: dict[str, Any],
                        now: int) -> dict[str, Any] | None:
        """Record the winning attempt; promote the next of the chain (returned)."""
        return await self._finish(delivery, {
            "$set": {"status": "delivered", "delivered_ts": now, "open": False,
                     "expire_at": _later(KEEP_DONE)},
            "$unset": {"claim": ""}, "$inc": {"tries": 1},
            "$push": {"attempts": {"$each": [attempt], "$slice": -MAX_ATTEMPTS_KEPT}}}, now)

    async def failed(self, delivery: dict[str, Any], attempt: dict[str, Any],
                     next_ts: int | None, now: int, dead_reason: str = "retries_exhausted"
                     ) -> dict[str, Any] | None:
        """Record a failed attempt: due again at next_ts, or (None) dead, and
        then the ones waiting behind it in its chain are dead too (they
        would otherwise go out of order); replay sends them again in order."""
        if next_ts is not None:
            await self._deliveries.update_one(
                {"_id": delivery["_id"]},
                {"$set": {"next_ts": next_ts}, "$unset": {"claim": ""}, "$inc": {"tries": 1},
                 "$push": {"attempts": {"$each": [attempt], "$slice": -MAX_ATTEMPTS_KEPT}}})
            return None
        return await self._finish(delivery, {
            "$set": {"status": "dead", "open": False, "dead_ts": now, "dead_reason": dead_reason,
                     "expire_at": _later(KEEP_DEAD)},
            "$unset": {"claim": ""}, "$inc": {"tries": 1},
            "$push": {"attempts": {"$each": [attempt], "$slice": -MAX_ATTEMPTS_KEPT}}}, now,
            dead=True)

    async def dropped(self, delivery_id: str, reason: str, now: int) -> None:
        """Not to be sent at all (expired, subscription gone, unsubscribed,
        read meanwhile, endpoint removed); an ordered chain moves on."""
        doc = await self._deliveries.find_one({"_id": delivery_id}, {"chain": 1, "ordered": 1})
        if doc is None:
            return
        await self._finish(doc, {
            "$set": {"status": "dropped", "open": False, "dead_ts": now, "dead_reason": reason,
                     "expire_at": _later(KEEP_DONE)}, "$unset": {"claim": ""}}, now)

    async def _finish(self, delivery: dict[str, Any], update: dict[str, Any], now: int,
                      dead: bool = False) -> dict[str, Any] | None:
        """End an open delivery; in an ordered chain, then make the next one
        the head (returned), or, for a dead one, end the ones waiting behind
        it. The first write waits for a fan-out transaction that is adding to
        this chain (it wrote this delivery: see `fan_out`), so what that
        transaction added is seen here. A node that dies between the two
        writes leaves the chain to `repair`."""
        if delivery.get("ordered"):
            # Most heads have nothing behind them: one write ends them. One
            # that a fan-out marked `behind` (or is marking: this write waits
            # for it) is not matched and takes the path below.
            res = await self._deliveries.update_one(
                {"_id": delivery["_id"], "open": True, "behind": {"$ne": True}}, update)
            if res.modified_count:
                return None
        res = await self._deliveries.update_one({"_id": delivery["_id"], "open": True}, update)
        if not res.modified_count or not delivery.get("ordered"):
            return None  # ended already (a repeat), or no chain to move
        if dead:
            await self._deliveries.update_many(
                {"chain": delivery["chain"], "open": True, "status": "waiting"},
                {"$set": {"status": "dead", "open": False, "dead_ts": now,
                          "dead_reason": "behind_dead", "expire_at": _later(KEEP_DEAD)}})
            return None
        return await self._promote(delivery["chain"], now)

    async def _promote(self, chain: str, now: int) -> dict[str, Any] | None:
        return await self._deliveries.find_one_and_update(
            {"chain": chain, "open": True, "status": "waiting"},
            {"$set": {"status": "pending", "next_ts": now}},
            sort=[("pos", ASCENDING)], return_document=ReturnDocument.AFTER)

    async def repair(self, parts: Iterable[int], suspects: dict[str, str], now: int,
                     limit: int) -> dict[str, str]:
        """Chains of these partitions with deliveries waiting and no head:
        those that were `suspects` (chain -> the delivery first in line) at
        the last look and still are, with the same delivery first in line,
        get it as their head (a node died between finishing a head and
        promoting the next). Returns the suspects of this look."""
        waiting = {d["chain"] async for d in self._deliveries.find(
            {"status": "waiting", "part": {"$in": list(parts)}}, {"chain": 1}).limit(limit)}
        if not waiting:
            return {}
        headed = {d["chain"] async for d in self._deliveries.find(
            {"chain": {"$in": sorted(waiting)}, "open": True, "status": "pending"}, {"chain": 1})}
        found: dict[str, str] = {}
        for chain in sorted(waiting - headed):
            first = await self._deliveries.find_one(
                {"chain": chain, "open": True, "status": "waiting"}, {"_id": 1}, sort=[("pos", ASCENDING)])
            if first is None:
                continue
            if suspects.get(chain) == first["_id"]:
                await self._deliveries.update_one({"_id": first["_id"], "status": "waiting"},
                                                  {"$set": {"status": "pending", "next_ts": now}})
            else:
                found[chain] = first["_id"]
        return found

    async def hurry(self, target: str, now: int) -> int:
        """The target answered again: its heads waiting out a backoff are due now."""
        res = await self._deliveries.update_many(
            {"target": target, "status": "pending", "next_ts": {"$gt": now}, "claim": {"$exists": False},
             "held": {"$ne": True}},
            {"$set": {"next_ts": now}})
        return int(res.modified_count)

    async def deliveries_of(self, target: str, status: str | None, before_ts: int | None,
                            limit: int) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"target": target}
        if status:
            query["status"] = status
        if before_ts is not None:
            query["ts"] = {"$lt": before_ts}
        cursor = self._deliveries.find(query, {"body": 0, "claim": 0}) \
            .sort("ts", DESCENDING).limit(limit)
        return [d async for d in cursor]

    async def replay(self, target: str, since_ts: int | None, msg_ids: list[str] | None,
                     now: int, limit: int) -> int:
        """Send again: the dead letters since `since_ts`, or the named
        events if they are finished (delivered, dead or dropped). Each
        chain's replayed deliveries go out in order, behind any of the chain
        still open."""
        query: dict[str, Any] = {"target": target, "open": {"$ne": True}}
        if msg_ids is not None:
            query["msg_id"] = {"$in": msg_ids}
            query["status"] = {"$in": ["dead", "delivered", "dropped"]}
        else:
            query["status"] = "dead"
            query["ts"] = {"$gte": since_ts or 0}
        docs = [d async for d in self._deliveries.find(query, {"_id": 1, "chain": 1, "ordered": 1})
                .sort("ts", ASCENDING).limit(limit)]
        if not docs:
            return 0

        n = 0
        by_chain: dict[str, list[dict[str, Any]]] = {}
        for d in docs:
            by_chain.setdefault(d["chain"], []).append(d)
        for chain, group in by_chain.items():
            ordered = bool(group[0].get("ordered"))
            res = await self._deliveries.update_many(
                {"_id": {"$in": [d["_id"] for d in group]}, "open": {"$ne": True}},
                {"$set": {"status": "waiting" if ordered else "pending", "open": True, "tries": 0,
                          "replayed_ts": now, "next_ts": now},
                 "$unset": {"expire_at": "", "dead_reason": "", "dead_ts": "", "claim": ""}})
            n += res.modified_count
            if ordered and res.modified_count and await self._deliveries.find_one(
                    {"chain": chain, "open": True, "status": "pending"}, {"_id": 1}) is None:
                await self._promote(chain, now)
        return n

    async def cancel_target(self, target: str, now: int) -> None:
        await self._deliveries.update_many(
            {"target": target, "open": True},
            {"$set": {"status": "dropped", "open": False, "dead_reason": "endpoint_removed",
                      "dead_ts": now, "expire_at": _later(KEEP_DONE)}})

    async def dead_count(self) -> int:
        return await self._deliveries.count_documents({"status": "dead"})

    # -- endpoints ---------------------------------------------------------
    async def put_endpoint(self, doc: dict[str, Any]) -> None:
        await self._endpoints.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    async def insert_endpoint(self, doc: dict[str, Any]) -> None:
        await self._endpoints.insert_one(doc)

    async def endpoints(self) -> list[dict[str, Any]]:
        return [d async for d in self._endpoints.find({}).sort("created_ts", ASCENDING)]

    async def endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        return await self._endpoints.find_one({"_id": endpoint_id})

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        res = await self._endpoints.delete_one({"_id": endpoint_id})
        return bool(res.deleted_count)

    # -- notifications -----------------------------------------------------
    async def inbox(self, user_id: str, unread_only: bool, before_ts: int | None,
                    limit: int) -> tuple[list[dict[str, Any]], int]:
        query: dict[str, Any] = {"user_id": user_id}
        if unread_only:
            query["read"] = False
        if before_ts is not None:
            query["ts"] = {"$lt": before_ts}
        # Notifications of one batch share `ts`: their events' times order them.
        items = [d async for d in self._notes.find(query)
                 .sort([("ts", DESCENDING), ("event_ts", DESCENDING)]).limit(limit)]
        unread = await self._notes.count_documents({"user_id": user_id, "read": False},
                                                   limit=MAX_INBOX)
        return items, unread

    async def mark_read(self, user_id: str, ids: list[str] | None, now: int) -> int:
        query: dict[str, Any] = {"user_id": user_id, "read": False}
        if ids is not None:
            query["_id"] = {"$in": ids}
        res = await self._notes.update_many(query, {"$set": {"read": True, "read_ts": now}})
        return int(res.modified_count)

    async def unread_of(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._notes.find({"user_id": user_id, "read": False}) \
            .sort([("ts", ASCENDING), ("event_ts", ASCENDING)]).limit(limit)
        return [d async for d in cursor]

    async def trim_inbox(self, user_id: str) -> None:
        """Past MAX_INBOX unread, the oldest count as read."""
        cursor = self._notes.find({"user_id": user_id, "read": False}, {"_id": 1}) \
            .sort("ts", DESCENDING).skip(MAX_INBOX).limit(1000)
        old = [d["_id"] async for d in cursor]
        if old:
            await self._notes.update_many({"_id": {"$in": old}}, {"$set": {"read": True}})

    # -- push subscriptions and preferences --------------------------------
    async def subscribe(self, user_id: str, endpoint: str, keys: dict[str, str], now: int,
                        max_per_user: int) -> tuple[dict[str, Any], bool]:
        """Store a browser's subscription for this user (the same endpoint
        moves to the newest user who signs in there); (doc, created)."""
        sid = subscription_id(endpoint)
        doc = {"_id": sid, "user_id": user_id, "endpoint": endpoint, "keys": keys, "created_ts": now}
        old = await self._subs.find_one_and_replace({"_id": sid}, doc, upsert=True)
        cursor = self._subs.find({"user_id": user_id}, {"_id": 1}).sort("created_ts", DESCENDING) \
            .skip(max_per_user)
        extra = [d["_id"] async for d in cursor]
        if extra:
            await self._subs.delete_many({"_id": {"$in": extra}})
        return doc, old is None

    async def unsubscribe(self, user_id: str, endpoint: str) -> bool:
        res = await self._subs.delete_one({"_id": subscription_id(endpoint), "user_id": user_id})
        return bool(res.deleted_count)

    async def forget_subscription(self, sub_id: str) -> None:
        await self._subs.delete_one({"_id": sub_id})

    async def subscriptions_of(self, user_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        if user_ids:
            async for d in self._subs.find({"user_id": {"$in": user_ids}}):
                out.setdefault(d["user_id"], []).append(d)
        return out

    async def subscription(self, sub_id: str) -> dict[str, Any] | None:
        return await self._subs.find_one({"_id": sub_id})

    async def prefs_of(self, user_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not user_ids:
            return {}
        return {d["_id"]: d async for d in self._prefs.find({"_id": {"$in": user_ids}})}

    async def set_prefs(self, user_id: str, prefs: dict[str, Any]) -> dict[str, Any]:
        doc = await self._prefs.find_one_and_update(
            {"_id": user_id}, {"$set": prefs}, upsert=True, return_document=ReturnDocument.AFTER)
        return dict(doc or {})

    async def mute(self, user_id: str, conversation_id: str, muted: bool) -> None:
        op = "$addToSet" if muted else "$pull"
        await self._prefs.update_one({"_id": user_id}, {op: {"muted_conversations": conversation_id}},
                                     upsert=True)

