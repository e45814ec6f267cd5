"""Agents' chosen status (available, away), shared by every node."""

from __future__ import annotations

from typing import Any

from storage.redis.client import AnyRedis


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisAgentDirectory:
    """Agents' chosen status, shared by every node (a hash)."""

    def __init__(self, redis: AnyRedis, prefix: str = "rt") -> None:
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
