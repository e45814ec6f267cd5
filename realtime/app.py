"""create_app(settings): the composition root. Builds the Socket.IO server,
the HTTP routes and the services; opens and closes the stores in cleanup_ctx.
No module-level state: two apps in one process are independent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from chat.routing import Router
from chat.service import ChatService
from orders.service import Event, Order, OrderService
from realtime.api import (
    CTX,
    api_middleware,
    hide_server_version,
    json_response,
    metrics_listener,
    server_header,
    setup_routes,
)
from realtime.auth import TokenVerifier
from realtime.context import Context
from realtime.engine import build_engine
from realtime.errors import ok
from realtime.interest import Interest
from realtime.limits import LIMITS, Limits
from realtime.metrics import Metrics
from realtime.namespaces.base import NotServed
from realtime.namespaces.chat import NAMESPACE as CHAT_NS
from realtime.namespaces.chat import ChatNamespace
from realtime.namespaces.ops import NAMESPACE as OPS_NS
from realtime.namespaces.ops import OpsNamespace
from realtime.namespaces.orders import NAMESPACE as ORDERS_NS
from realtime.namespaces.orders import OrdersNamespace
from realtime.namespaces.tracking import NAMESPACE as TRACKING_NS
from realtime.namespaces.tracking import TrackingNamespace
from realtime.pages import setup_pages
from realtime.settings import Settings
from realtime.transport.cluster import ClusterManager
from realtime.transport.hostile import Hostile, HostileLogFilter
from realtime.transport.sio import RealtimeServer
from storage.chat import MongoChatStore
from storage.dispatch import MongoDispatchStore
from storage.embedded import EmbeddedMongo
from storage.gate import StoreGate
from storage.mongo import MongoOrderStore, connect, ensure_indexes
from storage.trails import KEEP_NO_TRAILS, TrailWriter, ensure_trail_indexes
from tracking.dispatch import DispatchConfig, DispatchService
from tracking.eta import EtaConfig
from tracking.locations import FilterConfig
from tracking.service import TrackingConfig, TrackingService

log = logging.getLogger(__name__)

# How long start-up waits for the store before giving up (the process
# supervisor restarts us); long enough for a replica set election.
STORE_START_TIMEOUT_S = 30.0


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


def point_counter(metrics: Metrics) -> Callable[[str], None]:
    """Counts GPS points by outcome (the labelled children cached: hot path)."""
    children: dict[str, Any] = {}

    def count(outcome: str) -> None:
        child = children.get(outcome)
        if child is None:
            child = children[outcome] = metrics.fast(metrics.points.labels(outcome))
        child.inc()

    return count


def create_app(settings: Settings) -> web.Application:
    settings.ensure_secret()
    metrics = Metrics()
    engine = build_engine(settings)
    sio = RealtimeServer(
        async_mode="aiohttp",
        client_manager=engine.manager,
        cors_allowed_origins=cors_policy(settings),
        max_http_buffer_size=settings.max_message_bytes,
        ping_interval=settings.ping_interval_s,
        ping_timeout=settings.ping_timeout_s,
        join_timeout_s=settings.join_timeout_s,
        http_compression=False,
        # Engine.IO already runs each inbound message in its own task; a
        # second task per event at the Socket.IO layer is pure overhead.
        async_handlers=False,
        logger=False,
        engineio_logger=False,
    )
    sio.hostile.count_with(metrics.count_hostile)
    ctx = Context(settings=settings, metrics=metrics, verifier=TokenVerifier(settings), sio=sio,
                  engine=engine)
    orders_ns = OrdersNamespace(ORDERS_NS, ctx)
    tracking_ns = TrackingNamespace(TRACKING_NS, ctx)
    chat_ns = ChatNamespace(CHAT_NS, ctx)
    ops_ns = OpsNamespace(OPS_NS, ctx)
    ctx.ops = ops_ns
    for ns in (orders_ns, tracking_ns, chat_ns, ops_ns, NotServed(ctx)):
        sio.register_namespace(ns)
    sio.fast_handlers[TRACKING_NS] = {"location": tracking_ns.fast_location}
    sio.eio.max_unsent_bytes = settings.max_unsent_bytes
    engine.bus.on("leave_user", orders_ns.on_leave_user)
    engine.bus.on("positions", tracking_ns.on_positions)
    engine.bus.on("order_changed", tracking_ns.on_order_changed)

    async def dispatch_answered(data: dict[str, Any]) -> None:
        if ctx._dispatch is not None:
            ctx._dispatch.wake(str(data.get("dispatch_id")))

    engine.bus.on("dispatch_answer", dispatch_answered)
    if isinstance(engine.manager, ClusterManager):
        engine.bus.on_received = lambda name: metrics.bus_received.labels(name).inc()
        interest = Interest(engine.manager.host_id, engine.bus.to_others)
        tracking_ns.interest = interest
        engine.bus.on("interest", interest.on_interest)
        engine.bus.on("interest_query", interest.on_query)

        async def link_restored() -> None:
            interest.refresh()
            await resync(sio, ctx)

        engine.manager._on_restored = link_restored

    async def order_changed(order: Order, event: Event) -> None:
        await orders_ns.publish(order, event)
        await tracking_ns.order_changed(order, event)
        try:
            await ctx.chat.append_order_event(order, event)
        except Exception as exc:  # the order change stands; its chat card is best-effort
            log.warning("order %s event %d not written to its chat: %s",
                        order["order_id"], event["seq"], type(exc).__name__)

    app = web.Application(middlewares=[api_middleware], client_max_size=settings.max_message_bytes)
    app[CTX] = ctx
    app[LIMITS] = Limits(settings, metrics)
    hide_server_version()
    app.on_response_prepare.append(server_header)
    app.cleanup_ctx.append(metrics_listener)
    sio.attach(app)
    setup_routes(app)
    setup_pages(app, settings)
    app.router.add_get("/", index)

    async def store(app: web.Application) -> AsyncIterator[None]:
        embedded: EmbeddedMongo | None = None
        url = settings.mongo_url
        if not url:
            embedded = EmbeddedMongo(settings.data_dir / "mongo", settings.embedded_mongo_cmd)
            await embedded.start()
            url = embedded.url
        client = connect(url, settings.mongo_timeout_ms)
        # All store work of this node's calls goes through one gate (storage/gate.py).
        bound_s = settings.mongo_timeout_ms / 1000
        gate = StoreGate(client[settings.mongo_db], timeout_s=bound_s,
                         max_inflight=settings.store_max_inflight,
                         max_waiting=settings.store_max_waiting,
                         max_per_owner=settings.store_max_per_user, on_shed=metrics.store_shed.inc)
        metrics.store_inflight.set_function(lambda: gate.inflight)
        metrics.store_waiting.set_function(lambda: gate.waiting)
        trails: TrailWriter | None = None
        background: list[asyncio.Task[None]] = []
        try:
            db = client[settings.mongo_db]
            await asyncio.wait_for(_ensure_indexes_retrying(db), STORE_START_TIMEOUT_S)
            await ensure_trail_indexes(db, settings.trail_ttl_days)
            chat_store = MongoChatStore(client, db, metrics.observe_store, gate)
            await chat_store.ensure_indexes()
            ctx.mongo = client
            order_store = MongoOrderStore(client, db, metrics.observe_store, gate)
            ctx._orders = OrderService(order_store, order_changed, busy_wait_s=bound_s)
            if settings.trails:
                trails = TrailWriter(db, interval=settings.trail_flush_s,
                                     on_flush=metrics.trail_flushed, on_drop=metrics.trail_dropped)
                trails.start()
                ctx.trails = trails
            ctx._tracking = TrackingService(
                positions=engine.positions,
                orders=ctx._orders,
                active_orders=order_store,
                trails=trails if trails is not None else KEEP_NO_TRAILS,
                limiter=engine.limiter,
                position_out=tracking_ns.position_out,
                count=point_counter(metrics),
                config=tracking_config(settings),
            )
            router = Router(chat_store, directory=engine.directory, presence=engine.agent_presence,
                            conversation_changed=chat_ns.conversation_changed,
                            queue_position=chat_ns.queue_position, pump_lock=engine.pump_lock,
                            cap=settings.agent_cap, grace_s=settings.agent_grace_s)
            metrics.queue_length.set_function(lambda: router.queue_length)
            metrics.agents_available.set_function(lambda: router.available_agents)
            ctx.chat_store = chat_store
            ctx._chat = ChatService(chat_store, ctx._orders, router, chat_ns.delivered,
                                    limits=engine.chat_limits, busy_wait_s=bound_s)
            dispatch_store = MongoDispatchStore(db, gate)
            await dispatch_store.ensure_indexes()
            ctx._dispatch = DispatchService(
                orders=ctx._orders, positions=engine.positions, presence=engine.tech_presence,
                busy=order_store, store=dispatch_store, send_offer=orders_ns.send_offer,
                withdraw=orders_ns.withdraw_offer,
                config=DispatchConfig(strategy=settings.dispatch_strategy,
                                      radius_m=settings.dispatch_radius_m,
                                      count=settings.dispatch_count,
                                      timeout_s=settings.dispatch_timeout_s,
                                      stale_after_s=settings.stale_position_s))
            ctx.dispatch_store = dispatch_store
            tracking_ns.area.start()
            background.append(asyncio.get_running_loop().create_task(
                presence_keeper(ctx, settings.presence_ttl_s)))
            if tracking_ns.interest is not None:
                background.append(asyncio.get_running_loop().create_task(
                    tracking_ns.interest.run()))
            log.info("store ready (%s); %s engine, node %s",
                     "embedded" if embedded else "MONGO_URL", engine.name, engine.node_id)
            yield
        finally:
            if ctx._dispatch is not None:
                await ctx._dispatch.close()
            ctx._dispatch = None
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if ctx._chat is not None:
                await ctx._chat.router.close()
            ctx._chat = None
            await tracking_ns.area.stop()
            if ctx._tracking is not None:
                await ctx._tracking.close()
            if trails is not None:
                await trails.close()
            ctx._tracking = None
            ctx.trails = None
            ctx._orders = None
            ctx.mongo = None
            await gate.close()
            await client.close()
            await engine.close()
            if embedded is not None:
                await embedded.stop()

    app.cleanup_ctx.append(store)

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


async def resync(sio: RealtimeServer, ctx: Context) -> None:
    """After a Redis outage: cross-node emits were lost; ask every client to
    replay its durable streams (`subscribe`/`join` with `since_seq`), and
    re-read what this node cached from bus messages."""
    if ctx._tracking is not None:
        ctx._tracking.invalidate_all()
    for ns in (ORDERS_NS, CHAT_NS, TRACKING_NS):
        await sio.emit("resync", {"reason": "cluster_link_restored"}, namespace=ns)


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
            for tech in await engine.tech_presence.sweep():
                await ctx.ops.announce("technician", tech, False)
            for agent in await engine.agent_presence.sweep():
                ctx.chat.router.agent_offline(agent)
                await ctx.ops.announce("agent", agent, False)
        except Exception as exc:  # Redis away: try again next round
            log.warning("presence upkeep failed: %s", type(exc).__name__)


def tracking_config(settings: Settings) -> TrackingConfig:
    return TrackingConfig(
        filters=FilterConfig(max_speed_mps=settings.max_speed_mps,
                             max_accuracy_m=settings.max_accuracy_m),
        eta=EtaConfig(road_factor=settings.road_factor,
                      default_speed_mps=settings.default_speed_kmh / 3.6),
        arrival_radius_m=settings.arrival_radius_m,
    )


async def _ensure_indexes_retrying(db: Any) -> None:
    delay = 0.2
    while True:
        try:
            await ensure_indexes(db)
            return
        except Exception as exc:
            log.warning("store not ready (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def index(request: web.Request) -> web.Response:
    return json_response(ok({
        "service": "realtime",
        "socketio_path": "/socket.io/",
        "namespaces": [ORDERS_NS, TRACKING_NS, CHAT_NS, OPS_NS],
        "docs": "docs/protocol.md",
    }))
