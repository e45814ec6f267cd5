"""One asyncio lock per key (an order, a conversation), kept only while
someone holds or waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator

from kernel import deadline
from kernel.errors import Unavailable


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def hold(self, key: str, wait_s: float | None, busy: str) -> AsyncIterator[None]:
        """Hold `key`'s lock, waiting for it at most `wait_s` (None: as long as
        it takes); past that `Unavailable(busy)`. While the store stalls, work
        queued behind one another on one key would otherwise be answered one
        store timeout after another, far past the bound the client was promised."""
        lock = self(key)
        try:
            async with asyncio.timeout(deadline.remaining(wait_s)):
                await lock.acquire()
        except TimeoutError:
            raise Unavailable(busy) from None
        try:
            yield
        finally:
            lock.release()
