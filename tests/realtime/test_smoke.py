from tests.conftest import Live


async def test_health_ready_metrics(live: Live) -> None:
    status, body = await live.http.request("GET", "/healthz")
    assert status == 200 and body["ok"] is True
    status, body = await live.http.request("GET", "/readyz")
    assert status == 200 and body["data"]["checks"]["mongo"] == "ok"
    async with live.http.session.get(live.url + "/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert "realtime_connections" in text and "realtime_store_latency_seconds" in text


async def test_subscribe_receives_order_event(live: Live) -> None:
    order = await live.create_order()
    customer = await live.client("customer", order["customer_id"])
    data = await customer.ok("subscribe", {"order_id": order["order_id"]})
    assert data["order"]["state"] == "created"
    assert [e["seq"] for e in data["events"]] == [1]
    await live.assign(order["order_id"], "tech-1")
    event = await customer.next("order_event")
    assert event["seq"] == 2 and event["state"] == "assigned"
    assert event["data"]["technician_id"] == "tech-1"
    # Subscribed *and* the order's customer: delivered once, not twice.
    assert customer.drain("order_event") == []


async def test_readyz_reports_each_store(live: Live) -> None:
    status, body = await live.http.request("GET", "/readyz")
    assert status == 200, body
    checks = body["data"]["checks"]
    assert checks["mongo"] == "ok"
    if live.settings.redis_url:
        assert checks["redis"] == "ok" and body["data"]["status"] == "ready"
    else:
        assert "redis" not in checks
