"""Latest positions on a Redis Cluster: the same store as RedisPositions, with
the GEO index split into cells so that no command needs two slots.

- A technician's record (`<prefix>:pos:<id>`: ts, JSON, the cell it is
  indexed in) is its own key: latest-wins is one Lua call on one slot.
- The GEO index is one sorted set per cell of a 0.1-degree grid
  (`<prefix>:cell:<i>:<j>`, i = floor(lat / 0.1), j = floor(lng / 0.1)).
  A fix that moves a technician to another cell adds it there and removes it
  from the old one; a set of the cells that ever held someone
  (`<prefix>:cells`) serves searches too wide to list cells.
- A search covers the cells that meet its area, nearest first, in pipelined
  rounds, and stops once the nearest cell left is farther than the
  `limit`-th hit. Hits are checked against their records (the record is the
  truth): a member whose record is gone or in another cell is dropped from
  the cell on the way.

Why a degree grid and 0.1 degree (docs/scaling.md): covering a box is two
integer ranges (geohash cells need neighbour arithmetic for the same
result); 0.1 degree is 11.1 km north-south and 9.5 km east-west at
Shanghai's latitude, so a dispatch search (10 km around an address) covers
4 to 9 cells, a city-district view a few dozen, and a downtown cell of a
few thousand technicians is still a cheap GEOSEARCH. Cells spread a city
over many slots, so the masters share its writes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from storage.redis.positions import (
    GEO_MAX_LAT,
    POSITION_TTL_S,
    RedisPositions,
    _dumps,
    _geo_lat,
    _text,
    box_size_m,
)
from tracking.geo import haversine_m
from tracking.positions import Position

CELL_DEG: Final = 0.1
# A search meeting more cells than this reads the set of occupied cells
# instead of listing the grid (about 160 km x 150 km at 31 degrees north).
MAX_LISTED_CELLS: Final = 256
CELLS_PER_ROUND: Final = 32
M_PER_DEG_LAT: Final = 111_320.0

# Latest wins for one technician: KEYS[1] = its record; ARGV = ttl, the JSON
# record, its cell ('' beyond the GEO band). Returns the cell it was indexed
# in before ('' for none), or -1 when the record held a newer fix.
_PUT_RECORD = """
local ttl, rec, cell = ARGV[1], ARGV[2], ARGV[3]
local cur = redis.call('HMGET', KEYS[1], 'ts', 'c')
local ts = cjson.decode(rec).ts
if cur[1] and tonumber(cur[1]) >= ts then return -1 end
redis.call('HSET', KEYS[1], 'ts', string.format('%.0f', ts), 'j', rec, 'c', cell)
redis.call('EXPIRE', KEYS[1], ttl)
return cur[2] or ''
"""


def cell_of(lat: float, lng: float) -> tuple[int, int]:
    return math.floor(lat / CELL_DEG), math.floor(lng / CELL_DEG)


def _cell_distance_m(lat: float, lng: float, cell: tuple[int, int]) -> float:
    """From a point to the nearest point of a cell (0 inside it)."""
    i, j = cell
    clat = min(max(lat, i * CELL_DEG), (i + 1) * CELL_DEG)
    clng = min(max(lng, j * CELL_DEG), (j + 1) * CELL_DEG)
    return haversine_m(lat, lng, clat, clng)


class ClusterPositions(RedisPositions):
    """RedisPositions for a Redis Cluster (one slot per command)."""

    def __init__(self, redis: RedisCluster, prefix: str = "rt") -> None:
        super().__init__(redis, prefix)  # type: ignore[arg-type]
        self._rc = redis
        self._sha: str | None = None
        self._cells = f"{prefix}:cells"

    def _cell_key(self, cell: tuple[int, int]) -> str:
        return f"{self._prefix}:cell:{cell[0]}:{cell[1]}"

    def _cell_name(self, pos: Position) -> str:
        if abs(pos.lat) > GEO_MAX_LAT:
            return ""
        return self._cell_key(cell_of(pos.lat, pos.lng))

    async def _script(self, reload: bool = False) -> str:
        if self._sha is None or reload:
            # SCRIPT LOAD goes to every master (a promoted replica may lack it).
            self._sha = str(await self._rc.script_load(_PUT_RECORD))
        return self._sha

    async def _put_records(self, batch: list[tuple[Position, str]]) -> list[Any]:
        sha = await self._script()
        for attempt in (0, 1):
            async with self._rc.pipeline(transaction=False) as pipe:
                for pos, cell in batch:
                    pipe.evalsha(sha, 1, self._key(pos.technician_id), POSITION_TTL_S,
                                 _dumps(pos.as_dict()).encode(), cell)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                sha = await self._script(reload=True)
                continue
            for r in results:
                if isinstance(r, Exception):
                    raise r
            return list(results)
        raise RedisError("the position script could not be loaded")

    async def _send(self, batch: dict[str, Position]) -> bool:
        """Two pipelined rounds (each spread over the masters): the records,
        latest-wins; then the cells of the fixes that won."""
        if not batch:
            return True
        items = [(pos, self._cell_name(pos)) for pos in batch.values()]
        try:
            before = await self._put_records(items)
            async with self._rc.pipeline(transaction=False) as pipe:
                for (pos, cell), old in zip(items, before, strict=True):
                    if old == -1 or isinstance(old, int):
                        continue  # another node wrote a newer fix
                    old_cell = _text(old)
                    tid = pos.technician_id
                    if cell:
                        pipe.geoadd(cell, [pos.lng, pos.lat, tid])
                        if old_cell != cell:
                            pipe.sadd(self._cells, cell)
                            pipe.srem(self._polar, tid)
                    else:
                        pipe.sadd(self._polar, tid)
                    if old_cell and old_cell != cell:
                        pipe.zrem(old_cell, tid)
                await pipe.execute()
            return True
        except (RedisError, OSError) as exc:
            return self._write_failed(len(batch), exc)

    async def _cells_meeting(self, min_lat: float, min_lng: float, max_lat: float,
                             max_lng: float, lat: float, lng: float) -> list[tuple[int, int]]:
        """The GEO cells that meet the box, nearest to (lat, lng) first."""
        lo_i, lo_j = cell_of(max(min_lat, -GEO_MAX_LAT), min_lng)
        hi_i, hi_j = cell_of(min(max_lat, GEO_MAX_LAT), max_lng)
        if (hi_i - lo_i + 1) * (hi_j - lo_j + 1) <= MAX_LISTED_CELLS:
            cells = [(i, j) for i in range(lo_i, hi_i + 1) for j in range(lo_j, hi_j + 1)]
        else:
            cells = []
            for raw in await self._rc.smembers(self._cells):
                parts = _text(raw).rsplit(":", 2)
                i, j = int(parts[1]), int(parts[2])
                if lo_i <= i <= hi_i and lo_j <= j <= hi_j:
                    cells.append((i, j))
        return sorted(cells, key=lambda c: _cell_distance_m(lat, lng, c))

    async def _search(self, cells: list[tuple[int, int]], lat: float, lng: float,
                      limit: int, **shape: Any) -> list[tuple[float, str, str]]:
        """(distance, cell key, technician) hits, nearest first, from the
        nearest cells on, until the cells left cannot hold anything nearer
        than the `limit`-th hit (each cell's own `limit` nearest are enough:
        the overall nearest are among them). Distances are GEO's own, so the
        order is the one a single GEO set gives."""
        hits: list[tuple[float, str, str]] = []
        for start in range(0, len(cells), CELLS_PER_ROUND):
            if len(hits) >= limit:
                hits.sort()
                # 0.1 % of slack: GEO's Earth radius is a little larger than ours.
                if _cell_distance_m(lat, lng, cells[start]) * 0.999 > hits[limit - 1][0]:
                    break
            chunk = [self._cell_key(c) for c in cells[start:start + CELLS_PER_ROUND]]
            async with self._rc.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.geosearch(key, longitude=lng, latitude=_geo_lat(lat), unit="m",
                                   sort="ASC", count=limit, withdist=True, **shape)
                answers = await pipe.execute()
            for key, found in zip(chunk, answers, strict=True):
                hits.extend((float(dist), key, _text(member)) for member, dist in found)
        hits.sort()
        return hits[:limit]

    async def _checked(self, hits: list[tuple[float, str, str]]) -> list[Position]:
        """The records of the hits, in the hits' order; a member whose record
        is gone or indexed in another cell leaves the cell it was found in."""
        if not hits:
            return []
        tids = list(dict.fromkeys(tid for _, _, tid in hits))
        async with self._rc.pipeline(transaction=False) as pipe:
            for tid in tids:
                pipe.hmget(self._key(tid), ["j", "c"])
            raws = await pipe.execute()
        records = dict(zip(tids, raws, strict=True))
        found: dict[str, Position] = {}
        stale = []
        for _, key, tid in hits:
            raw, cell = records[tid]
            if raw is None or cell is None or _text(cell) != key:
                stale.append((key, tid))
            elif tid not in found:
                found[tid] = Position.from_dict(json.loads(raw))
        if stale:
            try:
                async with self._rc.pipeline(transaction=False) as pipe:
                    for key, tid in stale:
                        pipe.zrem(key, tid)
                    await pipe.execute()
            except (RedisError, OSError):
                pass  # the next search tries again
        return list(found.values())

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float,
                     max_lng: float, limit: int) -> list[Position]:
        await self.flush()  # this node's own fixes first: read your writes
        clat, clng = _geo_lat((min_lat + max_lat) / 2), (min_lng + max_lng) / 2
        width, height = box_size_m(min_lat, min_lng, max_lat, max_lng)
        cells = await self._cells_meeting(min_lat, min_lng, max_lat, max_lng, clat, clng)
        hits = await self._search(cells, clat, clng, limit * 2, width=width, height=height)
        found = await self._checked(hits)
        if max_lat > GEO_MAX_LAT or min_lat < -GEO_MAX_LAT:
            found += await self._polar_records()
        return [p for p in found
                if min_lat <= p.lat <= max_lat and min_lng <= p.lng <= max_lng][:limit]

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        await self.flush()
        # The circle's bounding box, 2 % wider: GEO's Earth is a little smaller
        # than the degree's length here, and a cap is wider at its far rows.
        dlat = 1.02 * radius_m / M_PER_DEG_LAT
        dlng = 1.02 * radius_m / (M_PER_DEG_LAT * max(0.01, math.cos(math.radians(min(abs(lat), 89.9)))))
        glat = _geo_lat(lat)
        cells = await self._cells_meeting(lat - dlat, lng - dlng, lat + dlat, lng + dlng, glat, lng)
        found = await self._checked(await self._search(cells, glat, lng, limit, radius=radius_m))
        # A circle that reaches past the GEO band may hold polar fixes too.
        if abs(lat) + radius_m / 111_000 > GEO_MAX_LAT:
            polar = [p for p in await self._polar_records()
                     if haversine_m(lat, lng, p.lat, p.lng) <= radius_m]
            found = sorted(found + polar, key=lambda p: haversine_m(lat, lng, p.lat, p.lng))[:limit]
        return found
