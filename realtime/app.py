"""create_app(settings): the composition root. Builds the Socket.IO server,
the HTTP routes and the services; opens and closes the stores in cleanup_ctx.
No module-level state: two apps in one process are independent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from chat.routing import Router
from chat.service import ChatService
from realtime.api import CTX, api_middleware, json_response, setup_routes
from realtime.auth import TokenVerifier
from realtime.context import Context
from realtime.errors import ok
from realtime.metrics import Metrics
from realtime.namespaces.chat import NAMESPACE as CHAT_NS
from realtime.namespaces.chat import ChatNamespace
from realtime.namespaces.orders import NAMESPACE as ORDERS_NS
from realtime.namespaces.orders import OrdersNamespace
from realtime.namespaces.tracking import NAMESPACE as TRACKING_NS
from realtime.namespaces.tracking import TrackingNamespace
from realtime.settings import Settings
from realtime.sio import RealtimeServer
from storage.chat import MongoChatStore
from storage.embedded import EmbeddedMongo
from storage.mongo import MongoOrderStore, connect, ensure_indexes
from storage.trails import TrailWriter, ensure_trail_indexes
from tracking.eta import EtaConfig
from tracking.locations import FilterConfig, MemoryRateLimiter
from tracking.orders import Event, Order, OrderService
from tracking.positions import MemoryPositions
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


def create_app(settings: Settings) -> web.Application:
    settings.ensure_secret()
    metrics = Metrics()
    sio = RealtimeServer(
        async_mode="aiohttp",
        cors_allowed_origins=cors_policy(settings),
        max_http_buffer_size=settings.max_message_bytes,
        ping_interval=settings.ping_interval_s,
        ping_timeout=settings.ping_timeout_s,
        http_compression=False,
        logger=False,
        engineio_logger=False,
    )
    ctx = Context(settings=settings, metrics=metrics, verifier=TokenVerifier(settings), sio=sio)
    orders_ns = OrdersNamespace(ORDERS_NS, ctx)
    tracking_ns = TrackingNamespace(TRACKING_NS, ctx)
    chat_ns = ChatNamespace(CHAT_NS, ctx)
    for ns in (orders_ns, tracking_ns, chat_ns):
        sio.register_namespace(ns)

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
    sio.attach(app)
    setup_routes(app)
    app.router.add_get("/", index)

    async def store(app: web.Application) -> AsyncIterator[None]:
        embedded: EmbeddedMongo | None = None
        url = settings.mongo_url
        if not url:
            embedded = EmbeddedMongo(settings.data_dir / "mongo", settings.embedded_mongo_cmd)
            await embedded.start()
            url = embedded.url
        client = connect(url, settings.mongo_timeout_ms)
        try:
            db = client[settings.mongo_db]
            await asyncio.wait_for(_ensure_indexes_retrying(db), STORE_START_TIMEOUT_S)
            await ensure_trail_indexes(db, settings.trail_ttl_days)
            ctx.mongo = client
            order_store = MongoOrderStore(client, db, metrics.observe_store)
            ctx._orders = OrderService(order_store, order_changed)
            trails = TrailWriter(db, interval=settings.trail_flush_s,
                                 on_flush=metrics.trail_flushed, on_drop=metrics.trail_dropped)
            trails.start()
            ctx.trails = trails
            ctx._tracking = TrackingService(
                positions=MemoryPositions(),
                orders=ctx._orders,
                active_orders=order_store,
                trails=trails,
                limiter=MemoryRateLimiter(settings.location_rate, settings.location_burst),
                publish_position=tracking_ns.publish_position,
                position_changed=tracking_ns.area.changed,
                count=lambda outcome: metrics.points.labels(outcome).inc(),
                config=tracking_config(settings),
            )
            chat_store = MongoChatStore(client, db, metrics.observe_store)
            await chat_store.ensure_indexes()
            router = Router(chat_store, conversation_changed=chat_ns.conversation_changed,
                            queue_position=chat_ns.queue_position, cap=settings.agent_cap,
                            grace_s=settings.agent_grace_s)
            metrics.queue_length.set_function(lambda: router.queue_length)
            ctx.chat_store = chat_store
            ctx._chat = ChatService(chat_store, ctx._orders, router, chat_ns.delivered)
            tracking_ns.area.start()
            log.info("store ready (%s)", "embedded" if embedded else "MONGO_URL")
            yield
        finally:
            if ctx._chat is not None:
                await ctx._chat.router.close()
            ctx._chat = None
            await tracking_ns.area.stop()
            if ctx._tracking is not None:
                await ctx._tracking.close()
            if ctx.trails is not None:
                await ctx.trails.close()
            ctx._tracking = None
            ctx.trails = None
            ctx._orders = None
            ctx.mongo = None
            await client.close()
            if embedded is not None:
                await embedded.stop()

    app.cleanup_ctx.append(store)

    async def say_goodbye(app: web.Application) -> None:
        await sio.close_all()

    app.on_shutdown.append(say_goodbye)
    return app


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
        "namespaces": [ORDERS_NS, TRACKING_NS, CHAT_NS],
        "docs": "docs/protocol.md",
    }))
