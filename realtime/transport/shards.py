"""Sharded pub/sub on a Redis Cluster (SSUBSCRIBE/SPUBLISH, Redis >= 7).

A shard channel lives on the master that owns its slot, and a message
published there reaches only that master's subscribers: no cluster-wide
broadcast on the cluster bus, which is what makes plain PUBLISH stop scaling
past a few masters. So each node holds one connection per master that owns
one of its channels, and reads every connection at once.

Written here rather than with redis-py's ClusterPubSub: that one reads all
masters from a single reader in time slices (`get_sharded_message(timeout)`
polls each node in turn), so a message on one master waits out the slices of
the others; a relay must read each master as soon as data arrives. redis-py
still gives the topology (which master owns a slot) and the SSUBSCRIBE
commands.

Channel names (realtime/transport/cluster.py): `<channel>#node#<id>` per
node, and `<channel>#b#<k>` for k below BROADCAST_SHARDS, chosen by the
entity (order, conversation, user) an emit or signal is about, so one
entity's messages keep their order while the entities spread over masters.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from redis import asyncio as aioredis

from storage.redis.client import cluster_client, parse_cluster_url

# Broadcast channels: enough that 64 masters all carry a share; each node
# subscribes to all of them (one SSUBSCRIBE per master it holds any on).
BROADCAST_SHARDS: Final = 64


class ShardLost(Exception):
    """A master dropped our subscription (its slot moved, it became a replica)."""


def entity_key(room: Any) -> str:
    """What a room is about: `order:O`, `watch:O:wgs84` -> `O`; `staff:C` -> `C`;
    `user:U` -> `U`; a room without a prefix is itself. For a list of rooms,
    the first's."""
    if isinstance(room, (list, tuple)):
        room = room[0] if room else None
    if not room:
        return ""
    text = str(room)
    _, sep, rest = text.partition(":")
    return rest.split(":", 1)[0] if sep else text


def signal_key(data: Any) -> str:
    """A bus signal's entity, so it rides with the emits about the same one
    (`leave_user` names its room; `order_changed` carries its order)."""
    if not isinstance(data, dict):
        return ""
    if data.get("room"):
        return entity_key(data["room"])
    order = data.get("order")
    if isinstance(order, dict) and order.get("order_id"):
        return str(order["order_id"])
    return str(data.get("order_id") or "")


def broadcast_channel(channel: str, key: str) -> str:
    shard = zlib.crc32(key.encode()) % BROADCAST_SHARDS if key else 0
    return f"{channel}#b#{shard}"


def broadcast_channels(channel: str) -> list[str]:
    return [f"{channel}#b#{k}" for k in range(BROADCAST_SHARDS)]


async def sharded_messages(url: str, channels: Iterable[str],
                           on_subscribed: Any = None) -> AsyncIterator[dict[str, Any]]:
    """Every `smessage` on these shard channels, from whichever masters own
    them now. Ends by raising when any master's link fails or drops a
    subscription: the caller connects again (after a failover the topology
    says which replica took over). `on_subscribed` (awaitable) runs once all
    subscriptions are in place."""
    seeds = parse_cluster_url(url)
    topology = cluster_client(url, max_connections=2, timeout_s=1.0)
    clients: list[aioredis.Redis] = []
    readers: list[asyncio.Task[None]] = []
    queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
    try:
        await topology.initialize()
        by_master: dict[tuple[str, int], list[str]] = {}
        for ch in channels:
            node = topology.get_node_from_key(ch)
            if node is None:  # mid-failover: no master serves the slot yet
                raise ShardLost(f"no master for {ch}")
            by_master.setdefault((str(node.host), int(node.port)), []).append(ch)
        subs = []
        for (host, port), chs in by_master.items():
            client = aioredis.Redis(host=host, port=port, username=seeds.username,
                                    password=seeds.password, ssl=seeds.tls,
                                    socket_connect_timeout=1.0, socket_keepalive=True)
            clients.append(client)
            ps = client.pubsub()
            by_slot: dict[int, list[str]] = {}
            for ch in chs:  # one SSUBSCRIBE names channels of one slot only
                by_slot.setdefault(topology.keyslot(ch), []).append(ch)
            for same_slot in by_slot.values():
                await ps.ssubscribe(*same_slot)
            subs.append(ps)
        for ps in subs:
            readers.append(asyncio.get_running_loop().create_task(_read(ps, queue)))
        if on_subscribed is not None:
            await on_subscribed()
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in readers:
            task.cancel()
        for task in readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(topology.aclose(), 2.0)


async def _read(ps: Any, queue: asyncio.Queue[dict[str, Any] | BaseException]) -> None:
    try:
        async for message in ps.listen():
            kind = message.get("type")
            if kind == "smessage":
                queue.put_nowait(message)
            elif kind == "sunsubscribe":
                # The master gave the slot away (failover, resharding).
                raise ShardLost(str(message.get("channel")))
        raise ShardLost("the subscription ended")
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        queue.put_nowait(exc)
