"""Feedback, ratings and CSAT over HTTP (docs/feedback.md, docs/protocol.md).

    POST  /api/feedback                      anyone signed in
    GET   /api/feedback                      staff: the inbox (filters; overdue first)
    GET   /api/feedback/stats                staff: counts, medians, top and rising terms
    GET   /api/feedback/export.csv           staff: the period's items, spreadsheet-safe
    GET   /api/feedback/{id}                 staff (all steps), the author (their thread)
    GET   /api/feedback/{id}/events          the same, after since_seq
    POST  /api/feedback/{id}/replies         staff (the assignee's, an admin's), the author
    POST  /api/feedback/{id}/notes           staff: internal notes
    PATCH /api/feedback/{id}                 staff: status, assignee, tags, priority
    GET   /api/technicians/{id}/ratings      staff, the technician
    GET   /api/chat/csat                     agents (their own), admins and the backend (all)
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StringConstraints, field_validator

from feedback.analysis import CSV_COLUMNS, Period, csat_summary, csv_row
from feedback.model import MAX_TAGS, STAFF, staff_view, user_event, user_view
from feedback.service import UNSET, FeedbackService
from kernel.clock import now_ms
from kernel.errors import Forbidden, NotFound
from realtime.api import (
    CTX,
    SERVICES,
    QueryIn,
    json_response,
    parse,
    parse_query,
    principal,
    require_role,
)
from realtime.errors import WireError, ok
from realtime.namespaces.models import Id, Inbound, Seq
from realtime.namespaces.orders import actor_of

FID = "{feedback_id:[A-Za-z0-9_.:@-]{1,64}}"
TECH = "{technician_id:[A-Za-z0-9_.:@-]{1,64}}"
Body = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=32, strip_whitespace=True)]
IsoDate = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]
Status = Literal["new", "in_progress", "replied", "resolved", "closed"]
Priority = Literal["low", "normal", "high", "urgent"]
RECENT_COMMENTS = 20


class FeedbackIn(Inbound):
    category: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    body: Body
    order_id: Id | None = None


class ReplyIn(Inbound):
    body: Body


class PatchIn(Inbound):
    status: Status | None = None
    assignee: Id | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] | None = None
    priority: Priority | None = None

    @field_validator("tags")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("tags are distinct")
        return v


class InboxQuery(QueryIn):
    status: Status | None = None
    assignee: Annotated[str, StringConstraints(min_length=1, max_length=64,
                                               pattern=r"^[A-Za-z0-9_.:@-]+$")] | None = None
    tag: Tag | None = None
    category: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    priority: Priority | None = None
    overdue: bool | None = None
    open: bool | None = None
    q: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    technician_id: Id | None = None
    order_id: Id | None = None
    offset: Annotated[int, Field(ge=0, le=10_000)] = 0
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class PeriodQuery(QueryIn):
    from_: IsoDate | None = Field(default=None, alias="from")
    to: IsoDate | None = None


class StatsQuery(PeriodQuery):
    group_by: Literal["day", "week"] = "day"


class EventsQuery(QueryIn):
    since_seq: Seq = 0
    limit: Annotated[int, Field(ge=1, le=500)] = 200


def _service(request: web.Request) -> FeedbackService:
    return request.app[SERVICES].feedback


def _period(request: web.Request, q: PeriodQuery) -> Period:
    tz = _service(request).tz
    return Period.parse(q.from_, q.to, dt.datetime.now(tz).date())


def _view(p: Any, item: dict[str, Any]) -> dict[str, Any]:
    return staff_view(item) if p.role in STAFF else user_view(item)


async def post_feedback(request: web.Request) -> web.Response:
    """用户反馈: any signed-in user. With an order the user is party to, the
    order's technician is linked too."""
    p = principal(request)
    body = await parse(request, FeedbackIn)
    ctx = request.app[CTX]
    technician = None
    if body.order_id is not None:
        try:
            order = await ctx.services.orders.visible(actor_of(p), body.order_id)
            technician = order.get("technician_id")
        except (NotFound, Forbidden):
            pass  # an order the user cannot see is kept as they wrote it, unlinked
    item = await _service(request).create(actor_of(p), p.name, category=body.category,
                                          body=body.body, order_id=body.order_id,
                                          technician_id=technician)
    return json_response(ok({"feedback": staff_view(item)}), 201)


async def list_feedback(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    q = parse_query(request, InboxQuery)
    query = q.model_dump(exclude={"offset", "limit"}, exclude_none=True)
    items = await _service(request).inbox(actor_of(p), query, q.offset, q.limit + 1)
    more = len(items) > q.limit
    return json_response(ok({"feedback": [staff_view(i) for i in items[:q.limit]], "has_more": more,
                             "next_offset": q.offset + q.limit if more else None,
                             "now": now_ms()}))


async def get_feedback(request: web.Request) -> web.Response:
    p = principal(request)
    item, events = await _service(request).thread(actor_of(p), request.match_info["feedback_id"], 0, 500)
    return json_response(ok({"feedback": _view(p, item), "events": events}))


async def get_events(request: web.Request) -> web.Response:
    p = principal(request)
    q = parse_query(request, EventsQuery)
    item, events = await _service(request).thread(actor_of(p), request.match_info["feedback_id"],
                                                  q.since_seq, q.limit)
    view = _view(p, item)
    return json_response(ok({"feedback": view, "events": events,
                             "last_seq": view["seq"], "has_more": len(events) == q.limit}))


async def post_reply(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, ReplyIn)
    item, event = await _service(request).reply(actor_of(p), p.name, request.match_info["feedback_id"],
                                                 body.body)
    if p.role not in STAFF:
        return json_response(ok({"feedback": user_view(item), "event": user_event(event)}), 201)
    return json_response(ok({"feedback": staff_view(item), "event": event}), 201)


async def post_note(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    body = await parse(request, ReplyIn)
    item, event = await _service(request).note(actor_of(p), p.name, request.match_info["feedback_id"],
                                                body.body)
    return json_response(ok({"feedback": staff_view(item), "event": event}), 201)


async def patch_feedback(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    body = await parse(request, PatchIn)
    given = body.model_fields_set
    if not given:
        raise WireError("invalid", "nothing to change: give status, assignee, tags or priority")
    item, events = await _service(request).update(
        actor_of(p), p.name, request.match_info["feedback_id"],
        assignee=body.assignee if "assignee" in given else UNSET,
        status=body.status, tags=body.tags, priority=body.priority)
    return json_response(ok({"feedback": staff_view(item), "events": events}))


async def feedback_stats(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    q = parse_query(request, StatsQuery)
    stats = await _service(request).stats(actor_of(p), _period(request, q), q.group_by)
    return json_response(ok(stats))


async def export_csv(request: web.Request) -> web.StreamResponse:
    """The period's items as CSV (UTF-8 with a BOM, so that Excel reads the
    Chinese right); a cell a spreadsheet would run as a formula starts with
    an apostrophe."""
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    q = parse_query(request, PeriodQuery)
    period = _period(request, q)
    service = _service(request)
    rows = service.export(actor_of(p), period)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="feedback-{period.start}-{period.end}.csv"'})
    await response.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    await response.write(("\ufeff" + buf.getvalue()).encode())
    async for item in rows:
        buf.seek(0)
        buf.truncate()
        writer.writerow(csv_row(item, service.tz))
        await response.write(buf.getvalue().encode())
    await response.write_eof()
    return response


async def technician_ratings(request: web.Request) -> web.Response:
    p = principal(request)
    tech = request.match_info["technician_id"]
    if not (p.role in STAFF or (p.role == "technician" and p.id == tech)):
        raise Forbidden("a technician's ratings are for staff and the technician")
    store = request.app[SERVICES].rating_store
    agg = (await store.aggregates([tech], now_ms()))[tech]
    recent = await store.recent(tech, RECENT_COMMENTS)
    return json_response(ok({"technician_id": tech, "aggregate": agg, "recent": recent}))


async def chat_csat(request: web.Request) -> web.Response:
    """CSAT of closed support conversations per agent and ISO week: an agent
    sees their own, admins and the backend every agent's."""
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    q = parse_query(request, PeriodQuery)
    period = _period(request, q)
    tz = _service(request).tz
    start, end = period.bounds_ms(tz)
    agent = p.id if p.role == "agent" else None
    rows = await request.app[SERVICES].chat_store.csat_between(start, end, agent)
    return json_response(ok({"from": period.start.isoformat(), "to": period.end.isoformat(),
                             **csat_summary(rows, tz)}))


def setup_feedback_routes(app: web.Application) -> None:
    app.router.add_post("/api/feedback", post_feedback)
    app.router.add_get("/api/feedback", list_feedback)
    app.router.add_get("/api/feedback/stats", feedback_stats)
    app.router.add_get("/api/feedback/export.csv", export_csv)
    app.router.add_get(f"/api/feedback/{FID}", get_feedback)
    app.router.add_patch(f"/api/feedback/{FID}", patch_feedback)
    app.router.add_get(f"/api/feedback/{FID}/events", get_events)
    app.router.add_post(f"/api/feedback/{FID}/replies", post_reply)
    app.router.add_post(f"/api/feedback/{FID}/notes", post_note)
    app.router.add_get(f"/api/technicians/{TECH}/ratings", technician_ratings)
    app.router.add_get("/api/chat/csat", chat_csat)
