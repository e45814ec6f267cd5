"""Issue 14, items 6 and 7.

6. A stranger (a customer or technician with no relation to an order) learns
   nothing from the server about an order that is not theirs: the same reply
   for an existing order as for one that never existed.
7. A stalled store: every call answers within the documented bound
   (REALTIME_MONGO_TIMEOUT_MS), the node sheds what exceeds its gate at once
   with `unavailable` and `retry_after_ms`, and it serves again as soon as the
   store does, having lost nothing it acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from realtime.api import CTX
from tests.conftest import Live, app_on
from tests.harness import (
    Client,
    MongoServer,
    server_errors,
    uid,
    until,
)

# -- 6. strangers ---------------------------------------------------------------------------------


def _same(reply: Any, order_id: str) -> Any:
    """A reply with the order id the caller sent replaced: what must not differ
    between an existing and a missing order is everything else."""
    return repr(reply).replace(order_id, "<order_id>")


async def test_a_stranger_gets_the_same_answer_for_an_existing_and_a_missing_order(
        live: Live) -> None:
    customer_id, tech_id = uid("c-"), uid("t-")
    oid = (await live.create_order(customer_id))["order_id"]
    await live.assign(oid, tech_id)
    for state in ("en_route", "arrived", "in_service"):
        status, body = await live.post_event(oid, state)
        assert status == 200, body
    missing = uid("o-")

    def socket_calls(order_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("subscribe", {"order_id": order_id}),
            ("subscribe", {"order_id": order_id, "since_seq": 2}),
            ("progress", {"order_id": order_id, "state": "completed"}),
            ("progress", {"order_id": order_id, "state": "en_route"}),
            ("cancel", {"order_id": order_id, "reason": "changed my mind"}),
            ("request_refund", {"order_id": order_id, "reason": "not fixed"}),
            ("resolve_refund", {"order_id": order_id, "approve": True}),
            ("rate", {"order_id": order_id, "stars": 5}),
        ]

    def http_calls(order_id: str) -> list[tuple[str, str, Any]]:
        path = f"/api/orders/{order_id}"
        return [
            ("GET", path, None),
            *[("POST", f"{path}/events", {"state": state})
              for state in ("completed", "cancelled", "refund_requested", "refunded", "created")],
            ("POST", f"{path}/events", {"state": "assigned", "data": {"technician_id": "t-x"}}),
            ("POST", f"{path}/assign", {"technician_id": "t-x"}),
            ("GET", f"{path}/trail", None),
            ("GET", f"{path}/dispatch", None),
        ]

    problems: list[str] = []
    for role in ("customer", "technician"):
        sub = uid(f"stranger-{role}-")
        token = live.token(role, sub)
        orders = await live.client(role, sub)
        tracking = await live.client(role, sub, namespace="/tracking")
        for (event, real), (_, fake) in zip(socket_calls(oid), socket_calls(missing), strict=True):
            a, b = await orders.call(event, real), await orders.call(event, fake)
            if _same(a, oid) != _same(b, missing):
                problems.append(f"{role} {event} {real}: {a} != {b}")
            elif a["ok"] or a["error"]["code"] != "not_found":
                problems.append(f"{role} {event} {real}: expected not_found, got {a}")
        a, b = (await tracking.call("watch", {"order_id": oid}),
                await tracking.call("watch", {"order_id": missing}))
        if _same(a, oid) != _same(b, missing):
            problems.append(f"{role} watch: {a} != {b}")
        for (method, path, body), (_, fake_path, _) in zip(http_calls(oid), http_calls(missing),
                                                           strict=True):
            a = await live.http.request(method, path, token, json=body)
            b = await live.http.request(method, fake_path, token, json=body)
            if _same(a, oid) != _same(b, missing):
                problems.append(f"{role} {method} {path} {body}: {a} != {b}")
    assert not problems, "a stranger can tell an existing order from a missing one:\n" + "\n".join(
        problems)

    # Whoever belongs to the order still hears why: permission first, then the state.
    customer = await live.client("customer", customer_id)
    technician = await live.client("technician", tech_id)
    await customer.error("progress", {"order_id": oid, "state": "completed"}, "forbidden")
    await customer.error("resolve_refund", {"order_id": oid, "approve": True}, "forbidden")
    err = await customer.error("cancel", {"order_id": oid}, "conflict")
    assert err["details"] == {"state": "in_service"}, err
    await customer.error("request_refund", {"order_id": oid, "reason": "x"}, "conflict")
    await customer.error("rate", {"order_id": oid, "stars": 5}, "conflict")
    # A technician may never cancel: forbidden, whatever the state (it is not told the state).
    err = await technician.error("cancel", {"order_id": oid}, "forbidden")
    assert "in_service" not in repr(err), err
    await technician.error("progress", {"order_id": oid, "state": "en_route"}, "conflict")
    # Staff, who may see every order, keep 404 for a missing one.
    status, body = await live.http.request("GET", f"/api/orders/{missing}", live.token("agent"))
    assert status == 404 and body["error"]["code"] == "not_found", body
    # Nothing above moved the order.
    status, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service"))
    assert status == 200 and body["data"]["order"]["state"] == "in_service", body
    assert [e["seq"] for e in body["data"]["events"]] == [1, 2, 3, 4, 5]


# -- 7. a stalled store -----------------------------------------------------------------------------

BOUND_MS = 500
BOUND_S = BOUND_MS / 1000
# The docs promise an answer within REALTIME_MONGO_TIMEOUT_MS; a call queued
# behind another change of the same order may wait one bound more. The rest is
# margin for a loaded test machine (the old code answered after up to 10 s).
ANSWER_WITHIN_S = 2 * BOUND_S + 1.0
# A gate far smaller than the traffic below, so that it sheds.
GATE = {"store_max_inflight": 2, "store_max_waiting": 2}
STALL_S = 3.0
SENDERS = 6
BURST = 12  # sends and order events each, fired at once during the stall
NO_LIMITS = {"chat_send_rate": 1000.0, "chat_send_burst": 1000.0,
             "chat_conversation_rate": 1000.0, "chat_conversation_burst": 1000.0}


@pytest.fixture
def store() -> Iterator[MongoServer]:
    """A store of this test's own, to stop and continue (never the session's)."""
    server = MongoServer()
    try:
        yield server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


class Timed:
    """Every call's reply and how long it took, checked against the bound at the end."""

    def __init__(self) -> None:
        self.slow: list[str] = []
        self.unavailable: list[float] = []  # seconds to each `unavailable`

    async def call(self, client: Client, event: str, data: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        reply: dict[str, Any] = await client.call(event, data, timeout=30)
        took = time.monotonic() - t0
        if not reply["ok"] and reply["error"]["code"] == "unavailable":
            self.unavailable.append(took)
        if took > ANSWER_WITHIN_S:
            code = "ok" if reply["ok"] else reply["error"]["code"]
            self.slow.append(f"{event} answered {code} after {took:.2f}s")
        return reply


class Sender:
    """A customer's app: sends one message after another into its order chat and
    retries a failed send with the same client_msg_id, as the docs say."""

    def __init__(self, client: Client, cid: str, timed: Timed) -> None:
        self.client, self.cid, self.timed = client, cid, timed
        self.acked: dict[str, dict[str, Any]] = {}
        self.unexpected: list[Any] = []
        self.n = 0

    async def send(self, cmid: str) -> dict[str, Any]:
        return await self.timed.call(self.client, "send", {
            "conversation_id": self.cid, "client_msg_id": cmid, "body": f"消息 {cmid}"})

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cmid = f"loop-{self.n}"
            while not stop.is_set():
                reply = await self.send(cmid)
                if reply["ok"]:
                    self.acked[cmid] = reply["data"]["message"]
                    break
                if reply["error"]["code"] != "unavailable":
                    self.unexpected.append(reply)
                # The server's hint, else the client's own pace.
                await asyncio.sleep(min(reply["error"].get("retry_after_ms") or 100, 500) / 1000)
            self.n += 1
            await asyncio.sleep(0.005)


async def metric(live: Live, name: str) -> float:
    async with live.http.session.get(live.url + "/metrics") as resp:
        status, text = resp.status, await resp.text()
    assert status == 200
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


async def test_a_stalled_store_answers_within_the_bound_sheds_the_excess_and_recovers_at_once(
        store: MongoServer, caplog: pytest.LogCaptureFixture) -> None:
    async with app_on(store.url, mongo_db=uid("stall_"), mongo_timeout_ms=BOUND_MS, **GATE,
                      **NO_LIMITS) as live:
        timed = Timed()
        # The backend moves the orders (each has a technician of its own: one
        # technician has one job under way at a time).
        tech = await live.client("service")
        senders: list[Sender] = []
        order_ids: list[str] = []
        for _ in range(SENDERS):
            customer_id = uid("c-")
            oid = (await live.create_order(customer_id))["order_id"]
            await live.assign(oid, uid("t-"))
            status, body = await live.post_event(oid, "en_route")
            assert status == 200, body
            order_ids.append(oid)
            chat = await live.client("customer", customer_id, namespace="/chat")
            conv = (await chat.ok("open", {"kind": "order", "order_id": oid}))["conversation"]
            senders.append(Sender(chat, conv["conversation_id"], timed))

        stop = asyncio.Event()
        loops = [asyncio.create_task(s.run(stop)) for s in senders]
        await until(lambda: _all(s.acked for s in senders), 10, what="traffic flowing")
        os.kill(store.proc.pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        try:
            # The traffic's calls now hold every place of the gate, waiting on the store.
            gate = live.app[CTX].services.store.gate

            async def gate_full() -> bool:
                return (gate.inflight, gate.waiting) == (GATE["store_max_inflight"],
                                                         GATE["store_max_waiting"])

            await until(gate_full, 5, every=0.01, what="the gate full of stalled calls")
            burst = [timed.call(senders[i % SENDERS].client, "send", {
                         "conversation_id": senders[i % SENDERS].cid, "client_msg_id": f"burst-{i}",
                         "body": f"断库时 {i}"}) for i in range(BURST)]
            burst += [timed.call(tech, "progress", {"order_id": order_ids[i % SENDERS],
                                                    "state": "arrived"}) for i in range(BURST)]
            replies = await asyncio.gather(*burst)
            codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
            assert set(codes) == {"unavailable"}, codes
            shed = [r["error"] for r in replies if "retry_after_ms" in r["error"]]
            # Far more calls than the gate holds: most are turned away at once, and
            # told when to come back (top level, like rate_limited, and in details).
            assert len(shed) >= BURST, replies
            for err in shed:
                assert 0 < err["retry_after_ms"] <= BOUND_MS, err
                assert err["details"]["retry_after_ms"] == err["retry_after_ms"], err
            assert await metric(live, "realtime_store_shed_total") >= len(shed)

            # Over HTTP a shed call is a 503 with Retry-After (whole seconds).
            async def post_event(oid: str) -> tuple[int, str | None]:
                async with live.http.session.post(
                        f"{live.url}/api/orders/{oid}/events", json={"state": "arrived"},
                        headers={"Authorization": f"Bearer {live.token('service')}"}) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After")

            answers = await asyncio.gather(*(post_event(order_ids[i % SENDERS]) for i in range(BURST)))
            assert {status for status, _ in answers} == {503}, answers
            assert any(after == "1" for _, after in answers), answers
            await asyncio.sleep(max(0.0, STALL_S - (time.monotonic() - stalled_at)))
        finally:
            os.kill(store.proc.pid, signal.SIGCONT)

        # The next send succeeds promptly: nothing left over from the stall holds the
        # conversation (a transaction the store started and never heard the end of).
        probe = senders[0]
        first = await until(lambda: _ok(probe.send(uid("probe-"))), 15, every=0.05,
                            what="a send succeeding after the store came back")
        waits = sorted(timed.unavailable)
        print(f"\nbound {BOUND_S}s, stall {STALL_S:.1f}s: {len(waits)} unavailable, answered after "
              f"{waits[0]:.3f}..{waits[-1]:.3f}s (median {waits[len(waits) // 2]:.3f}s); "
              f"first send ok {first:.3f}s after SIGCONT")
        marks = {s.cid: s.n for s in senders}
        await until(lambda: _all(s.n > marks[s.cid] + 2 for s in senders), 15,
                    what="every sender going on after the store came back")
        stop.set()
        await asyncio.gather(*loops)

        # Retried with the same client_msg_id: stored once each, whatever the stall did.
        for i in range(BURST):
            s = senders[i % SENDERS]
            reply = await s.send(f"burst-{i}")
            assert reply["ok"], reply
            s.acked[f"burst-{i}"] = reply["data"]["message"]
        # Order events: retry, then read the order (docs/protocol.md, `unavailable`).
        for oid in order_ids:
            reply = await timed.call(tech, "progress", {"order_id": oid, "state": "arrived"})
            assert reply["ok"] or reply["error"]["details"] == {"state": "arrived"}, reply
            status, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service"))
            assert status == 200, body
            events = body["data"]["events"]
            assert body["data"]["order"]["state"] == "arrived", body
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
            assert [e["state"] for e in events].count("arrived") == 1, events

        # Nothing acknowledged was lost, nothing stored twice, no gap.
        for s in senders:
            assert not s.unexpected, s.unexpected
            status, body = await live.http.request(
                "GET", f"/api/conversations/{s.cid}/messages?limit=1000", live.token("service"))
            assert status == 200, body
            msgs = body["data"]["messages"]
            assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))
            stored = {m["client_msg_id"]: m for m in msgs if m["sender"]["role"] == "customer"}
            assert len(stored) == len([m for m in msgs if m["sender"]["role"] == "customer"])
            for cmid, acked in s.acked.items():
                assert cmid in stored, f"acknowledged {cmid} is not stored"
                assert (stored[cmid]["id"], stored[cmid]["seq"]) == (acked["id"], acked["seq"])

        assert not timed.slow, f"calls answered after more than {ANSWER_WITHIN_S}s:\n" + "\n".join(
            timed.slow)
        await until(lambda: _zero(metric(live, "realtime_store_inflight")), 5,
                    what="no store work left in flight")
    bad = server_errors(caplog.get_records("call"))
    assert not bad, "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)


async def _all(values: Any) -> bool:
    return all(values)


async def _ok(reply: Any) -> bool:
    return bool((await reply)["ok"])


async def _zero(value: Any) -> bool:
    return bool(await value == 0)


async def test_changes_queued_on_one_order_during_a_stall_answer_within_twice_the_bound(
        store: MongoServer) -> None:
    """Changes of one order wait for each other on a node (its events leave in seq
    order). While the store stalls, the ones queued behind the first must not be
    answered one store timeout after another."""
    async with app_on(store.url, mongo_db=uid("stall_"), mongo_timeout_ms=BOUND_MS) as live:
        tech_id = uid("t-")
        oid = (await live.create_order())["order_id"]
        await live.assign(oid, tech_id)
        tech = await live.client("technician", tech_id)
        await tech.ok("subscribe", {"order_id": oid})
        timed = Timed()
        os.kill(store.proc.pid, signal.SIGSTOP)
        try:
            replies = await asyncio.gather(*(timed.call(tech, "progress", {
                "order_id": oid, "state": "en_route"}) for _ in range(6)))
        finally:
            os.kill(store.proc.pid, signal.SIGCONT)
        assert {r["error"]["code"] for r in replies if not r["ok"]} <= {"unavailable"}, replies
        assert not timed.slow, timed.slow
        # The retry of a change that may have been stored late: ok, or conflict
        # because it is (docs/protocol.md, Replies).
        async def en_route() -> bool:
            reply = await tech.call("progress", {"order_id": oid, "state": "en_route"})
            return bool(reply["ok"] or reply["error"].get("details") == {"state": "en_route"})

        await until(en_route, 15, every=0.05, what="the order moving on after the stall")
        await tech.ok("progress", {"order_id": oid, "state": "arrived"})
        status, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service"))
        assert status == 200 and [e["state"] for e in body["data"]["events"]] == [
            "created", "assigned", "en_route", "arrived"], body


async def test_a_store_call_made_inside_another_shares_its_turn(start_app: Any) -> None:
    """A store method that calls another (a create that finds the order exists
    reads it) runs inside the caller's operation: with one turn per node it
    still completes, instead of waiting for a second turn it can never get."""
    live = await start_app(store_max_inflight=1, store_max_waiting=64)
    body = {
        "order_id": uid("o-"), "customer_id": uid("c-"),
        "service": {"code": "aircon_repair", "name": "空调维修"},
        "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
        "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000},
    }
    replies = await asyncio.gather(*(live.http.request("POST", "/api/orders", live.token("service"),
                                                       json=body) for _ in range(6)))
    assert sorted(status for status, _ in replies) == [200] * 5 + [201], replies
