"""Helpers of the feedback tests: requests, a completed order, a rating."""

from __future__ import annotations

from typing import Any

from tests.conftest import Live


async def api(live: Live, method: str, path: str, token: str | None,
              json: Any = None, status: int = 200) -> dict[str, Any]:
    got, reply = await live.http.request(method, path, token, json=json)
    assert got == status, (method, path, got, reply)
    return dict(reply["data"]) if isinstance(reply, dict) and "data" in reply else reply


async def post_feedback(live: Live, customer: str, body: str, category: str = "service",
                        order_id: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"category": category, "body": body}
    if order_id:
        payload["order_id"] = order_id
    data = await api(live, "POST", "/api/feedback", live.token("customer", customer, name="周女士"),
                     payload, 201)
    return dict(data["feedback"])


async def completed_order(live: Live, customer: str, tech: str) -> str:
    order = await live.create_order(customer)
    oid = order["order_id"]
    await live.assign(oid, tech)
    for state in ("en_route", "arrived", "in_service", "completed"):
        status, reply = await live.post_event(oid, state)
        assert status == 200, reply
    return str(oid)


async def rate(live: Live, customer: str, order_id: str, **rating: Any) -> dict[str, Any]:
    c = await live.client("customer", customer)
    try:
        return dict(await c.ok("rate", {"order_id": order_id, **rating}))
    finally:
        await c.close()
