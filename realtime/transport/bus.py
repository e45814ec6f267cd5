"""Node-to-node signals that are not client events: "drop user U's sockets
from room R", "technician T answered offer O". Handlers run on every node,
this one included. With the memory engine there is one node; with Redis the
signal rides the Socket.IO manager's channel, so it keeps the ordering of the
emits around it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

log = logging.getLogger(__name__)

PREFIX: Final = "\x00bus:"
Handler = Callable[[dict[str, Any]], Awaitable[None] | None]


class Bus:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        # To every other node (queues the publish; never waits on Redis).
        self.remote_nowait: Callable[[str, dict[str, Any]], None] | None = None
        # Counts what arrives from other nodes (a metric).
        self.on_received: Callable[[str], None] = lambda name: None
        # Waits until what was queued for other nodes is published.
        self.flush: Callable[[], Awaitable[None]] | None = None
        # One row of signal `name` to named other nodes only (their own
        # channels), queued; each receives the rows gathered until the next
        # publish as one `{"rows": [...]}`.
        self.row_to_nodes: Callable[[list[str], str, Any], None] | None = None

    def on(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def to_others(self, name: str, data: dict[str, Any]) -> None:
        """Only to the other nodes (this one acted already), without waiting."""
        if self.remote_nowait is not None:
            self.remote_nowait(name, data)

    async def publish(self, name: str, data: dict[str, Any]) -> None:
        await self.dispatch(name, data)
        self.to_others(name, data)

    async def dispatch(self, name: str, data: dict[str, Any]) -> None:
        handler = self._handlers.get(name)
        if handler is None:
            return
        try:
            result = handler(data)
            if result is not None:
                await result
        except Exception as exc:  # one failed signal must not break the listener
            log.warning("bus handler %s failed: %s", name, type(exc).__name__)
