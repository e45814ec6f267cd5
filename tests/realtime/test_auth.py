"""Identity over the real wire: the Socket.IO handshake, the HTTP bearer token,
audience/issuer, the RS256 option, and that who acts is always the token's subject."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import socketio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import JWT_SECRET, Live, StartApp
from tests.harness import Client, uid
from tests.wire import (
    RawSocketIO,
    assert_error,
    assert_no_server_errors,
    b64url,
    claims,
    hmac_jwt,
    unsigned_jwt,
)

# Test tokens for HS384/HS512 use the 39-byte test secret; PyJWT's advice does not apply.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

NS = "/orders"
# A handshake is answered in milliseconds; a missing answer is a hung handshake.
HANDSHAKE_TIMEOUT = 3.0
OTHER_SECRET = "another-secret-0123456789abcdef-xyz"


def rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.fixture(scope="module")
def rsa_key() -> tuple[str, str]:
    return rsa_pems()


@pytest.fixture(scope="module")
def other_rsa_key() -> tuple[str, str]:
    return rsa_pems()


def hs(payload: dict[str, Any], secret: str = JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def auth(token: Any) -> str:
    return json.dumps({"token": token})


async def raw_handshake(live: Live, auth_text: str | None, query: str = "") -> tuple[str, Any]:
    raw = await RawSocketIO.open(live.http.session, live.url, query)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            return await raw.connect_ns(NS, auth_text)
    except TimeoutError:
        raise AssertionError(f"no CONNECT or CONNECT_ERROR within {HANDSHAKE_TIMEOUT}s: "
                             f"the handshake hung (auth={(auth_text or '')[:120]!r})") from None
    finally:
        await raw.close()


def assert_refused(result: tuple[str, Any], code: str = "unauthorized") -> dict[str, Any]:
    """A CONNECT_ERROR packet: {message, data: {code, message}}."""
    kind, packet = result
    assert kind == "connect_error", result
    assert isinstance(packet, dict) and isinstance(packet.get("message"), str), packet
    data = packet.get("data")
    assert isinstance(data, dict) and set(data) == {"code", "message"}, packet
    assert data["code"] == code, packet
    assert isinstance(data["message"], str) and data["message"], packet
    return data


async def sio_refusal(live: Live, token: Any, url_suffix: str = "") -> dict[str, Any]:
    """Connect with python-socketio's AsyncClient; it must raise ConnectionError,
    and its connect_error handler receives {message, data: {code, message}}."""
    client = Client(live.url + url_suffix, NS, None)
    seen: list[Any] = []

    async def _refused(data: Any = None) -> None:
        seen.append(data)

    client.sio.on("connect_error", _refused, namespace=NS)

    with pytest.raises(socketio.exceptions.ConnectionError, match="failed to connect: /orders"):
        await client.sio.connect(client.base_url, namespaces=[NS], auth={"token": token},
                                 transports=["websocket"], wait_timeout=10)
    await client.close()
    assert len(seen) == 1, seen
    assert seen[0]["data"]["code"] == "unauthorized", seen
    return dict(seen[0]["data"])


# -- the handshake matrix -------------------------------------------------------------

# name -> (auth JSON text or None for no payload, token factory for {"token": ...} or None)
HANDSHAKE_REFUSED: dict[str, Callable[[], str | None]] = {
    "no_auth_payload": lambda: None,
    "auth_null": lambda: "null",
    "auth_string": lambda: json.dumps(hs(claims())),
    "auth_list": lambda: json.dumps([hs(claims())]),
    "auth_number": lambda: "42",
    "auth_empty_object": lambda: "{}",
    "auth_other_key": lambda: json.dumps({"access_token": hs(claims())}),
    "token_empty": lambda: auth(""),
    "token_null": lambda: auth(None),
    "token_number": lambda: auth(12345),
    "token_list": lambda: auth([hs(claims())]),
    "token_garbage": lambda: auth("garbage"),
    "token_three_garbage_parts": lambda: auth("a.b.c"),
    "token_with_bearer_prefix": lambda: auth("Bearer " + hs(claims())),
    "token_too_long": lambda: auth(hs(claims(pad="x" * 9000))),
    "wrong_signature": lambda: auth(hs(claims(), OTHER_SECRET)),
    "tampered_payload": lambda: auth(tamper(hs(claims(role="customer")), role="admin")),
    "expired": lambda: auth(hs(claims(ttl_s=-120))),
    "expired_just_past_leeway": lambda: auth(hs(claims(ttl_s=-45))),
    "not_yet_valid": lambda: auth(hs(claims(nbf=int(time.time()) + 600))),
    "missing_exp": lambda: auth(hs(claims(exp=None))),
    "missing_sub": lambda: auth(hs(claims(sub=None))),
    "missing_role": lambda: auth(hs(claims(role=None))),
    "unknown_role": lambda: auth(hs(claims(role="superuser"))),
    "role_list": lambda: auth(hs(claims(role=["admin"]))),
    "role_object": lambda: auth(hs(claims(role={"admin": True}))),
    "role_number": lambda: auth(hs(claims(role=1))),
    "sub_not_string": lambda: auth(hs(claims(sub=123))),
    "sub_empty": lambda: auth(hs(claims(sub=""))),
    "sub_too_long": lambda: auth(hs(claims(sub="u" * 129))),
    "skills_not_list": lambda: auth(hs(claims(role="technician", skills="plumbing"))),
    "alg_none": lambda: auth(unsigned_jwt(claims())),
    "alg_none_capitalised": lambda: auth(unsigned_jwt(claims(), {"alg": "None", "typ": "JWT"})),
    "alg_none_with_hs256_signature": lambda: auth(
        unsigned_jwt(claims()) + hs(claims()).rsplit(".", 1)[1]),
    "hs512_when_server_hs256": lambda: auth(hs(claims(), alg="HS512")),
    "hs384_when_server_hs256": lambda: auth(hs(claims(), alg="HS384")),
}


def tamper(token: str, **changes: Any) -> str:
    """Re-encode the payload of a signed token, keeping the old signature."""
    head, body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    return f"{head}.{b64url(json.dumps(payload).encode())}.{sig}"


@pytest.mark.parametrize("case", list(HANDSHAKE_REFUSED))
async def test_handshake_refused_with_code_and_message(
        live: Live, case: str, caplog: pytest.LogCaptureFixture) -> None:
    assert_refused(await raw_handshake(live, HANDSHAKE_REFUSED[case]()))
    assert_no_server_errors(caplog)


async def test_handshake_rs256_token_refused_when_server_expects_hs256(
        live: Live, rsa_key: tuple[str, str]) -> None:
    token = jwt.encode(claims(), rsa_key[0], algorithm="RS256")
    data = assert_refused(await raw_handshake(live, auth(token)))
    assert data["code"] == "unauthorized"
    await sio_refusal(live, token)


async def test_handshake_accepts_valid_token_and_tolerates_skew_within_leeway(live: Live) -> None:
    kind, data = await raw_handshake(live, auth(hs(claims())))
    assert kind == "connect" and isinstance(data["sid"], str), data
    # Expired 10 s ago: inside the 30 s leeway, still admitted.
    kind, data = await raw_handshake(live, auth(hs(claims(ttl_s=-10))))
    assert kind == "connect", data
    # Optional claims are accepted.
    token = hs(claims(role="technician", name="Li Wei", skills=["aircon", "plumbing"]))
    kind, data = await raw_handshake(live, auth(token))
    assert kind == "connect", data


@pytest.mark.parametrize("param", ["token", "access_token"])
async def test_token_in_query_string_refused_even_with_auth(live: Live, param: str) -> None:
    good = hs(claims())
    assert_refused(await raw_handshake(live, auth(good), f"&{param}={good}"))
    assert_refused(await raw_handshake(live, None, f"&{param}={good}"))
    data = await sio_refusal(live, good, url_suffix=f"?{param}={good}")
    assert "query" in data["message"]


@pytest.mark.parametrize("case", ["token_garbage", "wrong_signature", "expired", "alg_none", "missing_sub"])
async def test_socketio_client_sees_connection_error_with_data(live: Live, case: str) -> None:
    token = json.loads(HANDSHAKE_REFUSED[case]() or "{}")["token"]
    data = await sio_refusal(live, token)
    assert set(data) == {"code", "message"}


async def test_server_configured_for_hs512_refuses_hs256(start_app: StartApp) -> None:
    live = await start_app(jwt_algorithm="HS512")
    assert_refused(await raw_handshake(live, auth(hs(claims(), alg="HS256"))))
    kind, _ = await raw_handshake(live, auth(hs(claims(), alg="HS512")))
    assert kind == "connect"
    status, body = await live.http.request("GET", "/api/orders/o-none", hs(claims(role="admin")))
    assert status == 401, body
    assert_error(body, "unauthorized")


# -- audience and issuer --------------------------------------------------------------

AUD_ISS_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "no_aud_no_iss": ({}, False),
    "no_aud": ({"iss": "biz"}, False),
    "no_iss": ({"aud": "apps"}, False),
    "wrong_aud": ({"aud": "other", "iss": "biz"}, False),
    "wrong_iss": ({"aud": "apps", "iss": "evil"}, False),
    "aud_list_without_ours": ({"aud": ["x", "y"], "iss": "biz"}, False),
    "right": ({"aud": "apps", "iss": "biz"}, True),
    "aud_list_with_ours": ({"aud": ["x", "apps"], "iss": "biz"}, True),
}


async def test_audience_and_issuer(start_app: StartApp) -> None:
    live = await start_app(jwt_audience="apps", jwt_issuer="biz")
    for name, (extra, admitted) in AUD_ISS_CASES.items():
        token = hs(claims(role="admin", **extra))
        result = await raw_handshake(live, auth(token))
        status, body = await live.http.request("GET", "/api/orders/o-none", token)
        if admitted:
            assert result[0] == "connect", (name, result)
            assert status == 404, (name, body)  # past authentication: the order does not exist
        else:
            assert_refused(result)
            assert status == 401, (name, body)
            assert_error(body, "unauthorized")
    # The harness's own minting carries aud and iss: a full client works.
    client = await live.client("admin")
    await client.error("subscribe", {"order_id": "o-none"}, "not_found")


# -- RS256 option ---------------------------------------------------------------------

async def test_rs256_option_and_key_confusion(start_app: StartApp, tmp_path: Path,
                                              rsa_key: tuple[str, str],
                                              other_rsa_key: tuple[str, str]) -> None:
    private, public = rsa_key
    live = await start_app(jwt_algorithm="RS256", jwt_public_key=public, jwt_private_key=private)
    good = jwt.encode(claims(role="admin"), private, algorithm="RS256")
    kind, data = await raw_handshake(live, auth(good))
    assert kind == "connect", data
    status, body = await live.http.request("GET", "/api/orders/o-none", good)
    assert status == 404, body

    refused = {
        # The classic key-confusion attack: HS256 keyed with the public key's PEM text.
        "hs256_keyed_with_public_pem": hmac_jwt(claims(role="admin"), public.encode()),
        "hs256_keyed_with_public_pem_stripped": hmac_jwt(claims(role="admin"), public.strip().encode()),
        "hs256_with_shared_secret": hs(claims(role="admin")),
        "rs256_other_key": jwt.encode(claims(role="admin"), other_rsa_key[0], algorithm="RS256"),
        "rs512_same_key": jwt.encode(claims(role="admin"), private, algorithm="RS512"),
        "alg_none": unsigned_jwt(claims(role="admin")),
        "expired": jwt.encode(claims(role="admin", ttl_s=-120), private, algorithm="RS256"),
    }
    for name, token in refused.items():
        assert_refused(await raw_handshake(live, auth(token)))
        status, body = await live.http.request("GET", "/api/orders/o-none", token)
        assert status == 401, (name, body)
        assert_error(body, "unauthorized")

    # The public key may also be given as a path to a PEM file.
    pem = tmp_path / "public.pem"
    pem.write_text(public)
    by_path = await start_app(jwt_algorithm="RS256", jwt_public_key=str(pem))
    kind, data = await raw_handshake(by_path, auth(good))
    assert kind == "connect", data
    assert_refused(await raw_handshake(by_path, auth(refused["hs256_keyed_with_public_pem"])))


# -- HTTP ----------------------------------------------------------------------------

HTTP_REFUSED: dict[str, Callable[[], dict[str, str]]] = {
    "no_authorization": lambda: {},
    "empty_authorization": lambda: {"Authorization": ""},
    "basic_scheme": lambda: {"Authorization": "Basic dXNlcjpwYXNz"},
    "token_scheme": lambda: {"Authorization": "Token " + hs(claims(role="admin"))},
    "bare_token": lambda: {"Authorization": hs(claims(role="admin"))},
    "bearer_without_token": lambda: {"Authorization": "Bearer"},
    "bearer_blank": lambda: {"Authorization": "Bearer  "},
    "bearer_garbage": lambda: {"Authorization": "Bearer garbage"},
    "bearer_wrong_signature": lambda: {"Authorization": "Bearer " + hs(claims(role="admin"), OTHER_SECRET)},
    "bearer_expired": lambda: {"Authorization": "Bearer " + hs(claims(role="admin", ttl_s=-120))},
    "bearer_alg_none": lambda: {"Authorization": "Bearer " + unsigned_jwt(claims(role="admin"))},
    "bearer_unknown_role": lambda: {"Authorization": "Bearer " + hs(claims(role="root"))},
    "bearer_missing_exp": lambda: {"Authorization": "Bearer " + hs(claims(role="admin", exp=None))},
    "bearer_role_list": lambda: {"Authorization": "Bearer " + hs(claims(role=["admin"]))},
}


@pytest.mark.parametrize("case", list(HTTP_REFUSED))
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/orders/o-any", None),
    ("POST", "/api/orders", {"not": "even valid"}),
    ("POST", "/api/orders/o-any/assign", {"technician_id": "t-1"}),
    ("POST", "/api/orders/o-any/events", {"state": "cancelled"}),
])
async def test_http_refused(live: Live, case: str, method: str, path: str, body: Any) -> None:
    status, reply = await live.http.request(method, path, json=body, headers=HTTP_REFUSED[case]())
    assert status == 401, reply
    assert_error(reply, "unauthorized")


@pytest.mark.parametrize("param", ["token", "access_token"])
async def test_http_token_in_query_string_refused(live: Live, param: str) -> None:
    good = hs(claims(role="admin"))
    status, reply = await live.http.request("GET", f"/api/orders/o-any?{param}={good}", good)
    assert status == 401, reply
    assert_error(reply, "unauthorized")
    status, reply = await live.http.request("GET", f"/api/orders/o-any?{param}={good}")
    assert status == 401, reply
    assert_error(reply, "unauthorized")


async def test_http_bearer_accepted(live: Live) -> None:
    good = hs(claims(role="admin"))
    for header in (f"Bearer {good}", f"bearer {good}"):
        status, reply = await live.http.request("GET", "/api/orders/o-none",
                                                headers={"Authorization": header})
        assert status == 404, reply  # authenticated; the order does not exist
        assert_error(reply, "not_found")


# -- identity comes from the token --------------------------------------------------------

async def test_actor_is_the_token_subject(live: Live) -> None:
    customer_id = uid("c-")
    order = await live.create_order(customer_id)
    oid = order["order_id"]
    customer = await live.client("customer", customer_id)
    stranger = await live.client("customer")

    # Another customer cannot act on or see it, whatever the payload says (to them it
    # does not exist).
    await stranger.error("subscribe", {"order_id": oid}, "not_found")
    await stranger.error("cancel", {"order_id": oid}, "not_found")

    # Identity fields in payloads are refused, never trusted.
    for extra in ({"actor": {"id": customer_id, "role": "admin"}}, {"customer_id": customer_id},
                  {"role": "admin"}, {"sub": customer_id}, {"user_id": customer_id}):
        for event in ("cancel", "subscribe"):
            err = await stranger.error(event, {"order_id": oid, **extra}, "invalid")
            assert_error({"ok": False, "error": err}, "invalid", set(extra))
    err = await customer.error("rate", {"order_id": oid, "stars": 5, "customer_id": customer_id}, "invalid")
    assert {d["field"] for d in err["details"]} == {"customer_id"}

    data = await customer.ok("cancel", {"order_id": oid, "reason": "changed my mind"})
    assert data["event"]["actor"] == {"id": customer_id, "role": "customer"}
    assert data["event"]["state"] == "cancelled"
    assert data["event"]["data"] == {"reason": "changed my mind"}

    service_sub = uid("svc-")
    status, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service", service_sub))
    assert status == 200, body
    assert body["data"]["events"][-1]["actor"] == {"id": customer_id, "role": "customer"}
    assert body["data"]["events"][0]["actor"]["role"] == "service"


async def test_http_actor_is_the_token_subject(live: Live) -> None:
    order = await live.create_order()
    oid = order["order_id"]
    service_sub = uid("svc-")
    token = live.token("service", service_sub)
    status, body = await live.http.request("POST", f"/api/orders/{oid}/events", token,
                                           json={"state": "cancelled", "actor": {"id": "x", "role": "admin"}})
    assert status == 400, body
    assert_error(body, "invalid", {"actor"})
    status, body = await live.http.request("POST", f"/api/orders/{oid}/assign", token,
                                           json={"technician_id": "t-1"})
    assert status == 200, body
    assert body["data"]["event"]["actor"] == {"id": service_sub, "role": "service"}


async def test_technician_identity(live: Live) -> None:
    tech_id = uid("t-")
    order = await live.create_order()
    oid = order["order_id"]
    await live.assign(oid, tech_id)
    impostor = await live.client("technician")
    await impostor.error("progress", {"order_id": oid, "state": "en_route"}, "not_found")
    await impostor.error("progress", {"order_id": oid, "state": "en_route", "technician_id": tech_id},
                         "invalid")
    tech = await live.client("technician", tech_id)
    data = await tech.ok("progress", {"order_id": oid, "state": "en_route"})
    assert data["event"]["actor"] == {"id": tech_id, "role": "technician"}
