"""HTTP API for the business backend, plus health and metrics.

Errors use the same ``{ok: false, error}`` body as acks, with the matching
HTTP status. The caller is always the bearer token's principal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from aiohttp import web, web_response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from chat.model import conversation_view, message_view
from kernel.errors import DomainError, Forbidden
from orders.lifecycle import STATES
from realtime.auth import Principal
from realtime.context import Context
from realtime.errors import WireError, ok, to_error
from realtime.limits import LIMITS, SOCKETIO_PATH, Limited, Limits, is_new_session, within
from realtime.metrics import Metrics
from realtime.namespaces.base import begin_request
from realtime.namespaces.models import MAX_SAFE_INT, Id, Inbound, Lat, Lng, Ts
from realtime.namespaces.orders import actor_of
from realtime.services import Services
from realtime.transport import jsonwire
from storage.gate import store_deadline
from storage.trails import trail_for_order

log = logging.getLogger(__name__)

CTX: web.AppKey[Context] = web.AppKey("ctx", Context)
SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


class Drain:
    """Whether this node is stopping. Once begun (SIGTERM, realtime/__main__.py),
    /readyz answers 503 `draining` so that load balancers send new clients to
    other nodes, while everything else is served as before; the node closes
    its sockets when the drain period ends."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the start

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)

# Bound on free-form `data` objects the backend attaches to events.
MAX_DATA_BYTES = 8 * 1024
TRAIL_PAGE = 10_000

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ServiceIn(Inbound):
    code: Id
    name: Name


class AddressIn(Inbound):
    lat: Lat
    lng: Lng
    text: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class WindowIn(Inbound):
    start_ts: Ts
    end_ts: Ts

    @field_validator("end_ts")
    @classmethod
    def _after_start(cls, v: int, info: Any) -> int:
        if v < info.data.get("start_ts", 0):
            raise ValueError("end_ts must not be before start_ts")
        return v


class CreateOrderIn(Inbound):
    order_id: Id
    customer_id: Id
    service: ServiceIn
    address: AddressIn
    window: WindowIn
    skills: Annotated[list[Id], Field(max_length=20)] | None = None


class AssignIn(Inbound):
    technician_id: Id


class EventIn(Inbound):
    state: Annotated[str, StringConstraints(max_length=32)]
    data: dict[str, Any] | None = None

    @field_validator("state")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STATES:
            raise ValueError(f"state must be one of {list(STATES)}")
        return v

    @field_validator("data")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if len(json.dumps(v)) > MAX_DATA_BYTES:
            raise ValueError(f"data must encode to at most {MAX_DATA_BYTES} bytes")
        check_plain(v, 0)
        return v


# Free-form JSON we store must fit MongoDB (nesting, 64-bit ints, keys
# without NUL) and JavaScript (safe integers, finite numbers). The body was
# parsed by realtime/transport/jsonwire.py, which already refuses NaN, infinities and
# NUL in keys; checked again here because this is what gets stored.
MAX_DEPTH = 16


def check_plain(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"data nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or "\x00" in key:
                raise ValueError("keys in data must be strings without NUL characters")
            check_plain(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_plain(item, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INT:
        raise ValueError("integers in data must be within ±(2**53 - 1)")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers in data must be finite")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=jsonwire.dumps)


async def parse(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_length is None and request.body_exists is False:
        raise WireError("invalid", "a JSON body is required")
    try:
        raw = await request.json(loads=jsonwire.loads)
    except web.HTTPRequestEntityTooLarge:
        raise WireError("too_large", "request body too large") from None
    except UnicodeDecodeError:
        raise WireError("invalid", "body is not valid JSON") from None
    except ValueError as exc:  # malformed, or refused by transport/jsonwire.py (depth, numbers, keys)
        raise WireError("invalid", f"body is not valid JSON: {jsonwire.why(exc)}") from None
    if not isinstance(raw, dict):
        raise WireError("invalid", "body must be a JSON object",
                        [{"field": "(payload)", "error": "must be an object"}])
    return model.model_validate(raw)


class QueryIn(BaseModel):
    """A query string's parameters: an unknown one refused, numbers read from
    their text (a query has no types), each then checked like a body's."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_query(request: web.Request, model: type[QueryIn]) -> Any:
    if any(len(request.query.getall(k)) > 1 for k in request.query):
        raise WireError("invalid", "a query parameter is given more than once")
    return model.model_validate(dict(request.query))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limits (realtime/limits.py), bearer auth, JSON errors and the HTTP
    metric. A new Engine.IO session over its address's rate is refused 429
    before engine.io sees it. Then a websocket handshake passes straight
    through: it has no auth or error of ours to add, and a session is counted
    in realtime_connections, not as an HTTP response."""
    limits = request.app[LIMITS]
    if is_new_session(request):
        try:
            limits.new_session(request)
        except Limited as exc:
            return error_response(exc)
    if (request.headers.get("Upgrade", "").lower() == "websocket"
            and request.path.startswith(SOCKETIO_PATH)):
        return await handler(request)
    ctx = request.app[CTX]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    try:
        if request.path.startswith("/api/"):
            request[PRINCIPAL] = authenticate(request, ctx, limits)
            begin_request(request[PRINCIPAL], ctx.settings)
        elif not request.path.startswith(SOCKETIO_PATH):  # sessions: limited above
            limits.by_address(request)
        resp = await handler(request)
    except Limited as exc:  # pages and static files too, not only /api/
        resp = error_response(exc)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/"):
            raise
        code = {404: "not_found", 405: "invalid", 413: "too_large"}.get(exc.status, "invalid")
        resp = error_response(WireError(code, exc.reason))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not request.path.startswith("/api/"):
            raise  # Socket.IO and the pages handle their own failures
        resp = error_response(to_error(exc))
    ctx.metrics.http.labels(route, str(resp.status)).inc()
    return resp


def authenticate(request: web.Request, ctx: Context, limits: Limits) -> Principal:
    """The bearer token's principal, charged to its own bucket; a request
    without a valid token is charged to its address (so a refused token
    costs the same as no token, and a flood of them is limited)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token:
            raise WireError("unauthorized", "send Authorization: Bearer <token>")
        if "token" in request.query or "access_token" in request.query:
            raise WireError("unauthorized", "tokens in the query string are refused")
        p = ctx.verifier.verify(token.strip())
    except (WireError, DomainError):
        limits.by_address(request)
        raise
    limits.by_principal(p)
    return p


def error_response(err: WireError) -> web.Response:
    """The error's body and status; with `Retry-After` (whole seconds, RFC
    9110) whenever the error says when to come back (rate limited, or shed
    by the store's gate)."""
    body = err.body()
    resp = json_response(body, err.http_status)
    retry_ms = body["error"].get("retry_after_ms")
    if isinstance(retry_ms, int | float) and retry_ms > 0:
        resp.headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    return resp


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def require_role(p: Principal, *roles: str) -> None:
    if p.role not in roles:
        raise Forbidden(f"role {p.role!r} may not call this; needs one of {list(roles)}")


async def create_order(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "service", "admin")
    body = await parse(request, CreateOrderIn)
    order, created = await request.app[SERVICES].orders.create(actor_of(p), body.model_dump())
    return json_response(ok({"order": order, "created": created}), 201 if created else 200)


async def get_order(request: web.Request) -> web.Response:
    p = principal(request)
    orders = request.app[SERVICES].orders
    order_id = request.match_info["order_id"]
    # Not theirs: 404, as for an order that does not exist.
    order = await orders.visible(actor_of(p), order_id)
    events = await orders.events_since(order_id, 0)
    return json_response(ok({"order": order, "events": events}))


async def assign_order(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, AssignIn)
    order, event = await request.app[SERVICES].orders.transition(
        actor_of(p), request.match_info["order_id"], "assigned",
        {"technician_id": body.technician_id})
    return json_response(ok({"order": order, "event": event}))


async def post_event(request: web.Request) -> web.Response:
    p = principal(request)
    body = await parse(request, EventIn)
    order, event = await request.app[SERVICES].orders.transition(
        actor_of(p), request.match_info["order_id"], body.state, body.data or {})
    return json_response(ok({"order": order, "event": event}))


async def get_trail(request: web.Request) -> web.Response:
    """The technician's recorded path for an order: evidence for disputes and refunds."""
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    ctx = request.app[CTX]
    if not ctx.settings.trails:
        raise WireError("not_found", "this deployment keeps no trails (REALTIME_TRAILS=false)")
    order_id = request.match_info["order_id"]
    order = await ctx.services.orders.get(order_id)
    after_ts = int_query(request, "after_ts", 0, 0, 2**53)
    limit = int_query(request, "limit", TRAIL_PAGE, 1, TRAIL_PAGE)
    with store_deadline(ctx.settings.mongo_timeout_ms / 1000):  # outside the gate, still bounded
        points = await trail_for_order(ctx.services.store.db, order_id, after_ts, limit)
    return json_response(ok({"order_id": order_id, "technician_id": order.get("technician_id"),
                             "points": points, "has_more": len(points) == limit}))


def _query_number(request: web.Request, name: str, parse: type[int] | type[float],
                  lo: float, hi: float, default: float | None) -> float:
    """A numeric query parameter within lo..hi (NaN and non-numbers refused),
    or its default; required when there is no default."""
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise WireError("invalid", f"{name} is required", [{"field": name, "error": "required"}])
        return default
    try:
        value: float = parse(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # also refuses NaN
        kind = "an integer" if parse is int else "a number"
        raise WireError("invalid", f"{name} must be {kind} within {lo}..{hi}",
                        [{"field": name, "error": f"must be {kind} within {lo}..{hi}"}])
    return value


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    return int(_query_number(request, name, int, lo, hi, default))


def float_query(request: web.Request, name: str, lo: float, hi: float,
                default: float | None = None) -> float:
    return _query_number(request, name, float, lo, hi, default)


async def get_transcript(request: web.Request) -> web.Response:
    """A conversation's messages for agents and the backend (originals, unmasked)."""
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    ctx = request.app[CTX]
    conv_id = request.match_info["conversation_id"]
    conv = await ctx.services.chat.get(conv_id)
    after = int_query(request, "after_seq", 0, 0, 2**53)
    limit = int_query(request, "limit", 100, 1, 1000)
    msgs = await ctx.services.chat_store.messages_after(conv_id, after, limit)
    last = msgs[-1]["seq"] if msgs else after
    return json_response(ok({
        "conversation": conversation_view(conv),
        "messages": [message_view(m, actor_of(p)) for m in msgs],
        "has_more": last < int(conv["last_seq"]),
    }))


class DispatchIn(Inbound):
    strategy: Literal["sequential", "broadcast"] | None = None
    radius_m: Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)] | None = None
    count: Annotated[int, Field(ge=1, le=100)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] | None = None


async def start_dispatch(request: web.Request) -> web.Response:
    p = principal(request)
    require_role(p, "service", "admin", "agent")
    body = await parse(request, DispatchIn) if request.body_exists else DispatchIn()
    doc = await request.app[SERVICES].dispatch.start(
        actor_of(p), request.match_info["order_id"], strategy=body.strategy,
        radius_m=body.radius_m, count=body.count, timeout_s=body.timeout_s)
    return json_response(ok({"dispatch": doc}), 202)


async def get_dispatches(request: web.Request) -> web.Response:
    """Every dispatch round of an order, with each technician considered and why."""
    p = principal(request)
    require_role(p, "agent", "admin", "service")
    ctx = request.app[CTX]
    order_id = request.match_info["order_id"]
    await ctx.services.orders.get(order_id)
    return json_response(ok({"order_id": order_id,
                             "dispatches": await ctx.services.dispatch_store.for_order(order_id)}))


async def nearby(request: web.Request) -> web.Response:
    """Available technicians near a point, nearest first (fresh positions only)."""
    p = principal(request)
    require_role(p, "service", "admin", "agent")
    lat = float_query(request, "lat", -90, 90)
    lng = float_query(request, "lng", -180, 180)
    radius = float_query(request, "radius_m", 1, 100_000, 5000)
    limit = int_query(request, "limit", 20, 1, 50)
    skill = request.query.get("skill") or None
    if skill is not None and len(skill) > 64:
        raise WireError("invalid", "skill is at most 64 characters",
                        [{"field": "skill", "error": "too long"}])
    found = await request.app[SERVICES].dispatch.nearby(lat, lng, radius, skill, limit)
    return json_response(ok({"technicians": found}))


async def healthz(request: web.Request) -> web.Response:
    return json_response(ok({"status": "alive"}))


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAIN].draining:
        # Asked to stop: not ready, whatever the stores say (docs/operations.md, Draining).
        err = WireError("unavailable", "the node is stopping", {"status": "draining"})
        return json_response(err.body(), 503)
    ctx = request.app[CTX]
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(ctx.services.store.client.admin.command("ping"), 2.0)
        checks["mongo"] = "ok"
    except Exception as exc:  # any failure means "not ready"; the reason is the type
        checks["mongo"] = f"down: {type(exc).__name__}"
    ready = checks["mongo"] == "ok"
    redis = ctx.engine.redis
    if redis is not None:
        # Reported, not required: without Redis a node still serves its own
        # clients (docs/operations.md), and failing readiness on every node at
        # once would leave the load balancer with none.
        try:
            await asyncio.wait_for(redis.ping(), 2.0)
            checks["redis"] = "ok"
        except Exception as exc:  # reported as degraded
            checks["redis"] = f"down: {type(exc).__name__}"
    if ready:
        status = "ready" if all(v == "ok" for v in checks.values()) else "degraded"
        return json_response(ok({"status": status, "checks": checks}))
    err = WireError("unavailable", "a backing store is unreachable", {"checks": checks})
    return json_response(err.body(), 503)


async def metrics(request: web.Request) -> web.Response:
    """On the main port: for client addresses in REALTIME_METRICS_ALLOW only
    (the host itself by default). The metrics listener serves them to anyone
    who can reach it (metrics_listener)."""
    ctx = request.app[CTX]
    if not within(request.app[LIMITS].client(request), ctx.settings.metrics_allow):
        err = WireError("forbidden", "metrics are served only to REALTIME_METRICS_ALLOW "
                                     "and on REALTIME_METRICS_PORT")
        return json_response(err.body(), err.http_status)
    return render_metrics(ctx.metrics)


def render_metrics(m: Metrics) -> web.Response:
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


# What every response says in `Server`: no framework or version to look up
# vulnerabilities by.
SERVER_NAME = "realtime"


async def server_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: every routed response, errors, Engine.IO and websocket
    handshakes included."""
    response.headers["Server"] = SERVER_NAME


def hide_server_version() -> None:
    """aiohttp's default `Server` (Python and aiohttp versions), which its
    answers to unparseable requests carry: they come before any route, so
    before server_header. Process-wide; tests/realtime/test_harden_config.py pins it."""
    web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]


async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: with REALTIME_METRICS_PORT, /metrics (and nothing else) on
    its own listener at REALTIME_METRICS_HOST, for Prometheus on an internal
    interface."""
    ctx = app[CTX]
    settings = ctx.settings
    if not settings.metrics_port:
        yield
        return
    side = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        return render_metrics(ctx.metrics)

    side.router.add_get("/metrics", scrape)
    side.on_response_prepare.append(server_header)
    runner = web.AppRunner(side, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        yield
    finally:
        await runner.cleanup()


def setup_routes(app: web.Application) -> None:
    # Order ids in paths use the same charset as on the socket.
    oid = "{order_id:[A-Za-z0-9_.:@-]{1,64}}"
    app.router.add_post("/api/orders", create_order)
    app.router.add_get(f"/api/orders/{oid}", get_order)
    app.router.add_post(f"/api/orders/{oid}/assign", assign_order)
    app.router.add_post(f"/api/orders/{oid}/events", post_event)
    app.router.add_get(f"/api/orders/{oid}/trail", get_trail)
    app.router.add_post(f"/api/orders/{oid}/dispatch", start_dispatch)
    app.router.add_get(f"/api/orders/{oid}/dispatch", get_dispatches)
    app.router.add_get("/api/technicians/nearby", nearby)
    app.router.add_get("/api/conversations/{conversation_id:[A-Za-z0-9_.:@-]{1,64}}/messages",
                       get_transcript)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
