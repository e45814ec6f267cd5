"""Webhooks over the wire (issue 18): every order event reaches a real
receiver once, in order, signed per Standard Webhooks; retries hold later
events behind a failing one; dead letters and replay; the API's refusals.
Real Redis or memory engine, the real store (a database of each test's own:
endpoints outlive a test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Live, StartApp
from tests.harness import uid, until
from tests.outbox.receivers import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Fast retries: the schedule is a setting.
QUICK = {"outbox_poll_s": 0.05, "webhook_retry_s": (0.2, 0.2, 0.2), "webhook_timeout_s": 2.0}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(secret=SECRET).start()
    yield r
    await r.stop()


async def app_with(start_app: StartApp, **kw: Any) -> Live:
    return await start_app(mongo_db=uid("ob"), **{**QUICK, **kw})


async def register(live: Live, url: str, types: list[str] | None = None,
                   secret: str | None = SECRET) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if types:
        body["types"] = types
    if secret:
        body["secret"] = secret
    status, reply = await live.http.request("POST", "/api/webhooks", live.token("admin"), json=body)
    assert status == 201, reply
    return dict(reply["data"])


def order_hits(r: Receiver, order_id: str) -> list[dict[str, Any]]:
    return [h.json for h in r.ok() if h.json["data"].get("order", {}).get("order_id") == order_id]


async def run_order(live: Live, tech: str) -> str:
    order = await live.create_order()
    oid = order["order_id"]
    await live.assign(oid, tech)
    for state in ("en_route", "arrived", "in_service", "completed"):
        status, reply = await live.post_event(oid, state)
        assert status == 200, reply
    return str(oid)


async def test_every_order_event_reaches_the_receiver_once_in_order_signed(
        start_app: StartApp, receiver: Receiver) -> None:
    live = await app_with(start_app, webhooks=[{"url": receiver.url, "secret": SECRET,
                                                "types": ["order.*"]}])
    oid = await run_order(live, uid("t-"))
    await receiver.until(lambda: len(order_hits(receiver, oid)) >= 6)
    hits = [h for h in receiver.ok() if h.json["data"]["order"]["order_id"] == oid]
    types = [h.json["type"] for h in hits]
    assert types == ["order.created", "order.assigned", "order.en_route", "order.arrived",
                     "order.in_service", "order.completed"]
    assert [h.json["data"]["event"]["seq"] for h in hits] == [1, 2, 3, 4, 5, 6]
    assert len({h.headers["webhook-id"] for h in hits}) == 6
    assert receiver.bad_signatures == 0
    for h in hits:
        assert h.headers["webhook-signature"].startswith("v1,")
        assert h.headers["Content-Type"] == "application/json"
    # Once each: nothing more arrives for this order.
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("service"))
    assert status == 200
    (wh,) = reply["data"]["webhooks"]
    assert wh["source"] == "config" and "secret" not in wh
    async def delivered() -> list[dict[str, Any]]:
        # The receiver answers before the relay records the delivery: wait for the record.
        status, reply = await live.http.request(
            "GET", f"/api/webhooks/{wh['id']}/deliveries?status=delivered&limit=50", live.token("admin"))
        assert status == 200, reply
        return list(reply["data"]["deliveries"])

    async def recorded() -> bool:
        return len(await delivered()) >= 6

    await until(recorded, 10, every=0.05, what="six deliveries recorded")
    mine = await delivered()
    assert len(mine) >= 6 and all(d["attempts"][-1]["status"] == 200 for d in mine), mine
    assert len(order_hits(receiver, oid)) == 6


async def test_a_failing_receiver_holds_later_events_behind_the_failed_one(
        start_app: StartApp, receiver: Receiver) -> None:
    live = await app_with(start_app)
    await register(live, receiver.url, ["order.*"])
    receiver.fail = [500, 502, 503]  # the first three requests fail
    order = await live.create_order()
    oid = order["order_id"]
    await live.assign(oid, uid("t-"))
    await live.post_event(oid, "cancelled")
    await receiver.until(lambda: len(order_hits(receiver, oid)) >= 3)
    # Every request, failed or not, in seq order: 1,1,1,1 then 2, then 3.
    seqs = [h.json["data"]["event"]["seq"] for h in receiver.hits
            if h.json["data"]["order"]["order_id"] == oid]
    assert seqs == [1, 1, 1, 1, 2, 3], seqs
    assert [h.status for h in receiver.hits][:4] == [500, 502, 503, 200]
    ids = [h.headers["webhook-id"] for h in receiver.hits[:4]]
    assert len(set(ids)) == 1  # a retry carries the same webhook-id


async def test_dead_letters_after_the_last_try_and_replay_delivers_them(
        start_app: StartApp, receiver: Receiver) -> None:
    live = await app_with(start_app)
    wh = (await register(live, receiver.url, ["order.*"]))["webhook"]
    receiver.down = True
    order = await live.create_order()
    oid = order["order_id"]
    await live.assign(oid, uid("t-"))
    admin = live.token("admin")

    async def dead() -> list[dict[str, Any]]:
        _, reply = await live.http.request(
            "GET", f"/api/webhooks/{wh['id']}/deliveries?status=dead", admin)
        return list(reply["data"]["deliveries"])

    await receiver.until(lambda: len(receiver.hits) >= 4)  # the first try and 3 retries
    async def two_dead() -> bool:
        return len(await dead()) == 2

    await until(two_dead, 10, every=0.05, what="two dead letters")
    letters = await dead()
    assert len(letters) == 2, letters
    assert {d["dead_reason"] for d in letters} == {"retries_exhausted", "behind_dead"}
    assert len(letters[0]["attempts"]) + len(letters[1]["attempts"]) == 4
    receiver.down = False
    status, reply = await live.http.request("POST", f"/api/webhooks/{wh['id']}/replay", admin,
                                            json={"since_ts": 0})
    assert status == 200 and reply["data"]["replayed"] == 2, reply
    await receiver.until(lambda: len(order_hits(receiver, oid)) >= 2)
    assert [h["data"]["event"]["seq"] for h in order_hits(receiver, oid)] == [1, 2]
    assert await dead() == []


async def test_feedback_chat_messages_and_csat_are_announced(
        start_app: StartApp, receiver: Receiver) -> None:
    live = await start_app(mongo_db=uid("ob"), **QUICK)
    await register(live, receiver.url, ["feedback.*", "chat.*"])
    customer = uid("c-")
    status, reply = await live.http.request(
        "POST", "/api/feedback", live.token("customer", customer),
        json={"category": "service", "body": "师傅很专业"})
    assert status == 201, reply
    chat = await live.client("customer", customer, namespace="/chat")
    conv = (await chat.ok("open", {"kind": "support"}))["conversation"]
    cid = conv["conversation_id"]
    await chat.ok("send", {"conversation_id": cid, "client_msg_id": uid("m"), "body": "你好"})
    agent = await live.client("admin", uid("a-"), namespace="/chat")
    await agent.ok("close", {"conversation_id": cid})
    await chat.ok("rate", {"conversation_id": cid, "stars": 5})
    await receiver.until(lambda: {"feedback.created", "chat.message", "chat.csat"}
                         <= {h.json["type"] for h in receiver.ok()})
    by_type = {h.json["type"]: h.json["data"] for h in receiver.ok()}
    assert by_type["feedback.created"]["body"] == "师傅很专业"
    assert by_type["feedback.created"]["user"]["id"] == customer
    assert by_type["chat.message"]["message"]["body"] == "你好"
    assert by_type["chat.message"]["conversation"]["conversation_id"] == cid
    assert by_type["chat.csat"]["csat"]["stars"] == 5
    # Order cards in the chat are not chat.message records (the order events are).
    assert all(h.json["data"]["message"]["kind"] != "system" for h in receiver.ok()
               if h.json["type"] == "chat.message")


async def test_a_change_that_is_refused_is_never_announced(
        start_app: StartApp, receiver: Receiver) -> None:
    """The record is written in the change's transaction: a commit the store
    refuses (one job under way per technician) announces nothing."""
    live = await start_app(mongo_db=uid("ob"), **QUICK)
    await register(live, receiver.url, ["order.*"])
    tech = uid("t-")
    first = (await live.create_order())["order_id"]
    second = (await live.create_order())["order_id"]
    for oid in (first, second):
        await live.assign(oid, tech)
    status, _ = await live.post_event(first, "en_route")
    assert status == 200
    status, reply = await live.post_event(second, "en_route")
    assert status == 409 and reply["error"]["details"]["reason"] == "job_in_progress", reply
    await live.post_event(second, "cancelled")
    await receiver.until(lambda: len(order_hits(receiver, second)) >= 3)
    assert [h["type"] for h in order_hits(receiver, second)] == [
        "order.created", "order.assigned", "order.cancelled"]
    assert [h["data"]["event"]["seq"] for h in order_hits(receiver, second)] == [1, 2, 3]
    async with live.http.session.get(live.url + "/metrics") as resp:
        text = await resp.text()
    assert 'realtime_outbox_attempts_total{channel="webhook",result="ok"}' in text
    assert "realtime_outbox_lag_seconds_count" in text and "realtime_outbox_partitions 32.0" in text
