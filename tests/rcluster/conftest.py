"""The cross-node tests on a Redis Cluster (3 masters, 3 replicas), started
once for the whole run: here `redis_server` is the cluster, so every
fixture and test built on it (tests/cluster) runs unchanged against it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.conftest import cluster, session
from tests.redis_cluster import RedisCluster

__all__ = ["cluster", "session"]  # tests/cluster's fixtures, on the cluster below


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
