"""The outbox's HTTP routes and its socket event over the wire, fed bad
payloads: webhooks (register, list, get, delete, replay, deliveries),
notifications (inbox, read, preferences), Web Push subscriptions and key, the
/orders `notifications` event; secrets never shown twice nor logged; and the
ways an endpoint fails (timeout, refused, redirect) never hold up another.
Each test on a database of its own (endpoints outlive a test), on both
engines."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Live, StartApp
from tests.harness import Client, free_port, uid
from tests.outbox.receivers import Receiver, b64u, b64u_decode
from tests.wire import assert_error, assert_no_server_errors

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
QUICK: dict[str, Any] = {"outbox_poll_s": 0.05, "webhook_retry_s": (30.0,), "webhook_timeout_s": 2.0}
WAIT_S = 15.0  # deadline of every wait for something the server does by itself


async def app_with(start_app: StartApp, **kw: Any) -> Live:
    return await start_app(mongo_db=uid("oa"), **{**QUICK, **kw})


async def eventually(what: str, probe: Callable[[], Awaitable[Any]], timeout: float = WAIT_S) -> Any:
    """Poll `probe` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)


async def expect(live: Live, method: str, path: str, code: str, status: int,
                 fields: set[str] | None = None, token: str | None = None, role: str | None = "admin",
                 **kw: Any) -> dict[str, Any]:
    """The route answers `status` with {ok: false, error: {code, ...}} (naming `fields`)."""
    tok = token if token is not None else (live.token(role) if role else None)
    got, reply = await live.http.request(method, path, tok, **kw)
    assert got == status, (method, path, kw, got, reply)
    return assert_error(reply, code, fields)


async def register(live: Live, url: str, role: str = "admin", **body: Any) -> dict[str, Any]:
    status, reply = await live.http.request("POST", "/api/webhooks", live.token(role),
                                            json={"url": url, **body})
    assert status == 201, reply
    assert reply["ok"] is True, reply
    return dict(reply["data"])


def order_hits(r: Receiver, order_id: str) -> list[dict[str, Any]]:
    return [h.json for h in r.ok() if h.json["data"].get("order", {}).get("order_id") == order_id]


def a_point() -> str:
    """A P-256 public key as a browser gives it (p256dh: 65 bytes, base64url)."""
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    return b64u(pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))


def a_subscription(host: str = "push.example.com") -> dict[str, Any]:
    return {"endpoint": f"https://{host}/push/{uid()}",
            "keys": {"p256dh": a_point(), "auth": b64u(b"a" * 16)}}


# -- POST /api/webhooks ------------------------------------------------------------------------

async def test_register_webhook_roles_and_the_secret_shown_once(start_app: StartApp) -> None:
    live = await app_with(start_app)
    body = {"url": "https://hooks.example.com/in"}
    for role in ("customer", "technician", "agent"):
        await expect(live, "POST", "/api/webhooks", "forbidden", 403, role=role, json=body)
        await expect(live, "GET", "/api/webhooks", "forbidden", 403, role=role)
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("admin"))
    assert status == 200 and reply["data"]["webhooks"] == [], reply  # the refusals stored nothing

    given = await register(live, "https://hooks.example.com/a", role="admin", secret=SECRET,
                           types=["order.*", "chat.message", "order.*"], description="crm")
    assert given["secret"] == SECRET
    wh = given["webhook"]
    assert wh["id"].startswith("wh_") and wh["url"] == "https://hooks.example.com/a"
    assert wh["types"] == ["chat.message", "order.*"]  # sorted, once each
    assert wh["source"] == "api" and wh["description"] == "crm" and "secret" not in wh

    made = await register(live, "https://hooks.example.com/b", role="service")
    generated = made["secret"]
    assert generated.startswith("whsec_") and generated != SECRET
    assert 24 <= len(base64.b64decode(generated[6:], validate=True)) <= 64
    assert made["webhook"]["types"] == ["*"]
    third = await register(live, "https://hooks.example.com/c")
    assert third["secret"] != generated  # each its own

    # Never again: neither the list nor each endpoint shows a secret.
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("service"))
    assert status == 200, reply
    listed = reply["data"]["webhooks"]
    assert [w["id"] for w in listed] == [wh["id"], made["webhook"]["id"], third["webhook"]["id"]]
    texts = [json.dumps(reply)]
    for w in listed:
        assert "secret" not in w
        status, one = await live.http.request("GET", f"/api/webhooks/{w['id']}", live.token("admin"))
        assert status == 200 and one["data"]["webhook"] == w, one
        texts.append(json.dumps(one))
    for text in texts:
        for s in (SECRET, generated, third["secret"]):
            assert s not in text and s[6:] not in text
        assert '"secret"' not in text


async def test_register_webhook_bad_bodies(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    url = "https://hooks.example.com/in"
    cases: list[tuple[str, Any, set[str] | None]] = [
        ("missing url", {"types": ["*"]}, {"url"}),
        ("url null", {"url": None}, {"url"}),
        ("url int", {"url": 8080}, {"url"}),
        ("ftp", {"url": "ftp://hooks.example.com/in"}, {"url"}),
        ("javascript", {"url": "javascript:alert(1)"}, {"url"}),
        ("no scheme", {"url": "hooks.example.com/in"}, {"url"}),
        ("no host", {"url": "http:///path/only"}, {"url"}),
        ("credentials", {"url": "http://u:p@hooks.example.com/"}, {"url"}),
        ("user only", {"url": "https://user@hooks.example.com/"}, {"url"}),
        ("fragment", {"url": "https://hooks.example.com/in#x"}, {"url"}),
        ("bad port", {"url": "http://hooks.example.com:99999/"}, {"url"}),
        ("too short", {"url": "http://"}, {"url"}),
        ("huge url", {"url": "https://hooks.example.com/" + "a" * 2100}, {"url"}),
        ("types pattern foo.*", {"url": url, "types": ["foo.*"]}, {"types"}),
        ("types order.**", {"url": url, "types": ["order.**"]}, {"types"}),
        ("types order.*.x", {"url": url, "types": ["order.*.x"]}, {"types"}),
        ("types empty pattern", {"url": url, "types": [""]}, {"types.0"}),
        ("types 31", {"url": url, "types": [f"order.s{i}" for i in range(31)]}, {"types"}),
        ("types empty list", {"url": url, "types": []}, {"types"}),
        ("types string", {"url": url, "types": "order.*"}, {"types"}),
        ("types int entry", {"url": url, "types": [1]}, {"types.0"}),
        ("secret without prefix", {"url": url, "secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, {"secret"}),
        ("secret not base64", {"url": url, "secret": "whsec_!!not*base64!!"}, {"secret"}),
        ("secret too short", {"url": url, "secret": "whsec_" + base64.b64encode(b"k" * 8).decode()},
         {"secret"}),
        ("secret too long", {"url": url, "secret": "whsec_" + base64.b64encode(b"k" * 100).decode()},
         {"secret"}),
        ("secret int", {"url": url, "secret": 12345678901}, {"secret"}),
        ("description too long", {"url": url, "description": "d" * 201}, {"description"}),
        ("unknown field", {"url": url, "foo": 1}, {"foo"}),
        ("source given", {"url": url, "source": "config"}, {"source"}),
        ("id given", {"url": url, "id": "wh_mine"}, {"id"}),
    ]
    for label, body, fields in cases:
        err = await expect(live, "POST", "/api/webhooks", "invalid", 400, fields, json=body)
        assert err["message"], label
    # Not an object, not JSON, no body at all.
    for payload in ([{"url": url}], "https://hooks.example.com/in", 42, None):
        await expect(live, "POST", "/api/webhooks", "invalid", 400, {"(payload)"},
                     data=json.dumps(payload), headers={"content-type": "application/json"})
    for raw in ("{not json", '{"url": ', "\xff\xfe", ""):
        await expect(live, "POST", "/api/webhooks", "invalid", 400,
                     data=raw.encode("latin-1"), headers={"content-type": "application/json"})
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("admin"))
    assert status == 200 and reply["data"]["webhooks"] == [], reply  # nothing was stored
    assert_no_server_errors(caplog)


SELF_HOSTS = ("127.0.0.1", "localhost", "[::1]", "0.0.0.0")


async def refuses_urls_at(live: Live, port: int) -> None:
    """Webhooks and push endpoints at this server's `port` are refused (a
    delivery to itself would loop), by any name of this host."""
    for host in SELF_HOSTS:
        err = await expect(live, "POST", "/api/webhooks", "invalid", 400, {"url"},
                           json={"url": f"http://{host}:{port}/x"})
        assert "itself" in err["details"][0]["error"], err
        err = await expect(live, "POST", "/api/push/subscriptions", "invalid", 400, {"endpoint"},
                           role="customer", json={**a_subscription(), "endpoint": f"http://{host}:{port}/p"})
        assert "itself" in err["details"][0]["error"], err
    await expect(live, "POST", "/api/webhooks", "invalid", 400, {"url"},
                 json={"url": f"http://localhost:{port}/"})
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("admin"))
    assert status == 200 and reply["data"]["webhooks"] == [], reply


async def test_urls_at_the_configured_port_are_refused(start_app: StartApp) -> None:
    port = free_port()
    live = await app_with(start_app, port=port)
    await refuses_urls_at(live, port)
    # Another port of the same host is another program: allowed.
    await register(live, f"http://127.0.0.1:{free_port()}/hook")


async def test_urls_at_the_listening_port_are_refused(start_app: StartApp) -> None:
    live = await app_with(start_app)
    await refuses_urls_at(live, live.port)


async def test_at_most_50_endpoints(start_app: StartApp) -> None:
    live = await app_with(start_app)
    for i in range(50):
        await register(live, f"https://hooks.example.com/{i}")
    await expect(live, "POST", "/api/webhooks", "conflict", 409, json={"url": "https://hooks.example.com/x"})


# -- secrets never in logs -------------------------------------------------------------------

async def register_and_deliver(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every log record at any level, captured while endpoints are registered
    (a secret given, one generated) and signed deliveries go out (one of them
    failing first); the secrets."""
    caplog.set_level(logging.DEBUG)
    live = await app_with(start_app)
    given = Receiver(secret=SECRET)
    made = Receiver()
    failing = Receiver(secret=SECRET, fail=[500])
    await given.start()
    await made.start()
    await failing.start()
    try:
        await register(live, given.url, secret=SECRET, types=["order.*"])
        generated = (await register(live, made.url, role="service", types=["order.*"]))["secret"]
        made.secret = generated  # it verifies the signatures with the secret shown once
        await register(live, failing.url, secret=SECRET, types=["order.*"])
        order = await live.create_order()
        oid = order["order_id"]
        await given.until(lambda: len(order_hits(given, oid)) >= 1, WAIT_S)
        await made.until(lambda: len(order_hits(made, oid)) >= 1, WAIT_S)
        await failing.until(lambda: len(failing.hits) >= 1, WAIT_S)
        assert given.bad_signatures == 0 and made.bad_signatures == 0
    finally:
        await given.stop()
        await made.stop()
        await failing.stop()
    assert caplog.records, "nothing was captured: the check would prove nothing"
    return [SECRET, generated]


def leaks(records: list[logging.LogRecord], secrets: list[str],
          skip: Callable[[logging.LogRecord], bool] = lambda r: False) -> list[str]:
    out = []
    for r in records:
        if skip(r):
            continue
        parts = [r.getMessage(), repr(r.args), r.exc_text or "", repr(r.__dict__)]
        if r.exc_info and r.exc_info[1] is not None:
            parts.append(repr(r.exc_info[1]))
        text = "\n".join(parts)
        if any(s[6:] in text for s in secrets):  # the key itself, with or without whsec_
            out.append(f"{r.name} {r.levelname}: {r.getMessage()[:300]}")
    return out


async def test_secrets_are_never_logged_by_the_server(start_app: StartApp,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    secrets = await register_and_deliver(start_app, caplog)

    def driver_debug(r: logging.LogRecord) -> bool:  # see the next test
        return r.name.startswith("pymongo") and r.levelno < logging.INFO

    assert not leaks(caplog.records, secrets, driver_debug)


async def test_secrets_are_never_logged_even_at_debug(start_app: StartApp,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    secrets = await register_and_deliver(start_app, caplog)
    assert not leaks(caplog.records, secrets)


# -- GET / DELETE /api/webhooks/{id} --------------------------------------------------------

async def test_get_and_delete_webhook(start_app: StartApp) -> None:
    live = await app_with(start_app, webhooks=[{"url": "https://config.example.com/in", "secret": SECRET}])
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("admin"))
    assert status == 200, reply
    (cfg,) = reply["data"]["webhooks"]
    assert cfg["source"] == "config" and "secret" not in cfg

    await expect(live, "GET", "/api/webhooks/wh_nosuchendpoint", "not_found", 404)
    await expect(live, "DELETE", "/api/webhooks/wh_nosuchendpoint", "not_found", 404)
    for bad in ("w" * 65, "wh-1", "wh.1", "wh%201", "%E8%AE%A2", "wh_1%2F..", "wh_1;x"):
        for method, path in (("GET", f"/api/webhooks/{bad}"), ("DELETE", f"/api/webhooks/{bad}"),
                             ("GET", f"/api/webhooks/{bad}/deliveries"),
                             ("POST", f"/api/webhooks/{bad}/replay")):
            kw: dict[str, Any] = {"json": {"since_ts": 0}} if method == "POST" else {}
            await expect(live, method, path, "not_found", 404, **kw)

    for role in ("customer", "technician", "agent"):
        await expect(live, "GET", f"/api/webhooks/{cfg['id']}", "forbidden", 403, role=role)
        await expect(live, "DELETE", f"/api/webhooks/{cfg['id']}", "forbidden", 403, role=role)
    # From REALTIME_WEBHOOKS: removed there, never over the API.
    await expect(live, "DELETE", f"/api/webhooks/{cfg['id']}", "conflict", 409)

    wh = (await register(live, "https://hooks.example.com/gone"))["webhook"]
    status, reply = await live.http.request("DELETE", f"/api/webhooks/{wh['id']}", live.token("service"))
    assert status == 200 and reply["data"] == {"deleted": wh["id"]}, reply
    await expect(live, "GET", f"/api/webhooks/{wh['id']}", "not_found", 404)
    await expect(live, "DELETE", f"/api/webhooks/{wh['id']}", "not_found", 404)
    await expect(live, "GET", f"/api/webhooks/{wh['id']}/deliveries", "not_found", 404)
    status, reply = await live.http.request("GET", "/api/webhooks", live.token("admin"))
    assert [w["id"] for w in reply["data"]["webhooks"]] == [cfg["id"]], reply
    status, reply = await live.http.request("GET", f"/api/webhooks/{cfg['id']}", live.token("admin"))
    assert status == 200 and reply["data"]["webhook"] == cfg, reply


# -- replay and deliveries ---------------------------------------------------------------------

async def test_replay_and_deliveries_bad_input_and_a_good_replay(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    receiver = Receiver(secret=SECRET)
    await receiver.start()
    try:
        wh = (await register(live, receiver.url, secret=SECRET, types=["order.*"]))["webhook"]
        replay = f"/api/webhooks/{wh['id']}/replay"
        cases: list[tuple[Any, set[str]]] = [
            ({}, {"(payload)"}),
            ({"since_ts": 0, "event_ids": ["msg_1"]}, {"(payload)"}),
            ({"event_ids": []}, {"event_ids"}),
            ({"event_ids": [""]}, {"event_ids.0"}),
            ({"event_ids": ["m" * 65]}, {"event_ids.0"}),
            ({"event_ids": [f"msg_{i}" for i in range(1001)]}, {"event_ids"}),
            ({"event_ids": "msg_1"}, {"event_ids"}),
            ({"since_ts": -1}, {"since_ts"}),
            ({"since_ts": "0"}, {"since_ts"}),
            ({"since_ts": 1.5}, {"since_ts"}),
            ({"since_ts": 2**53}, {"since_ts"}),
            ({"since_ts": 0, "all": True}, {"all"}),
            ([{"since_ts": 0}], {"(payload)"}),
        ]
        for body, fields in cases:
            await expect(live, "POST", replay, "invalid", 400, fields, json=body)
        await expect(live, "POST", replay, "invalid", 400, data=b"{since_ts",
                     headers={"content-type": "application/json"})
        await expect(live, "POST", "/api/webhooks/wh_nosuchendpoint/replay", "not_found", 404,
                     json={"since_ts": 0})
        for role in ("customer", "technician", "agent"):
            await expect(live, "POST", replay, "forbidden", 403, role=role, json={"since_ts": 0})

        deliveries = f"/api/webhooks/{wh['id']}/deliveries"
        for query, fields in [
            ("status=bogus", {"status"}), ("status=", {"status"}), ("limit=0", {"limit"}),
            ("limit=201", {"limit"}), ("limit=-1", {"limit"}), ("limit=ten", {"limit"}),
            ("limit=1.5", {"limit"}), ("before_ts=-1", {"before_ts"}), ("before_ts=x", {"before_ts"}),
            ("foo=1", {"foo"}), ("limit=5&foo=1", {"foo"}),
        ]:
            await expect(live, "GET", f"{deliveries}?{query}", "invalid", 400, fields)
        for query in ("limit=1&limit=2", "status=dead&status=dead"):
            await expect(live, "GET", f"{deliveries}?{query}", "invalid", 400)
        await expect(live, "GET", "/api/webhooks/wh_nosuchendpoint/deliveries", "not_found", 404)
        await expect(live, "GET", deliveries, "forbidden", 403, role="technician")

        # Good: an event delivered, then sent again by its id (same webhook-id).
        order = await live.create_order()
        oid = order["order_id"]
        await receiver.until(lambda: len(order_hits(receiver, oid)) >= 1, WAIT_S)
        event_id = receiver.ok()[0].headers["webhook-id"]

        async def delivered() -> dict[str, Any] | None:
            # The receiver has it before the relay records its answer: wait for the record.
            status, reply = await live.http.request("GET", f"{deliveries}?status=delivered&limit=200",
                                                    live.token("admin"))
            assert status == 200, reply
            return dict(reply["data"]) if reply["data"]["deliveries"] else None

        page = await eventually("the delivery recorded", delivered)
        (d,) = page["deliveries"]
        assert d["event_id"] == event_id and d["type"] == "order.created" and d["tries"] == 1
        assert d["attempts"][-1]["result"] == "ok" and d["attempts"][-1]["status"] == 200
        assert page["has_more"] is False
        status, reply = await live.http.request("GET", f"{deliveries}?status=dead", live.token("admin"))
        assert status == 200 and reply["data"]["deliveries"] == [], reply

        status, reply = await live.http.request("POST", replay, live.token("admin"), json={"since_ts": 0})
        assert status == 200 and reply["data"] == {"replayed": 0}, reply  # no dead letters
        status, reply = await live.http.request("POST", replay, live.token("service"),
                                                json={"event_ids": [event_id, "msg_nosuchevent"]})
        assert status == 200 and reply["data"] == {"replayed": 1}, reply
        await receiver.until(lambda: len(order_hits(receiver, oid)) >= 2, WAIT_S)
        assert [h.headers["webhook-id"] for h in receiver.ok()] == [event_id, event_id]
        assert receiver.bad_signatures == 0
    finally:
        await receiver.stop()
    assert_no_server_errors(caplog)


# -- notifications -----------------------------------------------------------------------------

async def inbox(live: Live, user: str, query: str = "") -> dict[str, Any]:
    status, reply = await live.http.request("GET", f"/api/notifications{query}", live.token("customer", user))
    assert status == 200, reply
    return dict(reply["data"])


async def customer_with_notifications(live: Live, n: int) -> tuple[str, list[dict[str, Any]]]:
    """An offline customer whose order moves: `n` notifications in their inbox."""
    customer = uid("c-")
    order = await live.create_order(customer_id=customer)
    await live.assign(order["order_id"], uid("t-"))
    for state in ("en_route", "arrived", "in_service")[:n - 1]:
        status, reply = await live.post_event(order["order_id"], state)
        assert status == 200, reply

    async def all_there() -> list[dict[str, Any]] | None:
        data = await inbox(live, customer)
        return list(data["notifications"]) if data["unread"] == n and len(data["notifications"]) == n \
            else None

    return customer, await eventually("notifications in the inbox", all_there)


async def test_notifications_inbox_read_and_bad_input(start_app: StartApp,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    for query, fields in [
        ("?limit=0", {"limit"}), ("?limit=201", {"limit"}), ("?limit=x", {"limit"}),
        ("?unread=maybe", {"unread"}), ("?before_ts=-5", {"before_ts"}), ("?before_ts=soon", {"before_ts"}),
        ("?foo=1", {"foo"}), ("?unread_only=true", {"unread_only"}),
    ]:
        await expect(live, "GET", f"/api/notifications{query}", "invalid", 400, fields, role="customer")
    await expect(live, "GET", "/api/notifications?limit=1&limit=1", "invalid", 400, role="customer")

    read = "/api/notifications/read"
    for body, fields in [
        ({}, {"(payload)"}), ({"ids": ["ntf_1"], "all": True}, {"(payload)"}),
        ({"all": False}, {"all"}), ({"all": "true"}, {"all"}), ({"all": 0}, {"all"}),
        ({"ids": []}, {"ids"}), ({"ids": "ntf_1"}, {"ids"}), ({"ids": [""]}, {"ids.0"}),
        ({"ids": ["n" * 65]}, {"ids.0"}), ({"ids": [f"n{i}" for i in range(501)]}, {"ids"}),
        ({"all": True, "user_id": "someone"}, {"user_id"}), (["ntf_1"], {"(payload)"}),
    ]:
        await expect(live, "POST", read, "invalid", 400, fields, role="customer", json=body)

    customer, items = await customer_with_notifications(live, 3)
    assert all(i["id"].startswith("ntf_") and i["read"] is False and i["kind"] == "order" for i in items)
    assert {i["data"]["state"] for i in items} == {"assigned", "en_route", "arrived"}
    assert [i["ts"] for i in items] == sorted((i["ts"] for i in items), reverse=True)  # newest first
    ids = [i["id"] for i in items]
    data = await inbox(live, customer, "?limit=2")
    assert [i["id"] for i in data["notifications"]] == ids[:2] and data["has_more"] is True

    async def mark(body: dict[str, Any], user: str = customer) -> dict[str, Any]:
        status, reply = await live.http.request("POST", read, live.token("customer", user), json=body)
        assert status == 200, reply
        return dict(reply["data"])

    assert await mark({"ids": [ids[0]]}, uid("c-")) == {"marked": 0, "unread": 0}  # not theirs
    assert await mark({"ids": [ids[0], "ntf_nosuchnote"]}) == {"marked": 1, "unread": 2}
    assert await mark({"ids": [ids[0]]}) == {"marked": 0, "unread": 2}  # read already
    data = await inbox(live, customer, "?unread=true")
    assert [i["id"] for i in data["notifications"]] == ids[1:] and data["unread"] == 2
    assert await mark({"all": True}) == {"marked": 2, "unread": 0}
    data = await inbox(live, customer)
    assert data["unread"] == 0 and all(i["read"] is True for i in data["notifications"])
    assert len(data["notifications"]) == 3
    assert_no_server_errors(caplog)


async def test_read_all_takes_only_true(start_app: StartApp) -> None:
    live = await app_with(start_app)
    customer, _ = await customer_with_notifications(live, 2)
    for value in (1, 1.0):
        await expect(live, "POST", "/api/notifications/read", "invalid", 400, {"all"},
                     token=live.token("customer", customer), json={"all": value})
    assert await _unread_is(live, customer, 2)


async def test_preferences_bad_input_and_round_trip(start_app: StartApp,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    path = "/api/notifications/preferences"
    quiet = {"start": "22:00", "end": "07:30", "tz": "Europe/Paris"}
    cases: list[tuple[Any, set[str] | None]] = [
        ({"lang": "fr"}, {"lang"}), ({"lang": "EN"}, {"lang"}), ({"lang": 1}, {"lang"}),
        ({"quiet_hours": {**quiet, "start": "25:00"}}, {"quiet_hours.start"}),
        ({"quiet_hours": {**quiet, "start": "7:00"}}, {"quiet_hours.start"}),
        ({"quiet_hours": {**quiet, "end": "07:60"}}, {"quiet_hours.end"}),
        ({"quiet_hours": {**quiet, "end": "0a:00"}}, {"quiet_hours.end"}),
        ({"quiet_hours": {**quiet, "tz": "Mars/Olympus"}}, {"quiet_hours.tz"}),
        ({"quiet_hours": {**quiet, "tz": "/etc/passwd"}}, {"quiet_hours.tz"}),
        ({"quiet_hours": {**quiet, "tz": "../../etc/passwd"}}, {"quiet_hours.tz"}),
        ({"quiet_hours": {**quiet, "tz": ""}}, {"quiet_hours.tz"}),
        ({"quiet_hours": {"start": "22:00"}}, {"quiet_hours.end"}),
        ({"quiet_hours": {**quiet, "days": [1]}}, {"quiet_hours.days"}),
        ({"quiet_hours": "22:00-07:00"}, {"quiet_hours"}),
        ({"muted_conversations": [f"cv-{i}" for i in range(201)]}, {"muted_conversations"}),
        ({"muted_conversations": ["has space"]}, {"muted_conversations.0"}),
        ({"muted_conversations": "cv-1"}, {"muted_conversations"}),
        ({"push": False}, {"push"}),
        ({}, None),
        ([{"lang": "en"}], {"(payload)"}),
    ]
    for body, fields in cases:
        await expect(live, "PUT", path, "invalid", 400, fields, role="customer", json=body)

    user = uid("c-")
    token = live.token("customer", user)
    status, reply = await live.http.request("GET", path, token)
    assert status == 200 and reply["data"]["preferences"] == \
        {"lang": "zh-CN", "quiet_hours": None, "muted_conversations": []}, reply
    want = {"lang": "en", "quiet_hours": quiet, "muted_conversations": ["cv-1", "cv-2"]}
    status, reply = await live.http.request("PUT", path, token, json={
        "lang": "en", "quiet_hours": quiet, "muted_conversations": ["cv-2", "cv-1", "cv-2"]})
    assert status == 200 and reply["data"]["preferences"] == want, reply
    status, reply = await live.http.request("GET", path, token)
    assert status == 200 and reply["data"]["preferences"] == want, reply
    # One field changes, the others stay; null clears.
    status, reply = await live.http.request("PUT", path, token, json={"quiet_hours": None})
    assert status == 200, reply
    status, reply = await live.http.request("GET", path, token)
    assert reply["data"]["preferences"] == {**want, "quiet_hours": None}, reply
    # Another user's are their own.
    status, reply = await live.http.request("GET", path, live.token("technician"))
    assert reply["data"]["preferences"]["lang"] == "zh-CN", reply
    assert_no_server_errors(caplog)


# -- push ----------------------------------------------------------------------------------------

async def test_push_key_and_subscriptions(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    status, reply = await live.http.request("GET", "/api/push/key", live.token("customer"))
    assert status == 200, reply
    key = reply["data"]["public_key"]
    assert len(key) == 87 and set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                              "0123456789-_"), key
    raw = b64u_decode(key)
    assert len(raw) == 65 and raw[0] == 4
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)  # a point on the curve

    path = "/api/push/subscriptions"
    good = a_subscription()
    keys = good["keys"]
    compressed = b64u(b"\x02" + b"\x11" * 64)  # 65 bytes, not an uncompressed point
    cases: list[tuple[Any, set[str]]] = [
        ({**good, "keys": {**keys, "p256dh": compressed}}, {"keys.p256dh"}),
        ({**good, "keys": {**keys, "p256dh": b64u(b"\x04" + b"\x11" * 70)}}, {"keys.p256dh"}),
        ({**good, "keys": {**keys, "p256dh": b64u(b"\x04" + b"\x11" * 32)}}, {"keys.p256dh"}),
        ({**good, "keys": {**keys, "p256dh": keys["p256dh"][:-3] + "+/+"}}, {"keys.p256dh"}),
        ({**good, "keys": {**keys, "p256dh": "A" * 85}}, {"keys.p256dh"}),
        ({**good, "keys": {**keys, "auth": b64u(b"a" * 15)}}, {"keys.auth"}),
        ({**good, "keys": {**keys, "auth": b64u(b"a" * 18)}}, {"keys.auth"}),
        ({**good, "keys": {**keys, "auth": "YWFhYWFh!WFhYWFhYWFhYQ"}}, {"keys.auth"}),
        ({**good, "keys": {**keys, "auth": "A" * 17}}, {"keys.auth"}),
        ({**good, "keys": {"p256dh": keys["p256dh"]}}, {"keys.auth"}),
        ({**good, "keys": {**keys, "extra": "x"}}, {"keys.extra"}),
        ({"endpoint": good["endpoint"]}, {"keys"}),
        ({"keys": keys}, {"endpoint"}),
        ({**good, "endpoint": "ftp://push.example.com/x"}, {"endpoint"}),
        ({**good, "endpoint": "javascript:alert(1)"}, {"endpoint"}),
        ({**good, "endpoint": "https://u:p@push.example.com/x"}, {"endpoint"}),
        ({**good, "endpoint": "https://push.example.com/" + "p" * 2100}, {"endpoint"}),
        ({**good, "expirationTime": "never"}, {"expirationTime"}),
        ({**good, "user_id": "someone"}, {"user_id"}),
        ([good], {"(payload)"}),
    ]
    for body, fields in cases:
        await expect(live, "POST", path, "invalid", 400, fields, role="customer", json=body)

    user = uid("c-")
    token = live.token("customer", user)
    status, reply = await live.http.request("POST", path, token, json={**good, "expirationTime": None})
    assert status == 201, reply
    sub = reply["data"]["subscription"]
    assert sub["id"].startswith("sub_") and sub["endpoint"] == good["endpoint"]
    assert "keys" not in sub
    status, reply = await live.http.request("POST", path, token, json=good)
    assert status == 200 and reply["data"]["subscription"]["id"] == sub["id"], reply  # the same again

    for body, fields in [({}, {"endpoint"}), ({"endpoint": 1}, {"endpoint"}),
                         ({"endpoint": good["endpoint"], "keys": keys}, {"keys"})]:
        await expect(live, "DELETE", path, "invalid", 400, fields, token=token, json=body)
    await expect(live, "DELETE", path, "not_found", 404, token=token,
                 json={"endpoint": "https://push.example.com/push/nosuch"})
    # Another user cannot remove it.
    await expect(live, "DELETE", path, "not_found", 404, role="customer", json={"endpoint": good["endpoint"]})
    status, reply = await live.http.request("DELETE", path, token, json={"endpoint": good["endpoint"]})
    assert status == 200 and reply["data"] == {"deleted": True}, reply
    await expect(live, "DELETE", path, "not_found", 404, token=token, json={"endpoint": good["endpoint"]})
    assert_no_server_errors(caplog)


async def test_every_route_needs_a_token(start_app: StartApp) -> None:
    live = await app_with(start_app)
    wh = (await register(live, "https://hooks.example.com/in"))["webhook"]
    routes: list[tuple[str, str, Any]] = [
        ("POST", "/api/webhooks", {"url": "https://hooks.example.com/x"}),
        ("GET", "/api/webhooks", None),
        ("GET", f"/api/webhooks/{wh['id']}", None),
        ("DELETE", f"/api/webhooks/{wh['id']}", None),
        ("POST", f"/api/webhooks/{wh['id']}/replay", {"since_ts": 0}),
        ("GET", f"/api/webhooks/{wh['id']}/deliveries", None),
        ("GET", "/api/notifications", None),
        ("POST", "/api/notifications/read", {"all": True}),
        ("GET", "/api/notifications/preferences", None),
        ("PUT", "/api/notifications/preferences", {"lang": "en"}),
        ("POST", "/api/push/subscriptions", a_subscription()),
        ("DELETE", "/api/push/subscriptions", {"endpoint": "https://push.example.com/x"}),
    ]
    for method, path, body in routes:
        kw = {"json": body} if body is not None else {}
        await expect(live, method, path, "unauthorized", 401, role=None, **kw)
        await expect(live, method, path, "unauthorized", 401, token="not-a-jwt", **kw)
        await expect(live, method, path, "unauthorized", 401,
                     headers={"Authorization": f"Basic {live.token('admin')}"}, role=None, **kw)
    # Still there: the refused DELETE removed nothing.
    status, reply = await live.http.request("GET", f"/api/webhooks/{wh['id']}", live.token("admin"))
    assert status == 200, reply


# -- the /orders `notifications` event -------------------------------------------------------------

async def test_notifications_event_on_connect_and_bad_payloads(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app)
    customer, items = await customer_with_notifications(live, 2)
    ids = {i["id"] for i in items}
    client: Client = await live.client("customer", customer)
    # Missed while away: pushed once the connection stands, then read.
    pushed = await client.next("notifications", timeout=WAIT_S)
    assert {n["id"] for n in pushed["notifications"]} == ids and pushed["unread"] == 0, pushed
    await eventually("the pushed notifications marked read",
                     lambda: _unread_is(live, customer, 0))

    sid = client.sio.get_sid("/orders")
    for payload, fields in [
        ({"limit": 0}, {"limit"}), ({"limit": 201}, {"limit"}), ({"limit": "5"}, {"limit"}),
        ({"foo": 1}, {"foo"}), ({"before_ts": "yesterday"}, {"before_ts"}),
        ({"before_ts": -1}, {"before_ts"}),
        ({"unread_only": "yes"}, {"unread_only"}), ({"unread": True}, {"unread"}),
        ([{"limit": 5}], {"(payload)"}), ("inbox", {"(payload)"}),
    ]:
        reply = await client.call("notifications", payload, timeout=5.0)
        assert_error(reply, "invalid", fields)
        assert client.sio.connected and client.sio.get_sid("/orders") == sid
    reply = await client.call("notifications", {"limit": 1}, timeout=5.0)
    assert reply["ok"] is True, reply
    assert len(reply["data"]["notifications"]) == 1 and reply["data"]["unread"] == 0
    assert reply["data"]["notifications"][0]["id"] in ids
    reply = await client.call("notifications", {"unread_only": True}, timeout=5.0)
    assert reply["ok"] is True and reply["data"]["notifications"] == [], reply
    assert client.drain("notifications") == []  # pushed once, not again
    assert_no_server_errors(caplog)


async def _unread_is(live: Live, user: str, n: int) -> bool:
    return bool((await inbox(live, user))["unread"] == n)


# -- endpoint failure modes --------------------------------------------------------------------------

class Redirector:
    """Answers every POST /hook with 301 to /moved (which counts what arrives)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hooks = 0
        self.moved = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Redirector:
        async def hook(request: web.Request) -> web.Response:
            await request.read()
            self.hooks += 1
            return web.Response(status=301, headers={"Location": f"http://127.0.0.1:{self.port}/moved"})

        async def moved(request: web.Request) -> web.Response:
            await request.read()
            self.moved += 1
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_route("*", "/moved", moved)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def test_failing_endpoints_never_hold_up_a_healthy_one(start_app: StartApp,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    live = await app_with(start_app, webhook_timeout_s=0.5)
    slow = Receiver(secret=SECRET, delay_s=3.0)
    healthy = Receiver(secret=SECRET)
    redirector = Redirector()
    await slow.start()
    await healthy.start()
    await redirector.start()
    refused_url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    try:
        failing: dict[str, str] = {}
        for name, url in (("timeout", slow.url), ("refused", refused_url), ("redirect", redirector.url)):
            failing[name] = (await register(live, url, secret=SECRET, types=["order.*"]))["webhook"]["id"]
        await register(live, healthy.url, secret=SECRET, types=["order.*"])

        order = await live.create_order()
        oid = order["order_id"]
        await live.assign(oid, uid("t-"))
        for state in ("en_route", "arrived"):
            status, reply = await live.post_event(oid, state)
            assert status == 200, reply
        t0 = time.monotonic()
        await healthy.until(lambda: len(order_hits(healthy, oid)) >= 4, timeout=5.0)
        took = time.monotonic() - t0
        hits = order_hits(healthy, oid)
        assert [h["type"] for h in hits] == ["order.created", "order.assigned", "order.en_route",
                                             "order.arrived"], hits
        assert [h["data"]["event"]["seq"] for h in hits] == [1, 2, 3, 4]
        assert healthy.bad_signatures == 0
        assert took < 5.0

        async def head_failed(wid: str) -> list[dict[str, Any]] | None:
            status, reply = await live.http.request("GET", f"/api/webhooks/{wid}/deliveries",
                                                    live.token("admin"))
            assert status == 200, reply
            ds: list[dict[str, Any]] = reply["data"]["deliveries"]
            return ds if len(ds) == 4 and any(d["attempts"] for d in ds) else None

        for name, wid in failing.items():
            ds = await eventually(f"the {name} endpoint's first attempt recorded",
                                  functools.partial(head_failed, wid))
            (head,) = [d for d in ds if d["type"] == "order.created"]
            behind = [d for d in ds if d is not head]
            assert head["type"] == "order.created" and head["status"] == "pending", (name, head)
            assert head["tries"] == 1 and len(head["attempts"]) == 1, (name, head)
            (a,) = head["attempts"]
            assert a["result"] == name, (name, a)
            assert a["status"] == (301 if name == "redirect" else None), (name, a)
            assert head["next_ts"] is not None and head["next_ts"] > a["ts"] + 20_000, head  # ~30 s away
            # Later events of the order wait behind the failed one, untried.
            assert [d["status"] for d in behind] == ["waiting"] * 3, (name, behind)
            assert all(d["attempts"] == [] for d in behind), (name, behind)
        assert redirector.hooks == 1 and redirector.moved == 0  # the redirect was not followed
        tried = [d for d in await head_failed(failing["timeout"]) or [] if d["attempts"]]
        # Cut at the timeout, not when the slow receiver answers.
        assert len(tried) == 1 and tried[0]["attempts"][0]["latency_ms"] < 3000, tried
    finally:
        await slow.stop()
        await healthy.stop()
        await redirector.stop()
    assert_no_server_errors(caplog)
