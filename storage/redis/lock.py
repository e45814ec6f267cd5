"""A lock shared by every node (the chat queue's pump), degrading to a lock of
this node alone while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import LockError, RedisError

from storage.redis.client import AnyRedis


def redis_lock(redis: AnyRedis, name: str, timeout_s: float = 10.0) -> Any:
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
