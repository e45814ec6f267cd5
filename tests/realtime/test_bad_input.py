"""The bad-input matrix: every /orders event and every order HTTP route, fed
missing fields, wrong types, extra fields, huge and out-of-range values and
non-object payloads. Each is answered {ok: false, error: {code, message, details?}}
(validation errors name their fields in ``details``), nothing is logged at ERROR,
and the SAME Socket.IO connection keeps working through the whole matrix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.conftest import Live, app_on
from tests.harness import Client, MongoServer, uid
from tests.wire import RawClosed, RawSocketIO, assert_error, assert_no_server_errors, parse_packet

NS = "/orders"
UNKNOWN = "o-no-such-order-0000"
ID64 = "o" * 64
ID65 = "o" * 65
# Under the 64 KiB engine.io frame limit once wrapped in a packet; over every field limit.
HUGE = "x" * 60_000
# Over the 64 KiB frame / body limit.
OVERSIZE = "x" * 100_000
CALL_TIMEOUT = 3.0  # replies come in milliseconds; longer is a hung ack


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
NO_PAYLOAD: Any = type("NoPayload", (), {"__repr__": lambda self: "NO_PAYLOAD"})()
NOBODY: Any = type("NoBody", (), {"__repr__": lambda self: "NOBODY"})()


def patch(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value`` (or removed: DROP)."""
    out: dict[str, Any] = json.loads(json.dumps(base))
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is DROP:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return out


# -- the shared app and the one connection the matrix runs on -----------------------------

@dataclass
class Matrix:
    live: Live
    client: Client
    order_id: str
    sid: str

    async def still_works(self) -> None:
        """The same connection (same sid) still answers a valid subscribe."""
        assert self.client.sio.connected, "the matrix connection was closed"
        assert self.client.sio.get_sid(NS) == self.sid, "the matrix connection was replaced"
        reply = await self.client.call("subscribe", {"order_id": self.order_id}, timeout=CALL_TIMEOUT)
        assert reply["ok"] is True, reply
        assert reply["data"]["order"]["order_id"] == self.order_id


@pytest.fixture(scope="module")
async def matrix(mongo_server: MongoServer) -> AsyncIterator[Matrix]:
    async with app_on(mongo_server.url) as live:
        order = await live.create_order()
        client = await live.client("admin")
        sid = client.sio.get_sid(NS)
        assert sid
        yield Matrix(live, client, order["order_id"], sid)


async def call(client: Client, event: str, payload: Any) -> Any:
    try:
        if payload is NO_PAYLOAD:
            return await client.sio.call(event, namespace=NS, timeout=CALL_TIMEOUT)
        return await client.call(event, payload, timeout=CALL_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no reply to {event!r} within {CALL_TIMEOUT}s (hung ack)") from None


# -- Socket.IO: the table --------------------------------------------------------------

BASE: dict[str, dict[str, Any]] = {
    "subscribe": {"order_id": UNKNOWN},
    "unsubscribe": {"order_id": UNKNOWN},
    "progress": {"order_id": UNKNOWN, "state": "en_route"},
    "cancel": {"order_id": UNKNOWN},
    "request_refund": {"order_id": UNKNOWN, "reason": "it broke again"},
    "resolve_refund": {"order_id": UNKNOWN, "approve": True},
    "rate": {"order_id": UNKNOWN, "stars": 5},
}
# A valid payload for an order that does not exist. Leaving a room one is not in is a no-op.
VALID_UNKNOWN = {ev: "not_found" for ev in BASE} | {"unsubscribe": "ok"}

PAYLOAD = {"(payload)"}

Case = tuple[str, str, Any, str, set[str] | None]  # id, event, payload, code, fields


def common_cases(ev: str) -> list[Case]:
    base = BASE[ev]
    cases: list[Case] = [
        ("valid_unknown_order", ev, base, VALID_UNKNOWN[ev], None),
        ("order_id_64_chars", ev, {**base, "order_id": ID64}, VALID_UNKNOWN[ev], None),
        ("empty_object", ev, {}, "invalid", REQUIRED[ev]),
        ("missing_order_id", ev, patch(base, "order_id", DROP), "invalid", {"order_id"}),
        ("extra_field", ev, {**base, "foo": 1}, "invalid", {"foo"}),
        ("extra_actor", ev, {**base, "actor": {"id": "x", "role": "admin"}}, "invalid", {"actor"}),
        ("two_extra_fields", ev, {**base, "a": 1, "b": None}, "invalid", {"a", "b"}),
    ]
    for label, value in [
        ("int", 123), ("float", 1.5), ("bool", True), ("null", None), ("list", [UNKNOWN]),
        ("object", {"id": UNKNOWN}), ("empty", ""), ("space", "o 1"), ("newline", "o-1\n"),
        ("slash", "../o-1"), ("non_ascii", "订单-1"), ("65_chars", ID65), ("60kb", HUGE),
    ]:
        cases.append((f"order_id_{label}", ev, {**base, "order_id": value}, "invalid", {"order_id"}))
    for label, payload in [
        ("list", [base]), ("empty_list", []), ("string", UNKNOWN), ("int", 42), ("float", 4.2),
        ("bool", True), ("json_null", (None,)), ("two_payloads", (base, {})),
    ]:
        cases.append((f"payload_{label}", ev, payload, "invalid", PAYLOAD))
    # No payload at all reads as an empty object: the reply names the missing fields.
    cases.append(("payload_no_payload", ev, NO_PAYLOAD, "invalid", REQUIRED[ev]))
    return cases


REQUIRED: dict[str, set[str]] = {
    "subscribe": {"order_id"}, "unsubscribe": {"order_id"}, "progress": {"order_id", "state"},
    "cancel": {"order_id"}, "request_refund": {"order_id", "reason"},
    "resolve_refund": {"order_id", "approve"}, "rate": {"order_id", "stars"},
}


def field_cases(ev: str, field: str, bad: list[tuple[str, Any]],
                good: list[tuple[str, Any]] | None = None) -> list[Case]:
    out: list[Case] = [(f"{field}_{label}", ev, patch(BASE[ev], field, v), "invalid", {field})
                       for label, v in bad]
    out += [(f"{field}_{label}_ok", ev, patch(BASE[ev], field, v), VALID_UNKNOWN[ev], None)
            for label, v in good or []]
    return out


WRONG_TYPES = [("string", "1"), ("float", 1.5), ("bool", True), ("list", [1]), ("object", {"n": 1})]
STARS_BAD = [("0", 0), ("6", 6), ("negative", -1), ("string", "5"), ("float_whole", 5.0), ("float", 4.5),
             ("bool", True), ("huge", 10**20), ("list", [5])]

SPECIFIC: list[Case] = [
    *field_cases("subscribe", "since_seq", [*WRONG_TYPES, ("negative", -1), ("null_string", "null")],
                 [("null", None), ("zero", 0), ("absent", DROP)]),
    *field_cases("progress", "state", [("missing", DROP), ("int", 5), ("null", None), ("bool", True),
                                       ("cancelled", "cancelled"), ("created", "created"),
                                       ("upper", "EN_ROUTE"), ("empty", ""), ("60kb", HUGE),
                                       ("list", ["en_route"])],
                 [("arrived", "arrived"), ("completed", "completed")]),
    *field_cases("cancel", "reason", [("int", 5), ("bool", True), ("list", ["x"]), ("object", {}),
                                      ("501_chars", "r" * 501), ("60kb", HUGE)],
                 [("null", None), ("empty", ""), ("500_chars", "r" * 500)]),
    *field_cases("request_refund", "reason", [("missing", DROP), ("null", None), ("empty", ""),
                                              ("int", 5), ("2001_chars", "r" * 2001), ("60kb", HUGE)],
                 [("2000_chars", "r" * 2000)]),
    *field_cases("resolve_refund", "approve", [("missing", DROP), ("string", "true"), ("int_1", 1),
                                               ("int_0", 0), ("null", None), ("yes", "yes"), ("list", [])],
                 [("false", False)]),
    *field_cases("resolve_refund", "note", [("int", 5), ("501_chars", "n" * 501), ("60kb", HUGE)],
                 [("null", None), ("500_chars", "n" * 500)]),
    *field_cases("rate", "stars", [("missing", DROP), ("null", None), *STARS_BAD],
                 [("1", 1), ("5", 5)]),
    *field_cases("rate", "quality", STARS_BAD, [("null", None), ("3", 3)]),
    *field_cases("rate", "attitude", STARS_BAD, [("1", 1)]),
    *field_cases("rate", "efficiency", STARS_BAD, [("5", 5)]),
    *field_cases("rate", "comment", [("int", 5), ("1001_chars", "c" * 1001), ("60kb", HUGE)],
                 [("1000_chars", "c" * 1000), ("empty", "")]),
    ("several_bad_fields", "rate", {"order_id": "o 1", "stars": 0, "quality": 9, "comment": 1}, "invalid",
     {"order_id", "stars", "quality", "comment"}),
    ("identity_field", "rate", {**BASE["rate"], "customer_id": "c-1"}, "invalid", {"customer_id"}),
    ("identity_field", "cancel", {**BASE["cancel"], "customer_id": "c-1"}, "invalid", {"customer_id"}),
    ("identity_field", "progress", {**BASE["progress"], "technician_id": "t-1"}, "invalid",
     {"technician_id"}),
    ("state_injection", "cancel", {**BASE["cancel"], "state": "refunded"}, "invalid", {"state"}),
]

SOCKET_CASES: list[Case] = [c for ev in BASE for c in common_cases(ev)] + SPECIFIC


@pytest.mark.parametrize(("label", "event", "payload", "code", "fields"), SOCKET_CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in SOCKET_CASES])
async def test_socket_bad_input(matrix: Matrix, caplog: pytest.LogCaptureFixture, label: str, event: str,
                                payload: Any, code: str, fields: set[str] | None) -> None:
    reply = await call(matrix.client, event, payload)
    if code == "ok":
        assert reply["ok"] is True, reply
    else:
        assert_error(reply, code, fields)
    await matrix.still_works()
    assert_no_server_errors(caplog)


UNKNOWN_EVENTS = ["nope", "", "SUBSCRIBE", "subscribe ", "e" * 1000, "order_event", "message", "offer",
                  "__proto__", "订阅"]


@pytest.mark.parametrize("event", UNKNOWN_EVENTS, ids=[e[:20] or "(empty)" for e in UNKNOWN_EVENTS])
async def test_socket_unknown_event(matrix: Matrix, caplog: pytest.LogCaptureFixture, event: str) -> None:
    for payload in ({"order_id": matrix.order_id}, NO_PAYLOAD, "x"):
        err = assert_error(await call(matrix.client, event, payload), "invalid")
        assert event[:64] in err["message"]
    await matrix.still_works()
    assert_no_server_errors(caplog)


async def test_subscribe_since_seq_beyond_int64(matrix: Matrix, caplog: pytest.LogCaptureFixture) -> None:
    """A since_seq no store (or JavaScript) can hold is a bad payload: `invalid`, or nothing
    to replay; never `internal` with a traceback. Integers are bounded to 2**53 - 1."""
    for since in (2**53, 2**63, 2**64, 10**30):
        reply = await call(matrix.client, "subscribe", {"order_id": matrix.order_id, "since_seq": since})
        if reply["ok"]:
            assert reply["data"]["events"] == [], reply
        else:
            assert_error(reply, "invalid", {"since_seq"})
    reply = await call(matrix.client, "subscribe", {"order_id": matrix.order_id, "since_seq": 2**53 - 1})
    assert reply["ok"] is True and reply["data"]["events"] == [], reply
    await matrix.still_works()
    assert_no_server_errors(caplog)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_frame_over_64kib_closes_only_that_connection(
        matrix: Matrix, caplog: pytest.LogCaptureFixture, transport: str) -> None:
    """Over the engine.io limit the server refuses the frame and drops that
    connection (no ack); other connections are untouched and a NEW one works."""
    live = matrix.live
    raw = await RawSocketIO.open(live.http.session, live.url)
    assert raw.open_packet["maxPayload"] == 64 * 1024, raw.open_packet
    await raw.close()

    victim = Client(live.url, NS, live.token("admin"))
    gone = asyncio.Event()
    acks: list[Any] = []

    async def _gone(reason: Any = None) -> None:
        gone.set()

    victim.sio.on("disconnect", _gone, namespace=NS)

    await victim.connect(transports=[transport])
    await victim.ok("subscribe", {"order_id": matrix.order_id})
    await victim.sio.emit("cancel", {"order_id": matrix.order_id, "reason": OVERSIZE}, namespace=NS,
                          callback=lambda *a: acks.append(a))
    await asyncio.wait_for(gone.wait(), 10)
    assert acks == []
    await victim.close()

    fresh = await live.client("admin")
    await fresh.ok("subscribe", {"order_id": matrix.order_id})
    await matrix.still_works()
    # Nothing was stored: the order was not cancelled.
    status, body = await live.http.request("GET", f"/api/orders/{matrix.order_id}", live.token("admin"))
    assert status == 200 and body["data"]["order"]["state"] == "created", body
    assert_no_server_errors(caplog)


async def test_reserved_event_names_do_not_touch_the_session(
        matrix: Matrix, caplog: pytest.LogCaptureFixture) -> None:
    """`connect` / `disconnect` sent as ordinary events are unknown events: answered
    `invalid`, and the connection keeps the identity of its handshake."""
    live = matrix.live
    customer_id = uid("c-")
    own = await live.create_order(customer_id)
    admin_token = live.token("admin", uid("admin-"))
    for event, payload in [
        ("connect", NO_PAYLOAD),
        ("connect", ({"QUERY_STRING": ""}, {"token": admin_token})),
        ("disconnect", NO_PAYLOAD),
        ("disconnect", "client namespace disconnect"),
    ]:
        customer = await live.client("customer", customer_id)
        reply = await call(customer, event, payload)
        assert_error(reply, "invalid")
        # Still the customer of the handshake: own order yes, someone else's order no.
        await customer.ok("subscribe", {"order_id": own["order_id"]})
        await customer.error("subscribe", {"order_id": matrix.order_id}, "not_found")
        await customer.close()
    assert_no_server_errors(caplog)


async def raw_admin(matrix: Matrix) -> RawSocketIO:
    live = matrix.live
    raw = await RawSocketIO.open(live.http.session, live.url)
    kind, data = await raw.connect_ns(NS, json.dumps({"token": live.token("admin")}))
    assert kind == "connect", data
    return raw


async def test_raw_socketio_packets(matrix: Matrix, caplog: pytest.LogCaptureFixture) -> None:
    """Packet-level garbage on an authenticated raw connection: answered `invalid`
    where there is an ack id to answer, dropped otherwise; the connection survives."""
    raw = await raw_admin(matrix)
    answered = {
        2: '42/orders,2[1,{"order_id":"o-1"}]',                 # event name not a string
        3: "42/orders,3[]",                                      # no event name
        4: '42/orders,4"subscribe"',                             # data not an array
        5: '42/orders,5{"order_id":"o-1"}',                      # data an object
        6: "42/orders,6[null]",
        7: '451-/orders,7["subscribe",{"_placeholder":true,"num":0}]',  # binary event
        8: '42/orders,8["subscribe",{"order_id":"o-1"},{"y":1}]',        # two payloads
        9: '42/orders,9["subscribe",{"order_id":"o 1"}]',
        10: '42/orders,10["subscribe",{"order_id":NaN}]',
        11: '42/orders,11["connect",{"QUERY_STRING":""},{"token":"x"}]',
        1: '42/orders,1["subscribe"',                            # malformed JSON (docs/protocol.md)
        12: '42/orders,12["subscribe",{"order_id":"o-1"}',
        13: "42/orders,13[",
    }
    dropped = [
        "4",
        "42",
        "49/orders,",                   # unknown packet type
        "4x",
        '43/orders,14[{"ok":true}]',   # an ack for nothing the server sent
        '42/nope,15["subscribe",{}]',  # a namespace never joined
        "6",                            # engine.io noop
        "b",                            # empty base64 binary message
    ]
    for text in dropped:
        await raw.send(text)
    await raw.ws.send_bytes(b"\x00\x01garbage")  # a stray binary attachment
    for text in answered.values():
        await raw.send(text)
    await raw.send(f'42/orders,99["subscribe",{{"order_id":"{matrix.order_id}"}}]')

    got: dict[int, Any] = {}
    async with asyncio.timeout(CALL_TIMEOUT):
        while set(got) != {*answered, 99}:
            kind, ns, pid, data = parse_packet(await raw.recv())
            assert (kind, ns) == ("3", NS) and pid in {*answered, 99} and pid not in got, (kind, ns, pid)
            got[pid] = data
    for pid in answered:
        assert isinstance(got[pid], list) and len(got[pid]) == 1, got[pid]
        assert_error(got[pid][0], "invalid")
    assert got[99][0]["ok"] is True, got[99]
    assert_error(got[9][0], "invalid", {"order_id"})
    assert_error(got[10][0], "invalid")  # NaN is not JSON: refused whole, before any field
    await raw.close()
    assert_no_server_errors(caplog)


ENGINEIO_GARBAGE = ["", " ", "x", "{}", "-1", "ba", "b===", "22", "\u0663", "7", "8x", "9"]


@pytest.mark.parametrize("frame", ENGINEIO_GARBAGE, ids=[repr(f) for f in ENGINEIO_GARBAGE])
async def test_raw_engineio_garbage_frame(matrix: Matrix, caplog: pytest.LogCaptureFixture,
                                          frame: str) -> None:
    """A websocket text frame that is not an Engine.IO packet is dropped (or, at
    worst, the connection is closed cleanly); never a traceback, never bytes that
    are not websocket frames on the wire."""
    raw = await raw_admin(matrix)
    await raw.send(frame)
    try:
        reply = await raw.call(NS, 1, f'["subscribe",{{"order_id":"{matrix.order_id}"}}]')
    except RawClosed as exc:
        assert exc.clean, f"the stream broke after {frame!r}: {exc}"
    else:
        assert reply[0]["ok"] is True, reply
        await raw.close()
    assert_no_server_errors(caplog)
    fresh = await matrix.live.client("admin")
    await fresh.ok("subscribe", {"order_id": matrix.order_id})
    await fresh.close()
    await matrix.still_works()


# -- HTTP --------------------------------------------------------------------------

CREATE: dict[str, Any] = {
    "order_id": "o-http-never-created",
    "customer_id": "c-1",
    "service": {"code": "aircon_repair", "name": "空调维修"},
    "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
    "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000},
}
ASSIGN = f"/api/orders/{UNKNOWN}/assign"
EVENTS = f"/api/orders/{UNKNOWN}/events"
JSON = {"Content-Type": "application/json"}

# id, method, path, body (dict -> json, bytes -> raw, NOBODY), status, code, fields
HttpCase = tuple[str, str, str, Any, int, str, set[str] | None]

RAW_BODIES: list[tuple[str, Any, set[str] | None]] = [
    ("no_body", NOBODY, None),
    ("empty_body", b"", None),
    ("malformed_json", b'{"order_id": ', None),
    ("single_quotes", b"{'order_id': 'o-1'}", None),
    ("trailing_garbage", b'{"a": 1} x', None),
    ("not_utf8", b"\xff\xfe{}", None),
    ("form_encoded", b"order_id=o-1", None),
    ("json_list", b"[]", PAYLOAD),
    ("json_string", b'"o-1"', PAYLOAD),
    ("json_number", b"1", PAYLOAD),
    ("json_null", b"null", PAYLOAD),
    ("json_true", b"true", PAYLOAD),
]


def http_field_cases(prefix: str, path: str, base: dict[str, Any], field: str,
                     bad: list[tuple[str, Any]], fields: set[str] | None = None) -> list[HttpCase]:
    return [(f"{prefix}-{field}_{label}", "POST", path, patch(base, field, v), 400, "invalid",
             fields or {field}) for label, v in bad]


ID_BAD = [("int", 123), ("float", 1.5), ("bool", True), ("null", None), ("empty", ""), ("space", "a b"),
          ("65_chars", ID65), ("60kb", HUGE), ("list", ["o-1"]), ("non_ascii", "订单")]
TS_BAD = [("negative", -1), ("string", "1"), ("float", 1.5), ("bool", True), ("null", None), ("list", [1])]

HTTP_CASES: list[HttpCase] = [
    # POST /api/orders
    ("create-empty_object", "POST", "/api/orders", {}, 400, "invalid",
     {"order_id", "customer_id", "service", "address", "window"}),
    *[(f"create-missing_{f}", "POST", "/api/orders", patch(CREATE, f, DROP), 400, "invalid", {f})
      for f in ("order_id", "customer_id", "service", "address", "window", "service.code", "service.name",
                "address.lat", "address.lng", "address.text", "window.start_ts", "window.end_ts")],
    *http_field_cases("create", "/api/orders", CREATE, "order_id", ID_BAD),
    *http_field_cases("create", "/api/orders", CREATE, "customer_id", ID_BAD),
    *http_field_cases("create", "/api/orders", CREATE, "service",
                      [("string", "aircon"), ("list", []), ("null", None), ("int", 1)]),
    *http_field_cases("create", "/api/orders", CREATE, "service.code", ID_BAD),
    *http_field_cases("create", "/api/orders", CREATE, "service.name",
                      [("empty", ""), ("201_chars", "n" * 201), ("int", 5), ("null", None)]),
    *http_field_cases("create", "/api/orders", CREATE, "service.price", [("extra", 10)]),
    *http_field_cases("create", "/api/orders", CREATE, "address",
                      [("string", "Shanghai"), ("list", [31.2, 121.4]), ("null", None)]),
    *http_field_cases("create", "/api/orders", CREATE, "address.lat",
                      [("91", 91), ("minus_91", -91), ("90_000001", 90.000001), ("string", "31.2"),
                       ("bool", True), ("null", None), ("list", [31.2])]),
    *http_field_cases("create", "/api/orders", CREATE, "address.lng",
                      [("181", 181), ("minus_180_5", -180.5), ("string", "121"), ("null", None)]),
    *http_field_cases("create", "/api/orders", CREATE, "address.text",
                      [("empty", ""), ("501_chars", "t" * 501), ("60kb", HUGE), ("int", 5)]),
    *http_field_cases("create", "/api/orders", CREATE, "address.zip", [("extra", "200000")]),
    *http_field_cases("create", "/api/orders", CREATE, "window",
                      [("list", []), ("string", "today"), ("null", None)]),
    *http_field_cases("create", "/api/orders", CREATE, "window.start_ts", TS_BAD),
    *http_field_cases("create", "/api/orders", CREATE, "window.end_ts",
                      [*TS_BAD, ("before_start", 1_799_999_999_999)]),
    *http_field_cases("create", "/api/orders", CREATE, "window.tz", [("extra", "Asia/Shanghai")]),
    *http_field_cases("create", "/api/orders", CREATE, "skills",
                      [("string", "aircon"), ("object", {}), ("21_items", [f"s{i}" for i in range(21)])]),
    *http_field_cases("create", "/api/orders", CREATE, "skills", [("int_item", [1])], {"skills.0"}),
    *http_field_cases("create", "/api/orders", CREATE, "skills", [("space_item", ["ok", "a b"])],
                      {"skills.1"}),
    *[(f"create-extra_{f}", "POST", "/api/orders", {**CREATE, f: v}, 400, "invalid", {f})
      for f, v in [("foo", 1), ("actor", {"id": "x", "role": "admin"}), ("state", "completed"),
                   ("seq", 9), ("technician_id", "t-1"), ("rating", {"stars": 5})]],
    ("create-several_bad", "POST", "/api/orders",
     {**CREATE, "order_id": "a b", "address": {"lat": 91, "lng": 0, "text": ""}}, 400, "invalid",
     {"order_id", "address.lat", "address.text"}),
    ("create-lat_nan", "POST", "/api/orders",
     json.dumps(CREATE).replace("31.2304", "NaN").encode(), 400, "invalid", None),
    ("create-lng_infinity", "POST", "/api/orders",
     json.dumps(CREATE).replace("121.4737", "Infinity").encode(), 400, "invalid", None),
    ("create-over_64kib", "POST", "/api/orders", {**CREATE, "order_id": OVERSIZE}, 413, "too_large", None),
    *[(f"create-{label}", "POST", "/api/orders", body, 400, "invalid", fields)
      for label, body, fields in RAW_BODIES],

    # POST /api/orders/{id}/assign
    ("assign-valid_unknown_order", "POST", ASSIGN, {"technician_id": "t-1"}, 404, "not_found", None),
    ("assign-empty_object", "POST", ASSIGN, {}, 400, "invalid", {"technician_id"}),
    *http_field_cases("assign", ASSIGN, {"technician_id": "t-1"}, "technician_id", ID_BAD),
    *[(f"assign-extra_{f}", "POST", ASSIGN, {"technician_id": "t-1", f: v}, 400, "invalid", {f})
      for f, v in [("foo", 1), ("actor", {"id": "x"}), ("state", "assigned")]],
    ("assign-over_64kib", "POST", ASSIGN, {"technician_id": OVERSIZE}, 413, "too_large", None),
    ("assign-path_id_space", "POST", "/api/orders/a%20b/assign", {"technician_id": "t-1"}, 404,
     "not_found", None),
    ("assign-path_id_65_chars", "POST", f"/api/orders/{ID65}/assign", {"technician_id": "t-1"}, 404,
     "not_found", None),
    *[(f"assign-{label}", "POST", ASSIGN, body, 400, "invalid", fields)
      for label, body, fields in RAW_BODIES],

    # POST /api/orders/{id}/events
    ("events-valid_unknown_order", "POST", EVENTS, {"state": "cancelled"}, 404, "not_found", None),
    ("events-valid_with_data_unknown_order", "POST", EVENTS, {"state": "cancelled", "data": {"a": [1]}},
     404, "not_found", None),
    ("events-empty_object", "POST", EVENTS, {}, 400, "invalid", {"state"}),
    *http_field_cases("events", EVENTS, {"state": "cancelled"}, "state",
                      [("int", 5), ("null", None), ("bool", True), ("unknown", "flying"),
                       ("upper", "CANCELLED"), ("empty", ""), ("33_chars", "s" * 33), ("60kb", HUGE),
                       ("list", ["cancelled"])]),
    *http_field_cases("events", EVENTS, {"state": "cancelled"}, "data",
                      [("string", "x"), ("list", []), ("int", 5), ("bool", True),
                       ("9kb", {"blob": "b" * 9000})]),
    *[(f"events-extra_{f}", "POST", EVENTS, {"state": "cancelled", f: v}, 400, "invalid", {f})
      for f, v in [("foo", 1), ("actor", {"id": "x", "role": "admin"}), ("seq", 2), ("type", "rated"),
                   ("ts", 1), ("order_id", UNKNOWN)]],
    ("events-over_64kib", "POST", EVENTS, {"state": "cancelled", "data": {"b": OVERSIZE}}, 413,
     "too_large", None),
    ("events-path_id_space", "POST", "/api/orders/a%20b/events", {"state": "cancelled"}, 404,
     "not_found", None),
    ("events-path_id_65_chars", "POST", f"/api/orders/{ID65}/events", {"state": "cancelled"}, 404,
     "not_found", None),
    *[(f"events-{label}", "POST", EVENTS, body, 400, "invalid", fields)
      for label, body, fields in RAW_BODIES],

    # GET /api/orders/{id}
    ("get-unknown_order", "GET", f"/api/orders/{UNKNOWN}", NOBODY, 404, "not_found", None),
    ("get-64_chars_unknown", "GET", f"/api/orders/{ID64}", NOBODY, 404, "not_found", None),
    ("get-65_chars", "GET", f"/api/orders/{ID65}", NOBODY, 404, "not_found", None),
    ("get-space", "GET", "/api/orders/a%20b", NOBODY, 404, "not_found", None),
    ("get-nul", "GET", "/api/orders/a%00b", NOBODY, 404, "not_found", None),
    ("get-non_ascii", "GET", "/api/orders/%E8%AE%A2%E5%8D%95", NOBODY, 404, "not_found", None),
    ("get-with_body", "GET", f"/api/orders/{UNKNOWN}", {"order_id": "x"}, 404, "not_found", None),
    ("get-unknown_route", "GET", "/api/nope", NOBODY, 404, "not_found", None),
    ("get-unknown_subroute", "GET", f"/api/orders/{UNKNOWN}/nope", NOBODY, 404, "not_found", None),
]


@pytest.mark.parametrize(("label", "method", "path", "body", "status", "code", "fields"), HTTP_CASES,
                         ids=[c[0] for c in HTTP_CASES])
async def test_http_bad_input(matrix: Matrix, caplog: pytest.LogCaptureFixture, label: str, method: str,
                              path: str, body: Any, status: int, code: str, fields: set[str] | None) -> None:
    live = matrix.live
    token = live.token("service")
    if body is NOBODY:
        got, reply = await live.http.request(method, path, token)
    elif isinstance(body, bytes):
        got, reply = await live.http.request(method, path, token, data=body, headers=JSON)
    else:
        got, reply = await live.http.request(method, path, token, json=body)
    assert got == status, reply
    assert_error(reply, code, fields)
    # Nothing was created by a refused create.
    if path == "/api/orders":
        assert (await live.http.request("GET", f"/api/orders/{CREATE['order_id']}", token))[0] == 404
    assert_no_server_errors(caplog)


async def strict_json(resp: aiohttp.ClientResponse) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"the server sent non-JSON {name}")
    return json.loads(await resp.text(), parse_constant=refuse)


@pytest.mark.parametrize(("label", "data_json"), [
    ("int_2_64", '{"n": 18446744073709551616}'),
    ("int_minus_2_64", '{"n": -18446744073709551616}'),
    ("nested_int_2_70", '{"a": {"b": [1180591620717411303424]}}'),
    ("nan", '{"x": NaN}'),
    ("infinity", '{"x": Infinity}'),
    ("minus_infinity", '{"x": [-Infinity]}'),
])
async def test_event_data_must_be_storable_json(matrix: Matrix, caplog: pytest.LogCaptureFixture,
                                                label: str, data_json: str) -> None:
    """`data` the store cannot hold (ints beyond 64 bits) or that is not JSON
    (NaN, Infinity) is `invalid`: never a 500 with a traceback, never stored and
    pushed on to subscribers as non-JSON."""
    live = matrix.live
    order = await live.create_order()
    token = live.token("service")
    async with live.http.session.post(
            f"{live.url}/api/orders/{order['order_id']}/events",
            data=f'{{"state": "cancelled", "data": {data_json}}}'.encode(),
            headers={"Authorization": f"Bearer {token}", **JSON}) as resp:
        body = await strict_json(resp)
        status = resp.status
    assert status == 400, body
    # NaN/Infinity are not JSON at all: the body is refused whole, before any field.
    assert_error(body, "invalid", None if "NaN" in data_json or "Infinity" in data_json else {"data"})
    status, body = await live.http.request("GET", f"/api/orders/{order['order_id']}", token)
    assert body["data"]["order"]["state"] == "created" and body["data"]["order"]["seq"] == 1, body
    assert_no_server_errors(caplog)


@pytest.mark.parametrize("field", ["window.start_ts", "window.end_ts"])
@pytest.mark.parametrize("value", [2**63, 10**30])
async def test_window_beyond_int64_is_invalid(matrix: Matrix, caplog: pytest.LogCaptureFixture,
                                              field: str, value: int) -> None:
    live = matrix.live
    body = patch(CREATE, "order_id", uid("o-"))
    body = patch(body, "window.end_ts", value)
    if field == "window.start_ts":
        body = patch(body, "window.start_ts", value)
    status, reply = await live.http.request("POST", "/api/orders", live.token("service"), json=body)
    assert status == 400, reply
    assert_error(reply, "invalid")
    assert field in {d["field"] for d in reply["error"]["details"]}, reply
    status, _ = await live.http.request("GET", f"/api/orders/{body['order_id']}", live.token("service"))
    assert status == 404
    assert_no_server_errors(caplog)


async def test_matrix_connection_survived_everything(matrix: Matrix) -> None:
    """Runs last: the one connection the whole socket matrix used is still the same
    session and still answers."""
    await matrix.still_works()
    data = await matrix.client.ok("subscribe", {"order_id": matrix.order_id, "since_seq": 0})
    assert [e["seq"] for e in data["events"]] == [1]
