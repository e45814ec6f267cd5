"""/ops: agents' and admins' live view of who is online (technicians and agents)."""

from __future__ import annotations

from typing import Any

from realtime.auth import Principal
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Inbound

NAMESPACE = "/ops"
ROOM = "ops"


class Empty(Inbound):
    pass


class OpsNamespace(BaseNamespace):
    roles = frozenset({"agent", "admin"})

    async def connected(self, sid: str, p: Principal) -> None:
        await self.enter_room(sid, ROOM)

    async def announce(self, kind: str, user_id: str, online: bool,
                       status: str | None = None) -> None:
        """A presence change, to every ops viewer on every node."""
        event: dict[str, Any] = {"kind": kind, "user_id": user_id, "online": online}
        if status is not None:
            event["status"] = status
        await self.emit("presence", event, room=ROOM)

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
