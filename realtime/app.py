"""create_app(settings): the composition root. Builds the Socket.IO server,
the HTTP routes and the services; opens and closes the stores in cleanup_ctx.
No module-level state: two apps in one process are independent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from realtime.api import (
    CTX,
    DRAIN,
    SERVICES,
    Drain,
    api_middleware,
    hide_server_version,
    json_response,
    metrics_listener,
    server_header,
    setup_routes,
)
from realtime.auth import TokenVerifier
from realtime.context import Context, Edge
from realtime.day_api import setup_day_routes
from realtime.engine import build_engine
from realtime.errors import ok
from realtime.feedback_api import setup_feedback_routes
from realtime.feeds import build_feeds
from realtime.limits import LIMITS, Limits
from realtime.metrics import Metrics
from realtime.namespaces.base import NotServed
from realtime.namespaces.booking import BookingNamespace
from realtime.namespaces.chat import ChatNamespace
from realtime.namespaces.ops import OpsNamespace
from realtime.namespaces.orders import OrdersNamespace
from realtime.namespaces.tracking import TrackingNamespace
from realtime.outbox_api import setup_outbox_routes
from realtime.pages import setup_pages
from realtime.rooms import CHAT as CHAT_NS
from realtime.rooms import OPS as OPS_NS
from realtime.rooms import ORDERS as ORDERS_NS
from realtime.rooms import TRACKING as TRACKING_NS
from realtime.scheduling_api import setup_scheduling_routes
from realtime.services import Services, build_services, stop_embedded
from realtime.settings import Settings
from realtime.transport.cluster import ClusterManager
from realtime.transport.hostile import Hostile, HostileLogFilter
from realtime.transport.sio import RealtimeServer

log = logging.getLogger(__name__)


def cors_policy(settings: Settings) -> Any:
    """Exact origins from the settings, plus the server's own origin (its pages)."""
    if "*" in settings.cors_origins:
        return "*"
    allowed = frozenset(settings.cors_origins)

    def check(origin: str | None, environ: dict[str, Any]) -> bool:
        if origin is None:
            return True  # not a browser: native apps and servers send no Origin
        if origin.rstrip("/") in allowed:
            return True
        host = environ.get("HTTP_HOST")
        return host is not None and origin in (f"http://{host}", f"https://{host}")

    return check


def create_app(settings: Settings) -> web.Application:
    settings.ensure_secret()
    quiet_drivers()
    metrics = Metrics()

    async def link_restored() -> None:
        """The Redis link is back after an outage (Redis engine only)."""
        if feeds.tracking.interest is not None:
            feeds.tracking.interest.refresh()
        await resync(sio, services)

    engine = build_engine(settings, on_link_restored=link_restored,
                          on_bus_received=lambda name: metrics.bus_received.labels(name).inc())
    sio = RealtimeServer(
        async_mode="aiohttp",
        client_manager=engine.manager,
        cors_allowed_origins=cors_policy(settings),
        max_http_buffer_size=settings.max_message_bytes,
        max_unsent_bytes=settings.max_unsent_bytes,
        ping_interval=settings.ping_interval_s,
        ping_timeout=settings.ping_timeout_s,
        join_timeout_s=settings.join_timeout_s,
        count_hostile=metrics.count_hostile,
        http_compression=False,
        # Engine.IO already runs each inbound message in its own task; a
        # second task per event at the Socket.IO layer is pure overhead.
        async_handlers=False,
        logger=False,
        engineio_logger=False,
    )
    edge = Edge(settings, metrics, TokenVerifier(settings), sio, engine)
    feeds = build_feeds(edge)
    services = build_services(settings, engine, metrics, feeds)
    ctx = Context.of(edge, services, feeds)
    tracking_ns = TrackingNamespace(ctx)
    for ns in (OrdersNamespace(ctx), tracking_ns, ChatNamespace(ctx), OpsNamespace(ctx),
               BookingNamespace(ctx), NotServed(ctx)):
        sio.register_namespace(ns)
    sio.on_fast(TRACKING_NS, "location", tracking_ns.fast_location)
    if isinstance(engine.manager, ClusterManager):
        metrics.watch_cluster(engine.manager)

    app = web.Application(middlewares=[api_middleware], client_max_size=settings.max_message_bytes)
    app[CTX] = ctx
    app[SERVICES] = services
    app[LIMITS] = Limits(settings, metrics)
    app[DRAIN] = Drain()  # begun on SIGTERM (realtime/__main__.py): /readyz then answers 503
    hide_server_version()
    app.on_response_prepare.append(server_header)
    app.cleanup_ctx.append(metrics_listener)
    sio.attach(app)
    setup_day_routes(app)  # before the order routes (/api/orders/late)
    setup_outbox_routes(app)
    setup_feedback_routes(app)
    setup_routes(app)
    setup_scheduling_routes(app)
    setup_pages(app, settings)
    app.router.add_get("/", index)

    async def run(app: web.Application) -> AsyncIterator[None]:
        background: list[asyncio.Task[None]] = []
        try:
            await services.start()
            await feeds.start()
            if isinstance(engine.manager, ClusterManager):
                await engine.manager.start_listening(sio)
            loop = asyncio.get_running_loop()
            background.append(loop.create_task(presence_keeper(ctx, settings.presence_ttl_s)))
            if feeds.tracking.interest is not None:
                background.append(loop.create_task(feeds.tracking.interest.run()))
            log.info("store ready (%s); %s engine, node %s",
                     "embedded" if services.store.embedded else "MONGO_URL", engine.name,
                     engine.node_id)
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await feeds.stop()
            await services.stop()
            await engine.close()
            await stop_embedded(services.store)

    app.cleanup_ctx.append(run)

    async def say_goodbye(app: web.Application) -> None:
        await sio.close_all()

    app.on_shutdown.append(say_goodbye)
    quiet_bad_requests(app, sio.hostile)
    return app


def quiet_bad_requests(app: web.Application, hostile: Hostile) -> None:
    """aiohttp logs a traceback for every malformed HTTP request (an
    oversized header, a garbage request line): anyone could fill the log.
    While this app runs they are counted as hostile input instead."""
    logger = logging.getLogger("aiohttp.server")
    quiet = HostileLogFilter(hostile, "bad_http_request", "Error handling request",
                             (HttpProcessingError,))

    async def install(app: web.Application) -> AsyncIterator[None]:
        logger.addFilter(quiet)
        yield
        logger.removeFilter(quiet)

    app.cleanup_ctx.append(install)


async def resync(sio: RealtimeServer, services: Services) -> None:
    """After a Redis outage: cross-node emits were lost; ask every client to
    replay its durable streams (`subscribe`/`join` with `since_seq`), and
    re-read what this node cached from bus messages."""
    services.tracking.invalidate_all()
    for ns in (ORDERS_NS, CHAT_NS, TRACKING_NS):
        await sio.emit("resync", {"reason": "cluster_link_restored"}, namespace=ns)


def quiet_drivers() -> None:
    """The MongoDB driver at DEBUG prints whole commands, webhook secrets and
    chat messages among them: never below INFO, even at REALTIME_LOG_LEVEL=DEBUG."""
    driver = logging.getLogger("pymongo")
    if driver.getEffectiveLevel() < logging.INFO:
        driver.setLevel(logging.INFO)


async def presence_keeper(ctx: Context, ttl_s: float) -> None:
    """Refresh this node's presence claims, and announce users whose node
    died (their claims lapsed) as offline; a dead agent's chats start their
    grace period."""
    engine = ctx.engine
    interval = max(0.2, min(5.0, ttl_s / 3))
    while True:
        await asyncio.sleep(interval)
        try:
            await engine.tech_presence.heartbeat()
            await engine.agent_presence.heartbeat()
            await engine.user_presence.heartbeat()
            await engine.user_presence.sweep()
            for tech in await engine.tech_presence.sweep():
                await ctx.feeds.ops.announce("technician", tech, False)
            for agent in await engine.agent_presence.sweep():
                ctx.services.router.agent_offline(agent)
                await ctx.feeds.ops.announce("agent", agent, False)
        except Exception as exc:  # Redis away: try again next round
            log.warning("presence upkeep failed: %s", type(exc).__name__)


async def index(request: web.Request) -> web.Response:
    return json_response(ok({
        "service": "realtime",
        "socketio_path": "/socket.io/",
        "namespaces": [ORDERS_NS, TRACKING_NS, CHAT_NS, OPS_NS],
        "docs": "docs/protocol.md",
    }))
