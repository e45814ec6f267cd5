"""Location trails in MongoDB, written in background batches.

The GPS path only appends to an in-memory buffer; a writer task flushes it
every `interval` seconds (or sooner when it fills), keeps points across store
outages (bounded: past `max_buffer` the oldest are dropped and counted), and
flushes everything on a graceful stop. Trails expire by a TTL index.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from tracking.locations import Point

log = logging.getLogger(__name__)

# Documents per insert_many: each is encoded in one go on the event loop, so a
# big batch is a stall every watcher feels (building and encoding 2,000 took
# ~13 ms on the benchmark machine; 500, ~3 ms).
BATCH: Final = 500
DUPLICATE_KEY: Final = 11000


async def ensure_trail_indexes(db: AsyncDatabase[dict[str, Any]], ttl_days: int) -> None:
    coll = db["trails"]
    await coll.create_indexes([
        IndexModel([("order_id", ASCENDING), ("ts", ASCENDING)]),
        IndexModel([("technician_id", ASCENDING), ("ts", ASCENDING)]),
    ])
    ttl = ttl_days * 86400
    try:
        await coll.create_index([("at", ASCENDING)], name="ttl_at", expireAfterSeconds=ttl)
    except OperationFailure:
        # The TTL changed since the index was made: update it in place.
        await db.command({"collMod": "trails",
                          "index": {"name": "ttl_at", "expireAfterSeconds": ttl}})


class KeepNoTrails:
    """The trail sink of a deployment that keeps no trails (REALTIME_TRAILS=false)."""

    def add(self, technician_id: str, order_id: str | None, points: list[Point]) -> None:
        pass


KEEP_NO_TRAILS: Final = KeepNoTrails()


class TrailWriter:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], *, interval: float = 1.0,
                 max_buffer: int = 200_000,
                 on_flush: Callable[[int, float], None] | None = None,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self._coll = db["trails"]
        self._interval = interval
        self._max = max_buffer
        # (when added, technician, order, point): documents are built at flush
        self._buf: deque[tuple[float, str, str | None, Point]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_flush = on_flush or (lambda n, lag: None)
        self._on_drop = on_drop or (lambda n: None)

    def add(self, technician_id: str, order_id: str | None, points: list[Point]) -> None:
        now = time.monotonic()
        for p in points:
            self._buf.append((now, technician_id, order_id, p))
        overflow = len(self._buf) - self._max
        if overflow > 0:
            for _ in range(overflow):
                self._buf.popleft()
            self._on_drop(overflow)
        if len(self._buf) >= BATCH:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            try:
                await self.flush()
                backoff = self._interval
            except PyMongoError as exc:
                log.warning("trail flush failed (%s); %d points kept", type(exc).__name__,
                            len(self._buf))
                backoff = min(backoff * 2, 30.0)

    async def flush(self) -> None:
        while self._buf:
            batch = [self._buf[i] for i in range(min(BATCH, len(self._buf)))]
            lag = time.monotonic() - batch[0][0]
            at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            # Accepted points of one technician have strictly increasing ts, so
            # the id is unique, and a batch retried after a lost reply stores
            # nothing twice.
            docs = [{"_id": f"{tech}:{p.ts}", "technician_id": tech, "order_id": order_id,
                     "lat": p.lat, "lng": p.lng, "ts": p.ts, "accuracy": p.accuracy,
                     "speed": p.speed, "heading": p.heading, "at": at}
                    for _, tech, order_id, p in batch]
            # ordered=False: one bad document must not hold back the rest.
            try:
                await self._coll.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
            for _ in batch:
                self._buf.popleft()
            self._on_flush(len(batch), lag)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the writer and flush what is left: no accepted point lost on a clean stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (PyMongoError, TimeoutError) as exc:
            log.error("trail flush at shutdown failed (%s): %d points lost",
                      type(exc).__name__, len(self._buf))


async def trail_for_order(db: AsyncDatabase[dict[str, Any]], order_id: str, after_ts: int,
                          limit: int) -> list[dict[str, Any]]:
    cursor = db["trails"].find(
        {"order_id": order_id, "ts": {"$gt": after_ts}},
        {"_id": 0, "at": 0, "order_id": 0},
    ).sort("ts", ASCENDING).limit(limit)
    return [doc async for doc in cursor]
