"""The outbox across nodes (issue 18): three nodes share the partitions by
leases; SIGKILL one of them while deliveries are in flight, and every order
event still reaches the receiver, in order per order, a repeat carrying the
same webhook-id."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import defaultdict

import aiohttp

from tests.cluster.helpers import assert_clean
from tests.cluster_harness import Cluster
from tests.harness import MongoServer, RedisServer, uid, until
from tests.outbox.receivers import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ORDERS = 24  # three events each


async def test_sigkill_of_a_node_mid_delivery_loses_nothing_and_repeats_keep_their_id(
        redis_server: RedisServer, mongo_server: MongoServer,
        session: aiohttp.ClientSession) -> None:
    # A slow receiver: sends are in flight when the node dies.
    receiver = await Receiver(secret=SECRET, delay_s=0.2).start()
    cl = Cluster(redis_server.url, mongo_server.url, session,
                 REALTIME_WEBHOOKS=json.dumps([{"url": receiver.url, "secret": SECRET,
                                                "types": ["order.*"]}]),
                 REALTIME_OUTBOX_LEASE_S="2", REALTIME_OUTBOX_POLL_S="0.05",
                 REALTIME_WEBHOOK_TIMEOUT_S="1", REALTIME_WEBHOOK_RETRY_S="0.5,0.5,0.5,0.5,0.5")
    try:
        nodes = await cl.start(3)

        async def spread() -> bool:
            held = [await cl.metric(n, "realtime_outbox_partitions") or 0 for n in nodes]
            return sum(held) == 32 and all(h > 0 for h in held)

        await until(spread, 20, every=0.2, what="partitions spread over the three nodes")

        oids = []
        for i in range(ORDERS):
            node = nodes[i % 3]
            order = await cl.create_order(node, uid("c-"))
            oids.append(order["order_id"])
            await cl.api(node, "POST", f"/api/orders/{order['order_id']}/assign",
                         {"technician_id": uid("t-")})
            await cl.api(node, "POST", f"/api/orders/{order['order_id']}/events", {"state": "cancelled"})
        total = ORDERS * 3
        # Kill one node while its deliveries are under way.
        await receiver.until(lambda: len(receiver.hits) >= total // 4, timeout=30)
        victim = nodes[0]
        await asyncio.to_thread(victim.stop, signal.SIGKILL)
        assert victim.proc is not None and victim.proc.returncode == -signal.SIGKILL

        mine = set(oids)

        def delivered() -> dict[str, list[int]]:
            first: dict[str, list[int]] = defaultdict(list)
            for h in receiver.ok():
                body = h.json
                oid = body["data"]["order"]["order_id"]
                seq = body["data"]["event"]["seq"]
                if oid in mine and seq not in first[oid]:
                    first[oid].append(seq)
            return first

        await receiver.until(lambda: sum(len(v) for v in delivered().values()) == total, timeout=60)
        # In order per order: each event's first delivery after the one before.
        for oid, seqs in delivered().items():
            assert seqs == [1, 2, 3], (oid, seqs)
        # Repeats (the killed node's sends in flight) carry the same webhook-id.
        ids: dict[tuple[str, int], set[str]] = defaultdict(set)
        for h in receiver.hits:
            body = h.json
            ids[(body["data"]["order"]["order_id"], body["data"]["event"]["seq"])].add(
                h.headers["webhook-id"])
        assert all(len(v) == 1 for v in ids.values()), [k for k, v in ids.items() if len(v) > 1]
        repeats = len(receiver.hits) - total
        print(f"\n[outbox sigkill] {total} events delivered by the survivors; {repeats} repeats")
        assert receiver.bad_signatures == 0
        cl.nodes.remove(victim)
        assert_clean(cl)
    finally:
        await cl.close()
        await receiver.stop()
