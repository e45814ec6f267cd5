"""Node-to-node signals that are not client events: "drop user U's sockets
from room R", "technician T answered offer O". Handlers run on every node,
this one included. With the memory engine there is one node; with Redis the
signal rides the Socket.IO manager's channel, so it keeps the ordering of the
emits around it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

PREFIX: Final = "\x00bus:"
Handler = Callable[[dict[str, Any]], Awaitable[None] | None]


class BusLink(Protocol):
    """What carries signals to the other nodes (the Redis manager)."""

    host_id: str  # this node's id on the link

    def queue_signal(self, name: str, data: dict[str, Any]) -> None: ...

    def queue_row(self, nodes: list[str], name: str, row: Any) -> None: ...

    async def flush(self, timeout: float = 1.0) -> None: ...


class Bus:
    def __init__(self, link: BusLink | None = None,
                 on_received: Callable[[str], None] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        # To the other nodes (None: one node, the memory engine).
        self._link = link
        # Counts what arrives from other nodes (a metric).
        self.on_received: Callable[[str], None] = on_received or (lambda name: None)

    @property
    def clustered(self) -> bool:
        return self._link is not None

    @property
    def node(self) -> str | None:
        """This node's id on the link (the name of its own channel)."""
        return self._link.host_id if self._link is not None else None

    def on(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def to_others(self, name: str, data: dict[str, Any]) -> None:
        """Only to the other nodes (this one acted already), without waiting."""
        if self._link is not None:
            self._link.queue_signal(name, data)

    def row_to_nodes(self, nodes: list[str], name: str, row: Any) -> None:
        """One row of signal `name` to these other nodes only (their own
        channels), queued; each receives the rows gathered until the next
        publish as one `{"rows": [...]}`."""
        if self._link is not None:
            self._link.queue_row(nodes, name, row)

    async def flush(self) -> None:
        """Wait until what was queued for other nodes is published."""
        if self._link is not None:
            await self._link.flush()

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
