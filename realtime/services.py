"""The domain services of one app, built once by create_app and never changed:
a frozen `Services` with every field set. Building does no I/O (the Mongo
client connects lazily, the embedded store's port is chosen up front), so
nothing is "not started yet" to check for; `start` and `stop` (the app's
cleanup_ctx) do the I/O: the embedded store, indexes, background writers.

What a service pushes to clients it gets at construction, as callbacks into
the edge's feeds (realtime/feeds/), which exist before any service."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from chat.routing import Router
from chat.service import ChatService
from feedback.ratings import follow_up_id, is_low
from feedback.service import FeedbackService
from kernel.clock import now_ms
from orders.model import Event, Order
from orders.service import OrderService
from outbox.relay import Relay, RelayConfig
from realtime.engine import Engine
from realtime.feeds import Feeds
from realtime.feeds.booking import CALENDAR_CHANGED, SCHEDULE_CHANGED
from realtime.metrics import Metrics, OutboxObserver
from realtime.outbound import HttpSender, application_server_key, load_vapid, url_problem
from realtime.settings import Settings
from scheduling.service import BookingConfig, SchedulingService
from storage.calendars import MongoCalendarStore
from storage.chat import MongoChatStore
from storage.dispatch import MongoDispatchStore
from storage.embedded import EmbeddedMongo
from storage.feedback import MongoFeedbackStore, MongoRatingStore
from storage.gate import StoreGate
from storage.mongo import MongoOrderStore, connect, ensure_indexes
from storage.outbox import MongoOutboxStore
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
    outbox_store: MongoOutboxStore
    feedback: FeedbackService
    feedback_store: MongoFeedbackStore
    rating_store: MongoRatingStore
    relay: Relay
    sender: HttpSender
    # The Web Push application server key (VAPID public key, base64url).
    vapid_public_key: str
    webhooks_config: tuple[dict[str, Any], ...]
    # This server's own ports (a webhook URL must not point back at them).
    own_ports: frozenset[int]

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
        await self.outbox_store.ensure_indexes()
        await self.feedback_store.ensure_indexes()
        await self.rating_store.ensure_indexes()
        await sync_config_endpoints(self.outbox_store, self.webhooks_config, self.own_ports)
        if isinstance(self.trails, TrailWriter):
            self.trails.start()
        self.scheduling.start()
        self.tracking.start()
        self.relay.start()
        await self.feedback.start()

    async def stop(self) -> None:
        """In the order that loses nothing: rounds and timers first, then the
        writers flush, then the store closes."""
        await self.dispatch.close()
        await self.feedback.close()
        await self.relay.close()
        await self.sender.close()
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
    feedback_store = MongoFeedbackStore(store.client, db, store.gate)

    async def follow_up(order: dict[str, Any], rating: dict[str, Any]) -> Any:
        return await feedback.follow_up(order, rating)

    rating_store = MongoRatingStore(store.client, db, store.gate, follow_up=follow_up)

    async def order_committed(doc: dict[str, Any], event: Event, ts: int, session: Any) -> None:
        # An assignment takes the technician's time in its own transaction (or
        # is refused); a cancellation gives it back (storage/schedules.py). A
        # rating adds to its technician's aggregate (storage/feedback.py).
        await book.order_committed(doc, event, ts, session)
        await rating_store.order_committed(doc, event, ts, session)

    order_store = MongoOrderStore(store.client, db, metrics.observe_store, store.gate,
                                  on_commit=order_committed, turns=book.turns)

    outbox_store = MongoOutboxStore(store.client, db, store.gate)
    vapid = load_vapid(settings.data_dir, settings.vapid_private_key)
    sender = HttpSender(settings.webhook_timeout_s, vapid, settings.vapid_subject)
    relay = Relay(outbox_store, sender, engine.user_presence.online, engine.node_id,
                  RelayConfig(lease_s=settings.outbox_lease_s, poll_s=settings.outbox_poll_s,
                              schedule=settings.webhook_retry_s,
                              per_target=settings.webhook_concurrency,
                              send_timeout_s=settings.webhook_timeout_s),
                  OutboxObserver(metrics), signal=_coalesced(engine))

    async def outbox_wake(data: dict[str, Any]) -> None:
        relay.wake()

    async def webhooks_changed(data: dict[str, Any]) -> None:
        await relay.reload_endpoints()

    engine.bus.on(OUTBOX_SIGNAL, outbox_wake)
    engine.bus.on(WEBHOOKS_CHANGED, webhooks_changed)

    async def order_changed(order: Order, event: Event) -> None:
        relay.poke()
        await feeds.orders.publish(order, event)
        await feeds.tracking.order_changed(order, event)
        if order.get("technician_id") or event["data"].get("previous_technician_id"):
            await feeds.ops.job_changed(order, event)
        touched = schedule_touched(order, event)
        if touched:
            await feeds.booking.changed(touched)
        if event["type"] == "rated" and order.get("technician_id"):
            await rating_received(order, event)
        try:
            await chat.append_order_event(order, event)
        except Exception as exc:  # the order change stands; its chat card is best-effort
            log.warning("order %s event %d not written to its chat: %s",
                        order["order_id"], event["seq"], type(exc).__name__)

    async def rating_received(order: Order, event: Event) -> None:
        """The technician hears their rating with the aggregate it made; a low
        one's follow-up (written with it) is pushed to the inbox and routed."""
        tech = str(order["technician_id"])
        try:
            await rating_store.count_in_fleet(int(event["data"]["stars"]))
            agg = (await rating_store.aggregates([tech], now_ms()))[tech]
            await feeds.orders.rating_received(tech, {
                "order_id": order["order_id"], "seq": event["seq"], **event["data"],
                "ts": dict(order.get("rating") or {}).get("ts"), "aggregate": agg})
            if is_low(event["data"]):
                await feedback.announce(follow_up_id(order["order_id"]))
        except Exception as exc:  # the rating stands; the sweep routes a follow-up later
            log.warning("order %s rating not pushed: %s", order["order_id"], type(exc).__name__)

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
    async def message_delivered(conv: Any, msg: Any, origin: str | None) -> None:
        relay.poke()
        await feeds.chat.delivered(conv, msg, origin)

    async def send_offer(technician_id: str, offer: dict[str, Any]) -> None:
        relay.poke()
        await feeds.orders.send_offer(technician_id, offer)

    chat = ChatService(chat_store, orders, router, message_delivered,
                       limits=engine.chat_limits, busy_wait_s=bound_s)

    async def feedback_changed(item: dict[str, Any], event: dict[str, Any]) -> None:
        relay.poke()
        await feeds.feedback.changed(item, event)

    feedback = FeedbackService(feedback_store, feedback_changed, sla_min=settings.feedback_sla_min,
                               tz=settings.report_tz, choose_agent=router.least_loaded)
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
        busy=order_store, store=dispatch_store, send_offer=send_offer,
        withdraw=feeds.orders.withdraw_offer,
        config=DispatchConfig(strategy=settings.dispatch_strategy,
                              radius_m=settings.dispatch_radius_m,
                              count=settings.dispatch_count,
                              timeout_s=settings.dispatch_timeout_s,
                              stale_after_s=settings.stale_position_s,
                              rating_margin_s=settings.dispatch_rating_margin_s),
        schedule_check=scheduling.conflicts, eta=eta, ratings=rating_store)

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
                    schedules=schedules, scheduling=scheduling, outbox_store=outbox_store,
                    feedback=feedback, feedback_store=feedback_store, rating_store=rating_store,
                    relay=relay, sender=sender, vapid_public_key=application_server_key(vapid),
                    webhooks_config=tuple(w.model_dump() for w in settings.webhooks),
                    own_ports=frozenset(p for p in (settings.port, settings.metrics_port) if p))


# Bus signals: a record was committed (the owner of its partition may be
# another node); the webhook endpoints changed.
OUTBOX_SIGNAL = "outbox"
WEBHOOKS_CHANGED = "webhooks_changed"
# Commits within this long share one signal to the other nodes.
SIGNAL_COALESCE_S = 0.01


def _coalesced(engine: Engine) -> Callable[[], None]:
    pending = False

    def send() -> None:
        nonlocal pending
        pending = False
        engine.bus.to_others(OUTBOX_SIGNAL, {})

    def signal() -> None:
        nonlocal pending
        if not pending and engine.bus.clustered:
            pending = True
            asyncio.get_running_loop().call_later(SIGNAL_COALESCE_S, send)

    return signal


async def sync_config_endpoints(store: MongoOutboxStore, configured: tuple[dict[str, Any], ...],
                                own_ports: frozenset[int]) -> None:
    """REALTIME_WEBHOOKS into the store (ids from the URL): a changed secret
    or filter applies on restart, an endpoint no longer configured goes. One
    that breaks the URL rules (docs/webhooks.md) is left out, and said so."""
    ids = set()
    for w in configured:
        why = await url_problem(w["url"], set(own_ports))
        if why:
            log.error("REALTIME_WEBHOOKS: %s %s; left out", w["url"].split("?")[0][:200], why)
            continue
        eid = "wh_cfg_" + hashlib.sha256(w["url"].encode()).hexdigest()[:16]
        ids.add(eid)
        await store.put_endpoint({"_id": eid, "url": w["url"], "secret": w["secret"],
                                  "types": w.get("types") or ["*"],
                                  "description": w.get("description"), "source": "config",
                                  "created_ts": now_ms()})
    for doc in await store.endpoints():
        if doc.get("source") == "config" and doc["_id"] not in ids:
            await store.delete_endpoint(doc["_id"])
            await store.cancel_target(doc["_id"], now_ms())


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
