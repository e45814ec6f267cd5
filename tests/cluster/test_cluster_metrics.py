"""The Redis link's state and its losses on /metrics (docs/operations.md):
realtime_cluster_link_up, realtime_cluster_messages_lost_total{reason},
realtime_cluster_outbox. Cross-node messages are at most once; these say
when some were lost."""

from __future__ import annotations

import asyncio
import re

import pytest

from realtime.metrics import Metrics
from realtime.transport.cluster import ClusterManager
from tests.cluster_harness import RestartableRedis
from tests.conftest import Live, StartApp
from tests.harness import free_port, uid, until


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(realtime_cluster_\w+(?:\{[^}]*\})?) (\S+)", line)
        if m:
            out[m[1]] = float(m[2])
    return out


async def scrape(live: Live) -> dict[str, float]:
    async with live.http.session.get(live.url + "/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


async def test_a_redis_node_exports_its_link(start_app: StartApp, engine: str) -> None:
    live = await start_app()
    got = await scrape(live)
    if engine == "memory":
        assert got == {}, got  # one node: no link to report
        return
    assert got["realtime_cluster_link_up"] == 1.0, got
    assert got['realtime_cluster_messages_lost_total{reason="publish_failed"}'] == 0.0, got
    assert got['realtime_cluster_messages_lost_total{reason="outbox_full"}'] == 0.0, got
    assert "realtime_cluster_outbox" in got, got


async def test_lost_publishes_are_counted_and_the_link_reported_down() -> None:
    """A Redis that refuses connections: what was published is lost, counted
    by reason, and the link reads down."""
    metrics = Metrics()
    manager = ClusterManager(f"redis://127.0.0.1:{free_port()}/0", channel=uid("dead"))
    metrics.watch_cluster(manager)
    try:
        for i in range(3):
            manager.queue_signal("probe", {"n": i})
        await manager.flush(timeout=5.0)
        got = samples(metrics.render().decode())
        assert got['realtime_cluster_messages_lost_total{reason="publish_failed"}'] == 3.0, got
        assert got["realtime_cluster_link_up"] == 0.0, got
        assert got["realtime_cluster_outbox"] == 0.0, got
    finally:
        await manager.aclose()


async def test_the_link_reads_up_again_once_publishing_works_again() -> None:
    """A publish that failed says the link is down; the next one that goes
    through says it is up again (the listener never failed here: only the
    publisher decides)."""
    redis = RestartableRedis()
    metrics = Metrics()
    manager = ClusterManager(redis.url, channel=uid("back"))
    metrics.watch_cluster(manager)
    try:
        redis.stop()
        manager.queue_signal("probe", {"n": 1})
        await manager.flush(timeout=5.0)
        got = samples(metrics.render().decode())
        assert got["realtime_cluster_link_up"] == 0.0, got
        redis.start()

        async def published() -> bool:
            manager.queue_signal("probe", {"n": 2})
            await manager.flush(timeout=2.0)
            return samples(metrics.render().decode())["realtime_cluster_link_up"] == 1.0

        await until(published, timeout=10, what="the link reads up again")
        got = samples(metrics.render().decode())
        assert got['realtime_cluster_messages_lost_total{reason="publish_failed"}'] >= 1.0, got
    finally:
        await manager.aclose()
        redis.stop()


@pytest.mark.parametrize("extra", [0, 5])
async def test_a_full_outbox_drops_the_oldest_and_counts_them(
        monkeypatch: pytest.MonkeyPatch, extra: int) -> None:
    """Under a long outage the outbox is bounded: the oldest go first, counted."""
    monkeypatch.setattr("realtime.transport.cluster.OUTBOX_MAX", 10)
    metrics = Metrics()
    manager = ClusterManager(f"redis://127.0.0.1:{free_port()}/0", channel=uid("full"))
    metrics.watch_cluster(manager)
    try:
        for i in range(10 + extra):  # queued in one step: the publisher has not run yet
            manager.queue_signal("probe", {"n": i})
        got = samples(metrics.render().decode())
        assert got['realtime_cluster_messages_lost_total{reason="outbox_full"}'] == extra, got
        assert got["realtime_cluster_outbox"] == 10.0, got
        await asyncio.wait_for(manager.flush(timeout=5.0), 10)
    finally:
        await manager.aclose()
