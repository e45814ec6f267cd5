"""/ops: agents' and admins' live view of who is online (technicians and
agents), and of the technicians' days (one row each, jobs as bars)."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Any

from kernel.clock import now_ms
from realtime import rooms
from realtime.auth import Principal
from realtime.feeds.ops import job_out
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Day, Inbound
from scheduling.calendar import DEFAULT_TZ
from tracking import day

if TYPE_CHECKING:
    from realtime.context import Context

NAMESPACE = rooms.OPS


# Most jobs one `day` reply carries (a city's day; the page shows rows, not all).
MAX_DAY_JOBS = 5000


class Empty(Inbound):
    pass


class DayIn(Inbound):
    date: Day | None = None


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

    @handles("day", DayIn)
    async def day(self, p: Principal, sid: str, body: DayIn) -> dict[str, Any]:
        """Every technician's jobs of a day (in the service's timezone), one
        row per technician; `job` pushes keep it live."""
        on, from_ts, to_ts = day.day_range(
            date.fromisoformat(body.date) if body.date else None, DEFAULT_TZ, now_ms())
        orders = await self.ctx.services.order_store.day_of(from_ts, to_ts, MAX_DAY_JOBS)
        rows: dict[str, list[dict[str, Any]]] = {}
        for o in orders:
            rows.setdefault(str(o["technician_id"]), []).append(job_out(o))
        return {"date": on.isoformat(), "timezone": DEFAULT_TZ, "from_ts": from_ts,
                "to_ts": to_ts, "truncated": len(orders) >= MAX_DAY_JOBS,
                "technicians": [{"technician_id": t, "jobs": jobs}
                                for t, jobs in sorted(rows.items())]}
