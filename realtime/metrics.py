"""Prometheus metrics, one registry per app (no module-level globals), so
several apps in one test process do not share counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Store round trips are ~1-5 ms when healthy; the tail buckets catch a store
# under failover, where the client is about to get `unavailable`.
STORE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FastCounter:
    """A counter child incremented on the GPS path: a plain integer, added to
    the Prometheus child when scraped (prometheus_client takes a lock on
    every inc; a fix counts three times)."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0

    def inc(self) -> None:
        self.n += 1

    def publish(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.child.inc(n)


class OutboxObserver:
    """The relay's Observer (outbox/relay.py) over these metrics."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def attempt(self, channel: str, result: str) -> None:
        self.m.outbox_attempts.labels(channel, result).inc()

    def dead(self, channel: str) -> None:
        self.m.outbox_dead.labels(channel).inc()

    def lag(self, seconds: float) -> None:
        self.m.outbox_lag.observe(seconds)

    def undone_age(self, seconds: float) -> None:
        self.m.outbox_undone_age.set(seconds)

    def partitions(self, n: int) -> None:
        self.m.outbox_partitions.set(n)


class ClusterStats(Protocol):
    """What the Redis manager (realtime/transport/cluster.py) counts."""

    publish_failures: int
    publish_dropped: int
    stopped_dropped: int

    @property
    def link_ok(self) -> bool: ...

    @property
    def outbox_length(self) -> int: ...


class _ClusterCollector:
    """realtime_cluster_*: cross-node messages are at most once (pub/sub);
    these say when some were lost, and why (docs/operations.md)."""

    def __init__(self, link: ClusterStats) -> None:
        self.link = link

    def collect(self) -> Iterator[Metric]:
        link = self.link
        up = GaugeMetricFamily("realtime_cluster_link_up",
                               "1 while this node's Redis link (pub/sub) works, else 0")
        up.add_metric([], 1.0 if link.link_ok else 0.0)
        yield up
        lost = CounterMetricFamily(
            "realtime_cluster_messages_lost",
            "Cross-node messages lost: Redis refused the publish, the outbox was full, "
            "or they were emitted as the node stopped",
            labels=["reason"])
        lost.add_metric(["publish_failed"], link.publish_failures)
        lost.add_metric(["outbox_full"], link.publish_dropped)
        lost.add_metric(["stopped"], link.stopped_dropped)
        yield lost
        outbox = GaugeMetricFamily("realtime_cluster_outbox",
                                   "Cross-node messages queued here, not yet published")
        outbox.add_metric([], link.outbox_length)
        yield outbox


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self._fast: list[FastCounter] = []
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "realtime_connections", "Connected Socket.IO clients", ["namespace"], registry=r
        )
        self.handshakes_refused = Counter(
            "realtime_handshakes_refused_total", "Refused Socket.IO handshakes",
            ["namespace", "code"], registry=r,
        )
        self.events_in = Counter(
            "realtime_events_in_total", "Client events received", ["namespace", "event"],
            registry=r,
        )
        self.acks = Counter(
            "realtime_acks_total", "Replies sent, by result code", ["namespace", "event", "code"],
            registry=r,
        )
        self.http = Counter(
            "realtime_http_responses_total", "HTTP API responses", ["route", "status"], registry=r
        )
        self.store_latency = Histogram(
            "realtime_store_latency_seconds", "Store operation latency", ["op"],
            buckets=STORE_BUCKETS, registry=r,
        )
        # The store gate (storage/gate.py): calls turned away at once because this
        # node already has store_max_inflight + store_max_waiting operations.
        self.store_shed = Counter(
            "realtime_store_shed_total", "Store calls refused by this node's gate (unavailable)",
            registry=r,
        )
        self.store_inflight = Gauge(
            "realtime_store_inflight", "Store operations running on this node now", registry=r
        )
        self.store_waiting = Gauge(
            "realtime_store_waiting", "Store operations waiting for a turn on this node now",
            registry=r,
        )
        self.order_events = Counter(
            "realtime_order_events_total", "Order events stored", ["type"], registry=r
        )

        self.bus_received = Counter(
            "realtime_bus_received_total", "Node-to-node signals received from other nodes",
            ["signal"], registry=r,
        )
        self.points = Counter(
            "realtime_points_total", "Technician GPS points by outcome (accepted or the drop reason)",
            ["outcome"], registry=r,
        )
        self.watchers = Gauge(
            "realtime_watchers", "Position watchers on this node", ["kind"], registry=r
        )
        self.trail_lag = Histogram(
            "realtime_trail_write_lag_seconds", "Age of the oldest point in a trail batch when stored",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )
        self.trail_points = Counter(
            "realtime_trail_points_total", "Trail points stored / dropped (buffer overflow)",
            ["result"], registry=r,
        )

        self.messages = Counter(
            "realtime_messages_total", "Chat messages stored", ["kind"], registry=r
        )
        self.send_latency = Histogram(
            "realtime_send_latency_seconds", "Chat send: payload received to ack",
            buckets=STORE_BUCKETS, registry=r,
        )
        self.holds = Counter(
            "realtime_holds_total", "Bookings: holds made on this node, and how holds ended",
            ["outcome"], registry=r,
        )
        self.availability_watchers = Gauge(
            "realtime_availability_watchers", "Bookings: live availability views on this node",
            registry=r,
        )
        self.agents_available = Gauge(
            "realtime_agents_available", "Agents available on this node", registry=r
        )
        self.queue_length = Gauge(
            "realtime_chat_queue_length", "Support conversations waiting for an agent", registry=r
        )

        # The outbox (outbox/relay.py): the relay's Observer.
        self.outbox_lag = Histogram(
            "realtime_outbox_lag_seconds",
            "Outbox: a change's commit to its delivery's 2xx (webhooks and pushes not held)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 3600.0), registry=r,
        )
        self.outbox_attempts = Counter(
            "realtime_outbox_attempts_total", "Outbox: delivery attempts by channel and result",
            ["channel", "result"], registry=r,
        )
        self.outbox_dead = Counter(
            "realtime_outbox_dead_letters_total", "Outbox: deliveries dead after their last try",
            ["channel"], registry=r,
        )
        self.outbox_undone_age = Gauge(
            "realtime_outbox_undone_age_seconds",
            "Outbox: age of the oldest record not yet fanned out in this node's partitions",
            registry=r,
        )
        self.outbox_partitions = Gauge(
            "realtime_outbox_partitions", "Outbox: partitions this node holds leases on", registry=r,
        )

        self.hostile = Counter(
            "realtime_hostile_input_total",
            "Hostile or malformed input dropped or refused, by kind (realtime/transport/hostile.py)",
            ["kind"], registry=r,
        )

        self.gc_pause = Histogram(
            "realtime_gc_pause_seconds", "Garbage collector pauses (the process's event loop stalls)",
            ["generation"], buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.gc_pause_max = Gauge(
            "realtime_gc_pause_max_seconds", "Longest garbage collector pause since start", registry=r
        )

    def watch_gc(self) -> None:
        """Time every collection (process-wide: call once, from the process's main)."""
        import gc
        import time

        started: list[float] = [0.0]
        longest: list[float] = [0.0]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
                return
            pause = time.perf_counter() - started[0]
            self.gc_pause.labels(str(info.get("generation", "?"))).observe(pause)
            if pause > longest[0]:
                longest[0] = pause
                self.gc_pause_max.set(pause)

        gc.callbacks.append(callback)

    def count_hostile(self, kind: str) -> None:
        self.hostile.labels(kind).inc()

    def observe_store(self, op: str, seconds: float) -> None:
        self.store_latency.labels(op).observe(seconds)

    def trail_flushed(self, n: int, lag_s: float) -> None:
        self.trail_points.labels("stored").inc(n)
        self.trail_lag.observe(lag_s)

    def trail_dropped(self, n: int) -> None:
        self.trail_points.labels("dropped").inc(n)

    def point_counter(self) -> Callable[[str], None]:
        """Counts GPS points by outcome (the labelled children cached: hot path)."""
        children: dict[str, FastCounter] = {}

        def count(outcome: str) -> None:
            child = children.get(outcome)
            if child is None:
                child = children[outcome] = self.fast(self.points.labels(outcome))
            child.inc()

        return count

    def watch_cluster(self, link: ClusterStats) -> None:
        """Export the Redis link's state and what crossed nodes or was lost
        (read when scraped: the counters live on the manager)."""
        self.registry.register(_ClusterCollector(link))

    def fast(self, child: Any) -> FastCounter:
        """A scrape-time counter for this labelled child (hot paths only)."""
        counter = FastCounter(child)
        self._fast.append(counter)
        return counter

    def render(self) -> bytes:
        for counter in self._fast:
            counter.publish()
        return generate_latest(self.registry)
