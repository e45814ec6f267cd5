"""The cross-node tests on a Redis Cluster (3 masters, 3 replicas), started
once for the whole run: here `redis_server` is the cluster, so every
fixture and test built on it (tests/cluster) runs unchanged against it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.cluster_harness import Cluster
from tests.harness import MongoServer
from tests.redis_cluster import RedisCluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    c = RedisCluster()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def redis_server(redis_cluster: RedisCluster) -> RedisCluster:
    return redis_cluster


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = aiohttp.ClientSession()
    yield s
    await s.close()


@pytest.fixture
async def cluster(redis_cluster: RedisCluster, mongo_server: MongoServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    c = Cluster(redis_cluster.url, mongo_server.url, session)
    try:
        yield c
    finally:
        await c.close()
