"""Dispatch rounds in MongoDB: one document per round, with every technician
considered and what became of them."""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from kernel.clock import now_ms
from kernel.errors import Conflict
from outbox.records import offer_record
from storage.gate import GatedStore, StoreGate
from storage.mongo import run_txn, stage

INDEXES = [
    IndexModel([("order_id", ASCENDING), ("created_ts", ASCENDING)]),
    # At most one running round per order.
    IndexModel([("order_id", ASCENDING)], unique=True, name="one_running",
               partialFilterExpression={"status": "running"}),
]


def _out(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    doc = dict(doc)
    doc["dispatch_id"] = doc.pop("_id")
    return doc


class MongoDispatchStore(GatedStore):
    def __init__(self, db: AsyncDatabase[dict[str, Any]], gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._db = db
        self._c = db["dispatches"]

    async def ensure_indexes(self) -> None:
        await self._c.create_indexes(INDEXES)

    async def insert(self, doc: dict[str, Any]) -> None:
        stored = dict(doc)
        stored["_id"] = stored.pop("dispatch_id")
        try:
            await self._c.insert_one(stored)
        except DuplicateKeyError:
            raise Conflict("a dispatch round for this order is already running") from None

    async def get(self, dispatch_id: str) -> dict[str, Any] | None:
        return _out(await self._c.find_one({"_id": dispatch_id}))

    async def for_order(self, order_id: str) -> list[dict[str, Any]]:
        cursor = self._c.find({"order_id": order_id}).sort("created_ts", ASCENDING)
        return [d for d in [_out(x) async for x in cursor] if d is not None]

    async def running_for(self, order_id: str) -> dict[str, Any] | None:
        return _out(await self._c.find_one({"order_id": order_id, "status": "running"}))

    async def set_candidate(self, dispatch_id: str, technician_id: str, expect: str,
                            changes: dict[str, Any], offer: dict[str, Any] | None = None) -> bool:
        """Update one candidate's entry, only if its status is still `expect`;
        with `offer`, its outbox record in the same transaction."""
        query = {"_id": dispatch_id,
                 "candidates": {"$elemMatch": {"technician_id": technician_id, "status": expect}}}
        update = {"$set": {f"candidates.$.{k}": v for k, v in changes.items()}}
        if offer is None:
            res = await self._c.update_one(query, update)
            return res.modified_count == 1

        async def txn(session: AsyncClientSession) -> bool:
            res = await self._c.update_one(query, update, session=session)
            if res.modified_count != 1:
                return False
            n = int(changes.get("offered_ts") or now_ms())
            await stage(self._db, session, [offer_record(technician_id, offer, n, n)])
            return True

        return await run_txn(self._db.client, txn)

    async def claim(self, dispatch_id: str, technician_id: str, now: int) -> bool:
        """The one winning accept: running -> assigned, in a single conditional write."""
        res = await self._c.update_one(
            {"_id": dispatch_id, "status": "running",
             "candidates": {"$elemMatch": {"technician_id": technician_id, "status": "offered"}}},
            {"$set": {"status": "assigned", "assigned_to": technician_id, "finished_ts": now,
                      "candidates.$.status": "accepted", "candidates.$.answered_ts": now}})
        return res.modified_count == 1

    async def finish(self, dispatch_id: str, status: str, changes: dict[str, Any],
                     expect: str = "running") -> None:
        await self._c.update_one({"_id": dispatch_id, "status": expect},
                                 {"$set": {"status": status, **changes}})
