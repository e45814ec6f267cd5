"""The Redis engine's Socket.IO manager: python-socketio's AsyncRedisManager
with the failure behaviour fixed where it hurts.

- Publishing uses a bounded pool (BlockingConnectionPool) with short
  timeouts: a burst can no longer open thousands of Redis connections, and a
  dead Redis costs an emit one quick failed attempt, not two slow ones.
- The listener reconnects with a backoff capped at 1 s (stock: 60 s), so
  cross-node delivery resumes within about a second of Redis returning.
- After the link comes back, every local client gets a `resync` event: what
  crossed nodes while Redis was away is lost (pub/sub is at most once), and
  the durable streams replay it (`subscribe`/`join` with `since_seq`).

Local delivery never waits on Redis: the stock manager delivers to this
node's clients first and then publishes.

On a Redis Cluster (REDIS_URL `redis+cluster://`) the same traffic rides
sharded pub/sub (realtime/transport/shards.py): each node's own channel is
a shard channel, and what every node hears is spread over BROADCAST_SHARDS
channels by the entity it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import socketio
from redis import asyncio as aioredis

from realtime.transport.bus import PREFIX, Bus
from realtime.transport.fanout import local_emit
from realtime.transport.shards import (
    broadcast_channel,
    broadcast_channels,
    entity_key,
    sharded_messages,
    signal_key,
)
from storage.redis.client import AnyRedis, cluster_client, is_cluster

log = logging.getLogger(__name__)

# Bounded publish pool: a handful of connections saturate one Redis from one
# process; more only queue inside Redis (ANCHORS.md: 6,900 connections seen).
PUBLISH_POOL = 4
PUBLISH_TIMEOUT_S = 1.0
LISTEN_BACKOFF_MAX_S = 1.0
LOG_EVERY_S = 10.0  # at most one "Redis is down" line per this many seconds
PUBLISH_BATCH = 500  # messages per pipelined round trip
# Publishes gather this long before a round trip: under load a pipeline then
# carries dozens, for a millisecond more across nodes.
PUBLISH_GATHER_S = 0.001
# Rows per message: a backlog still arrives in slices a receiving node
# handles between other work, not as one long stall.
ROWS_PER_MESSAGE = 256
OUTBOX_MAX = 100_000  # bounded: under a long outage the oldest are dropped first


class ClusterManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    name = "realtime-redis"

    def __init__(self, url: str, channel: str = "realtime",
                 on_link_restored: Callable[[], Awaitable[None]] | None = None,
                 on_publish_error: Callable[[], None] | None = None,
                 on_bus_received: Callable[[str], None] | None = None) -> None:
        super().__init__(url, channel=channel)
        # A Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE).
        self.sharded = is_cluster(url)
        # The node-to-node signals ride this manager's channels.
        self.bus = Bus(self, on_bus_received)
        self._on_restored = on_link_restored
        self._on_publish_error = on_publish_error or (lambda: None)
        self._pub: AnyRedis | None = None
        self._last_log = 0.0
        # The link works while both halves do: the listener (other nodes'
        # messages reach us) and the publisher (ours reach them).
        self.listen_ok = True
        self.publish_ok = True
        self.publish_failures = 0
        self.publish_dropped = 0  # the outbox was full: the oldest went
        self.stopped_dropped = 0  # emitted after the node stopped
        self._publish_failed = False
        self._outbox: deque[tuple[str, str]] = deque()
        self._queued = 0  # messages ever queued / ever sent or given up
        self._finished = 0
        self._progress = asyncio.Event()
        # This node's own channel: what only this node needs (positions its
        # watchers asked for; realtime/interest.py).
        self.node_channel = f"{channel}#node#{self.host_id}"
        self._outbox_ready = asyncio.Event()
        # Rows for other nodes (positions), gathered until the publisher
        # drains them: one message per node and signal per drain.
        self._rows: dict[tuple[str, str], list[Any]] = {}
        self._publisher_task: asyncio.Task[None] | None = None
        self._closed = False  # after aclose nothing starts a publisher again
        # Set once the listener has subscribed the first time (start_listening).
        self.subscribed_once = asyncio.Event()

    async def start_listening(self, sio: Any, timeout: float = 2.0) -> None:
        """Start the listener now rather than at the first client's connect
        (python-socketio's default), and wait (at most `timeout`: a Redis
        that is down must not hold a start) until it has subscribed: a
        node's first clients then miss nothing other nodes publish. On a
        cluster subscribing takes a topology read and an SSUBSCRIBE per
        slot, long enough for a test's first event to be lost."""
        if not sio.manager_initialized:
            sio.manager_initialized = True
            self.initialize()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed_once.wait(), timeout)

    @property
    def link_ok(self) -> bool:
        return self.listen_ok and self.publish_ok

    @property
    def outbox_length(self) -> int:
        return len(self._outbox)

    def queue_signal(self, name: str, data: dict[str, Any]) -> None:
        # On a cluster, the broadcast shard of the entity the signal is about
        # (it keeps its order with the emits about the same one).
        channel = broadcast_channel(self.channel, signal_key(data)) if self.sharded else self.channel
        self._append(channel, self.json.dumps(self._signal(name, data)))

    def _signal(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"method": "emit", "event": PREFIX + name, "data": [data], "namespace": "/",
                "room": None, "skip_sid": None, "callback": None, "host_id": self.host_id}

    def queue_row(self, nodes: list[str], name: str, row: Any) -> None:
        """One row of a bus signal `name` for each of these nodes; each node
        gets the rows gathered meanwhile as one `{"rows": [...]}` signal when
        the publisher next drains (after its gather, or after the round trip
        in flight: under load the rows of many fixes share one message)."""
        for node in nodes:
            rows = self._rows.get((node, name))
            if rows is None:
                rows = self._rows[(node, name)] = []
            rows.append(row)
        self._wake_publisher()

    def _drain_rows(self) -> None:
        if not self._rows:
            return
        batches, self._rows = self._rows, {}
        for (node, name), rows in batches.items():
            for i in range(0, len(rows), ROWS_PER_MESSAGE):
                self._append(f"{self.channel}#node#{node}", self.json.dumps(
                    self._signal(name, {"rows": rows[i:i + ROWS_PER_MESSAGE]})))

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if isinstance(event, str) and event.startswith(PREFIX):
            if message.get("host_id") != self.host_id:  # ours ran when published
                data = message.get("data") or [{}]
                name = event[len(PREFIX):]
                self.bus.on_received(name)
                await self.bus.dispatch(name, data[0])
            return
        if message.get("callback") is not None or message.get("binary"):
            await super()._handle_emit(message)
            return
        data = message.get("data")
        if isinstance(data, list):
            data = data[0] if len(data) == 1 else tuple(data)
        local_emit(self, str(event), data, message.get("namespace") or "/", message.get("room"),
                   message.get("skip_sid"))

    def _publisher(self) -> AnyRedis:
        if self._pub is None and self.sharded:
            # Each master's pool is bounded as the single pool is.
            self._pub = cluster_client(self.redis_url, max_connections=PUBLISH_POOL,
                                       timeout_s=PUBLISH_TIMEOUT_S)
        if self._pub is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.redis_url, max_connections=PUBLISH_POOL, timeout=PUBLISH_TIMEOUT_S,
                socket_timeout=PUBLISH_TIMEOUT_S, socket_connect_timeout=PUBLISH_TIMEOUT_S)
            self._pub = aioredis.Redis(connection_pool=pool)
        return self._pub

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("Redis %s failed (%s); cross-node delivery is degraded", what,
                        type(exc).__name__)

    async def _publish(self, data: Any) -> None:
        self._enqueue(data)

    def _enqueue(self, data: Any) -> None:
        """Queue a message for the publisher task: an emit never waits on a
        Redis round trip, and bursts go out pipelined (one round trip for up
        to PUBLISH_BATCH messages), in order."""
        channel = (broadcast_channel(self.channel, entity_key(data.get("room"))) if self.sharded
                   else self.channel)
        self._append(channel, self.json.dumps(data))

    def _append(self, channel: str, raw: str) -> None:
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()  # at most once: the oldest goes first
            self.publish_dropped += 1
            self._finished += 1
        self._queued += 1
        self._outbox.append((channel, raw))
        self._wake_publisher()

    def _wake_publisher(self) -> None:
        if self._closed:
            # A late emit (a handler still finishing as the node stops) must
            # not start a publisher nobody stops: it would outlive the app,
            # waiting for ever. What it queued is dropped (at most once).
            self._drop_queued()
            return
        self._outbox_ready.set()
        if self._publisher_task is None or self._publisher_task.done():
            self._publisher_task = asyncio.get_running_loop().create_task(self._publisher_loop())

    async def _publisher_loop(self) -> None:
        # `_closed` ends the loop even when a cancellation was swallowed on
        # the way (Python 3.11's wait_for can lose one that races a result,
        # and redis-py waits with it): aclose sets it and wakes the loop.
        while not self._closed:
            await self._outbox_ready.wait()
            if self._closed:
                return
            await asyncio.sleep(PUBLISH_GATHER_S)
            self._outbox_ready.clear()
            self._drain_rows()
            while self._outbox and not self._closed:
                batch = [self._outbox.popleft()
                         for _ in range(min(PUBLISH_BATCH, len(self._outbox)))]
                try:
                    async with self._publisher().pipeline(transaction=False) as pipe:
                        if self.sharded:
                            for channel, raw in batch:
                                pipe.execute_command("SPUBLISH", channel, raw)
                        else:
                            for channel, raw in batch:
                                pipe.publish(channel, raw)
                        await pipe.execute()
                    self._done(len(batch))
                except Exception as exc:  # Redis away: these are lost (at most once)
                    self._done(len(batch))
                    self.publish_failures += len(batch)
                    self._publish_failed = True
                    self.publish_ok = False
                    self._on_publish_error()
                    self._warn("publish", exc)
                    await asyncio.sleep(0.05)
                    continue
                self._drain_rows()  # what gathered during the round trip
                self.publish_ok = True
                if self._publish_failed:
                    # Our emits were lost while publishing failed: other
                    # nodes' clients must replay too.
                    self._publish_failed = False
                    if self._on_restored is not None:
                        await self._on_restored()

    def _drop_queued(self) -> None:
        dropped = len(self._outbox) + len(self._rows)  # the rows: one message each
        self._outbox.clear()
        self._rows.clear()
        self.stopped_dropped += dropped
        self._done(self._queued - self._finished)

    def _done(self, n: int) -> None:
        self._finished += n
        self._progress.set()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait until what was queued so far has been published (or given up
        on); at most `timeout`: a down Redis must not hold anyone up."""
        self._drain_rows()
        target = self._queued
        deadline = time.monotonic() + timeout
        while self._finished < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    async def _listen(self) -> AsyncIterator[Any]:
        """Messages from other nodes. Our own come back on the channel too;
        they are recognised by our host id before any JSON is decoded."""
        names = ([*broadcast_channels(self.channel), self.node_channel] if self.sharded
                 else [self.channel, self.node_channel])
        channels = {n.encode() for n in names}
        kind = "smessage" if self.sharded else "message"
        own = f'"host_id": "{self.host_id}"'.encode()
        async for message in self._redis_listen_with_retries():
            if message["channel"] not in channels or message["type"] != kind:
                continue
            data = message.get("data")
            if isinstance(data, bytes) and own in data and b'"method": "callback"' not in data:
                continue
            yield data

    def _redis_connect(self) -> None:
        self.redis = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1.0,
                                             socket_keepalive=True)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _restored(self) -> None:
        self.listen_ok = True
        log.info("Redis link restored; asking local clients to resync")
        if self._on_restored is not None:
            await self._on_restored()

    async def _listen_failed(self, exc: BaseException, backoff: float) -> float:
        """The listener lost its link: note it, wait, and return the next wait."""
        self.listen_ok = False
        self._warn("subscribe", exc)
        await asyncio.sleep(backoff)
        return min(backoff * 2, LISTEN_BACKOFF_MAX_S)

    async def _sharded_listen_with_retries(self) -> AsyncIterator[Any]:
        """The cluster's listener: on any master's failure, subscribe again
        wherever the topology now puts the channels (after a failover, the
        promoted replica), then ask local clients to resync."""
        backoff = 0.1
        failed = False
        up_since = 0.0
        channels = [*broadcast_channels(self.channel), self.node_channel]
        while not self._closed:

            async def subscribed() -> None:
                nonlocal failed, up_since
                up_since = time.monotonic()
                self.subscribed_once.set()
                if failed:
                    failed = False
                    await self._restored()

            try:
                async for message in sharded_messages(self.redis_url, channels, subscribed):
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                if up_since and time.monotonic() - up_since > LISTEN_BACKOFF_MAX_S:
                    backoff = 0.1  # it held a while: this is a new outage
                up_since = 0.0
                backoff = await self._listen_failed(exc, backoff)
        raise asyncio.CancelledError

    async def _redis_listen_with_retries(self) -> AsyncIterator[Any]:
        if self.sharded:
            async for message in self._sharded_listen_with_retries():
                yield message
            return
        backoff = 0.1
        failed = False
        while not self._closed:
            try:
                self._redis_connect()
                await self.pubsub.subscribe(self.channel, self.node_channel)
                self.subscribed_once.set()
                if failed:
                    failed = False
                    await self._restored()
                backoff = 0.1
                async for message in self.pubsub.listen():
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                backoff = await self._listen_failed(exc, backoff)
                try:
                    await self.redis.aclose()
                except Exception:  # already broken: nothing to close cleanly
                    pass
        # Stopped, though the cancellation got lost on the way: end the
        # listening task as cancelled (python-socketio logs any other end).
        raise asyncio.CancelledError

    async def aclose(self) -> None:
        """Stop publishing and listening, and close both Redis clients.
        Bounded: a publish cut off mid-pipeline must not hold up a stop. The
        listener must end here, not be dropped: a pending task left behind
        is garbage-collected later with its async generators mid-iteration,
        and asyncio logs their failed close as errors of whatever runs then."""
        self._closed = True
        self._outbox_ready.set()  # a loop that lost its cancellation ends too
        for task in (self._publisher_task, getattr(self, "thread", None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
        clients: tuple[Any, ...] = (self._pub, self.pubsub, self.redis)
        for client in clients:
            if client is not None:
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(client.aclose(), 2.0)
        self._pub = None
