"""/booking: when a job can be booked, live; holding a slot while the
customer pays, and letting it go (docs/protocol.md, Bookings; the model:
docs/scheduling.md).

    availability        {lat, lng, skill?, from_date, days?, duration_min, granularity_min?}
    watch_availability  the same; the full view now, `availability_changed` after
    unwatch_availability
    hold                {start_ts, duration_min, lat, lng, skill?, technician_id?}
    release             {hold_id}
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden
from realtime import rooms
from realtime.auth import Principal
from realtime.namespaces.base import BaseNamespace, handles
from realtime.namespaces.models import Id, Inbound, Lat, Lng, Ts
from scheduling.schedule import Hold
from scheduling.service import MAX_DAYS, HoldSpec, Query

if TYPE_CHECKING:
    from realtime.context import Context

NAMESPACE = rooms.BOOKING
IsoDate = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]
Minutes = Annotated[int, Field(ge=1, le=12 * 60)]
STAFF = frozenset({"service", "admin", "agent"})
# A query's grid: 14 days at 10 minutes, or 7 at 5. Bounds what one watcher's
# view holds in this node's memory.
MAX_STARTS = 2016


class AvailabilityIn(Inbound):
    lat: Lat
    lng: Lng
    skill: Id | None = None
    from_date: IsoDate
    days: Annotated[int, Field(ge=1, le=MAX_DAYS)] = 7
    duration_min: Minutes
    granularity_min: Annotated[int, Field(ge=5, le=240)] = 30

    @field_validator("from_date")
    @classmethod
    def _a_date_not_past(cls, v: str) -> str:
        day = date.fromisoformat(v)
        # Yesterday in the furthest timezone ahead is still today somewhere.
        if day < datetime.now(UTC).date() - timedelta(days=1):
            raise ValueError("the window is in the past")
        return v

    @model_validator(mode="after")
    def _bounded(self) -> AvailabilityIn:
        starts = self.days * 24 * 60 // self.granularity_min
        if starts > MAX_STARTS:
            raise ValueError(f"at most {MAX_STARTS} start times per query (days x 24 h / "
                             "granularity_min): fewer days or a coarser granularity")
        return self

    def query(self) -> Query:
        return Query(lat=self.lat, lng=self.lng, skill=self.skill,
                     from_day=date.fromisoformat(self.from_date), days=self.days,
                     duration_min=self.duration_min, granularity_min=self.granularity_min)


class HoldIn(Inbound):
    start_ts: Ts
    duration_min: Minutes
    lat: Lat
    lng: Lng
    skill: Id | None = None
    technician_id: Id | None = None


class HoldRef(Inbound):
    hold_id: Id


class Empty(Inbound):
    pass


def slots_out(found: dict[int, list[str]], duration_min: int, staff: bool) -> list[dict[str, Any]]:
    """Start times and how many can come; who, for staff only."""
    out: list[dict[str, Any]] = []
    for start, techs in found.items():
        slot: dict[str, Any] = {"start_ts": start, "end_ts": start + duration_min * 60_000,
                                "count": len(techs)}
        if staff:
            slot["technicians"] = techs
        out.append(slot)
    return out


def hold_out(hold: Hold) -> dict[str, Any]:
    return {"hold_id": hold.hold_id, "technician": hold.technician_id,
            "start_ts": hold.start_ms, "end_ts": hold.end_ms, "expires_ts": hold.expires_ms,
            "state": hold.state, "order_id": hold.order_id}


class BookingNamespace(BaseNamespace):
    """Views move with every hold, release, expiry, booking and cancellation
    on any node: realtime/feeds/booking.py pushes them."""

    roles = frozenset({"customer", "service", "admin", "agent"})

    def __init__(self, ctx: Context) -> None:
        super().__init__(NAMESPACE, ctx)

    def admit(self, p: Principal, kind: Literal["query", "hold"]) -> None:
        if p.role != "service":  # the backend's own calls are not limited
            self.ctx.services.scheduling.admit(kind, f"{p.role}:{p.id}")

    async def disconnected(self, sid: str, principal: Principal) -> None:
        self.ctx.services.scheduling.unwatch(sid)

    @handles("availability", AvailabilityIn)
    async def availability(self, p: Principal, sid: str, body: AvailabilityIn) -> dict[str, Any]:
        self.admit(p, "query")
        found = await self.ctx.services.scheduling.availability(body.query())
        return {"slots": slots_out(found, body.duration_min, p.role in STAFF)}

    @handles("watch_availability", AvailabilityIn)
    async def watch(self, p: Principal, sid: str, body: AvailabilityIn) -> dict[str, Any]:
        """One live view per socket: a new watch replaces the last."""
        self.admit(p, "query")
        view = await self.ctx.services.scheduling.watch(sid, body.query())
        if sid not in self.principals:  # left while the view was computed
            self.ctx.services.scheduling.unwatch(sid)
        slots = [{"start_ts": t, "end_ts": t + body.duration_min * 60_000, "count": n}
                 for t, n in sorted(view.counts.items())]
        return {"slots": slots}

    @handles("unwatch_availability", Empty)
    async def unwatch(self, p: Principal, sid: str, body: Empty) -> dict[str, Any]:
        self.ctx.services.scheduling.unwatch(sid)
        return {}

    @handles("hold", HoldIn)
    async def hold(self, p: Principal, sid: str, body: HoldIn) -> dict[str, Any]:
        if p.role != "customer":
            raise Forbidden("a hold is a customer's, made from their app")
        self.admit(p, "hold")
        try:
            hold = await self.ctx.services.scheduling.hold(p.id, HoldSpec(
                start_ms=body.start_ts, duration_min=body.duration_min, lat=body.lat, lng=body.lng,
                skill=body.skill, technician_id=body.technician_id))
        except Conflict as exc:
            reason = exc.details.get("reason") if isinstance(exc.details, dict) else None
            self.ctx.metrics.holds.labels(str(reason or "conflict")).inc()
            raise
        self.ctx.metrics.holds.labels("made").inc()
        return hold_out(hold)

    @handles("release", HoldRef)
    async def release(self, p: Principal, sid: str, body: HoldRef) -> dict[str, Any]:
        self.admit(p, "hold")
        hold = await self.ctx.services.scheduling.release(Actor(p.id, p.role), body.hold_id)
        return hold_out(hold)
