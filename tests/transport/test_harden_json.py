"""Strict, bounded JSON at every edge (issue 14, items 2, 5, 9 and the fast
path of item 4): every inbound JSON goes through realtime/transport/jsonwire.py, which
refuses nesting deeper than MAX_DEPTH before parsing, NaN/Infinity and
numbers that overflow to infinity, integers of more than MAX_INT_DIGITS
digits, NUL in object keys and lone surrogates; every reply is strict JSON;
a malformed packet that carries a readable ack id is answered `invalid`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest

from realtime.api import CTX
from tests.conftest import Live, app_on
from tests.harness import MongoServer, server_errors, uid
from tests.node_client import NodeOrdersClient
from tests.wire import RawSocketIO, assert_error, assert_no_server_errors

CALL_TIMEOUT = 3.0  # replies come in milliseconds; longer is a hung ack
JSON_CT = {"Content-Type": "application/json"}
DEEP = 30_000  # brackets: under the 64 KiB frame and body limit, far over any recursion limit
# The documented limits (docs/protocol.md); test_limits_are_the_documented_ones ties them
# to realtime/transport/jsonwire.py, imported inside the tests that use it.
MAX_DEPTH = 32
MAX_INT_DIGITS = 32


def strict_loads(text: str) -> Any:
    """json.loads that fails on anything a strict parser (JSON.parse) refuses."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"the server sent non-JSON {name}: {text[:200]!r}")
    return json.loads(text, parse_constant=refuse)


# -- the app these tests share (the JSON edge is the same on both engines) ------------

@pytest.fixture(scope="module")
async def live(mongo_server: MongoServer) -> AsyncIterator[Live]:
    async with app_on(mongo_server.url, dev=True) as live:  # dev: POST /api/dev/token exists
        yield live


async def post_raw(live: Live, path: str, body: bytes, token: str | None) -> tuple[int, Any]:
    headers = dict(JSON_CT)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with live.http.session.post(live.url + path, data=body, headers=headers) as resp:
        return resp.status, strict_loads(await resp.text())


async def get_strict(live: Live, path: str, token: str) -> tuple[int, Any]:
    async with live.http.session.get(live.url + path,
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, strict_loads(await resp.text())


async def raw_socket(live: Live, namespace: str, token: str) -> RawSocketIO:
    raw = await RawSocketIO.open(live.http.session, live.url)
    kind, data = await raw.connect_ns(namespace, json.dumps({"token": token}))
    assert kind == "connect", data
    return raw


def split_ack(text: str) -> tuple[str, int, str] | None:
    """'43<ns>,<id><json>' -> (namespace, id, json text); None for anything else."""
    if not text.startswith("43"):
        return None
    rest, namespace = text[2:], "/"
    if rest.startswith("/"):
        namespace, _, rest = rest.partition(",")
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return namespace, int(rest[:digits]), rest[digits:]


async def strict_acks(raw: RawSocketIO, namespace: str, want: set[int]) -> dict[int, Any]:
    """The replies to `want`, each parsed strictly; fails on any other ack or a hung one."""
    got: dict[int, Any] = {}
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            while set(got) != want:
                text = await raw.recv()
                if text.startswith(f"42{namespace},[\"notifications\","):
                    continue  # what the user missed while away, pushed on connect
                parts = split_ack(text)
                assert parts is not None, f"unexpected packet {text[:200]!r}"
                ns, pid, body = parts
                assert ns == namespace and pid in want and pid not in got, text[:200]
                got[pid] = strict_loads(body)
    except TimeoutError:
        raise AssertionError(f"no reply to acks {sorted(want - set(got))} "
                             f"within {CALL_TIMEOUT}s (hung)") from None
    return got


async def cancelled_order(live: Live) -> dict[str, Any]:
    """An order its customer may now ask a refund for."""
    order = await live.create_order()
    status, body = await live.post_event(order["order_id"], "cancelled")
    assert status == 200, body
    return order


# -- realtime/transport/jsonwire.py on its own -------------------------------------------------

def test_limits_are_the_documented_ones() -> None:
    from realtime.transport import jsonwire

    assert (jsonwire.MAX_DEPTH, jsonwire.MAX_INT_DIGITS) == (MAX_DEPTH, MAX_INT_DIGITS)


def test_nesting_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    from realtime.transport import jsonwire

    limit = MAX_DEPTH
    assert jsonwire.loads("[" * limit + "]" * limit) is not None
    nested_objects = '{"a":' * limit + "1" + "}" * limit
    assert jsonwire.loads(nested_objects) is not None
    for text in ("[" * (limit + 1) + "]" * (limit + 1),
                 '{"a":' * (limit + 1) + "1" + "}" * (limit + 1),
                 "[" * DEEP + "]" * DEEP, "[" * DEEP, '{"a":' * DEEP):
        with pytest.raises(ValueError, match="nest"):
            jsonwire.loads(text)
    # Brackets in strings, escaped quotes and backslashes are text, not nesting.
    tricky = ["[" * 100 + "{" * 100, '\\"[[[[', "\\\\", "]]]]}}}", "\\u005b[[["]
    assert jsonwire.loads(json.dumps(tricky)) == tricky
    assert jsonwire.loads(json.dumps({"k[": "v{" * 50})) == {"k[": "v{" * 50}


@pytest.mark.parametrize("text", [
    "NaN", "[Infinity]", '{"a":-Infinity}', "1e999", "[-1e999]", '{"a":{"b":1e400}}',
    "1" * 400 + ".0",                                # overflows without an exponent
    "1" * (MAX_INT_DIGITS + 1), "-" + "9" * 101,
    '{"a\\u0000b":1}', '[{"\\u0000":1}]',            # NUL in a key
    '"\\ud800"', '{"a":"x\\udfff"}', '{"\\udc00":1}',  # lone surrogates
])
def test_refused_tokens(text: str) -> None:
    from realtime.transport import jsonwire

    with pytest.raises(ValueError):
        jsonwire.loads(text)


def test_accepted_edges() -> None:
    from realtime.transport import jsonwire

    assert jsonwire.loads("1e308") == 1e308
    assert jsonwire.loads("9" * MAX_INT_DIGITS) == int("9" * MAX_INT_DIGITS)
    assert jsonwire.loads('"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character
    assert jsonwire.loads('{"a":"x\\u0000y"}') == {"a": "x\x00y"}  # NUL in a value is text


def test_outbound_json_is_always_strict() -> None:
    from realtime.transport import jsonwire

    assert jsonwire.dumps({"a": 1.5, "b": [1, "x"]}) == '{"a":1.5,"b":[1,"x"]}'
    text = jsonwire.dumps({"a": float("inf"), "b": [float("nan"), -float("inf"), 2.0]})
    assert strict_loads(text) == {"a": None, "b": [None, None, 2.0]}


def _inbound_models() -> list[type[Any]]:
    import realtime.api
    import realtime.namespaces.chat
    import realtime.namespaces.ops
    import realtime.namespaces.orders
    import realtime.namespaces.tracking
    import realtime.pages  # noqa: F401  (their models register as Inbound subclasses)
    from realtime.namespaces.models import Inbound

    found, todo = [], [Inbound]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_inbound_float_field_refuses_non_finite_values() -> None:
    """A guard for new models: each float field of each inbound model refuses
    NaN and ±inf itself (allow_inf_nan=False), whatever the parser let through."""
    from pydantic import TypeAdapter, ValidationError

    checked = []
    for model in _inbound_models():
        for name, field in model.model_fields.items():
            if "float" not in str(field.annotation):
                continue
            ann: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            adapter: TypeAdapter[Any] = TypeAdapter(ann)
            for bad in (float("inf"), -float("inf"), float("nan")):
                with pytest.raises(ValidationError):
                    adapter.validate_python(bad, strict=True)
            checked.append(f"{model.__name__}.{name}")
    assert len(checked) >= 9, checked  # PointIn x5, AreaIn x4, AddressIn x2, DispatchIn x2


# -- item 2: a non-finite number stored through the API ------------------------------

@pytest.mark.parametrize("amount", ["1e999", "-1e999", "NaN", "Infinity", "[1, 1e400]"])
async def test_refund_request_with_a_non_finite_amount_is_refused(
        live: Live, caplog: pytest.LogCaptureFixture, amount: str) -> None:
    """The customer's own refund request with `data.amount` 1e999 (or NaN,
    Infinity) is `invalid` and stores nothing; then the order reads, over
    HTTP and Socket.IO, as strict JSON."""
    order = await cancelled_order(live)
    order_id, customer = order["order_id"], live.token("customer", order["customer_id"])
    body = f'{{"state":"refund_requested","data":{{"amount":{amount}}}}}'.encode()
    status, reply = await post_raw(live, f"/api/orders/{order_id}/events", body, customer)
    assert status == 400, reply
    assert_error(reply, "invalid")
    status, reply = await get_strict(live, f"/api/orders/{order_id}", customer)
    assert status == 200 and reply["data"]["order"]["state"] == "cancelled", reply
    raw = await raw_socket(live, "/orders", customer)
    await raw.send(f'42/orders,1["subscribe",{{"order_id":"{order_id}"}}]')
    got = await strict_acks(raw, "/orders", {1})
    assert got[1][0]["ok"] is True and got[1][0]["data"]["order"]["seq"] == 2, got
    await raw.close()
    # And a finite amount is still accepted.
    status, reply = await post_raw(live, f"/api/orders/{order_id}/events",
                                   b'{"state":"refund_requested","data":{"amount":12.5}}', customer)
    assert status == 200 and reply["data"]["event"]["data"] == {"amount": 12.5}, reply
    assert_no_server_errors(caplog)


async def test_a_non_finite_number_stored_before_the_fix_reads_as_null(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """Data written before the fix may hold Infinity/NaN: every reply that
    carries it is still strict JSON (the value reads as null), over HTTP, a
    raw websocket and the official JavaScript client, for the customer and
    for an agent."""
    order = await cancelled_order(live)
    order_id = order["order_id"]
    ctx = live.app[CTX]
    events = ctx.services.store.db["order_events"]
    result = await events.update_one(
        {"order_id": order_id, "seq": 2},
        {"$set": {"data.amount": float("inf"), "data.rates": [float("nan"), -float("inf"), 1.5]}})
    assert result.modified_count == 1

    for role, sub in (("customer", order["customer_id"]), ("agent", None)):
        token = live.token(role, sub)
        status, reply = await get_strict(live, f"/api/orders/{order_id}", token)
        assert status == 200, reply
        assert reply["data"]["events"][1]["data"]["amount"] is None, reply
        assert reply["data"]["events"][1]["data"]["rates"] == [None, None, 1.5], reply
        raw = await raw_socket(live, "/orders", token)
        await raw.send(f'42/orders,1["subscribe",{{"order_id":"{order_id}"}}]')
        got = await strict_acks(raw, "/orders", {1})
        assert got[1][0]["data"]["events"][1]["data"]["amount"] is None, got
        await raw.close()

    js = await NodeOrdersClient.start(live.url, live.token("customer", order["customer_id"]),
                                      order_id, transport="websocket", count=0)
    try:
        await js.expect("connect")
        reply = (await js.expect("subscribe"))["reply"]
        assert reply["ok"] is True, reply
        assert reply["data"]["events"][1]["data"]["amount"] is None, reply
        await js.expect("done")
        assert await js.exit_code() == 0, js.stderr
    finally:
        await js.close()
    assert_no_server_errors(caplog)


# -- item 5: no 5xx from any body ----------------------------------------------------

def deep_array(n: int) -> str:
    return "[" * n + "]" * n


def deep_object(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


def with_x(ok: dict[str, Any], raw_value: str) -> str:
    """The valid body `ok` with one more member, "x", written as raw JSON text."""
    return json.dumps({**ok, "x": None}).replace('"x": null', '"x": ' + raw_value)


# Label -> a function of a valid body (a dict) giving the hostile body's text.
HOSTILE_BODIES: dict[str, Any] = {
    "array_30000_deep": lambda ok: deep_array(DEEP),
    "object_10000_deep": lambda ok: deep_object(10_000),  # 60 KB
    "unbalanced_30000": lambda ok: "[" * DEEP,
    "member_1000_deep": lambda ok: with_x(ok, deep_array(1000)),
    "member_32_deep": lambda ok: with_x(ok, deep_array(MAX_DEPTH)),  # 33 with the body
    "number_1e999": lambda ok: with_x(ok, "1e999"),
    "number_minus_1e999": lambda ok: with_x(ok, "-1e999"),
    "number_400_digits": lambda ok: with_x(ok, "1" * 400 + ".5"),
    "int_101_digits": lambda ok: with_x(ok, "7" * 101),
    "int_5000_digits": lambda ok: with_x(ok, "7" * 5000),
    "nan": lambda ok: with_x(ok, "NaN"),
    "nul_in_key": lambda ok: json.dumps({**ok, "a\x00b": 1}),
    "lone_surrogate": lambda ok: json.dumps({**ok, "x": "\ud800"}),
}


def _order_body() -> dict[str, Any]:
    return {
        "order_id": uid("o-"), "customer_id": uid("c-"),
        "service": {"code": "aircon_repair", "name": "空调维修"},
        "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
        "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000},
    }


# Route label -> (path template, role, a valid body). Every POST route of the API.
POST_ROUTES: dict[str, tuple[str, str | None, Any]] = {
    "create": ("/api/orders", "service", _order_body),
    "assign": ("/api/orders/{order_id}/assign", "service", lambda: {"technician_id": "t-1"}),
    "events": ("/api/orders/{order_id}/events", "service", lambda: {"state": "cancelled"}),
    "events_data": ("/api/orders/{order_id}/events", "service",
                    lambda: {"state": "cancelled", "data": {"note": "n"}}),
    "dispatch": ("/api/orders/{order_id}/dispatch", "service", lambda: {"count": 1}),
    "feedback": ("/api/feedback", "customer", lambda: {"category": "app", "body": "hi"}),
    "dev_token": ("/api/dev/token", None, lambda: {"role": "customer", "sub": "c-1"}),
}


HTTP_CASES = [(route, body) for route in POST_ROUTES for body in HOSTILE_BODIES]


@pytest.mark.parametrize(("route", "body"), HTTP_CASES, ids=[f"{r}-{b}" for r, b in HTTP_CASES])
async def test_post_routes_refuse_hostile_json_without_a_5xx(
        live: Live, caplog: pytest.LogCaptureFixture, route: str, body: str) -> None:
    path, role, valid = POST_ROUTES[route]
    order = await live.create_order()  # exists and is `created`: every route would act on it
    path = path.format(order_id=order["order_id"])
    good = valid()
    if route == "events_data":
        # The hostile part inside the free-form `data` the backend attaches.
        text = '{"state":"cancelled","data":' + HOSTILE_BODIES[body](good["data"]) + "}"
    else:
        text = HOSTILE_BODIES[body](good)
    status, reply = await post_raw(live, path, text.encode(), live.token(role) if role else None)
    assert status == 400, reply
    assert_error(reply, "invalid")
    # Nothing happened to the order.
    status, reply = await get_strict(live, f"/api/orders/{order['order_id']}", live.token("service"))
    assert reply["data"]["order"]["seq"] == 1, reply
    assert_no_server_errors(caplog)


@pytest.mark.parametrize("key", ["a\x00b", "\x00"])
async def test_nul_in_a_data_key_is_invalid_when_the_json_is_built_by_a_client(
        live: Live, caplog: pytest.LogCaptureFixture, key: str) -> None:
    """The issue's own case: a NUL in a `data` key (MongoDB cannot store it) is
    400 invalid, not 500 internal."""
    order = await live.create_order()
    status, reply = await live.post_event(order["order_id"], "cancelled", {key: 1, "ok": True})
    assert status == 400, reply
    assert_error(reply, "invalid")
    assert_no_server_errors(caplog)


# -- item 9 and the fast path: malformed packets that carry an ack id -----------------

ORDERS_BAD = {
    21: '["subscribe",{"order_id":',                                   # truncated JSON
    22: '["subscribe",{"order_id":"o-1","since_seq":' + "1" * 101 + "}]",  # 101-digit integer
    23: deep_array(1000),                                              # 1,000 deep
    24: '["subscribe",' + deep_array(DEEP // 2) + "]",
    25: '["subscribe",{"order_id":"o-1","since_seq":1e999}]',
    26: '["subscribe",{"order_id":"o-1"}] trailing',
    27: '["subscribe",{"order_id":"o-1","x\\u0000":1}]',
    28: '["subscribe",{"order_id":"\\ud800"}]',
}
LOCATION = '{"lat":31.2304,"lng":121.4737,"ts":%s}'


def now_ms() -> int:
    return int(time.time() * 1000)

TRACKING_BAD = {
    31: '["location",{"lat":31.2304,"lng":',                         # truncated JSON
    32: '["location",' + LOCATION % ("1" * 101) + "]",                 # 101-digit ts
    33: '["location",' + deep_array(1000) + "]",
    34: '["location",{"lat":' + deep_array(DEEP // 2) + "}]",
    35: '["location",{"lat":1e999,"lng":121.4737,"ts":1}]',
    36: '["location",{"lat":NaN,"lng":121.4737,"ts":1}]',
    37: '["location",{"lat":31.2,"lng":121.4,"ts":1,"\\u0000":1}]',
    38: deep_array(1000),
}


@pytest.mark.parametrize("namespace", ["/orders", "/tracking"])
async def test_malformed_packets_with_an_ack_id_get_invalid(
        live: Live, caplog: pytest.LogCaptureFixture, namespace: str) -> None:
    """Bad JSON, a 101-digit integer, nesting of 1,000 and more, non-finite
    numbers, NUL in a key: each answered `invalid` on its ack id, at once, on
    the slow path (/orders) and on the fast GPS path (/tracking `location`).
    No traceback and no log line per packet."""
    caplog.set_level(logging.INFO)
    hostile = live.app[CTX].sio.hostile
    before = hostile.counts.get("malformed_packet", 0)
    role = "technician" if namespace == "/tracking" else "agent"
    raw = await raw_socket(live, namespace, live.token(role))
    if namespace == "/tracking":  # a technician already streaming: the fast path serves `location`
        await raw.send(f'42/tracking,1["location",{LOCATION % now_ms()}]')
        assert (await strict_acks(raw, namespace, {1}))[1][0]["ok"] is True
    bad = ORDERS_BAD if namespace == "/orders" else TRACKING_BAD
    caplog.clear()
    for ack_id, args in bad.items():
        await raw.send(f"42{namespace},{ack_id}{args}")
    got = await strict_acks(raw, namespace, set(bad))
    for ack_id, reply in got.items():
        assert isinstance(reply, list) and len(reply) == 1, (ack_id, reply)
        assert_error(reply[0], "invalid")
    # The session still works.
    await raw.send(f'42{namespace},99["{"unwatch" if namespace == "/tracking" else "unsubscribe"}",'
                   '{"order_id":"o-1"}]')
    assert (await strict_acks(raw, namespace, {99}))[99][0]["ok"] is True
    await raw.close()
    assert_no_server_errors(caplog)
    # Counted, not logged per packet: at most the one rate-limited line.
    assert hostile.counts.get("malformed_packet", 0) >= before + 1
    per_packet = [r for r in caplog.records if r.name.startswith(("realtime", "engineio", "socketio"))
                  and r.name != "realtime.transport.hostile"
                  and ("malformed" in r.getMessage() or "undecodable" in r.getMessage())]
    assert per_packet == [], [r.getMessage() for r in per_packet]
    assert len([r for r in caplog.records if r.name == "realtime.transport.hostile"]) <= 1


async def test_an_ack_id_too_long_to_be_one_is_never_echoed(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """python-socketio reads any number of digits as the ack id; a 10,000-digit
    one (or a 16-digit one) gets no reply at all, whether its JSON is good or
    bad, and the session still works. (Each `unsubscribe` is answered without
    I/O, so the replies come in the order the packets were sent: a reply to a
    long id would come before the last one's.)"""
    raw = await raw_socket(live, "/orders", live.token("agent"))
    for digits in ("1" * 10_000, "9" * 16, "1" * 101):
        await raw.send(f"42/orders,{digits}[[[[")
        await raw.send(f'42/orders,{digits}["unsubscribe",{{"order_id":"o-1"}}]')
    await raw.send('42/orders,123456789012345["unsubscribe",{"order_id":"o-1"}]')  # 15 digits: fine
    got = await strict_acks(raw, "/orders", {123456789012345})
    assert got[123456789012345][0]["ok"] is True
    await raw.close()
    assert_no_server_errors(caplog)


async def test_a_deep_location_frame_logs_no_traceback(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """Item 4's case: a technician's `location` frame nested 30,000 deep, on
    the fast path, without an ack id: dropped, counted, never an ERROR with a
    traceback (one per frame before)."""
    hostile = live.app[CTX].sio.hostile
    before = hostile.counts.get("malformed_packet", 0)
    raw = await raw_socket(live, "/tracking", live.token("technician"))
    await raw.send(f'42/tracking,1["location",{LOCATION % now_ms()}]')
    assert (await strict_acks(raw, "/tracking", {1}))[1][0]["ok"] is True
    for _ in range(5):
        await raw.send('42/tracking["location",' + deep_array(DEEP) + "]")
    await raw.send(f'42/tracking,2["location",{LOCATION % (now_ms() + 1000)}]')
    got = await strict_acks(raw, "/tracking", {2})
    assert got[2][0]["ok"] is True, got
    await raw.close()
    assert not server_errors(caplog.records), [r.getMessage() for r in server_errors(caplog.records)]
    assert hostile.counts.get("malformed_packet", 0) == before + 5
