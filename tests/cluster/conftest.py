"""Fixtures of the tests in this package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.cluster_harness import (
    Cluster,
    RestartableRedis,
)
from tests.harness import MongoServer, RedisServer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = aiohttp.ClientSession()
    yield s
    await s.close()


@pytest.fixture
async def cluster(redis_server: RedisServer, mongo_server: MongoServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    c = Cluster(redis_server.url, mongo_server.url, session)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def own_redis() -> Iterator[RestartableRedis]:
    r = RestartableRedis()
    try:
        yield r
    finally:
        r.stop()
