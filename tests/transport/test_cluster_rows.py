"""Rows for other nodes (realtime/transport/cluster.py): gathered per node until the
publisher drains them, then one message per node with every row in order,
cut into slices of ROWS_PER_MESSAGE; against a real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis import asyncio as aioredis

from realtime.transport.bus import PREFIX
from realtime.transport.cluster import ROWS_PER_MESSAGE, ClusterManager
from tests.harness import RedisServer, uid


async def test_rows_go_to_each_node_gathered_and_in_order(redis_server: RedisServer) -> None:
    channel = uid("rows")
    manager = ClusterManager(redis_server.url, channel=channel)
    listener = aioredis.Redis.from_url(redis_server.url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(f"{channel}#node#b", f"{channel}#node#c")
    try:
        n = ROWS_PER_MESSAGE + 10
        for i in range(n):  # one burst: nothing is published until it is over
            manager.queue_row(["b", "c"] if i % 2 == 0 else ["b"], "positions", [i, "t"])
        await manager.flush()
        got: dict[str, list[list[Any]]] = {"b": [], "c": []}
        messages = {"b": 0, "c": 0}
        while len(got["b"]) < n or len(got["c"]) < n // 2:
            msg = await asyncio.wait_for(pubsub.get_message(timeout=5), 10)
            if msg is None:
                continue
            node = msg["channel"].decode().rsplit("#", 1)[1]
            body = json.loads(msg["data"])
            assert body["event"] == PREFIX + "positions" and body["host_id"] == manager.host_id
            got[node] += body["data"][0]["rows"]
            messages[node] += 1
        assert got["b"] == [[i, "t"] for i in range(n)]
        assert got["c"] == [[i, "t"] for i in range(0, n, 2)]
        assert messages == {"b": 2, "c": 1}, messages
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await manager.aclose()


async def test_a_stopped_manager_starts_no_publisher_again(redis_server: RedisServer) -> None:
    """An emit that comes after the node stopped (a handler still finishing)
    must not start a publisher task: nothing would stop it, and it would wait
    for ever after the app is gone. What it queued is dropped and counted."""
    manager = ClusterManager(redis_server.url, channel=uid("stopped"))
    manager.queue_row(["b"], "positions", [1, "t"])
    await manager.flush()
    assert manager._publisher_task is not None
    await manager.aclose()
    assert manager._publisher_task.done()
    manager.queue_row(["b"], "positions", [2, "t"])
    await manager._publish({"method": "emit", "event": "x"})
    await asyncio.wait_for(manager.flush(timeout=5.0), 1.0)  # nothing left to wait for
    assert manager._publisher_task.done()
    assert manager.stopped_dropped == 2 and manager.publish_dropped == 0
    left = [t for t in asyncio.all_tasks() if "_publisher_loop" in repr(t.get_coro())]
    assert not left, left
