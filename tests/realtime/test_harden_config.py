"""Configuration and disclosure (issue 14: item 12, the id rule of item 3, the
per-IP and per-user limits of item 11), each through a real server: private
data files, a short secret refused at start, typed claims, `sub` under the
payload id rule, no version in `Server`, who may read /metrics, HTTP rate
limits per address and per token, the handshake rate per address, the
socket cap per user, and the new settings' bounds."""

from __future__ import annotations

import asyncio
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from pydantic import ValidationError

from realtime.auth import mint_token
from realtime.settings import Settings
from tests.conftest import JWT_SECRET, Live, StartApp
from tests.harness import free_port, uid, until
from tests.server_procs import clean_env, cli, log_text, server_process, start, stop
from tests.wire import RawSocketIO, assert_error, claims

XFF = "X-Forwarded-For"
HANDSHAKE_TIMEOUT = 5.0


def hs(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


async def get(live: Live, path: str, token: str | None = None, xff: str | None = None,
              port: int | None = None) -> tuple[int, Any, Any]:
    """(status, headers, body): the body as JSON when it is JSON, else text."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if xff is not None:
        headers[XFF] = xff
    url = f"http://127.0.0.1:{port or live.port}{path}"
    async with live.http.session.get(url, headers=headers) as resp:
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, resp.headers, body


async def metric(live: Live, sample: str) -> float:
    """One sample of /metrics, e.g. 'realtime_rate_limited_total{scope="ip"}' (0 if absent)."""
    status, _, text = await get(live, "/metrics")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def handshake(live: Live, token: str, namespace: str = "/orders",
                    headers: dict[str, str] | None = None) -> tuple[str, Any, RawSocketIO]:
    """A new Engine.IO session joining `namespace`: ("connect" | "connect_error", data, socket)."""
    raw = await RawSocketIO.open(live.http.session, live.url, headers=headers)
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        kind, data = await raw.connect_ns(namespace, json.dumps({"token": token}))
    return kind, data, raw


async def refused_once(live: Live, token: str) -> dict[str, Any]:
    """Handshake with `token`: it must be refused `unauthorized`; returns {code, message}."""
    kind, data, raw = await handshake(live, token)
    await raw.close()
    assert kind == "connect_error", (kind, data)
    assert data["data"]["code"] == "unauthorized", data
    return dict(data["data"])


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, list[str]]]:
    """Send bytes, read the status line and headers as they are on the wire."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers


# -- files: the data dir, the store's files and its log are private ------------------------

def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(data: Path) -> None:
    found = modes(data)
    assert found["."] == 0o700, oct(found["."])
    assert {"jwt_secret", "secantusd.log", "mongo"} <= set(found), sorted(found)
    assert len([p for p in found if p.startswith("mongo/")]) > 3, sorted(found)  # the store wrote files
    loose = {p: oct(m) for p, m in found.items() if m & 0o077}
    assert not loose, f"readable by others: {loose}"


async def test_data_dir_store_files_log_and_secret_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"REALTIME_DATA_DIR": str(data)}  # no MONGO_URL: the embedded store
    first = server_process(env)
    try:
        await start(first)
        assert_private(data)  # created private
    finally:
        await stop(first)
    # What an older version left: world-readable everything. Tightened at start.
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert modes(data)["jwt_secret"] == 0o644
    second = server_process(env)
    try:
        await start(second)
        assert_private(data)
    finally:
        await stop(second)
    assert "Traceback" not in log_text(second), log_text(second)[-3000:]


# -- the secret file --------------------------------------------------------------------

@pytest.mark.parametrize("content", ["abc", "abc\n", "", "   \n\t  \n", "x" * 15 + "\n"],
                         ids=["3_chars", "3_chars_newline", "empty", "whitespace", "15_chars"])
def test_a_short_or_blank_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "jwt_secret").write_text(content)
    settings = Settings(data_dir=tmp_path, jwt_secret=None)
    with pytest.raises(ValueError, match=r"jwt_secret.*16") as refused:
        settings.ensure_secret()
    assert str(tmp_path / "jwt_secret") in str(refused.value)
    assert settings.jwt_secret is None


def test_a_good_secret_file_is_read_and_made_private(tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text("s" * 16 + "\n")
    secret_file.chmod(0o644)
    settings = Settings(data_dir=tmp_path, jwt_secret=None)
    settings.ensure_secret()
    assert settings.jwt_secret == "s" * 16
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


@pytest.mark.parametrize("args", [["serve"], ["token", "--role", "service", "--sub", "backend"]],
                         ids=["serve", "token"])
async def test_the_cli_refuses_a_3_char_secret_file_with_a_clear_message(
        tmp_path: Path, args: list[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jwt_secret").write_text("abc\n")
    port = free_port()
    env = clean_env(REALTIME_DATA_DIR=str(data), REALTIME_PORT=str(port), REALTIME_HOST="127.0.0.1")
    code, out, text = await cli(*args, env=env, cwd=tmp_path)  # a `serve` that ran on is killed
    assert code == 2, (code, out[-500:], text[-3000:])
    assert "configuration error" in text and str(data / "jwt_secret") in text and "16" in text, text
    assert "Traceback" not in text, text
    assert out == ""  # no token minted


# -- claims: types, and `sub` under the id rule -----------------------------------------------

BAD_CLAIMS: dict[str, dict[str, Any]] = {
    "exp_numeric_string": claims(exp="9999999999"),
    "nbf_numeric_string": claims(nbf="0"),
    "iat_numeric_string": claims(iat="1"),
    "nbf_bool": claims(nbf=True),
    "iat_bool": claims(iat=False),
    "skills_not_ids": claims(role="technician", skills=["air con"]),
    "skills_nul": claims(role="technician", skills=["aircon\x00"]),
    "skills_too_many": claims(role="technician", skills=[f"s{i}" for i in range(65)]),
}

BAD_SUBS: dict[str, str] = {
    "nul": "user\x00admin",
    "space": "user 1",
    "65_chars": "u" * 65,
    "trailing_newline": "user-1\n",
    "tab": "user\t1",
    "slash": "a/b",
    "percent": "a%20b",
    "non_ascii": "用户一",
    "room_like": "user:1 x",
}


@pytest.mark.parametrize("case", list(BAD_CLAIMS))
async def test_mistyped_claims_are_refused_on_handshake_and_http(live: Live, case: str) -> None:
    token = hs(BAD_CLAIMS[case])
    claim = case.split("_")[0]
    data = await refused_once(live, token)
    assert claim in data["message"], data
    status, _, body = await get(live, "/api/orders/o-1", token)
    assert status == 401, body
    assert claim in assert_error(body, "unauthorized")["message"]


@pytest.mark.parametrize("case", list(BAD_SUBS))
async def test_sub_outside_the_id_rule_is_refused_on_handshake_and_http(live: Live, case: str) -> None:
    token = hs(claims(sub=BAD_SUBS[case]))
    data = await refused_once(live, token)
    assert "sub" in data["message"], data
    status, _, body = await get(live, "/api/orders/o-1", token)
    assert status == 401, body
    assert "sub" in assert_error(body, "unauthorized")["message"]


async def test_claims_at_the_edge_of_the_rules_are_accepted(live: Live) -> None:
    sub = ("Az09_.:@-" * 8)[:64]
    for payload in (claims(sub=sub), claims(exp=9_999_999_999.5, iat=1.5, nbf=0),
                    claims(role="technician", skills=["aircon", "a.b:c@d-e_f"], name="n" * 128)):
        kind, data, raw = await handshake(live, hs(payload))
        await raw.close()
        assert kind == "connect", (payload, data)
        status, _, body = await get(live, "/api/orders/o-missing", hs(payload))
        assert status == 404, (payload, body)  # signed in; the order does not exist


def test_minting_a_token_for_a_sub_outside_the_id_rule_fails() -> None:
    settings = Settings(jwt_secret=JWT_SECRET)
    with pytest.raises(ValueError, match="sub"):
        mint_token(settings, sub="user 1", role="customer")


# -- the Server header ----------------------------------------------------------------------

async def test_server_header_names_no_version_on_any_response(live: Live) -> None:
    seen: dict[str, tuple[int, list[str]]] = {}
    for path, token in [("/healthz", None), ("/readyz", None), ("/metrics", None), ("/", None),
                        ("/no-such-page", None), ("/console", None), ("/static/no-such.js", None),
                        ("/api/orders/o-1", None), ("/api/orders/o-1", live.token("customer")),
                        ("/api/no-such-route", live.token("service")),
                        ("/socket.io/?EIO=4&transport=polling", None),
                        ("/socket.io/?EIO=3&transport=polling", None),
                        ("/socket.io/?EIO=4&transport=polling&sid=nope", None)]:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        async with live.http.session.get(live.url + path, headers=auth) as resp:
            await resp.read()
            seen[path + (" (signed in)" if token else "")] = (resp.status, resp.headers.getall("Server", []))
    assert {status for status, _ in seen.values()} >= {200, 400, 401, 404}, seen
    wrong = {path: got for path, got in seen.items() if got[1] != ["realtime"]}
    assert not wrong, wrong
    upgrade = (b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
               b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status, headers = await raw_http(live.port, upgrade)
    assert (status, headers.get("server")) == (101, ["realtime"]), headers
    # A request aiohttp cannot parse is answered before any route or middleware.
    status, headers = await raw_http(live.port, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert (status, headers.get("server")) == (400, ["realtime"]), headers


# -- /metrics -----------------------------------------------------------------------------

async def test_metrics_on_the_main_port_answer_only_allowed_addresses(start_app: StartApp) -> None:
    default = await start_app()
    status, _, text = await get(default, "/metrics")
    assert status == 200 and "realtime_connections" in text  # loopback: the host itself

    off = await start_app(metrics_allow="")
    status, _, body = await get(off, "/metrics")
    assert status == 403, body
    assert "realtime_" not in json.dumps(body)
    assert_error(body, "forbidden")

    # Prometheus in 10.0.0.0/8 behind a proxy on this host that we trust.
    proxied = await start_app(metrics_allow="10.0.0.0/8", trusted_proxies="127.0.0.1")
    assert (await get(proxied, "/metrics", xff="10.1.2.3"))[0] == 200
    assert (await get(proxied, "/metrics", xff="203.0.113.9"))[0] == 403
    assert (await get(proxied, "/metrics", xff="10.1.2.3, 203.0.113.9"))[0] == 403  # rightmost counts
    assert (await get(proxied, "/metrics"))[0] == 403  # the proxy itself is not in 10/8

    # X-Forwarded-For from a peer that is not a trusted proxy is ignored.
    direct = await start_app(metrics_allow="10.0.0.0/8")
    assert (await get(direct, "/metrics", xff="10.1.2.3"))[0] == 403


async def test_metrics_port_serves_metrics_on_its_own_listener(start_app: StartApp) -> None:
    port = free_port()
    live = await start_app(metrics_port=port, metrics_allow="")
    status, headers, text = await get(live, "/metrics", port=port)
    assert status == 200 and "realtime_connections" in text, text
    assert headers.getall("Server") == ["realtime"]
    assert (await get(live, "/api/orders/o-1", live.token("service"), port=port))[0] == 404
    assert (await get(live, "/healthz", port=port))[0] == 404  # metrics only
    assert (await get(live, "/metrics"))[0] == 403  # and not on the main port


# -- HTTP rate limits -----------------------------------------------------------------------

def assert_limited(status: int, headers: Any, body: Any) -> int:
    assert status == 429, body
    err = assert_error(body, "rate_limited")
    retry_ms = err["retry_after_ms"]
    assert isinstance(retry_ms, int) and retry_ms > 0, err
    assert headers["Retry-After"] == str(math.ceil(retry_ms / 1000)), dict(headers)
    return int(retry_ms)


async def test_http_rate_limit_per_client_address(start_app: StartApp) -> None:
    # A refill far slower than the test: exactly the burst passes.
    live = await start_app(trusted_proxies="127.0.0.1", http_ip_rate=0.001, http_ip_burst=3)
    ip = "198.51.100.7"
    for _ in range(3):
        assert (await get(live, "/healthz", xff=ip))[0] == 200
    assert_limited(*await get(live, "/healthz", xff=ip))
    # A bad token from that address is refused by the limit before anything else.
    assert_limited(*await get(live, "/api/orders/o-1", "garbage", xff=ip))
    assert_limited(*await get(live, "/static/no-such.js", xff=ip))
    # Writing another address in front does not escape: the trusted proxy appended the real one.
    assert_limited(*await get(live, "/healthz", xff=f"192.0.2.1, {ip}"))
    # Another client of the proxy is not affected.
    assert (await get(live, "/healthz", xff="198.51.100.8"))[0] == 200
    # A signed-in caller is limited per token, not per address (carrier-grade NAT).
    assert (await get(live, "/api/orders/o-missing", live.token("customer"), xff=ip))[0] == 404
    # IPv6: one /64 is one client.
    for host in ("1", "2", "3"):
        assert (await get(live, "/healthz", xff=f"2001:db8:1:2::{host}"))[0] == 200
    assert_limited(*await get(live, "/healthz", xff="2001:db8:1:2:ffff::9"))
    assert (await get(live, "/healthz", xff="2001:db8:1:3::1"))[0] == 200
    assert await metric(live, 'realtime_rate_limited_total{scope="ip"}') == 5


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(start_app: StartApp) -> None:
    live = await start_app(http_ip_rate=0.001, http_ip_burst=2)
    assert (await get(live, "/healthz", xff="198.51.100.1"))[0] == 200
    assert (await get(live, "/healthz", xff="198.51.100.2"))[0] == 200
    # Both were 127.0.0.1, whatever they claimed.
    assert_limited(*await get(live, "/healthz", xff="198.51.100.3"))


async def test_http_rate_limit_per_token(start_app: StartApp) -> None:
    live = await start_app(http_user_rate=0.001, http_user_burst=3,
                           http_service_rate=0.001, http_service_burst=6)
    sub = uid("c-")
    for _ in range(3):
        assert (await get(live, "/api/orders/o-missing", live.token("customer", sub)))[0] == 404
    # The principal (sub and role) is limited, however many tokens it holds.
    assert_limited(*await get(live, "/api/orders/o-missing", live.token("customer", sub)))
    assert (await get(live, "/api/orders/o-missing", live.token("agent", sub)))[0] == 404
    assert (await get(live, "/api/orders/o-missing", live.token("customer")))[0] == 404
    # The business backend has its own, larger bucket.
    backend = live.token("service", "backend")
    for _ in range(6):
        assert (await get(live, "/api/orders/o-missing", backend))[0] == 404
    assert_limited(*await get(live, "/api/orders/o-missing", backend))
    assert await metric(live, 'realtime_rate_limited_total{scope="principal"}') == 2


# -- the handshake rate per address -------------------------------------------------------------

async def test_new_engineio_sessions_are_limited_per_client_address(start_app: StartApp) -> None:
    live = await start_app(trusted_proxies="127.0.0.1", handshake_rate=0.001, handshake_burst=2)
    here = {XFF: "198.51.100.9"}
    sids = []
    for _ in range(2):
        status, _, text = await get(live, "/socket.io/?EIO=4&transport=polling", xff=here[XFF])
        assert status == 200, text
        sids.append(json.loads(text[1:])["sid"])
    assert_limited(*await get(live, "/socket.io/?EIO=4&transport=polling", xff=here[XFF]))
    # A websocket without a session is refused before the upgrade.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await RawSocketIO.open(live.http.session, live.url, headers=here)
    assert refused.value.status == 429
    # Requests of an open session are not new sessions.
    connect = "40/orders," + json.dumps({"token": live.token("customer")})
    async with live.http.session.post(f"{live.url}/socket.io/?EIO=4&transport=polling&sid={sids[0]}",
                                      data=connect, headers=here) as resp:
        assert resp.status == 200, await resp.text()
    # Another address is not affected.
    kind, data, raw = await handshake(live, live.token("customer"), headers={XFF: "198.51.100.10"})
    await raw.close()
    assert kind == "connect", data
    assert await metric(live, 'realtime_rate_limited_total{scope="handshake"}') == 2


async def test_a_rate_of_zero_turns_a_limit_off(start_app: StartApp) -> None:
    """Benchmarks open thousands of sockets from one address (docs/operations.md)."""
    live = await start_app(http_ip_rate=0, http_ip_burst=1, handshake_rate=0, handshake_burst=1)
    for _ in range(5):
        assert (await get(live, "/healthz"))[0] == 200
        assert (await get(live, "/socket.io/?EIO=4&transport=polling"))[0] == 200


# -- sockets per user -----------------------------------------------------------------------

async def test_sockets_per_user_are_capped_per_namespace(start_app: StartApp) -> None:
    live = await start_app(max_sockets_per_user=2)
    sub = uid("c-")
    mine = live.token("customer", sub)
    opened: list[RawSocketIO] = []
    try:
        for _ in range(2):
            kind, data, raw = await handshake(live, mine)
            opened.append(raw)
            assert kind == "connect", data
        kind, data, raw = await handshake(live, mine)
        opened.append(raw)
        assert kind == "connect_error", data
        assert data["data"]["code"] == "too_many_connections", data
        assert "2" in data["data"]["message"], data
        # Each namespace counts on its own; other users are not affected.
        for token, namespace in [(mine, "/chat"), (live.token("customer"), "/orders")]:
            kind, data, raw = await handshake(live, token, namespace)
            opened.append(raw)
            assert kind == "connect", data
        # The backend's workers share one service identity: not capped.
        backend = live.token("service", "backend")
        for _ in range(3):
            kind, data, raw = await handshake(live, backend)
            opened.append(raw)
            assert kind == "connect", data
        # A socket that goes frees its place.
        await opened[0].close()

        async def gone() -> bool:
            return await metric(live, 'realtime_connections{namespace="/orders"}') == 5

        await until(gone, timeout=10, what="the closed socket's disconnect")
        kind, data, raw = await handshake(live, mine)
        opened.append(raw)
        assert kind == "connect", data
        refused = 'realtime_handshakes_refused_total{code="too_many_connections",namespace="/orders"}'
        assert await metric(live, refused) == 1
    finally:
        for raw in opened:
            await raw.close()


# -- the new settings ---------------------------------------------------------------------

BAD_SETTINGS: list[tuple[str, Any]] = [
    ("metrics_port", -1), ("metrics_port", 65536), ("metrics_port", "web"),
    ("metrics_allow", "not-an-address"), ("metrics_allow", "10.0.0.0/33"),
    ("trusted_proxies", "proxy.internal"), ("trusted_proxies", "10.0.0.0/40"),
    ("http_ip_rate", -1), ("http_ip_rate", float("nan")), ("http_ip_burst", 0),
    ("http_user_rate", -0.5), ("http_user_burst", 0.5),
    ("http_service_rate", float("inf")), ("http_service_burst", 0),
    ("handshake_rate", -1), ("handshake_burst", 0),
    ("max_sockets_per_user", 0), ("max_sockets_per_user", 100_001),
]


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS, ids=[f"{f}={v!r}" for f, v in BAD_SETTINGS])
def test_new_settings_refuse_out_of_range_values(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        Settings(jwt_secret=JWT_SECRET, **{field: value})


def test_new_settings_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="metrics"):
        Settings(jwt_secret=JWT_SECRET, port=9100, metrics_port=9100, metrics_host="0.0.0.0")
    monkeypatch.setenv("REALTIME_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16,::1")
    monkeypatch.setenv("REALTIME_METRICS_ALLOW", "")
    s = Settings(jwt_secret=JWT_SECRET)
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.1/32", "192.168.0.0/16", "::1/128"]
    assert s.metrics_allow == []
    monkeypatch.delenv("REALTIME_TRUSTED_PROXIES")
    monkeypatch.delenv("REALTIME_METRICS_ALLOW")
    d = Settings(jwt_secret=JWT_SECRET)
    assert (d.metrics_port, d.metrics_host, d.trusted_proxies) == (0, "127.0.0.1", [])
    assert [str(n) for n in d.metrics_allow] == ["127.0.0.0/8", "::1/128"]
    assert (d.http_ip_rate, d.http_ip_burst, d.http_user_rate, d.http_user_burst) == (50, 100, 100, 200)
    assert d.http_service_rate > d.http_user_rate
    assert (d.handshake_rate, d.handshake_burst, d.max_sockets_per_user) == (20, 50, 20)
