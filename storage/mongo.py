"""MongoDB: connection, indexes, and the order store.

Order updates and their events are written in one transaction, so an event
exists exactly when the order's seq says it does. That needs a replica set
(MongoDB) or the embedded SecantusDB server, which supports transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from orders.lifecycle import TECHNICIAN_PHASE
from orders.model import Event, Order
from orders.service import JobInProgress, OrderExists, StaleWrite
from outbox.records import order_record
from storage.gate import GatedStore, StoreGate, transaction_interrupted

Observe = Callable[[str, float], None]
# Most orders one technician's day or queue holds that a read returns.
MAX_JOBS = 200
# What a technician's day needs of each order (tracking/service.py JOB_FIELDS).
JOB_PROJECTION = {k: 1 for k in ("seq", "state", "customer_id", "technician_id", "address",
                                  "window", "times", "late", "job_of")}
# An order's committed document and event, its time, and the transaction.
OnCommit = Callable[[dict[str, Any], Event, int, AsyncClientSession], Awaitable[None]]
# This node's turn on some keys (technician ids), held around a commit.
Turns = Callable[[list[str]], contextlib.AbstractAsyncContextManager[None]]
T = TypeVar("T")
# Write conflicts between concurrent transactions are retried this many
# times, all within the operation's deadline (storage/gate.py). A store that
# is down or too slow is not retried here: the client gets `unavailable`
# within REALTIME_MONGO_TIMEOUT_MS and retries itself. (PyMongo's
# with_transaction would keep retrying for up to 120 s, hanging the caller's ack.)
TXN_ATTEMPTS = 10


async def run_txn(client: AsyncMongoClient[dict[str, Any]],
                  fn: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
    for attempt in range(TXN_ATTEMPTS):
        session = client.start_session()
        handed_over = False
        try:
            async with await session.start_transaction():
                return await fn(session)
        except PyMongoError as exc:
            if exc.timeout or isinstance(exc, ConnectionFailure):
                # The abort may not have reached the store: the transaction
                # may still hold its writes there (the gate ends it).
                handed_over = transaction_interrupted(session)
                raise
            if not exc.has_error_label("TransientTransactionError") or attempt == TXN_ATTEMPTS - 1:
                raise
        finally:
            if not handed_over:
                await session.end_session()
        await asyncio.sleep(0.002 * (attempt + 1))
    raise AssertionError("unreachable")


async def stage(db: AsyncDatabase[dict[str, Any]], session: AsyncClientSession,
                records: list[dict[str, Any]]) -> None:
    """Write outbox records (outbox/records.py) inside the caller's
    transaction: a change is announced exactly when it is committed."""
    if records:
        await db["outbox"].insert_many([dict(r) for r in records], session=session)


def _no_observe(op: str, seconds: float) -> None:
    return None


def connect(url: str, timeout_ms: int) -> AsyncMongoClient[dict[str, Any]]:
    # What runs through the gate (every call of the stores below) is bounded
    # by its per-operation deadline (CSOT), which overrides these. They bound
    # the rest: the trail writer, start-up, health checks. No client-wide
    # timeoutMS: it would also cut off index builds at start-up (the server
    # aborts a createIndexes past its maxTimeMS), and a node with a new index
    # on a large collection would never start.
    return AsyncMongoClient(
        url,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=max(timeout_ms * 4, 10_000),
        # Fail fast instead of queueing behind a dead primary.
        waitQueueTimeoutMS=timeout_ms,
        tz_aware=False,
        appname="realtime",
    )


INDEXES: dict[str, list[IndexModel]] = {
    "orders": [
        IndexModel([("customer_id", ASCENDING), ("updated_ts", ASCENDING)]),
        IndexModel([("technician_id", ASCENDING), ("state", ASCENDING), ("updated_ts", DESCENDING)]),
        # One job under way per technician (orders/service.py sets `job_of`
        # to the technician while en route, arrived or in service).
        IndexModel([("job_of", ASCENDING)], unique=True, name="one_job_per_technician",
                   partialFilterExpression={"job_of": {"$type": "string"}}),
        # A technician's day (GET /api/technicians/{id}/day).
        IndexModel([("technician_id", ASCENDING), ("window.start_ts", ASCENDING)]),
        # Orders whose window began without an arrival (the overdue sweep).
        IndexModel([("state", ASCENDING), ("window.start_ts", ASCENDING)]),
        # The orders at risk of a late arrival (GET /api/orders/late).
        IndexModel([("late.minutes_late", DESCENDING)], name="late_orders",
                   partialFilterExpression={"late": {"$type": "object"}}),
    ],
    "order_events": [
        # The gap-free, duplicate-free per-order sequence.
        IndexModel([("order_id", ASCENDING), ("seq", ASCENDING)], unique=True),
    ],
}


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    for coll, models in INDEXES.items():
        await db[coll].create_indexes(models)


def order_out(doc: dict[str, Any]) -> Order:
    """A stored document as an Order (the store's boundary: what was written
    by OrderService is read back as such)."""
    doc = dict(doc)
    doc["order_id"] = doc.pop("_id")
    doc.pop("job_of", None)  # the store's own bookkeeping (one job at a time)
    return cast(Order, doc)


class MongoOrderStore(GatedStore):
    def __init__(self, client: AsyncMongoClient[dict[str, Any]],
                 db: AsyncDatabase[dict[str, Any]], observe: Observe = _no_observe,
                 gate: StoreGate | None = None, on_commit: OnCommit | None = None,
                 turns: Turns | None = None) -> None:
        self._gate = gate
        self._client = client
        # Run inside each commit's transaction (storage/schedules.py keeps the
        # technicians' schedules true to assignments and cancellations).
        self._on_commit = on_commit
        # Commits that assign a technician take turns on this node (a
        # backend planning a day assigns many orders to one technician at
        # once: racing, they would all rewrite one schedule and retry).
        self._turns = turns
        self._db = db
        self._orders = db["orders"]
        self._events = db["order_events"]
        self._observe = observe

    async def get(self, order_id: str) -> Order | None:
        t0 = time.perf_counter()
        doc = await self._orders.find_one({"_id": order_id})
        self._observe("order_get", time.perf_counter() - t0)
        return order_out(doc) if doc else None

    async def insert(self, order: Order, event: Event) -> None:
        doc = dict(order)
        doc["_id"] = doc.pop("order_id")

        async def txn(session: AsyncClientSession) -> None:
            await self._orders.insert_one(doc, session=session)
            await self._events.insert_one(dict(event), session=session)
            # Announced (webhooks, notifications) exactly when committed.
            await stage(self._db, session, [order_record(order, event)])

        t0 = time.perf_counter()
        try:
            await run_txn(self._client, txn)
        except DuplicateKeyError:
            existing = await self.get(order["order_id"])
            if existing is None:  # pragma: no cover - deleted in between
                raise
            raise OrderExists(existing) from None
        finally:
            self._observe("order_insert", time.perf_counter() - t0)

    async def commit(self, order_id: str, expected_seq: int, changes: dict[str, Any],
                     event: Event) -> Order:
        async def txn(session: AsyncClientSession) -> dict[str, Any] | None:
            doc = await self._orders.find_one_and_update(
                {"_id": order_id, "seq": expected_seq},
                {"$set": changes, "$inc": {"seq": 1}},
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            if doc is None:
                return None
            if self._on_commit is not None:
                await self._on_commit(doc, event, event["ts"], session)
            await self._events.insert_one(dict(event), session=session)
            await stage(self._db, session, [order_record(doc, event)])
            return doc

        keys = [str(k) for k in (changes.get("technician_id"),
                                 event["data"].get("previous_technician_id")) if k]
        turn = (self._turns(keys) if keys and self._turns is not None
                else contextlib.nullcontext())
        t0 = time.perf_counter()
        try:
            async with turn:
                doc = await run_txn(self._client, txn)
        except DuplicateKeyError as exc:
            tech = changes.get("job_of")
            if tech and "job_of" in ((exc.details or {}).get("keyPattern") or {}):
                other = await self._orders.find_one({"job_of": tech}, {"state": 1})
                if other is not None and other["_id"] != order_id:
                    raise JobInProgress(str(tech), other["_id"], other["state"]) from None
                # That job ended meanwhile: decide again on a fresh read.
            # Another node stored this seq first: the same as a stale read.
            raise StaleWrite(order_id) from None
        finally:
            self._observe("order_commit", time.perf_counter() - t0)
        if doc is None:
            raise StaleWrite(order_id)
        return order_out(doc)

    async def active_for_technician(self, technician_id: str) -> Order | None:
        """The order a technician is working on now (the newest, should the
        backend have given them two)."""
        t0 = time.perf_counter()
        doc = await self._orders.find_one(
            {"technician_id": technician_id, "state": {"$in": list(TECHNICIAN_PHASE)}},
            sort=[("updated_ts", DESCENDING)],
        )
        self._observe("order_active", time.perf_counter() - t0)
        return order_out(doc) if doc else None

    async def jobs_for_technician(self, technician_id: str) -> list[Order]:
        """The technician's orders in the technician phase: the one under
        way, if any, and the queued ones (tracking/day.py orders them)."""
        return (await self.jobs_among([technician_id])).get(technician_id, [])

    async def jobs_among(self, technician_ids: list[str]) -> dict[str, list[Order]]:
        if not technician_ids:
            return {}
        t0 = time.perf_counter()
        out: dict[str, list[Order]] = {}
        # One query (every connected technician's day is re-read each minute):
        # the jobs under way first (`job_of` is a string only for them; null
        # sorts before strings), then the queued ones, soonest first, so a
        # long queue never hides the current job.
        cursor = self._orders.find(
            {"technician_id": {"$in": technician_ids}, "state": {"$in": list(TECHNICIAN_PHASE)}},
            JOB_PROJECTION, sort=[("job_of", DESCENDING), ("window.start_ts", ASCENDING)],
            limit=MAX_JOBS * len(technician_ids))
        async for doc in cursor:
            out.setdefault(doc["technician_id"], []).append(order_out(doc))
        self._observe("order_jobs", time.perf_counter() - t0)
        return out

    async def day_of(self, from_ts: int, to_ts: int, limit: int = MAX_JOBS,
                     technician_id: str | None = None) -> list[Order]:
        """The orders of one technician (or of every technician) whose window
        starts in [from_ts, to_ts), cancelled ones left out, in window order."""
        cursor = self._orders.find(
            {"technician_id": technician_id or {"$type": "string"},
             "window.start_ts": {"$gte": from_ts, "$lt": to_ts}, "state": {"$ne": "cancelled"}},
            sort=[("window.start_ts", ASCENDING)], limit=limit)
        return [order_out(doc) async for doc in cursor]

    async def overdue_orders(self, started_after: int, started_before: int,
                             limit: int) -> list[Order]:
        """Orders still ahead of their arrival whose window began between
        the two times, the most recent first (a backlog never hides a new
        one)."""
        cursor = self._orders.find(
            {"state": {"$in": ["assigned", "en_route"]},
             "window.start_ts": {"$gte": started_after, "$lt": started_before}},
            sort=[("window.start_ts", DESCENDING)], limit=limit)
        return [order_out(doc) async for doc in cursor]

    async def late_orders(self, limit: int) -> list[Order]:
        """Orders flagged `late_risk` whose arrival is still ahead, latest first."""
        cursor = self._orders.find(
            {"late": {"$type": "object"}, "state": {"$in": ["assigned", "en_route"]}},
            sort=[("late.minutes_late", DESCENDING)], limit=limit)
        return [order_out(doc) async for doc in cursor]

    async def busy_among(self, technician_ids: list[str],
                         states: frozenset[str] = TECHNICIAN_PHASE) -> set[str]:
        """Which of these technicians have an order in one of `states`."""
        if not technician_ids:
            return set()
        cursor = self._orders.find(
            {"technician_id": {"$in": technician_ids}, "state": {"$in": list(states)}},
            {"technician_id": 1})
        return {d["technician_id"] async for d in cursor}

    async def events(self, order_id: str, since_seq: int, limit: int) -> list[Event]:
        t0 = time.perf_counter()
        cursor = self._events.find(
            {"order_id": order_id, "seq": {"$gt": since_seq}}, {"_id": 0}
        ).sort("seq", ASCENDING).limit(limit)
        out = [cast(Event, doc) async for doc in cursor]
        self._observe("order_events", time.perf_counter() - t0)
        return out
