"""Support routing: the queue of waiting customers and the agents who take them.

Least-loaded first: the oldest waiting conversation goes to the available,
online agent with the fewest assigned conversations, below a per-agent cap.
Everything the choice needs is shared (agent statuses in the directory,
presence, loads counted in the store), so any node may run the pump; a
cluster-wide lock keeps two nodes from pumping at once, and claims are
atomic in the store (status queued -> assigned), so a conversation is never
given to two agents. An agent who disconnects keeps their conversations for
a grace period; after it they go back to the front of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

from chat.model import Conversation
from kernel.clock import now_ms

log = logging.getLogger(__name__)

# Requeued conversations rank before every fresh one (ranks of fresh ones
# are their queue time in ms), and among themselves by requeue time.
FRONT_OFFSET: Final = 10**13
# Queue-position pushes go to at most this many waiting customers per change.
POSITION_PUSH_LIMIT: Final = 500


class RoutingStore(Protocol):
    async def queued(self, limit: int) -> list[Conversation]: ...

    async def update(self, conv_id: str, expect: dict[str, Any], changes: dict[str, Any],
                     unset: tuple[str, ...] = ()) -> Conversation | None: ...

    async def assigned_to(self, agent_id: str) -> list[Conversation]: ...

    async def load_by_agent(self) -> dict[str, int]: ...


class AgentDirectory(Protocol):
    """Agents' chosen status (available | away), shared by every node."""

    async def set_status(self, agent_id: str, status: str) -> None: ...

    async def status(self, agent_id: str) -> str | None: ...

    async def statuses(self) -> dict[str, str]: ...

    async def forget(self, agent_id: str) -> None: ...


class Online(Protocol):
    async def online(self, user_ids: list[str]) -> set[str]: ...


class MemoryAgentDirectory:
    def __init__(self) -> None:
        self._status: dict[str, str] = {}

    async def set_status(self, agent_id: str, status: str) -> None:
        self._status[agent_id] = status

    async def status(self, agent_id: str) -> str | None:
        return self._status.get(agent_id)

    async def statuses(self) -> dict[str, str]:
        return dict(self._status)

    async def forget(self, agent_id: str) -> None:
        self._status.pop(agent_id, None)


PumpLock = Callable[[], contextlib.AbstractAsyncContextManager[Any]]
ConversationChanged = Callable[[Conversation], Awaitable[None]]
QueuePosition = Callable[[Conversation, int], Awaitable[None]]


def local_lock() -> PumpLock:
    lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def held() -> AsyncIterator[None]:
        async with lock:
            yield

    return held


class Router:
    def __init__(self, store: RoutingStore, *, directory: AgentDirectory, presence: Online,
                 conversation_changed: ConversationChanged, queue_position: QueuePosition,
                 pump_lock: PumpLock | None = None, cap: int = 5, grace_s: float = 60.0) -> None:
        self._store = store
        self.directory = directory
        self.presence = presence
        self._changed = conversation_changed
        self._position = queue_position
        self._pump_lock = pump_lock or local_lock()
        self.cap = cap
        self.grace_s = grace_s
        self._graces: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self._positions: dict[str, int] = {}
        self.queue_length = 0  # as of the last pump (capped at POSITION_PUSH_LIMIT)
        self.available_agents = 0  # as of the last pump

    # -- agents ----------------------------------------------------------
    async def agent_connected(self, agent_id: str) -> str:
        """An agent's connection on this node; returns their status."""
        grace = self._graces.pop(agent_id, None)
        if grace is not None:
            grace.cancel()
        status = await self.directory.status(agent_id)
        if status is None:
            status = "away"  # nobody is handed chats before saying they are available
            await self.directory.set_status(agent_id, status)
        return status

    def agent_offline(self, agent_id: str) -> None:
        """The agent has no connection on any node (their last one closed, or
        their node died): start the grace period on this node."""
        if agent_id not in self._graces and not self._closed:
            self._graces[agent_id] = asyncio.get_running_loop().create_task(
                self._expire(agent_id), context=contextvars.Context())  # not the caller's deadline

    async def _expire(self, agent_id: str) -> None:
        await asyncio.sleep(self.grace_s)
        self._graces.pop(agent_id, None)
        if await self.presence.online([agent_id]):
            return  # back on some node
        await self.directory.forget(agent_id)
        requeued = 0
        for conv in await self._store.assigned_to(agent_id):
            back = await self._store.update(
                conv["conversation_id"], {"status": "assigned", "assignee": agent_id},
                {"status": "queued", "queue_rank": now_ms() - FRONT_OFFSET,
                 "updated_ts": now_ms()}, unset=("assignee",))
            if back is not None:
                requeued += 1
                await self._changed(back)
        log.info("agent gone after the grace period; %d conversations requeued", requeued)
        await self.pump()

    async def set_status(self, agent_id: str, status: str) -> tuple[str, int]:
        await self.directory.set_status(agent_id, status)
        if status == "available":
            await self.pump()
        load = (await self._store.load_by_agent()).get(agent_id, 0)
        return status, load

    async def is_online(self, agent_id: str) -> bool:
        return bool(await self.presence.online([agent_id]))

    async def least_loaded(self, loads: dict[str, int]) -> str | None:
        """The routing rule for other work than chats (a follow-up feedback
        item): the available, online agent with the least of it (`loads`),
        ties by id; None when nobody is available."""
        statuses = await self.directory.statuses()
        online = await self.presence.online([a for a, s in statuses.items() if s == "available"])
        best = min(((loads.get(a, 0), a) for a in online), default=None)
        return None if best is None else best[1]

    # -- queue -----------------------------------------------------------
    async def _pick(self) -> str | None:
        statuses = await self.directory.statuses()
        available = [a for a, s in statuses.items() if s == "available"]
        online = await self.presence.online(available)
        self.available_agents = len(online)
        if not online:
            return None
        loads = await self._store.load_by_agent()
        best = min(((loads.get(a, 0), a) for a in online), default=None)
        if best is None or best[0] >= self.cap:
            return None
        return best[1]

    async def pump(self) -> None:
        """Assign waiting conversations while agents have room; then tell the
        customers still waiting where they stand."""
        async with self._pump_lock():
            while True:
                head = await self._store.queued(1)
                if not head:
                    break
                agent_id = await self._pick()
                if agent_id is None:
                    break
                conv = await self._store.update(
                    head[0]["conversation_id"], {"status": "queued"},
                    {"status": "assigned", "assignee": agent_id, "assigned_ts": now_ms(),
                     "updated_ts": now_ms()})
                if conv is None:
                    continue  # closed or claimed meanwhile
                self._positions.pop(conv["conversation_id"], None)
                await self._changed(conv)
            await self._push_positions()

    async def _push_positions(self) -> None:
        waiting = await self._store.queued(POSITION_PUSH_LIMIT)
        self.queue_length = len(waiting)
        for i, conv in enumerate(waiting, start=1):
            cid = conv["conversation_id"]
            if self._positions.get(cid) != i:
                self._positions[cid] = i
                await self._position(conv, i)
        if len(self._positions) > 4 * POSITION_PUSH_LIMIT:
            live = {c["conversation_id"] for c in waiting}
            self._positions = {k: v for k, v in self._positions.items() if k in live}

    async def close(self) -> None:
        self._closed = True  # a disconnect after this starts no grace nobody would end
        for task in self._graces.values():
            task.cancel()
        for task in list(self._graces.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._graces.clear()
