"""Reads that overlap share one round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedReads(Generic[T]):
    """Concurrent reads of one key share one call of `fetch`: after a deploy
    or a network blip every device watching something asks for it at once.
    A reader that gives up (disconnects) does not cancel the others' read.
    The value returned is shared: read it, never change it."""

    def __init__(self) -> None:
        self._pending: dict[Hashable, asyncio.Future[T]] = {}

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(fetch())
            self._pending[key] = pending

            def done(f: asyncio.Future[T]) -> None:
                if self._pending.get(key) is f:
                    del self._pending[key]
                if not f.cancelled():
                    f.exception()  # retrieved here even when every reader left

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    def cancel(self) -> None:
        """Stop the reads under way (the owner is closing)."""
        for pending in list(self._pending.values()):
            pending.cancel()
