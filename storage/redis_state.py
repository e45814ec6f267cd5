"""Redis implementations of the shared live state: latest positions (GEO +
a record per technician, latest-wins atomically in Lua), rate limits (a
token bucket in Lua on Redis's clock) and presence (per-node heartbeats
with TTLs, so a killed node's users go offline by themselves)."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Final

from redis import asyncio as aioredis

from tracking.geo import haversine_m
from tracking.positions import Position

GEO_KEY: Final = "rt:pos:geo"
# A latest position older than this is gone from Redis; staleness filters
# (nearby search, area views) cut much earlier.
POSITION_TTL_S: Final = 24 * 3600

_PUT_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'ts')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'j', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('GEOADD', KEYS[2], ARGV[3], ARGV[4], ARGV[5])
return 1
"""

_TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


def _pos_key(technician_id: str) -> str:
    return f"rt:pos:{technician_id}"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _decode(raw: bytes | str | None) -> Position | None:
    if raw is None:
        return None
    return Position(**json.loads(raw))


class RedisPositions:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._r = redis
        self._put = redis.register_script(_PUT_IF_NEWER)

    async def get(self, technician_id: str) -> Position | None:
        return _decode(await self._r.hget(_pos_key(technician_id), "j"))

    async def put_if_newer(self, pos: Position) -> bool:
        done = await self._put(
            keys=[_pos_key(pos.technician_id), GEO_KEY],
            args=[pos.ts, json.dumps(pos.as_dict(), separators=(",", ":")), pos.lng, pos.lat,
                  pos.technician_id, POSITION_TTL_S])
        return bool(done)

    async def _records(self, ids: list[str]) -> list[Position]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.hget(_pos_key(tid), "j")
            raws = await pipe.execute()
        return [p for p in (_decode(r) for r in raws) if p is not None]

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float,
                     max_lng: float, limit: int) -> list[Position]:
        clat, clng = (min_lat + max_lat) / 2, (min_lng + max_lng) / 2
        width = max(1.0, haversine_m(clat, min_lng, clat, max_lng))
        height = max(1.0, haversine_m(min_lat, clng, max_lat, clng))
        ids = await self._r.geosearch(GEO_KEY, longitude=clng, latitude=clat, width=width,
                                      height=height, unit="m", sort="ASC", count=limit * 2)
        found = await self._records([_text(i) for i in ids])
        return [p for p in found
                if min_lat <= p.lat <= max_lat and min_lng <= p.lng <= max_lng][:limit]

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        ids = await self._r.geosearch(GEO_KEY, longitude=lng, latitude=lat, radius=radius_m,
                                      unit="m", sort="ASC", count=limit)
        return await self._records([_text(i) for i in ids])


class RedisRateLimiter:
    def __init__(self, redis: aioredis.Redis, rate: float, burst: float,
                 prefix: str = "rt:rl:") -> None:
        self._take = redis.register_script(_TAKE_TOKEN)
        self.rate, self.burst, self.prefix = rate, burst, prefix

    async def take(self, key: str) -> int:
        return int(await self._take(keys=[self.prefix + key], args=[self.rate, self.burst]))


class RedisPresence:
    """Per user a sorted set of nodes scored by when their claim expires.

    A node claims each local user on connect and refreshes the claims of all
    its users every ttl/3; on the user's last local disconnect it drops the
    claim. A killed node stops refreshing, so its claims lapse within the TTL.
    `rt:presence:{kind}` scores every user by their latest claim so a sweeper
    can announce who lapsed (exactly one node wins each ZREM).
    """

    def __init__(self, redis: aioredis.Redis, kind: str, node_id: str, ttl_s: float) -> None:
        self._r = redis
        self.kind, self.node, self.ttl = kind, node_id, ttl_s
        self.local: dict[str, int] = {}

    def _key(self, user_id: str) -> str:
        return f"rt:presence:{self.kind}:{user_id}"

    @property
    def _all(self) -> str:
        return f"rt:presence:{self.kind}"

    async def _claim(self, user_ids: list[str]) -> None:
        if not user_ids:
            return
        until = time.time() + self.ttl
        async with self._r.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.zadd(self._key(u), {self.node: until})
                pipe.expire(self._key(u), math.ceil(self.ttl) + 5)
                pipe.zadd(self._all, {u: until}, gt=True)
            await pipe.execute()

    async def connect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) + 1
        self.local[user_id] = n
        was_online = await self.online([user_id])
        await self._claim([user_id])
        return not was_online

    async def disconnect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) - 1
        if n > 0:
            self.local[user_id] = n
            return False
        self.local.pop(user_id, None)
        await self._r.zrem(self._key(user_id), self.node)
        gone = not await self.online([user_id])
        if gone:
            await self._r.zrem(self._all, user_id)
        return gone

    async def online(self, user_ids: list[str]) -> set[str]:
        if not user_ids:
            return set()
        now = time.time()
        async with self._r.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.zcount(self._key(u), now, "+inf")
            counts = await pipe.execute()
        return {u for u, c in zip(user_ids, counts, strict=True) if c}

    async def heartbeat(self) -> None:
        await self._claim(list(self.local))

    async def sweep(self) -> list[str]:
        """Users whose every claim lapsed (a node died): each reported once, cluster-wide."""
        now = time.time()
        lapsed = await self._r.zrangebyscore(self._all, "-inf", now)
        gone = []
        for raw in lapsed:
            u = _text(raw)
            if await self.online([u]):
                continue
            if await self._r.zrem(self._all, u):
                gone.append(u)
        return gone

    async def count(self) -> int:
        return int(await self._r.zcount(self._all, time.time(), "+inf"))

    def snapshot(self) -> dict[str, Any]:
        return {"node": self.node, "local_users": len(self.local)}
