"""What the multi-node tests share: points near a test address, orders and chats across nodes, checks."""

from __future__ import annotations

import math
from typing import Any

from tests.cluster_harness import (
    ADDR,
    Cluster,
    TimedClient,
    next_where,
    now_ms,
)
from tests.harness import ServerProcess
from tracking.geo import haversine_m

M_PER_DEG = haversine_m(0, 0, 1, 0)


def at(north_m: float = 0.0, east_m: float = 0.0) -> tuple[float, float]:
    lat0, lng0 = ADDR
    return (lat0 + north_m / M_PER_DEG, lng0 + east_m / (M_PER_DEG * math.cos(math.radians(lat0))))


def pt(where: tuple[float, float], ts: int | None = None) -> dict[str, Any]:
    return {"lat": where[0], "lng": where[1], "ts": ts if ts is not None else now_ms()}


BOX = {"min_lat": ADDR[0] - 0.05, "min_lng": ADDR[1] - 0.05,
       "max_lat": ADDR[0] + 0.05, "max_lng": ADDR[1] + 0.05}


def seqs(items: list[dict[str, Any]]) -> list[int]:
    return [int(x["seq"]) for x in items]


def contiguous(seen: set[int]) -> int:
    """The highest n such that 1..n were all seen."""
    n = 0
    while n + 1 in seen:
        n += 1
    return n


async def assigned_order(cl: Cluster, node: ServerProcess, customer_id: str, tech_id: str,
                         set_off: bool = False) -> str:
    """An order assigned (through `node`) to the technician; `set_off`: and on its way
    (en_route), so the technician's positions reach its watchers (docs/tracking.md)."""
    order = await cl.create_order(node, customer_id)
    await cl.api(node, "POST", f"/api/orders/{order['order_id']}/assign", {"technician_id": tech_id})
    if set_off:
        await cl.api(node, "POST", f"/api/orders/{order['order_id']}/events", {"state": "en_route"})
    return str(order["order_id"])


async def open_support(cust: TimedClient, agent: TimedClient, agent_id: str) -> str:
    """The customer opens support; the agent (on any node) becomes available and gets it."""
    opened = await cust.ok("open", {"kind": "support"})
    cid = str(opened["conversation"]["conversation_id"])
    assert opened["conversation"]["status"] == "queued" and opened["queue_position"] == 1, opened
    await agent.ok("set_status", {"status": "available"})
    for c in (agent, cust):
        conv = await next_where(c, "conversation",
                                lambda x: x["conversation_id"] == cid and x["status"] == "assigned")
        assert conv["assignee"] == agent_id, conv
    return cid


def assert_clean(cl: Cluster) -> None:
    bad = cl.errors()
    assert not bad, "server logged errors:\n" + "\n".join(bad[:40])


async def true(value: bool) -> bool:
    return value
