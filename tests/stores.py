"""A database of a test's own on the session's store (tests/conftest.py
`mongo_server`, a real SecantusDB), behind the gate the app puts before it,
for the domain tests that build services without sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from storage.gate import StoreGate
from storage.mongo import connect, ensure_indexes
from tests.harness import MongoServer, uid

TIMEOUT_MS = 2500
BOUND_S = TIMEOUT_MS / 1000


@dataclass(frozen=True)
class OwnDatabase:
    client: AsyncMongoClient[dict[str, Any]]
    db: AsyncDatabase[dict[str, Any]]
    gate: StoreGate


@contextlib.asynccontextmanager
async def own_database(mongo_server: MongoServer, prefix: str) -> AsyncIterator[OwnDatabase]:
    """Order indexes made (as at start-up); dropped afterwards. Whatever a
    test builds on it must be closed before this exits."""
    client = connect(mongo_server.url, TIMEOUT_MS)
    name = uid(prefix)
    db = client[name]
    # The app's defaults (REALTIME_STORE_MAX_INFLIGHT, _WAITING, _PER_USER).
    gate = StoreGate(db, timeout_s=BOUND_S, max_inflight=64, max_waiting=256, max_per_owner=32)
    await ensure_indexes(db)
    try:
        yield OwnDatabase(client, db, gate)
    finally:
        await gate.close()
        await client.drop_database(name)
        await client.close()
