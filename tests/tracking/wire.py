"""What the tracking wire tests share: points near a test address, orders in a given state, trackers."""

from __future__ import annotations

import math
import time
from typing import Any

from tests.conftest import Live
from tests.harness import Client, uid
from tracking.geo import CoordSys, haversine_m

NS = "/tracking"
# The address live.create_order() gives every order (People's Square, Shanghai; WGS-84).
ADDR = (31.2304, 121.4737)
M_PER_DEG = haversine_m(0, 0, 1, 0)
SYSTEMS: tuple[CoordSys, ...] = ("wgs84", "gcj02", "bd09")
# Technicians in these tests send many points quickly; the default limit (5/s,
# burst 10) is tested on its own.
FAST = {"location_rate": 1000.0, "location_burst": 1000.0}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def at(north_m: float = 0.0, east_m: float = 0.0, origin: tuple[float, float] = ADDR) -> tuple[float, float]:
    """A WGS-84 point `north_m`/`east_m` metres from `origin`."""
    lat0, lng0 = origin
    return (lat0 + north_m / M_PER_DEG,
            lng0 + east_m / (M_PER_DEG * math.cos(math.radians(lat0))))


def pt(where: tuple[float, float], ts: int, **extra: Any) -> dict[str, Any]:
    return {"lat": where[0], "lng": where[1], "ts": ts, **extra}


def dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return haversine_m(a[0], a[1], b[0], b[1])


def fields(err: dict[str, Any]) -> set[str]:
    details = err.get("details")
    assert isinstance(details, list), err
    return {d["field"] for d in details}


PATH = {
    "created": [],
    "assigned": [],
    "en_route": ["en_route"],
    "arrived": ["en_route", "arrived"],
    "in_service": ["en_route", "arrived", "in_service"],
    "completed": ["en_route", "arrived", "in_service", "completed"],
    "cancelled": ["cancelled"],
}


async def order_in(live: Live, state: str, customer_id: str | None = None,
                   tech_id: str | None = None) -> tuple[str, str, str]:
    """An order moved (by the backend) to `state`: (order_id, customer_id, technician_id)."""
    order = await live.create_order(customer_id)
    oid, tech_id = order["order_id"], tech_id or uid("t-")
    if state != "created":
        await live.assign(oid, tech_id)
    for s in PATH[state]:
        status, body = await live.post_event(oid, s)
        assert status == 200, body
    return oid, order["customer_id"], tech_id


async def tracker(live: Live, role: str, sub: str | None = None, **kw: Any) -> Client:
    return await live.client(role, sub, namespace=NS, **kw)


async def order_events(live: Live, order_id: str) -> list[dict[str, Any]]:
    status, body = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert status == 200, body
    return list(body["data"]["events"])
