"""Support routing: the queue of waiting customers and the agents who take them.

Least-loaded first: the oldest waiting conversation goes to the available
agent with the fewest open conversations, below a per-agent cap. Claims are
atomic in the store (status queued -> assigned), so a conversation is never
given to two agents. An agent who disconnects keeps their conversations for
a grace period; after it they go back to the front of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from chat.model import Conversation
from tracking.clock import now_ms

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


@dataclass
class AgentState:
    status: str = "away"
    connections: int = 0
    load: int = 0
    name: str | None = None
    grace: asyncio.Task[None] | None = field(default=None, repr=False)


ConversationChanged = Callable[[Conversation], Awaitable[None]]
QueuePosition = Callable[[Conversation, int], Awaitable[None]]


class Router:
    def __init__(self, store: RoutingStore, *, conversation_changed: ConversationChanged,
                 queue_position: QueuePosition, cap: int = 5, grace_s: float = 60.0) -> None:
        self._store = store
        self._changed = conversation_changed
        self._position = queue_position
        self.cap = cap
        self.grace_s = grace_s
        self.agents: dict[str, AgentState] = {}
        self._lock = asyncio.Lock()
        self._positions: dict[str, int] = {}
        self.queue_length = 0  # as of the last pump (capped at POSITION_PUSH_LIMIT)

    # -- agents ----------------------------------------------------------
    async def agent_connected(self, agent_id: str, name: str | None) -> AgentState:
        st = self.agents.get(agent_id)
        if st is None:
            st = self.agents[agent_id] = AgentState(name=name)
            st.load = len(await self._store.assigned_to(agent_id))
        st.connections += 1
        if st.grace is not None:
            st.grace.cancel()
            st.grace = None
        return st

    async def agent_disconnected(self, agent_id: str) -> None:
        st = self.agents.get(agent_id)
        if st is None:
            return
        st.connections -= 1
        if st.connections <= 0:
            st.connections = 0
            st.grace = asyncio.get_running_loop().create_task(self._expire(agent_id))

    async def _expire(self, agent_id: str) -> None:
        await asyncio.sleep(self.grace_s)
        st = self.agents.get(agent_id)
        if st is None or st.connections > 0:
            return
        del self.agents[agent_id]
        requeued = 0
        for conv in await self._store.assigned_to(agent_id):
            rank = now_ms() - FRONT_OFFSET
            back = await self._store.update(
                conv["conversation_id"], {"status": "assigned", "assignee": agent_id},
                {"status": "queued", "queue_rank": rank, "updated_ts": now_ms()},
                unset=("assignee",))
            if back is not None:
                requeued += 1
                await self._changed(back)
        log.info("agent %s gone after the grace period; %d conversations requeued",
                 agent_id, requeued)
        await self.pump()

    async def set_status(self, agent_id: str, status: str) -> AgentState:
        st = self.agents[agent_id]
        st.status = status
        if status == "available":
            await self.pump()
        return st

    def available(self) -> int:
        return sum(1 for a in self.agents.values() if a.status == "available" and a.connections)

    # -- queue -----------------------------------------------------------
    def _pick(self) -> str | None:
        best: tuple[int, str] | None = None
        for agent_id, st in self.agents.items():
            if st.status != "available" or st.connections == 0 or st.load >= self.cap:
                continue
            if best is None or (st.load, agent_id) < best:
                best = (st.load, agent_id)
        return best[1] if best else None

    async def pump(self) -> None:
        """Assign waiting conversations while agents have room; then tell the
        customers still waiting where they stand."""
        async with self._lock:
            while True:
                agent_id = self._pick()
                if agent_id is None:
                    break
                head = await self._store.queued(1)
                if not head:
                    break
                conv = await self._store.update(
                    head[0]["conversation_id"], {"status": "queued"},
                    {"status": "assigned", "assignee": agent_id, "assigned_ts": now_ms(),
                     "updated_ts": now_ms()})
                if conv is None:
                    continue  # closed or claimed meanwhile
                self.agents[agent_id].load += 1
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

    def released(self, agent_id: str | None) -> None:
        st = self.agents.get(agent_id) if agent_id else None
        if st is not None and st.load > 0:
            st.load -= 1

    def took(self, agent_id: str) -> None:
        st = self.agents.get(agent_id)
        if st is not None:
            st.load += 1

    async def close(self) -> None:
        for st in self.agents.values():
            if st.grace is not None:
                st.grace.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await st.grace
