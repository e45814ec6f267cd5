"""Presence shared through Redis (storage/redis/presence.py), against a real
Redis: who is online across nodes, and a node's own users cost no round trip."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from storage.redis.presence import RedisPresence
from tests.harness import RedisServer, uid


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def calls(r: aioredis.Redis) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("zcount", "zmscore")}


async def test_online_across_nodes_and_own_users_without_a_round_trip(redis: aioredis.Redis) -> None:
    prefix = uid("p")
    a = RedisPresence(redis, "technician", "node-a", 30.0, prefix)
    b = RedisPresence(redis, "technician", "node-b", 30.0, prefix)
    mine, theirs, nobody = uid("t-"), uid("t-"), uid("t-")
    assert await a.connect(mine)
    assert await b.connect(theirs)

    before = await calls(redis)
    assert await a.online([mine]) == {mine}
    assert await calls(redis) == before  # a's own user: known without Redis

    assert await a.online([mine, theirs, nobody]) == {mine, theirs}
    after = await calls(redis)  # the two a does not hold, in one command
    assert after == {"zcount": before["zcount"], "zmscore": before["zmscore"] + 1}, (before, after)
    assert await a.online([theirs]) == {theirs}  # one: its own claims, counted

    assert await b.disconnect(theirs)
    assert await a.online([mine, theirs]) == {mine}
    assert await a.online([theirs, nobody]) == set()
    assert await b.online([mine, theirs]) == {mine}
