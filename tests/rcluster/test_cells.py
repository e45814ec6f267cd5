"""Latest positions on a Redis Cluster (storage/redis/cells.py) give the same
answers as on one Redis (storage/redis/positions.py): the same fixes go to
both, and every search is compared. Also: latest wins across nodes, a
technician who moves leaves its old cell, stale members are cleaned up, a
search wider than the listed cells, the polar band; REDIS_URL's cluster
form, and the channels the entities are spread over."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from realtime.settings import Settings
from realtime.transport.shards import BROADCAST_SHARDS, broadcast_channel, entity_key, signal_key
from storage.redis.cells import CELL_DEG, ClusterPositions, cell_of
from storage.redis.client import cluster_client, parse_cluster_url
from storage.redis.positions import RedisPositions
from tests.harness import RedisServer, uid
from tests.redis_cluster import RedisCluster
from tracking.positions import Position


@pytest.fixture(scope="module")
def one_redis() -> Any:
    server = RedisServer()  # tests/rcluster makes `redis_server` the cluster: one Redis of our own
    yield server
    server.stop()


@pytest.fixture
async def rc(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    r = cluster_client(redis_cluster.url, max_connections=8, timeout_s=2.0)
    yield r
    await r.aclose()


@pytest.fixture
async def single(one_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(one_redis.url)
    yield r
    await r.aclose()


def fix(tid: str, ts: int, lat: float, lng: float) -> Position:
    return Position(tid, lat, lng, ts)


async def test_the_same_answers_as_one_redis(rc: ClusterClient, single: aioredis.Redis) -> None:
    rng = random.Random(20)
    prefix = uid("p")
    cluster, one = ClusterPositions(rc, prefix), RedisPositions(single, prefix)
    # 400 technicians around Shanghai's centre (±0.3°: about 36 cells), then 200 of
    # them move, some across cells.
    base = (31.23, 121.47)
    where = {f"t{i}": (base[0] + rng.uniform(-0.3, 0.3), base[1] + rng.uniform(-0.3, 0.3))
             for i in range(400)}
    for store in (cluster, one):
        for tid, (lat, lng) in where.items():
            store.put(fix(tid, 1_000, lat, lng))
        await store.flush()
    for i in range(200):
        lat, lng = where[f"t{i}"]
        where[f"t{i}"] = (lat + rng.uniform(-0.15, 0.15), lng + rng.uniform(-0.15, 0.15))
    for store in (cluster, one):
        for i in range(200):
            store.put(fix(f"t{i}", 2_000, *where[f"t{i}"]))
        await store.flush()

    def ids(found: list[Position]) -> list[str]:
        return [p.technician_id for p in found]

    for _ in range(25):
        lat, lng = base[0] + rng.uniform(-0.3, 0.3), base[1] + rng.uniform(-0.3, 0.3)
        radius = rng.choice([500, 2_000, 5_000, 10_000, 30_000])
        limit = rng.choice([5, 20, 50, 500])
        a, b = await cluster.near(lat, lng, radius, limit), await one.near(lat, lng, radius, limit)
        assert ids(a) == ids(b), (lat, lng, radius, limit)
        half = rng.uniform(0.01, 0.25)
        box = (lat - half, lng - half, lat + half, lng + half)
        a, b = await cluster.in_box(*box, limit), await one.in_box(*box, limit)
        assert set(ids(a)) == set(ids(b)) and len(a) == len(b), (box, limit)
    # Every technician is indexed in exactly one cell: the one of its latest fix.
    for tid, (lat, lng) in where.items():
        i, j = cell_of(lat, lng)
        assert await rc.zscore(f"{prefix}:cell:{i}:{j}", tid) is not None
    members = 0
    async for key in rc.scan_iter(match=f"{prefix}:cell:*"):
        members += await rc.zcard(key)
    assert members == len(where)


async def test_latest_wins_across_nodes_and_stale_members_leave(rc: ClusterClient) -> None:
    prefix = uid("p")
    a, b = ClusterPositions(rc, prefix), ClusterPositions(rc, prefix)
    here, far = (31.23, 121.47), (31.23 + 3 * CELL_DEG, 121.47)
    a.put(fix("t1", 2_000, *far))
    await a.flush()
    b.put(fix("t1", 1_000, *here))  # older: refused by the record, indexed nowhere new
    await b.flush()
    got = await b.get("t1")
    assert got is not None and got.ts == 2_000
    assert await b.near(*here, 1_000, 10) == []
    assert [p.ts for p in await b.near(*far, 1_000, 10)] == [2_000]
    # A member left behind in another cell (as a crashed writer could leave it)
    # is not found there, and is removed by the search that meets it.
    i, j = cell_of(*here)
    await rc.geoadd(f"{prefix}:cell:{i}:{j}", [here[1], here[0], "t1"])
    assert await a.near(*here, 1_000, 10) == []
    assert await rc.zscore(f"{prefix}:cell:{i}:{j}", "t1") is None
    # A member whose record expired goes the same way.
    await rc.geoadd(f"{prefix}:cell:{i}:{j}", [here[1], here[0], "ghost"])
    assert await a.near(*here, 1_000, 10) == []
    assert await rc.zcard(f"{prefix}:cell:{i}:{j}") == 0


async def test_a_search_wider_than_the_listed_cells_and_the_polar_band(rc: ClusterClient) -> None:
    prefix = uid("p")
    pos = ClusterPositions(rc, prefix)
    spots = {"sh": (31.23, 121.47), "bj": (39.90, 116.40), "gz": (23.13, 113.26),
             "north": (86.0, 10.0)}
    for tid, (lat, lng) in spots.items():
        pos.put(fix(tid, 1_000, lat, lng))
    await pos.flush()
    # The whole world: far more than 256 cells, so the occupied cells are read.
    world = await pos.in_box(-90, -180, 90, 180, 100)
    assert {p.technician_id for p in world} == set(spots)
    china = await pos.in_box(20, 100, 45, 125, 2)  # nearest to the box's centre first
    assert [p.technician_id for p in china] == ["sh", "bj"]  # 860 and 890 km; gz 1,040 km
    assert [p.technician_id for p in await pos.near(86.0, 10.0, 1_000, 5)] == ["north"]
    # Moving into the polar band leaves the GEO cell, and back.
    pos.put(fix("sh", 2_000, 86.0, 10.001))
    await pos.flush()
    assert await pos.near(*spots["sh"], 1_000, 5) == []
    pos.put(fix("sh", 3_000, *spots["sh"]))
    await pos.flush()
    assert [p.technician_id for p in await pos.near(*spots["sh"], 1_000, 5)] == ["sh"]
    assert [p.technician_id for p in await pos.near(86.0, 10.0, 1_000, 5)] == ["north"]


@pytest.mark.parametrize(("url", "error"), [
    ("redis+cluster://", "host:port"),
    ("redis+cluster://h1", "host:port"),
    ("redis+cluster://h1:70000", "host:port"),
    ("redis+cluster://h1:7000,:7001", "host:port"),
    ("redis+cluster://h1:7000/3", "database 0"),
    ("http://h1:6379", "REDIS_URL must start with"),
    ("h1:6379", "REDIS_URL must start with"),
])
def test_a_bad_redis_url_is_refused_at_start(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Settings(redis_url=url)


def test_a_cluster_url() -> None:
    c = parse_cluster_url("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001/")
    assert (c.nodes, c.tls, c.username, c.password) == ((("h1", 7000), ("::1", 7001)), True, "u", "p@ss")
    assert Settings(redis_url="redis+cluster://h1:7000").redis_url == "redis+cluster://h1:7000"
    assert Settings(redis_url="redis://h1:6379/0").redis_url == "redis://h1:6379/0"


def test_an_entitys_messages_share_one_channel_and_entities_spread() -> None:
    assert entity_key("order:o1") == entity_key("watch:o1:gcj02") == entity_key(["order:o1", "user:c"])
    assert entity_key("staff:c1") == "c1" and entity_key("ops") == "ops" and entity_key(None) == ""
    assert signal_key({"user_id": "t", "room": "order:o1"}) == "o1"
    assert signal_key({"order": {"order_id": "o1"}, "event": {}}) == "o1"
    assert signal_key({"nodes": ["x"]}) == "" and signal_key("junk") == ""
    assert broadcast_channel("rt", "") == "rt#b#0"
    used = {broadcast_channel("rt", f"o{i}") for i in range(2_000)}
    assert len(used) == BROADCAST_SHARDS
