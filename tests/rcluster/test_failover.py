"""A Redis Cluster master dies under chat and GPS traffic; its replica is
promoted. The nodes subscribe again where the topology now puts their shard
channels, cross-node delivery comes back, every client is told to resync,
and replay closes every gap: no acknowledged chat message is lost. The time
from the master's death to the first cross-node delivery is printed (and
recorded in docs/scaling.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from realtime.transport.shards import broadcast_channel
from tests.cluster.helpers import assigned_order, contiguous, open_support, seqs, true
from tests.cluster.test_cluster_faults import Traffic, conv_messages
from tests.cluster_harness import Cluster, next_where, now_ms
from tests.harness import MongoServer, uid, until
from tests.redis_cluster import RedisCluster


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    c = RedisCluster()  # its own: this test kills one of its masters
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.timeout(150)
async def test_a_master_killed_under_traffic(own_cluster: RedisCluster, mongo_server: MongoServer,
                                             session: aiohttp.ClientSession) -> None:
    cl = Cluster(own_cluster.url, mongo_server.url, session, REALTIME_CHAT_SEND_RATE="20",
                 REALTIME_CHAT_CONVERSATION_RATE="40")
    traffic = Traffic(0.1)
    try:
        a, b, c = await cl.start(3)
        cust_id, agent_id, tech_id, tcust_id = uid("c-"), uid("a-"), uid("t-"), uid("c-")
        cust = await cl.client(a, "/chat", "customer", cust_id)
        cust_local = await cl.client(a, "/chat", "customer", cust_id)  # the sender's node
        agent = await cl.client(b, "/chat", "agent", agent_id)
        cid = await open_support(cust, agent, agent_id)
        oid = await assigned_order(cl, a, tcust_id, tech_id, set_off=True)
        tech = await cl.client(a, "/tracking", "technician", tech_id)
        watcher = await cl.client(b, "/tracking", "customer", tcust_id)
        await watcher.ok("watch", {"order_id": oid})
        everyone = [cust, cust_local, agent, tech, watcher]

        traffic.start(cust, agent, tech, cid)
        await until(lambda: true(len(conv_messages(agent, cid)) >= 2
                                  and len(watcher.received["position"]) >= 1),
                    timeout=10, what="cross-node traffic before the failover")

        # The master of the conversation's broadcast channel dies.
        victim = own_cluster.master_of(broadcast_channel(cl.channel, cid))
        killed_at = time.monotonic()
        await asyncio.to_thread(own_cluster.kill, victim)

        # Probe from A until a message reaches B.
        j = 0
        crossed_at: float | None = None
        while crossed_at is None and time.monotonic() - killed_at < 60:
            reply = await cust.call("send", {"conversation_id": cid, "client_msg_id": f"probe-{j}",
                                             "body": "probe"})
            j += 1
            if not reply["ok"]:
                await asyncio.sleep(0.1)
                continue
            try:
                await next_where(agent, "message",
                                 lambda m: m["client_msg_id"].startswith("probe-"), timeout=0.1)
                crossed_at = time.monotonic()
            except TimeoutError:
                pass
        if crossed_at is None:
            nodes = own_cluster.cli(own_cluster.alive()[0], "cluster", "nodes")
            raise AssertionError("no chat message crossed from A to B within 60 s of the "
                                 f"failover\n{nodes}\n{cl.logs()}")
        print(f"\n[redis cluster failover] first cross-node delivery {crossed_at - killed_at:.2f} s "
              f"after the master's SIGKILL ({j} probes)")
        await asyncio.to_thread(own_cluster.wait_ok)
        assert victim not in own_cluster.masters()

        for x in everyone:
            r = await x.next("resync", timeout=10)
            assert r == {"reason": "cluster_link_restored"}, r
        back = now_ms()
        await next_where(watcher, "position", lambda p: p["ts"] > back, timeout=10)
        await traffic.stop()

        # Local delivery never waited: the customer's other device, on the same
        # node, got every message the customer sent, through the failover too.
        mine = sorted(k for k in traffic.acked if k.startswith("cu-"))
        await until(lambda: true(len([m for m in conv_messages(cust_local, cid)
                                      if m["client_msg_id"].startswith("cu-")]) >= len(mine)),
                    timeout=5, what="the local device's copies")
        got = sorted(m["client_msg_id"] for m in conv_messages(cust_local, cid)
                     if m["client_msg_id"].startswith("cu-"))
        assert got == mine, sorted(set(mine) - set(got))
        during = [k for k in mine if traffic.ack_time[k] > killed_at]
        assert during, "no message was acknowledged during the failover"

        # Replay closes every gap; every acknowledged message is there, once.
        for viewer, own in ((agent, "ag-"), (cust, "cu-")):
            have = {m["seq"]: m for m in conv_messages(viewer, cid)}
            have.update({m["seq"]: m for k, m in traffic.acked.items() if k.startswith(own)})
            last = contiguous(set(have))
            joined = await viewer.ok("join", {"conversation_id": cid, "since_seq": last})
            for m in joined["messages"]:
                have[m["seq"]] = m
            total = joined["conversation"]["last_seq"]
            assert sorted(have) == list(range(1, total + 1)), set(range(1, total + 1)) - set(have)
            for cmid, msg in traffic.acked.items():
                assert have[msg["seq"]]["id"] == msg["id"], cmid
        stored = (await cl.api(c, "GET", f"/api/conversations/{cid}/messages?limit=1000"))["data"]["messages"]
        assert seqs(stored) == list(range(1, len(stored) + 1))
        by_cmid = {m["client_msg_id"]: m for m in stored}
        assert all(by_cmid[k]["id"] == m["id"] for k, m in traffic.acked.items())
        assert len(traffic.acked) >= 5  # traffic flowed (a send may wait out a failover)
        for node in (a, b, c):
            assert await cl.healthz(node) == 200
        assert cl.errors() == []
    finally:
        traffic.stopping.set()
        await asyncio.gather(*traffic.tasks, return_exceptions=True)
        await cl.close()
