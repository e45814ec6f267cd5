"""Technicians' days over HTTP (docs/protocol.md; the model: docs/tracking.md
and docs/scheduling.md, "Lateness").

    GET /api/orders/late                    agent, admin, service
    GET /api/technicians/{id}/day?date=     agent, admin, service, the technician

Registered before the order routes: `/api/orders/late` would otherwise be
read as the order "late".
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from kernel.clock import now_ms
from kernel.errors import Forbidden
from realtime.api import SERVICES, QueryIn, json_response, parse_query, principal, require_role
from realtime.errors import ok
from realtime.feeds.ops import job_out
from realtime.namespaces.models import Day
from scheduling.calendar import DEFAULT_TZ
from tracking import day

TECH = "{technician_id:[A-Za-z0-9_.:@-]{1,64}}"
MAX_LATE = 500


class DayQuery(QueryIn):
    date: Day | None = None


class LateQuery(QueryIn):
    limit: Annotated[int, Field(ge=1, le=MAX_LATE)] = 100


def job_view(order: dict[str, Any], proj: day.Projection | None, now: int) -> dict[str, Any]:
    """A job of the day: its bar (feeds/ops.py) with its actual start and end
    and, while the arrival is ahead, the projection and its lateness."""
    out = job_out(order)
    times = out["times"]
    out["started_ts"], out["ended_ts"] = times.get("in_service"), times.get("completed")
    actual = day.actual_minutes_late(order)
    if actual is not None:
        out.update(projected_arrival_ts=None, eta_basis="actual", minutes_late=actual)
    elif proj is not None and order["state"] in day.AHEAD:
        out.update(projected_arrival_ts=proj.arrival_ts, eta_basis=proj.basis,
                   minutes_late=proj.minutes_late(day.window_start(order)))
    else:
        out.update(projected_arrival_ts=None, eta_basis=None, minutes_late=None)
    return out


async def technician_day(request: web.Request) -> web.Response:
    p = principal(request)
    tech_id = request.match_info["technician_id"]
    if not (p.role in ("agent", "admin", "service") or (p.role == "technician" and p.id == tech_id)):
        raise Forbidden("a technician's day is for staff and the technician")
    query = parse_query(request, DayQuery)
    services = request.app[SERVICES]
    cal = (await services.calendars.of([tech_id])).get(tech_id)
    tz = cal.timezone if cal is not None else DEFAULT_TZ
    now = now_ms()
    on, from_ts, to_ts = day.day_range(
        date.fromisoformat(query.date) if query.date else None, tz, now)
    orders = await services.order_store.day_of(from_ts, to_ts, technician_id=tech_id)
    projections: dict[str, day.Projection] = {}
    if any(o["state"] in day.AHEAD for o in orders):
        projections = await services.tracking.projections(tech_id, now)
    return json_response(ok({
        "technician_id": tech_id, "date": on.isoformat(), "timezone": tz,
        "from_ts": from_ts, "to_ts": to_ts,
        "jobs": [job_view(dict(o), projections.get(o["order_id"]), now) for o in orders],
    }))


async def late_orders(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    query = parse_query(request, LateQuery)
    orders = await request.app[SERVICES].order_store.late_orders(query.limit)
    return json_response(ok({"orders": [
        {k: o.get(k) for k in ("order_id", "technician_id", "customer_id", "state", "window",
                               "late")} for o in orders]}))


def setup_day_routes(app: web.Application) -> None:
    app.router.add_get("/api/orders/late", late_orders)
    app.router.add_get(f"/api/technicians/{TECH}/day", technician_day)
