"""The shared latest positions (storage/redis/positions.py) against a real Redis:
latest wins across nodes, the polar band, at most one write per window,
and a flush that writes at once and leaves nothing pending."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import asyncio as aioredis

from storage.redis import positions as redis_state
from storage.redis.positions import WRITE_BEHIND_S, RedisPositions
from tests.harness import RedisServer, uid
from tracking.positions import Position


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


def fix(tid: str, ts: int, lat: float = 31.23, lng: float = 121.47, **kw: Any) -> Position:
    return Position(tid, lat, lng, ts, **kw)


async def evalsha_calls(r: aioredis.Redis) -> int:
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_latest_wins_across_nodes_and_the_record_is_whole(redis: aioredis.Redis) -> None:
    prefix = uid("p")
    a, b = RedisPositions(redis, prefix), RedisPositions(redis, prefix)
    tid = uid("t-")
    newer = fix(tid, 2_000, name="张师傅", speed=3.5, heading=90.0, accuracy=8.0, order_id="o1",
                eta_s=120, distance_m=900, status="busy", skills=("plumbing",))
    assert a.put(newer)
    await a.flush()
    assert b.put(fix(tid, 1_000, lat=31.0))  # b has not seen 2,000: it writes, Redis keeps 2,000
    await b.flush()
    assert await RedisPositions(redis, prefix).get(tid) == newer
    assert await redis.hget(f"{prefix}:pos:{tid}", "ts") == b"2000"
    assert 0 < await redis.ttl(f"{prefix}:pos:{tid}") <= redis_state.POSITION_TTL_S
    # Only the newest of one window is sent; the same technician twice in one batch.
    assert not a.put(fix(tid, 1_500))  # older than this node's own newest: refused here
    assert a.put(fix(tid, 3_000, lat=31.3)) and a.put(fix(tid, 4_000, lat=31.4))
    await a.flush()
    got = await b.get(tid)
    assert got is not None and (got.ts, got.lat) == (4_000, 31.4)


async def test_polar_fixes_leave_the_geo_set_and_come_back(redis: aioredis.Redis) -> None:
    prefix = uid("p")
    pos = RedisPositions(redis, prefix)
    tid = uid("t-")
    pos.put(fix(tid, 1, lat=86.0, lng=10.0))
    await pos.flush()
    assert await redis.zscore(f"{prefix}:pos:geo", tid) is None
    assert await redis.sismember(f"{prefix}:pos:polar", tid)
    assert [p.technician_id for p in await pos.near(86.0, 10.0, 1_000, 10)] == [tid]
    pos.put(fix(tid, 2, lat=31.23, lng=121.47))
    await pos.flush()
    assert await redis.zscore(f"{prefix}:pos:geo", tid) is not None
    assert not await redis.sismember(f"{prefix}:pos:polar", tid)
    assert [p.technician_id for p in await pos.in_box(31.0, 121.0, 31.5, 122.0, 10)] == [tid]


async def test_at_most_one_write_per_window(redis: aioredis.Redis) -> None:
    """Fixes streaming in for ten windows go out in about ten calls, each
    carrying the newest fix of every technician that moved."""
    prefix = uid("p")
    pos = RedisPositions(redis, prefix)
    techs = [uid("t-") for _ in range(20)]
    await pos.flush()
    before = await evalsha_calls(redis)
    loop = asyncio.get_running_loop()
    start = loop.time()
    ts = 0
    while loop.time() - start < 10 * WRITE_BEHIND_S:
        ts += 1
        for t in techs:
            assert pos.put(fix(t, ts))
        await asyncio.sleep(0.001)
    await pos.flush()
    calls = await evalsha_calls(redis) - before
    assert ts > 30  # the loop ran many times per window
    assert 1 <= calls <= 10 + 2, calls  # one per window (+ the first and the flush)
    for t in techs:
        got = await pos.get(t)
        assert got is not None and got.ts == ts


async def test_flush_writes_at_once_and_leaves_no_writer(redis: aioredis.Redis) -> None:
    prefix = uid("p")
    pos = RedisPositions(redis, prefix)
    tid = uid("t-")
    pos.put(fix(tid, 7))
    writer = pos._writer
    assert writer is not None and not writer.done()
    await pos.flush()  # well within the window: the writer is still asleep
    assert await redis.hget(f"{prefix}:pos:{tid}", "ts") == b"7"
    assert pos._writer is None  # let go at once: the next put starts another
    with contextlib.suppress(asyncio.CancelledError):
        await writer  # asleep until its window ended, nothing left to write
    assert writer.done()
    # The next fix starts a writer again, and it writes on its own.
    pos.put(fix(tid, 8))
    assert pos._writer is not None
    await asyncio.wait_for(asyncio.shield(pos._writer), 5)
    assert await redis.hget(f"{prefix}:pos:{tid}", "ts") == b"8"


async def test_a_write_that_fails_is_counted(
        redis_server: RedisServer) -> None:
    prefix = uid("p")
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    pos = RedisPositions(dead, prefix)
    pos.put(fix(uid("t-"), 1))
    pos.put(fix(uid("t-"), 1))
    await pos.flush()
    assert pos.write_failures == 2
    await dead.aclose()
