"""Latest positions in Redis, shared by every node: GEO + a record per
technician, latest-wins atomically in Lua, written behind."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Final

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from tracking.geo import haversine_m
from tracking.positions import Position

log = logging.getLogger(__name__)
_dumps = json.JSONEncoder(separators=(",", ":")).encode

# A latest position older than this is gone from Redis; staleness filters
# (nearby search, area views) cut much earlier.
POSITION_TTL_S: Final = 24 * 3600
# How long fixes gather before one write carries them all: far below any
# reader's horizon (a `watch` on another node sees a position at most this
# much older; this node's own reads and searches see its fixes at once), and
# under load one round trip carries hundreds of fixes (only the newest per
# technician), so its fixed cost all but vanishes from the GPS path.
WRITE_BEHIND_S: Final = 0.025

# Latest wins, for a batch of fixes: KEYS = geo set, polar set; ARGV = ttl,
# the record keys' prefix, then one JSON record per fix. The record carries
# everything the script needs (technician, ts, lat, lng), so a fix costs the
# client one argument to pack instead of five. The record keys are derived
# here rather than declared: this needs a single Redis (or one shard), as the
# pub/sub channels do.
_PUT_IF_NEWER = """
local ttl, prefix = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local rec = ARGV[i]
  local p = cjson.decode(rec)
  local key = prefix .. p.technician_id
  local cur = redis.call('HGET', key, 'ts')
  if not (cur and tonumber(cur) >= p.ts) then
    redis.call('HSET', key, 'ts', string.format('%.0f', p.ts), 'j', rec)
    redis.call('EXPIRE', key, ttl)
    -- Redis GEO covers latitudes within +-85.05112878 (Web Mercator); a fix
    -- beyond goes to a plain set that searches scan (there are few up there).
    if math.abs(p.lat) <= 85.05112878 then
      redis.call('GEOADD', KEYS[1], p.lng, p.lat, p.technician_id)
      redis.call('SREM', KEYS[2], p.technician_id)
    else
      redis.call('ZREM', KEYS[1], p.technician_id)
      redis.call('SADD', KEYS[2], p.technician_id)
    end
  end
end
return 1
"""

GEO_MAX_LAT: Final = 85.05112878


def _geo_lat(lat: float) -> float:
    return max(-GEO_MAX_LAT, min(GEO_MAX_LAT, lat))


# Metres per degree on GEO's sphere (Redis uses an Earth radius of 6,372,797.56 m).
GEO_M_PER_DEG: Final = 6_372_797.560856 * math.pi / 180


def box_size_m(min_lat: float, min_lng: float, max_lat: float, max_lng: float) -> tuple[float, float]:
    """GEOSEARCH BYBOX's width and height for a box of degrees, 1 % over so
    the search covers it all (the caller filters to the box). Redis checks a
    point's east-west distance at the point's own latitude, so the width is
    taken where a degree is longest (the latitude nearest the equator); a box
    wider than 180 degrees would wrap in a distance between its corners."""
    nearest_equator = 0.0 if min_lat <= 0 <= max_lat else min(abs(min_lat), abs(max_lat))
    width = (max_lng - min_lng) * GEO_M_PER_DEG * math.cos(math.radians(nearest_equator))
    height = (max_lat - min_lat) * GEO_M_PER_DEG
    return max(1.0, 1.01 * width), max(1.0, 1.01 * height)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _decode(raw: bytes | str | None) -> Position | None:
    if raw is None:
        return None
    return Position.from_dict(json.loads(raw))


class RedisPositions:
    """Latest positions shared by every node. Writes go behind: `put` decides
    latest-wins against what this node has put and returns at once; one
    writer task sends everything put meanwhile in one Lua call (latest-wins
    again, atomically, across nodes). So the GPS path never waits on Redis,
    and under load a round trip carries many fixes (the newest per
    technician only)."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "rt") -> None:
        self._r = redis
        self._put = redis.register_script(_PUT_IF_NEWER)
        self._prefix = prefix
        self._geo = f"{prefix}:pos:geo"
        self._polar = f"{prefix}:pos:polar"
        self._newest: dict[str, int] = {}  # technician -> newest ts put here
        self._pending: dict[str, Position] = {}
        self._writer: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Future[bool] | None = None
        self._last_log = 0.0
        self.write_failures = 0

    def _key(self, technician_id: str) -> str:
        return f"{self._prefix}:pos:{technician_id}"

    async def get(self, technician_id: str) -> Position | None:
        pending = self._pending.get(technician_id)
        if pending is not None:
            return pending
        return _decode(await self._r.hget(self._key(technician_id), "j"))

    def put(self, pos: Position) -> bool:
        tid = pos.technician_id
        newest = self._newest.get(tid)
        if newest is not None and newest >= pos.ts:
            return False
        self._newest[tid] = pos.ts
        self._pending[tid] = pos
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_behind())
        return True

    def forget(self, technician_id: str) -> None:
        """The technician left this node: its newest-ts memory may go."""
        if technician_id not in self._pending:
            self._newest.pop(technician_id, None)

    async def _write_behind(self) -> None:
        """At most one write per window: what is put meanwhile waits for the
        next (a write in flight never makes the next one start early)."""
        try:
            while True:
                await asyncio.sleep(WRITE_BEHIND_S)
                if not self._pending:
                    return
                sending = asyncio.ensure_future(self._send(self._take()))
                self._in_flight = sending
                try:
                    if not await asyncio.shield(sending):
                        await asyncio.sleep(0.1)  # Redis away: do not spin
                finally:
                    self._in_flight = None
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None

    def _take(self) -> dict[str, Position]:
        batch, self._pending = self._pending, {}
        return batch

    async def _send(self, batch: dict[str, Position]) -> bool:
        """One Lua call for the batch; the order of batches does not matter
        (the script is latest-wins per technician)."""
        if not batch:
            return True
        args: list[Any] = [POSITION_TTL_S, self._key("")]
        args += [_dumps(pos.as_dict()).encode() for pos in batch.values()]
        try:
            await self._put(keys=[self._geo, self._polar], args=args)
            return True
        except (RedisError, OSError) as exc:
            return self._write_failed(len(batch), exc)

    def _write_failed(self, n: int, exc: BaseException) -> bool:
        """A batch lost for Redis only (this node still relays and keeps its
        mirror); the technicians' next fixes write again."""
        self.write_failures += n
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning("positions not written to Redis (%s)", type(exc).__name__)
        return False

    async def flush(self) -> None:
        """Until what was put so far is in Redis (or failed): what waits is
        sent now, and a write in flight is awaited."""
        in_flight = self._in_flight
        await self._send(self._take())
        if in_flight is not None:
            await asyncio.shield(in_flight)
        writer = self._writer
        if writer is not None and self._in_flight is None and not self._pending:
            # Idle until its window ends: it has nothing left to write (and a
            # stop must not leave it pending). The next put starts another.
            self._writer = None
            writer.cancel()

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
        await self.flush()  # this node's own fixes first: read your writes
        clat, clng = _geo_lat((min_lat + max_lat) / 2), (min_lng + max_lng) / 2
        width, height = box_size_m(min_lat, min_lng, max_lat, max_lng)
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
        await self.flush()
        ids = await self._r.geosearch(self._geo, longitude=lng, latitude=_geo_lat(lat),
                                      radius=radius_m, unit="m", sort="ASC", count=limit)
        found = await self._records([_text(i) for i in ids])
        # A circle that reaches past the GEO band may hold polar fixes too.
        if abs(lat) + radius_m / 111_000 > GEO_MAX_LAT:
            polar = [p for p in await self._polar_records()
                     if haversine_m(lat, lng, p.lat, p.lng) <= radius_m]
            found = sorted(found + polar, key=lambda p: haversine_m(lat, lng, p.lat, p.lng))[:limit]
        return found
