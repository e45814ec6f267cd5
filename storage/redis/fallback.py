"""Keep serving a node's own clients while Redis is away.

Each wrapper sends calls to the shared Redis implementation and, when Redis
fails, answers from this node's own memory instead (a mirror kept current
on every successful call). Cross-node guarantees lapse while Redis is down
(latest-wins becomes per node); they return with Redis.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from redis.exceptions import RedisError

from tracking.positions import MemoryPositions, Position

log = logging.getLogger(__name__)

LOG_EVERY_S: Final = 10.0


class _Degraded:
    def __init__(self, what: str) -> None:
        self.what = what
        self._last = 0.0
        self.failures = 0

    def note(self, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last >= LOG_EVERY_S:
            self._last = now
            log.warning("Redis unavailable for %s (%s); serving from this node's memory",
                        self.what, type(exc).__name__)


class FallbackPositions:
    def __init__(self, primary: Any) -> None:
        self.primary = primary
        self.local = MemoryPositions()
        self._d = _Degraded("positions")

    async def get(self, technician_id: str) -> Position | None:
        try:
            return await self.primary.get(technician_id)  # type: ignore[no-any-return]
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            return await self.local.get(technician_id)

    def put(self, pos: Position) -> bool:
        self.local.put(pos)
        return bool(self.primary.put(pos))  # written behind: Redis errors surface there

    def forget(self, technician_id: str) -> None:
        self.primary.forget(technician_id)

    async def flush(self) -> None:
        await self.primary.flush()

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float, max_lng: float,
                     limit: int) -> list[Position]:
        try:
            return await self.primary.in_box(min_lat, min_lng, max_lat, max_lng, limit)  # type: ignore[no-any-return]
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            return await self.local.in_box(min_lat, min_lng, max_lat, max_lng, limit)

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        try:
            return await self.primary.near(lat, lng, radius_m, limit)  # type: ignore[no-any-return]
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            return await self.local.near(lat, lng, radius_m, limit)


class FallbackDirectory:
    """Agents' statuses: Redis, mirrored locally."""

    def __init__(self, primary: Any) -> None:
        self.primary = primary
        self.local: dict[str, str] = {}
        self._d = _Degraded("agent statuses")

    async def set_status(self, agent_id: str, status: str) -> None:
        self.local[agent_id] = status
        try:
            await self.primary.set_status(agent_id, status)
        except (RedisError, OSError) as exc:
            self._d.note(exc)

    async def status(self, agent_id: str) -> str | None:
        try:
            return await self.primary.status(agent_id)  # type: ignore[no-any-return]
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            return self.local.get(agent_id)

    async def statuses(self) -> dict[str, str]:
        try:
            found = dict(await self.primary.statuses())
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            return dict(self.local)
        # A Redis that restarted empty forgot who is available: re-teach it
        # what this node knows.
        for agent_id, status in self.local.items():
            if agent_id not in found:
                found[agent_id] = status
                try:
                    await self.primary.set_status(agent_id, status)
                except (RedisError, OSError):
                    break
        return found

    async def forget(self, agent_id: str) -> None:
        self.local.pop(agent_id, None)
        try:
            await self.primary.forget(agent_id)
        except (RedisError, OSError) as exc:
            self._d.note(exc)
