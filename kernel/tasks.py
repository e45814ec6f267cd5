"""Background work a service starts and must stop: kept referenced (asyncio
holds tasks weakly), failures logged rather than lost, cancelled on close."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


class BackgroundTasks:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # background work: log, never crash the caller
                log.warning("%s background task failed: %s", self.name, type(exc).__name__)

        # A context of its own: background work is the server's, not the
        # request's that started it (no request deadline, no user's share of
        # the store gate: kernel/deadline.py, storage/gate.py).
        task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        close = getattr(coro, "close", None)
        if close is not None:
            # Cancelled before it ever ran (a close right after a spawn): the
            # work it wraps was never awaited; closing it says so quietly
            # (a no-op for work that ran).
            task.add_done_callback(lambda t: close() if t.cancelled() else None)

    async def settled(self) -> None:
        """Wait until the work under way, and what it starts meanwhile, is
        done (tests, and anyone who must see its effects)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
