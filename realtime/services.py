"""The domain services of one app, built once by create_app and never changed:
a frozen `Services` with every field set. Building does no I/O (the Mongo
client connects lazily, the embedded store's port is chosen up front), so
nothing is "not started yet" to check for; `start` and `stop` (the app's
cleanup_ctx) do the I/O: the embedded store, indexes, background writers.

What a service pushes to clients it gets at construction, as callbacks into
the edge's feeds (realtime/feeds/), which exist before any service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from chat.routing import Router
from chat.service import ChatService
from orders.model import Event, Order
from orders.service import OrderService
from realtime.engine import Engine
from realtime.feeds import Feeds
from realtime.feeds.booking import CALENDAR_CHANGED, SCHEDULE_CHANGED
from realtime.metrics import Metrics
from realtime.settings import Settings
from scheduling.service import BookingConfig, SchedulingService
from storage.calendars import MongoCalendarStore
from storage.chat import MongoChatStore
from storage.dispatch import MongoDispatchStore
from storage.embedded import EmbeddedMongo
from storage.gate import StoreGate
from storage.mongo import MongoOrderStore, connect, ensure_indexes
from storage.schedules import MongoScheduleStore, ScheduleBook, schedule_touched
from storage.trails import KEEP_NO_TRAILS, KeepNoTrails, TrailWriter, ensure_trail_indexes
from tracking.dispatch import DispatchConfig, DispatchService
from tracking.eta import EtaConfig
from tracking.locations import FilterConfig
from tracking.service import TrackingConfig, TrackingService

log = logging.getLogger(__name__)

# How long start-up waits for the store before giving up (the process
# supervisor restarts us); long enough for a replica set election.
STORE_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Store:
    """The durable store: MongoDB at MONGO_URL, or the embedded one (started
    by `Services.start`), behind this node's gate (storage/gate.py)."""

    url: str
    embedded: EmbeddedMongo | None
    client: AsyncMongoClient[dict[str, Any]]
    db: AsyncDatabase[dict[str, Any]]
    gate: StoreGate
    trail_ttl_days: int


async def stop_embedded(store: Store) -> None:
    if store.embedded is not None:
        await store.embedded.stop()


def open_store(settings: Settings, metrics: Metrics) -> Store:
    embedded = None
    url = settings.mongo_url
    if not url:
        embedded = EmbeddedMongo(settings.data_dir / "mongo", settings.embedded_mongo_cmd)
        url = embedded.url
    client = connect(url, settings.mongo_timeout_ms)
    db = client[settings.mongo_db]
    gate = StoreGate(db, timeout_s=settings.mongo_timeout_ms / 1000,
                     max_inflight=settings.store_max_inflight,
                     max_waiting=settings.store_max_waiting,
                     max_per_owner=settings.store_max_per_user, on_shed=metrics.store_shed.inc)
    metrics.store_inflight.set_function(lambda: gate.inflight)
    metrics.store_waiting.set_function(lambda: gate.waiting)
    return Store(url, embedded, client, db, gate, settings.trail_ttl_days)


@dataclass(frozen=True)
class Services:
    store: Store
    orders: OrderService
    order_store: MongoOrderStore
    tracking: TrackingService
    # REALTIME_TRAILS=false: a sink that keeps nothing.
    trails: TrailWriter | KeepNoTrails
    chat: ChatService
    chat_store: MongoChatStore
    router: Router
    dispatch: DispatchService
    dispatch_store: MongoDispatchStore
    calendars: MongoCalendarStore
    schedules: MongoScheduleStore
    scheduling: SchedulingService

    async def start(self) -> None:
        """Wait for the store (indexes made), then start the background work."""
        store = self.store
        if store.embedded is not None:
            await store.embedded.start()
        await asyncio.wait_for(_ensure_indexes_retrying(store.db), STORE_START_TIMEOUT_S)
        await ensure_trail_indexes(store.db, store.trail_ttl_days)
        await self.chat_store.ensure_indexes()
        await self.dispatch_store.ensure_indexes()
        await self.calendars.ensure_indexes()
        await self.schedules.ensure_indexes()
        if isinstance(self.trails, TrailWriter):
            self.trails.start()
        self.scheduling.start()
        self.tracking.start()

    async def stop(self) -> None:
        """In the order that loses nothing: rounds and timers first, then the
        writers flush, then the store closes."""
        await self.dispatch.close()
        await self.scheduling.close()
        await self.router.close()
        await self.tracking.close()
        if isinstance(self.trails, TrailWriter):
            await self.trails.close()
        await self.store.gate.close()
        await self.store.client.close()
        # The embedded store itself stops last, after the engine
        # (stop_embedded, in the app's run).


def build_services(settings: Settings, engine: Engine, metrics: Metrics, feeds: Feeds) -> Services:
    store = open_store(settings, metrics)
    bound_s = settings.mongo_timeout_ms / 1000
    db = store.db
    chat_store = MongoChatStore(store.client, db, metrics.observe_store, store.gate)
    eta = tracking_config(settings).eta
    book = ScheduleBook(db, eta)
    # An assignment takes the technician's time in its own transaction (or
    # is refused); a cancellation gives it back (storage/schedules.py).
    order_store = MongoOrderStore(store.client, db, metrics.observe_store, store.gate,
                                  on_commit=book.order_committed, turns=book.turns)

    async def order_changed(order: Order, event: Event) -> None:
        await feeds.orders.publish(order, event)
        await feeds.tracking.order_changed(order, event)
        if order.get("technician_id") or event["data"].get("previous_technician_id"):
            await feeds.ops.job_changed(order, event)
        touched = schedule_touched(order, event)
        if touched:
            await feeds.booking.changed(touched)
        try:
            await chat.append_order_event(order, event)
        except Exception as exc:  # the order change stands; its chat card is best-effort
            log.warning("order %s event %d not written to its chat: %s",
                        order["order_id"], event["seq"], type(exc).__name__)

    orders = OrderService(order_store, order_changed, busy_wait_s=bound_s)
    trails = (TrailWriter(db, interval=settings.trail_flush_s, on_flush=metrics.trail_flushed,
                          on_drop=metrics.trail_dropped)
              if settings.trails else KEEP_NO_TRAILS)
    tracking = TrackingService(
        positions=engine.positions,
        orders=orders,
        jobs=order_store,
        trails=trails,
        limiter=engine.limiter,
        position_out=feeds.tracking.position_out,
        count=metrics.point_counter(),
        config=tracking_config(settings),
        eta_out=feeds.tracking.eta_out,
        online=engine.tech_presence.online,
        watched=feeds.tracking.watched,
    )
    router = Router(chat_store, directory=engine.directory, presence=engine.agent_presence,
                    conversation_changed=feeds.chat.conversation_changed,
                    queue_position=feeds.chat.queue_position, pump_lock=engine.pump_lock,
                    cap=settings.agent_cap, grace_s=settings.agent_grace_s)
    metrics.queue_length.set_function(lambda: router.queue_length)
    metrics.agents_available.set_function(lambda: router.available_agents)
    chat = ChatService(chat_store, orders, router, feeds.chat.delivered,
                       limits=engine.chat_limits, busy_wait_s=bound_s)
    calendars = MongoCalendarStore(db, store.gate)
    schedules = MongoScheduleStore(store.client, db, book, store.gate)
    scheduling = SchedulingService(
        calendars, schedules, eta, changed=feeds.booking.changed,
        hold_ended=feeds.booking.hold_ended, order_notify=order_changed,
        view_changed=feeds.booking.view_changed,
        config=BookingConfig(hold_ttl_s=settings.hold_ttl_s, max_holds=settings.max_holds))
    metrics.availability_watchers.set_function(lambda: scheduling.watchers)
    dispatch_store = MongoDispatchStore(db, store.gate)
    dispatch = DispatchService(
        orders=orders, positions=engine.positions, presence=engine.tech_presence,
        busy=order_store, store=dispatch_store, send_offer=feeds.orders.send_offer,
        withdraw=feeds.orders.withdraw_offer,
        config=DispatchConfig(strategy=settings.dispatch_strategy,
                              radius_m=settings.dispatch_radius_m,
                              count=settings.dispatch_count,
                              timeout_s=settings.dispatch_timeout_s,
                              stale_after_s=settings.stale_position_s),
        schedule_check=scheduling.conflicts, eta=eta)

    async def dispatch_answered(data: dict[str, Any]) -> None:
        dispatch.wake(str(data.get("dispatch_id")))

    engine.bus.on("dispatch_answer", dispatch_answered)

    async def schedules_changed(data: dict[str, Any]) -> None:
        for tech in data.get("technicians") or []:
            await scheduling.schedule_changed(str(tech))

    async def calendar_changed(data: dict[str, Any]) -> None:
        await scheduling.calendar_changed(str(data.get("technician_id")))

    engine.bus.on(SCHEDULE_CHANGED, schedules_changed)
    engine.bus.on(CALENDAR_CHANGED, calendar_changed)
    return Services(store=store, orders=orders, order_store=order_store, tracking=tracking,
                    trails=trails, chat=chat, chat_store=chat_store, router=router,
                    dispatch=dispatch, dispatch_store=dispatch_store, calendars=calendars,
                    schedules=schedules, scheduling=scheduling)


def tracking_config(settings: Settings) -> TrackingConfig:
    return TrackingConfig(
        filters=FilterConfig(max_speed_mps=settings.max_speed_mps,
                             max_accuracy_m=settings.max_accuracy_m),
        eta=EtaConfig(road_factor=settings.road_factor,
                      default_speed_mps=settings.default_speed_kmh / 3.6),
        arrival_radius_m=settings.arrival_radius_m,
        late_grace_min=settings.late_grace_min,
        project_interval_s=settings.project_interval_s,
    )


async def _ensure_indexes_retrying(db: AsyncDatabase[dict[str, Any]]) -> None:
    delay = 0.2
    while True:
        try:
            await ensure_indexes(db)
            return
        except Exception as exc:
            log.warning("store not ready (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
