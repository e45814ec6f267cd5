"""MongoDB stores of feedback items and of technicians' rating aggregates
(docs/feedback.md).

- `feedback`: the items; `feedback_events`: every step, unique on
  (feedback_id, seq); `feedback_daily`: one rollup per day (the statistics'
  only read). A step's item update, its event, its rollup and its outbox
  record are one transaction.
- `technician_ratings`: one aggregate per technician, written in the rating
  order's own commit (MongoOrderStore's on_commit), with the follow-up item
  of a low rating.

Map keys in the rollups (tags, categories, terms) are user text: a `.` or a
leading `$` would be a path or an operator, so they are stored as the
full-width `．` and `＄` and turned back on reading.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from feedback import ratings
from feedback.model import OPEN
from feedback.service import Rollup
from orders.model import Event
from outbox.records import feedback_record
from storage.gate import GatedStore, StoreGate
from storage.mongo import run_txn, stage

FEEDBACK_INDEXES: Final[dict[str, list[IndexModel]]] = {
    "feedback": [
        # The inbox: overdue first, then newest; with each filter.
        IndexModel([("overdue", DESCENDING), ("ts", DESCENDING)]),
        IndexModel([("status", ASCENDING), ("overdue", DESCENDING), ("ts", DESCENDING)]),
        IndexModel([("assignee", ASCENDING), ("status", ASCENDING), ("ts", DESCENDING)]),
        IndexModel([("tags", ASCENDING), ("ts", DESCENDING)]),
        IndexModel([("category", ASCENDING), ("ts", DESCENDING)]),
        # The inbox's search (q= is one of an item's terms): without it a search
        # read every item (100,000: 5.4 s on the embedded store, past the
        # store deadline; docs/benchmarks.md, issue 19).
        IndexModel([("terms", ASCENDING), ("ts", DESCENDING)]),
        # The export (a period by creation time) and the author's own items.
        IndexModel([("ts", DESCENDING)]),
        IndexModel([("user.id", ASCENDING), ("ts", DESCENDING)]),
        # The SLA sweep: items still waiting on a first response, by due time.
        IndexModel([("sla_due_ts", ASCENDING)]),
        # Follow-ups waiting for an agent.
        IndexModel([("auto_route", ASCENDING), ("ts", ASCENDING)]),
        IndexModel([("technician_id", ASCENDING), ("ts", DESCENDING)]),
    ],
    "feedback_events": [
        IndexModel([("feedback_id", ASCENDING), ("seq", ASCENDING)], unique=True),
    ],
}


def enc(key: str) -> str:
    key = key.replace(".", "．")
    return "＄" + key[1:] if key.startswith("$") else key


def dec(key: str) -> str:
    key = key.replace("．", ".")
    return "$" + key[1:] if key.startswith("＄") else key


def _item(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc["id"] = doc.pop("_id")
    return doc


def _event(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc.pop("_id", None)
    return doc


def _rollup_update(rollup: Rollup) -> dict[str, Any]:
    inc: dict[str, int] = {f"{kind}.{enc(k)}": n for kind, counts in rollup.inc.items()
                           for k, n in counts.items() if n}
    if rollup.created:
        inc["n"] = rollup.created
    update: dict[str, Any] = {}
    if inc:
        update["$inc"] = inc
    if rollup.push:
        update["$push"] = dict(rollup.push)
    return update


async def write_rollup(db: AsyncDatabase[dict[str, Any]], session: AsyncClientSession,
                       rollup: Rollup | None) -> None:
    if rollup is None:
        return
    update = _rollup_update(rollup)
    if update:
        await db["feedback_daily"].update_one({"_id": rollup.day}, update, upsert=True,
                                              session=session)


async def insert_in(db: AsyncDatabase[dict[str, Any]], session: AsyncClientSession,
                    item: dict[str, Any], event: dict[str, Any], rollup: Rollup) -> None:
    """A new item, its first event, its rollup and its record, in the
    caller's transaction."""
    doc = dict(item)
    doc["_id"] = doc.pop("id")
    await db["feedback"].insert_one(doc, session=session)
    await db["feedback_events"].insert_one(dict(event), session=session)
    await write_rollup(db, session, rollup)
    await stage(db, session, [feedback_record(item, event)])


async def in_txn(client: AsyncMongoClient[dict[str, Any]],
                 fn: Callable[[AsyncClientSession], Awaitable[Any]]) -> Any:
    """A transaction that may be the first to upsert a day's rollup: two
    such racing, one fails on the unique _id; it runs again (it then
    updates the other's)."""
    try:
        return await run_txn(client, fn)
    except DuplicateKeyError as exc:
        if "feedback_daily" not in str(exc):
            raise
        return await run_txn(client, fn)


class MongoFeedbackStore(GatedStore):  # every public method goes through the store gate
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
                 gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._client = client
        self._db = db
        self._items = db["feedback"]
        self._events = db["feedback_events"]
        self._daily = db["feedback_daily"]

    async def ensure_indexes(self) -> None:
        for name, models in FEEDBACK_INDEXES.items():
            await self._db[name].create_indexes(models)

    async def insert(self, item: dict[str, Any], event: dict[str, Any], rollup: Rollup) -> bool:
        async def txn(session: AsyncClientSession) -> None:
            await insert_in(self._db, session, item, event, rollup)

        try:
            await in_txn(self._client, txn)
        except DuplicateKeyError:
            return False
        return True

    async def get(self, feedback_id: str) -> dict[str, Any] | None:
        doc = await self._items.find_one({"_id": feedback_id})
        return _item(doc) if doc else None

    async def commit(self, feedback_id: str, expected_seq: int, changes: dict[str, Any],
                     event: dict[str, Any], rollup: Rollup | None) -> dict[str, Any] | None:
        async def txn(session: AsyncClientSession) -> dict[str, Any] | None:
            doc = await self._items.find_one_and_update(
                {"_id": feedback_id, "seq": expected_seq}, {"$set": changes},
                return_document=ReturnDocument.AFTER, session=session)
            if doc is None:
                return None
            await self._events.insert_one(dict(event), session=session)
            await write_rollup(self._db, session, rollup)
            item = _item(doc)
            await stage(self._db, session, [feedback_record(item, event)])
            return item

        try:
            return await in_txn(self._client, txn)  # type: ignore[no-any-return]
        except DuplicateKeyError:
            return None  # another node wrote this seq first: decide again

    async def events(self, feedback_id: str, since_seq: int, limit: int,
                     public: bool) -> list[dict[str, Any]]:
        if public:
            query: dict[str, Any] = {"feedback_id": feedback_id, "user_seq": {"$gt": since_seq}}
            order = "user_seq"
        else:
            query, order = {"feedback_id": feedback_id, "seq": {"$gt": since_seq}}, "seq"
        cursor = self._events.find(query).sort(order, ASCENDING).limit(limit)
        return [_event(d) async for d in cursor]

    async def search(self, query: dict[str, Any], offset: int, limit: int) -> list[dict[str, Any]]:
        """The inbox: `status`, `assignee` ("none": nobody's), `tag`,
        `category`, `priority`, `overdue`, `q` (a term), `technician_id`;
        overdue first, then newest."""
        find: dict[str, Any] = {}
        for key in ("status", "category", "priority", "technician_id", "order_id"):
            if query.get(key) is not None:
                find[key] = query[key]
        if query.get("assignee") is not None:
            find["assignee"] = None if query["assignee"] == "none" else query["assignee"]
        if query.get("tag") is not None:
            find["tags"] = query["tag"]
        if query.get("overdue") is not None:
            find["overdue"] = bool(query["overdue"])
        if query.get("open"):
            find["status"] = {"$in": sorted(OPEN)}
        if query.get("q"):
            find["terms"] = str(query["q"]).lower()
        cursor = self._items.find(find, {"terms": 0}).sort(
            [("overdue", DESCENDING), ("ts", DESCENDING)]).skip(offset).limit(limit)
        return [_item(d) async for d in cursor]

    async def mine(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._items.find({"user.id": user_id}, {"terms": 0}).sort("ts", DESCENDING) \
            .limit(limit)
        return [_item(d) async for d in cursor]

    async def due(self, now: int, limit: int) -> list[dict[str, Any]]:
        cursor = self._items.find({"sla_due_ts": {"$lte": now}, "overdue": False},
                                  {"_id": 1}).sort("sla_due_ts", ASCENDING).limit(limit)
        return [_item(d) async for d in cursor]

    async def unrouted(self, limit: int) -> list[dict[str, Any]]:
        cursor = self._items.find({"auto_route": True, "assignee": None}, {"_id": 1}) \
            .sort("ts", ASCENDING).limit(limit)
        return [_item(d) async for d in cursor]

    async def open_loads(self) -> dict[str, int]:
        pipeline: list[dict[str, Any]] = [
            {"$match": {"status": {"$in": sorted(OPEN)}, "assignee": {"$ne": None}}},
            {"$group": {"_id": "$assignee", "n": {"$sum": 1}}}]
        cursor = await self._items.aggregate(pipeline)
        return {str(d["_id"]): int(d["n"]) async for d in cursor}

    async def days(self, keys: list[str],
                   fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """The rollups of these days (only `fields` of each, when given)."""
        out = []
        projection = {f: 1 for f in fields} if fields else None
        async for d in self._daily.find({"_id": {"$in": keys}}, projection):
            for kind in ("status", "category", "tag", "term", "source"):
                if isinstance(d.get(kind), dict):
                    d[kind] = {dec(k): v for k, v in d[kind].items()}
            out.append(d)
        return out

    async def in_period(self, from_ts: int, to_ts: int) -> AsyncIterator[dict[str, Any]]:
        # Not gated as one operation (a long export would hold a turn): each
        # batch the cursor fetches is bounded by the client's timeouts.
        cursor = self._items.find({"ts": {"$gte": from_ts, "$lt": to_ts}}, {"terms": 0}) \
            .sort("ts", ASCENDING).batch_size(500)
        async for d in cursor:
            yield _item(d)


FollowUp = Callable[[dict[str, Any], dict[str, Any]],
                    Awaitable[tuple[dict[str, Any], dict[str, Any], Rollup]]]


class MongoRatingStore(GatedStore):
    """Technicians' aggregates (feedback/ratings.py), and the fleet's totals
    (`rating_fleet`, one document) for the Bayesian prior's mean.

    The fleet's totals are incremented just after the rating's commit, not
    inside it: one document written by every rating would make concurrent
    ratings' transactions conflict. A node that dies between the two leaves
    the fleet's mean one rating short (a technician's own aggregate is never
    short); `ensure_indexes` rebuilds the totals from the aggregates when
    they are missing. Read at most once a second per node."""

    FLEET_TTL_MS: Final = 1_000

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], db: AsyncDatabase[dict[str, Any]],
                 gate: StoreGate | None = None, follow_up: FollowUp | None = None) -> None:
        self._gate = gate
        self._client = client
        self._db = db
        self._aggs = db["technician_ratings"]
        self._fleet_doc = db["rating_fleet"]
        self._orders = db["orders"]
        self._follow_up = follow_up
        self._fleet: tuple[int, float] | None = None  # (read at, mean)

    async def ensure_indexes(self) -> None:
        # A technician's recent comments: their rated orders, newest first.
        await self._orders.create_indexes([
            IndexModel([("technician_id", ASCENDING), ("rating.ts", DESCENDING)],
                       name="ratings_by_technician")])
        if await self._fleet_doc.find_one({"_id": "fleet"}) is None:
            cursor = await self._aggs.aggregate(
                [{"$group": {"_id": None, "n": {"$sum": "$n"}, "sum": {"$sum": "$sum"}}}])
            rows = [d async for d in cursor]
            n, total = (int(rows[0]["n"]), int(rows[0]["sum"])) if rows else (0, 0)
            with contextlib.suppress(DuplicateKeyError):  # another node did it meanwhile
                await self._fleet_doc.insert_one({"_id": "fleet", "n": n, "sum": total})

    async def order_committed(self, doc: dict[str, Any], event: Event, ts: int,
                              session: AsyncClientSession) -> None:
        """In the rating order's own transaction: its technician's aggregate,
        and the follow-up of a low rating."""
        if event["type"] != "rated" or not doc.get("technician_id"):
            return
        rating = dict(doc.get("rating") or {})
        tech = str(doc["technician_id"])
        agg = await self._aggs.find_one_and_update(
            {"_id": tech}, {"$inc": ratings.increments(rating), "$set": {"updated_ts": ts}},
            upsert=True, return_document=ReturnDocument.AFTER, session=session)
        stale = ratings.stale_days(agg or {}, ts)
        if stale:
            await self._aggs.update_one({"_id": tech}, {"$unset": {f"days.{d}": "" for d in stale}},
                                        session=session)
        if ratings.is_low(rating) and self._follow_up is not None:
            order = {**doc, "order_id": doc["_id"]}
            item, first, rollup = await self._follow_up(order, rating)
            await insert_in(self._db, session, item, first, rollup)

    async def count_in_fleet(self, stars: int) -> None:
        """After a rating's commit: the fleet's totals (class doc)."""
        await self._fleet_doc.update_one({"_id": "fleet"}, {"$inc": {"n": 1, "sum": int(stars)}},
                                         upsert=True)
        self._fleet = None

    async def fleet_mean(self, now: int) -> float:
        cached = self._fleet
        if cached is not None and now - cached[0] < self.FLEET_TTL_MS:
            return cached[1]
        doc = await self._fleet_doc.find_one({"_id": "fleet"}) or {}
        n = int(doc.get("n", 0))
        mean = float(doc.get("sum", 0)) / n if n else ratings.DEFAULT_FLEET_MEAN
        self._fleet = (now, mean)
        return mean

    async def aggregates(self, technician_ids: list[str], now: int) -> dict[str, dict[str, Any]]:
        """Each technician's aggregate as shown (one with no rating: the prior's)."""
        if not technician_ids:
            return {}
        fleet = await self.fleet_mean(now)
        docs = {d["_id"]: d async for d in self._aggs.find({"_id": {"$in": technician_ids}})}
        return {t: ratings.aggregate(docs.get(t), fleet, now) for t in technician_ids}

    async def recent(self, technician_id: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._orders.find(
            {"technician_id": technician_id, "rating.ts": {"$exists": True}},
            {"rating": 1, "service": 1}).sort("rating.ts", DESCENDING).limit(limit)
        out = []
        async for d in cursor:
            out.append({"order_id": d["_id"], "service": (d.get("service") or {}).get("name"),
                        **d["rating"]})
        return out
