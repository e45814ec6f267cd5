"""/ops: agents' and admins' live view of who is online (technicians and agents)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from realtime import rooms
from realtime.auth import Principal
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Inbound

if TYPE_CHECKING:
    from realtime.context import Context

NAMESPACE = rooms.OPS


class Empty(Inbound):
    pass


class OpsNamespace(BaseNamespace):
    """Presence changes are pushed by realtime/feeds/ops.py."""

    roles = frozenset({"agent", "admin"})

    def __init__(self, ctx: Context) -> None:
        super().__init__(NAMESPACE, ctx)

    async def connected(self, sid: str, p: Principal) -> None:
        await self.enter_room(sid, rooms.OPS_ROOM)

    @handles("snapshot", Empty)
    async def snapshot(self, p: Principal, sid: str, body: Empty) -> dict[str, Any]:
        engine = self.ctx.engine
        statuses = await engine.directory.statuses()
        available = [a for a, s in statuses.items() if s == "available"]
        return {
            "technicians": {"online": await engine.tech_presence.count()},
            "agents": {"online": await engine.agent_presence.count(),
                       "available": len(await engine.agent_presence.online(available))},
            "node": engine.node_id, "engine": engine.name,
        }
