"""Notifications to people who are not connected (issue 18), over the wire:
a customer with no socket gets `en_route` as a Web Push that reaches a real
push service with a valid VAPID JWT and decrypts with the subscription's
keys; the inbox lists it and connecting to /orders delivers it and clears
the unread count; quiet hours hold a chat message but not an offer.
Real Redis or memory engine, the real store (a database of the test's own)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import Live, StartApp
from tests.harness import uid, until
from tests.outbox.receivers import PushService
from tests.tracking.test_dispatch import at, now_ms, started

QUICK = {"outbox_poll_s": 0.05, "webhook_retry_s": (0.2, 0.2, 0.2), "webhook_timeout_s": 2.0}


@pytest.fixture
async def push() -> AsyncIterator[PushService]:
    p = await PushService().start()
    yield p
    await p.stop()


async def subscribed(live: Live, push: PushService, user: str, role: str) -> None:
    status, reply = await live.http.request("GET", "/api/push/key", live.token(role, user))
    assert status == 200, reply
    push.vapid_key = reply["data"]["public_key"]
    status, reply = await live.http.request("POST", "/api/push/subscriptions", live.token(role, user),
                                            json=push.subscription(uid("b")))
    assert status == 201, reply


async def inbox(live: Live, user: str, role: str = "customer") -> dict[str, Any]:
    status, reply = await live.http.request("GET", "/api/notifications", live.token(role, user))
    assert status == 200, reply
    return dict(reply["data"])


async def test_a_customer_with_no_socket_gets_en_route_as_web_push_and_in_the_inbox(
        start_app: StartApp, push: PushService) -> None:
    live = await start_app(mongo_db=uid("nt"), **QUICK)
    customer, tech = uid("c-"), uid("t-")
    await subscribed(live, push, customer, "customer")
    order = await live.create_order(customer)
    oid = order["order_id"]
    await live.assign(oid, tech)
    status, reply = await live.post_event(oid, "en_route")
    assert status == 200, reply
    await push.until(lambda: any(m["payload"]["data"].get("state") == "en_route" for m in push.received))
    assert push.refused == []
    msg = next(m for m in push.received if m["payload"]["data"].get("state") == "en_route")
    payload = msg["payload"]
    assert payload["title"] == "技师已出发" and payload["lang"] == "zh-CN"
    assert payload["link"] == f"/track/{oid}" and payload["collapse_key"] == f"order:{oid}"
    assert payload["user_id"] == customer and payload["kind"] == "order"
    assert msg["headers"]["urgency"] == "normal" and int(msg["headers"]["ttl"]) > 0
    assert msg["headers"]["content-encoding"] == "aes128gcm"
    # The inbox lists it (and `assigned` before it), unread.
    box = await inbox(live, customer)
    states = [n["data"]["state"] for n in box["notifications"]]
    assert states[:2] == ["en_route", "assigned"], states
    assert box["unread"] == 2
    # Connecting delivers what was missed, oldest first, and clears the count.
    c = await live.client("customer", customer)
    missed = await c.next("notifications")
    assert [n["data"]["state"] for n in missed["notifications"]] == ["assigned", "en_route"]
    assert missed["unread"] == 0

    async def cleared() -> bool:
        return bool((await inbox(live, customer))["unread"] == 0)

    await until(cleared, 20, every=0.05, what="unread cleared")
    # Connected now: the next change reaches the socket, not the inbox.
    await live.post_event(oid, "arrived")
    ev = await c.next("order_event")
    while ev["state"] != "arrived":
        ev = await c.next("order_event")
    await live.post_event(oid, "in_service")
    await c.next("order_event")
    box = await inbox(live, customer)
    assert box["notifications"][0]["data"]["state"] == "en_route"
    assert box["unread"] == 0


def quiet_now(tz: str = "Asia/Shanghai") -> dict[str, str]:
    now = dt.datetime.now(ZoneInfo(tz))
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=1)
    return {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M"), "tz": tz}


async def test_quiet_hours_hold_a_chat_message_but_not_an_offer(
        start_app: StartApp, push: PushService) -> None:
    live = await start_app(mongo_db=uid("nq"), dispatch_timeout_s=30, **QUICK)
    customer = uid("c-")
    tid = uid("t-")
    await subscribed(live, push, tid, "technician")
    status, reply = await live.http.request(
        "PUT", "/api/notifications/preferences", live.token("technician", tid),
        json={"quiet_hours": quiet_now(), "lang": "en"})
    assert status == 200, reply
    # A chat message to the technician while they are connected nowhere.
    order = await live.create_order(customer)
    oid = order["order_id"]
    await live.assign(oid, tid)
    chat = await live.client("customer", customer, namespace="/chat")
    conv = (await chat.ok("open", {"kind": "order", "order_id": oid}))["conversation"]
    await chat.ok("send", {"conversation_id": conv["conversation_id"], "client_msg_id": uid("m"),
                           "body": "请问几点到？"})

    async def chat_noted() -> bool:
        box = await inbox(live, tid, "technician")
        return any(n["kind"] == "chat" for n in box["notifications"])

    await until(chat_noted, 20, every=0.05, what="chat notification")
    box = await inbox(live, tid, "technician")
    note = next(n for n in box["notifications"] if n["kind"] == "chat")
    assert note["held_until"] is not None and note["held_until"] > time.time() * 1000
    assert note["title"] == "New message from Customer" and note["body"] == "请问几点到？"
    # An offer is never held: it reaches the push service at once, high priority,
    # even though the technician's app holds a socket (it may be in the background).
    other = await live.create_order(uid("c-"))
    tech = await technician_as(live, tid)
    await started(live, other["order_id"], {"strategy": "broadcast", "timeout_s": 30})
    await push.until(lambda: any(m["payload"]["kind"] == "offer" for m in push.received))
    offer = next(m for m in push.received if m["payload"]["kind"] == "offer")
    assert offer["headers"]["urgency"] == "high"
    assert 0 < int(offer["headers"]["ttl"]) <= 30
    assert offer["payload"]["title"] == "New job offer"
    # The chat message, sent before, is still held.
    assert not any(m["payload"]["kind"] == "chat" for m in push.received)
    await tech.close()


async def technician_as(live: Live, tid: str) -> Any:
    """The technician `tid` online on /tracking next to the order address."""
    trk = await live.client("technician", tid, namespace="/tracking", skills=["aircon"])
    lat, lng = at(200.0)
    reply = await trk.ok("location", {"lat": lat, "lng": lng, "ts": now_ms()})
    assert reply["status"] == "accepted", reply
    return trk
