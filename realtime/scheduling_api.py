"""Scheduling over HTTP (docs/protocol.md; the model: docs/scheduling.md).
The business backend sets technicians' calendars; staff and the technician
read them; anyone signed in asks when a job can be booked.

    PUT  /api/technicians/{id}/calendar   service, admin
    GET  /api/technicians/{id}/calendar   service, admin, agent, the technician
    POST /api/availability                anyone signed in (ids for staff only)
    POST /api/holds/{id}/confirm          service, admin (after payment)
    POST /api/holds/{id}/release          service, admin
    GET  /api/holds/{id}                  staff, the hold's customer
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StringConstraints, field_validator, model_validator

from kernel.clock import now_ms
from kernel.errors import Forbidden, NotFound
from realtime.api import (
    CTX,
    SERVICES,
    AddressIn,
    ServiceIn,
    WindowIn,
    json_response,
    parse,
    principal,
    require_role,
)
from realtime.errors import ok
from realtime.namespaces.booking import STAFF, AvailabilityIn, hold_out, slots_out
from realtime.namespaces.models import Id, Inbound, Lat, Lng
from realtime.namespaces.orders import actor_of
from scheduling.calendar import DEFAULT_TZ, calendar_dict, calendar_of, check_calendar

HHMM = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
IsoDate = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]
# A week's rules and a season's exceptions: far more than any real calendar.
MAX_RULES = 50
MAX_EXCEPTIONS = 400
MAX_CORNERS = 200
TECH = "{technician_id:[A-Za-z0-9_.:@-]{1,64}}"
HOLD = "{hold_id:[A-Za-z0-9_.:@-]{1,64}}"


class ShiftIn(Inbound):
    start: HHMM
    end: HHMM  # "00:00": the end of the day


class WeeklyIn(ShiftIn):
    weekday: Annotated[int, Field(ge=0, le=6)]  # 0 Monday


class ExceptionIn(Inbound):
    date: IsoDate
    kind: Literal["off", "extra"]
    start: HHMM | None = None  # none (with `off`): the whole day
    end: HHMM | None = None

    @field_validator("date")
    @classmethod
    def _a_date(cls, v: str) -> str:
        date.fromisoformat(v)  # ValueError: "not a date" with the field
        return v

    @model_validator(mode="after")
    def _both_hours_or_none(self) -> ExceptionIn:
        if (self.start is None) != (self.end is None):
            raise ValueError("give both start and end, or neither")
        return self


class PointIn(Inbound):
    lat: Lat
    lng: Lng


class CircleIn(Inbound):
    lat: Lat
    lng: Lng
    radius_m: Annotated[float, Field(gt=0, le=200_000, allow_inf_nan=False)]


class AreaIn(Inbound):
    circle: CircleIn | None = None
    # [[lat, lng], ...], not closed (the last corner joins the first)
    polygon: Annotated[list[Annotated[list[float], Field(min_length=2, max_length=2)]],
                       Field(min_length=3, max_length=MAX_CORNERS)] | None = None

    @field_validator("polygon")
    @classmethod
    def _corners(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        for lat, lng in v or []:
            if not (-90 <= lat <= 90 and -180 <= lng <= 180):
                raise ValueError("a corner is [lat, lng] with lat in [-90, 90], lng in [-180, 180]")
        return v

    @model_validator(mode="after")
    def _one_shape(self) -> AreaIn:
        if (self.circle is None) == (self.polygon is None):
            raise ValueError("give exactly one of circle, polygon")
        return self


class CalendarIn(Inbound):
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)] = DEFAULT_TZ
    weekly: Annotated[list[WeeklyIn], Field(max_length=MAX_RULES)]
    exceptions: Annotated[list[ExceptionIn], Field(max_length=MAX_EXCEPTIONS, default_factory=list)]
    home: PointIn | None = None
    skills: Annotated[list[Id], Field(max_length=50, default_factory=list)]
    area: AreaIn | None = None

    @field_validator("timezone")
    @classmethod
    def _tz_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*", v):
            raise ValueError("not a timezone name (e.g. Asia/Shanghai)")
        return v


async def put_calendar(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "service", "admin")
    technician_id = request.match_info["technician_id"]
    body = await parse(request, CalendarIn)
    # The wire's shape is the stored one (scheduling/calendar.py calendar_dict).
    cal = calendar_of({"technician_id": technician_id, **body.model_dump(exclude_none=True)})
    check_calendar(cal)
    ts = now_ms()
    await request.app[SERVICES].calendars.put(cal, ts)
    await request.app[CTX].feeds.booking.calendar_set(technician_id)
    return json_response(ok({"calendar": {**calendar_dict(cal), "updated_ts": ts}}))


async def get_calendar(request: web.Request) -> web.Response:
    p = principal(request)
    technician_id = request.match_info["technician_id"]
    if p.role not in ("service", "admin", "agent") and not (
            p.role == "technician" and p.id == technician_id):
        raise Forbidden("a calendar is read by staff and by its technician")
    found = await request.app[SERVICES].calendars.get(technician_id)
    if found is None:
        raise NotFound(f"technician {technician_id!r} has no calendar")
    cal, ts = found
    out: dict[str, Any] = {**calendar_dict(cal), "updated_ts": ts}
    return json_response(ok({"calendar": out}))


async def post_availability(request: web.Request) -> web.Response:
    """Bookable start times: how many technicians can take the job at each;
    staff also see who (customers never do)."""
    p = principal(request)
    body = await parse(request, AvailabilityIn)
    if p.role != "service":
        request.app[SERVICES].scheduling.admit("query", f"{p.role}:{p.id}")
    found = await request.app[SERVICES].scheduling.availability(body.query())
    return json_response(ok({"slots": slots_out(found, body.duration_min, p.role in STAFF)}))


class ConfirmIn(Inbound):
    order_id: Id
    customer_id: Id
    service: ServiceIn
    address: AddressIn
    window: WindowIn | None = None  # when given: the held time, echoed
    skills: Annotated[list[Id], Field(max_length=20)] | None = None


async def confirm_hold(request: web.Request) -> web.Response:
    """The backend, after payment: the hold becomes its order, assigned to the
    held technician for the held time. The same call again answers the same
    order (200 instead of 201)."""
    p = principal(request)
    require_role(p, "service", "admin")
    body = await parse(request, ConfirmIn)
    order, created = await request.app[SERVICES].scheduling.confirm(
        actor_of(p), request.match_info["hold_id"], body.model_dump())
    return json_response(ok({"order": order, "created": created}), 201 if created else 200)


async def release_hold(request: web.Request) -> web.Response:
    """The backend lets a hold go (payment failed or abandoned)."""
    p = principal(request)
    require_role(p, "service", "admin")
    hold = await request.app[SERVICES].scheduling.release(actor_of(p), request.match_info["hold_id"])
    return json_response(ok({"hold": hold_out(hold)}))


async def get_hold(request: web.Request) -> web.Response:
    p = principal(request)
    hold = await request.app[SERVICES].scheduling.get_hold(actor_of(p), request.match_info["hold_id"])
    return json_response(ok({"hold": hold_out(hold)}))


def setup_scheduling_routes(app: web.Application) -> None:
    app.router.add_put(f"/api/technicians/{TECH}/calendar", put_calendar)
    app.router.add_get(f"/api/technicians/{TECH}/calendar", get_calendar)
    app.router.add_post("/api/availability", post_availability)
    app.router.add_post(f"/api/holds/{HOLD}/confirm", confirm_hold)
    app.router.add_post(f"/api/holds/{HOLD}/release", release_hold)
    app.router.add_get(f"/api/holds/{HOLD}", get_hold)
