"""Redis implementations of the shared live state: latest positions (GEO +
a record per technician, latest-wins atomically in Lua) and rate limits (a
token bucket in Lua on Redis's clock). Presence is in realtime/presence."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Final

from redis import asyncio as aioredis
from redis.exceptions import LockError, RedisError

from tracking.geo import haversine_m
from tracking.positions import Position

# A latest position older than this is gone from Redis; staleness filters
# (nearby search, area views) cut much earlier.
POSITION_TTL_S: Final = 24 * 3600

_PUT_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'ts')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'j', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
-- Redis GEO covers latitudes within +-85.05112878 (Web Mercator); a fix
-- beyond goes to a plain set that searches scan (there are few up there).
if math.abs(tonumber(ARGV[4])) <= 85.05112878 then
  redis.call('GEOADD', KEYS[2], ARGV[3], ARGV[4], ARGV[5])
  redis.call('SREM', KEYS[3], ARGV[5])
else
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('SADD', KEYS[3], ARGV[5])
end
return 1
"""

GEO_MAX_LAT: Final = 85.05112878


def _geo_lat(lat: float) -> float:
    return max(-GEO_MAX_LAT, min(GEO_MAX_LAT, lat))


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


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _decode(raw: bytes | str | None) -> Position | None:
    if raw is None:
        return None
    return Position.from_dict(json.loads(raw))


class RedisPositions:
    def __init__(self, redis: aioredis.Redis, prefix: str = "rt") -> None:
        self._r = redis
        self._put = redis.register_script(_PUT_IF_NEWER)
        self._prefix = prefix
        self._geo = f"{prefix}:pos:geo"
        self._polar = f"{prefix}:pos:polar"

    def _key(self, technician_id: str) -> str:
        return f"{self._prefix}:pos:{technician_id}"

    async def get(self, technician_id: str) -> Position | None:
        return _decode(await self._r.hget(self._key(technician_id), "j"))

    async def put_if_newer(self, pos: Position) -> bool:
        done = await self._put(
            keys=[self._key(pos.technician_id), self._geo, self._polar],
            args=[pos.ts, json.dumps(pos.as_dict(), separators=(",", ":")), pos.lng, pos.lat,
                  pos.technician_id, POSITION_TTL_S])
        return bool(done)

    async def _records(self, ids: list[str]) -> list[Position]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.hget(self._key(tid), "j")
            raws = await pipe.execute()
        return [p for p in (_decode(r) for r in raws) if p is not None]

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float,
                     max_lng: float, limit: int) -> list[Position]:
        clat, clng = _geo_lat((min_lat + max_lat) / 2), (min_lng + max_lng) / 2
        width = max(1.0, haversine_m(clat, min_lng, clat, max_lng))
        height = max(1.0, haversine_m(min_lat, clng, max_lat, clng))
        ids = await self._r.geosearch(self._geo, longitude=clng, latitude=clat, width=width,
                                      height=height, unit="m", sort="ASC", count=limit * 2)
        found = await self._records([_text(i) for i in ids])
        if max_lat > GEO_MAX_LAT or min_lat < -GEO_MAX_LAT:
            found += await self._polar_records()
        return [p for p in found
                if min_lat <= p.lat <= max_lat and min_lng <= p.lng <= max_lng][:limit]

    async def _polar_records(self) -> list[Position]:
        return await self._records([_text(i) for i in await self._r.smembers(self._polar)])

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        ids = await self._r.geosearch(self._geo, longitude=lng, latitude=_geo_lat(lat),
                                      radius=radius_m, unit="m", sort="ASC", count=limit)
        found = await self._records([_text(i) for i in ids])
        # A circle that reaches past the GEO band may hold polar fixes too.
        if abs(lat) + radius_m / 111_000 > GEO_MAX_LAT:
            polar = [p for p in await self._polar_records()
                     if haversine_m(lat, lng, p.lat, p.lng) <= radius_m]
            found = sorted(found + polar, key=lambda p: haversine_m(lat, lng, p.lat, p.lng))[:limit]
        return found


class RedisRateLimiter:
    def __init__(self, redis: aioredis.Redis, rate: float, burst: float,
                 prefix: str = "rt") -> None:
        self._take = redis.register_script(_TAKE_TOKEN)
        self.rate, self.burst, self.prefix = rate, burst, f"{prefix}:rl:"

    async def take(self, key: str) -> int:
        return int(await self._take(keys=[self.prefix + key], args=[self.rate, self.burst]))


class RedisAgentDirectory:
    """Agents' chosen status, shared by every node (a hash)."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "rt") -> None:
        self._r = redis
        self.KEY = f"{prefix}:agents:status"

    async def set_status(self, agent_id: str, status: str) -> None:
        await self._r.hset(self.KEY, agent_id, status)

    async def status(self, agent_id: str) -> str | None:
        raw = await self._r.hget(self.KEY, agent_id)
        return _text(raw) if raw is not None else None

    async def statuses(self) -> dict[str, str]:
        raw = await self._r.hgetall(self.KEY)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def forget(self, agent_id: str) -> None:
        await self._r.hdel(self.KEY, agent_id)


def redis_lock(redis: aioredis.Redis, name: str, timeout_s: float = 10.0) -> Any:
    """A cluster-wide lock (expires by itself if its holder dies). While Redis
    is away it degrades to a lock of this node alone: the store's atomic
    claims still keep a conversation from going to two agents."""
    local = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def held() -> AsyncIterator[None]:
        try:
            lock = redis.lock(name, timeout=timeout_s, blocking_timeout=timeout_s)
            acquired = await lock.acquire()
        except (RedisError, OSError):
            async with local:
                yield
            return
        try:
            yield
        finally:
            if acquired:
                with contextlib.suppress(RedisError, OSError, LockError):
                    await lock.release()

    return held
