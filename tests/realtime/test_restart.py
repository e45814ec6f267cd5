"""Restarts of `python -m realtime` with the embedded store (no MONGO_URL): orders
and their events survive on disk, the store child goes away with the server, and
a generated JWT secret is kept in the data dir."""

from __future__ import annotations

import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.harness import Client, Http, ServerProcess, uid
from tests.server_procs import (
    alive,
    clean_env,
    cli,
    embedded_store_pid,
    log_text,
    processes_using,
    server_process,
    start,
    stop,
    wait_gone,
)

SECRET = "restart-test-secret-0123456789ab"
assert len(SECRET) == 32


def token(secret: str, role: str, sub: str | None = None) -> str:
    now = int(time.time())
    claims = {"sub": sub or uid(f"{role}-"), "role": role, "iat": now, "exp": now + 600}
    return jwt.encode(claims, secret, algorithm="HS256")


def order_body(order_id: str, customer_id: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "service": {"code": "aircon_repair", "name": "空调维修"},
        "address": {"lat": 31.2304, "lng": 121.4737, "text": "上海市黄浦区人民广场 1 号"},
        "window": {"start_ts": 1_800_000_000_000, "end_ts": 1_800_000_360_000},
    }


class Servers:
    """Servers and clients of one test, all stopped at its end whatever happens."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.servers: list[ServerProcess] = []
        self.clients: list[Client] = []

    async def start(self, env: dict[str, str]) -> ServerProcess:
        server = server_process(env)
        self.servers.append(server)
        return await start(server)

    def http(self, server: ServerProcess) -> Http:
        return Http(server.url, self.session)

    async def client(self, server: ServerProcess, tok: str) -> Client:
        client = Client(server.url, "/orders", tok)
        self.clients.append(client)
        return await client.connect()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    session = aiohttp.ClientSession()
    s = Servers(session)
    try:
        yield s
    finally:
        for client in s.clients:
            await client.close()
        await session.close()
        for server in s.servers:
            await stop(server)


async def stop_cleanly(server: ServerProcess, data_dir: Path) -> None:
    """SIGTERM: the server exits by itself (not killed after the harness's grace),
    and its embedded store child is gone with it: nothing holds the data dir."""
    store_pid = embedded_store_pid(server)
    assert alive(store_pid)
    assert processes_using(data_dir), "the check below would see nothing even now"
    code = await stop(server)
    log = log_text(server)
    assert code == 0, f"server exit code {code} after SIGTERM; log:\n{log[-3000:]}"
    assert "embedded store stopped" in log, log[-3000:]
    assert not alive(store_pid), f"the embedded store (pid {store_pid}) outlived the server"
    assert processes_using(data_dir) == []


async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> str:
    code, out, err = await cli(*args, env=env, cwd=cwd)
    assert code == 0, f"python -m realtime {' '.join(args)}: {err}"
    return out.strip()


async def test_restart_keeps_orders_and_events(servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"REALTIME_DATA_DIR": str(data_dir), "REALTIME_JWT_SECRET": SECRET}
    service = token(SECRET, "service", "backend")
    order_id, customer_id, technician_id = uid("o-"), uid("c-"), uid("tech-")

    first = await servers.start(env)
    assert "store ready (embedded)" in log_text(first)
    http = servers.http(first)
    status, body = await http.request("POST", "/api/orders", service, json=order_body(order_id, customer_id))
    assert status == 201, body
    status, body = await http.request("POST", f"/api/orders/{order_id}/assign", service,
                                      json={"technician_id": technician_id})
    assert status == 200, body
    status, body = await http.request("POST", f"/api/orders/{order_id}/events", service,
                                      json={"state": "en_route"})
    assert status == 200, body
    status, before = await http.request("GET", f"/api/orders/{order_id}", service)
    assert status == 200, before
    assert before["data"]["order"]["state"] == "en_route"
    assert before["data"]["order"]["technician_id"] == technician_id
    assert [(e["seq"], e["state"]) for e in before["data"]["events"]] == [
        (1, "created"), (2, "assigned"), (3, "en_route")]
    # A configured secret is used as is: nothing generated in the data dir.
    assert not (data_dir / "jwt_secret").exists()

    await stop_cleanly(first, data_dir)

    second = await servers.start(env)
    assert embedded_store_pid(second) != embedded_store_pid(first)
    http = servers.http(second)
    status, after = await http.request("GET", f"/api/orders/{order_id}", service)
    assert status == 200, after
    assert after["data"]["order"] == before["data"]["order"]
    assert after["data"]["events"] == before["data"]["events"]

    # A reconnecting client replays what it missed, then the sequence goes on.
    customer = await servers.client(second, token(SECRET, "customer", customer_id))
    replay = await customer.ok("subscribe", {"order_id": order_id, "since_seq": 1})
    assert replay["order"] == before["data"]["order"]
    assert replay["events"] == before["data"]["events"][1:]
    status, body = await http.request("POST", f"/api/orders/{order_id}/events", service,
                                      json={"state": "arrived"})
    assert status == 200, body
    event = await customer.next("order_event")
    assert (event["order_id"], event["seq"], event["state"]) == (order_id, 4, "arrived")
    assert customer.drain("order_event") == []
    status, final = await http.request("GET", f"/api/orders/{order_id}", service)
    assert status == 200, final
    assert final["data"]["order"]["seq"] == 4
    assert [e["seq"] for e in final["data"]["events"]] == [1, 2, 3, 4]
    assert final["data"]["events"][:3] == before["data"]["events"]

    await customer.close()
    await stop_cleanly(second, data_dir)


async def test_generated_jwt_secret_is_kept_and_cli_tokens_are_accepted(
        servers: Servers, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret_file = data_dir / "jwt_secret"
    env = {"REALTIME_DATA_DIR": str(data_dir)}  # and no REALTIME_JWT_SECRET
    cli_env = clean_env(**env)
    cli_cwd = tmp_path / "elsewhere"
    cli_cwd.mkdir()

    first = await servers.start(env)
    assert secret_file.is_file(), f"no {secret_file}; log:\n{log_text(first)[-3000:]}"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    generated = [line for line in log_text(first).splitlines() if "REALTIME_JWT_SECRET" in line]
    assert len(generated) == 1, log_text(first)[-3000:]
    assert "generated one and stored it in " + str(secret_file) in generated[0], generated

    service = await run_cli("token", "--role", "service", "--sub", "backend", env=cli_env, cwd=cli_cwd)
    assert service.count(".") == 2, service
    assert secret_file.read_text().strip() == secret  # read, not regenerated

    http = servers.http(first)
    order_id, customer_id = uid("o-"), uid("c-")
    status, body = await http.request("POST", "/api/orders", service, json=order_body(order_id, customer_id))
    assert status == 201, body
    assert body["data"]["order"]["state"] == "created"
    # The server really checks the signature: another secret's token is refused.
    status, body = await http.request("GET", f"/api/orders/{order_id}", token("x" * 32, "service"))
    assert status == 401 and body["error"]["code"] == "unauthorized", body

    customer_tok = await run_cli("token", "--role", "customer", "--sub", customer_id,
                                 env=cli_env, cwd=cli_cwd)
    customer = await servers.client(first, customer_tok)
    reply = await customer.ok("subscribe", {"order_id": order_id})
    assert reply["order"]["order_id"] == order_id
    await customer.close()

    # Restart: the same secret is read back (not regenerated), old tokens still work.
    await stop_cleanly(first, data_dir)
    second = await servers.start(env)
    assert secret_file.read_text().strip() == secret
    assert "REALTIME_JWT_SECRET" not in log_text(second)
    status, body = await servers.http(second).request("GET", f"/api/orders/{order_id}", service)
    assert status == 200, body
    assert [e["seq"] for e in body["data"]["events"]] == [1]
    await stop_cleanly(second, data_dir)


async def test_killed_server_takes_its_store_along_and_restart_recovers(
        servers: Servers, tmp_path: Path) -> None:
    """SIGKILL gives the server no chance to stop its store: the child must still
    go (it is told to die with its parent), leaving the data dir to the next start."""
    data_dir = tmp_path / "data"
    env = {"REALTIME_DATA_DIR": str(data_dir), "REALTIME_JWT_SECRET": SECRET}
    service = token(SECRET, "service", "backend")
    order_id = uid("o-")

    first = await servers.start(env)
    store_pid = embedded_store_pid(first)
    http = servers.http(first)
    status, body = await http.request("POST", "/api/orders", service, json=order_body(order_id, uid("c-")))
    assert status == 201, body
    status, body = await http.request("POST", f"/api/orders/{order_id}/assign", service,
                                      json={"technician_id": uid("tech-")})
    assert status == 200, body

    assert await stop(first, signal.SIGKILL) == -signal.SIGKILL
    await wait_gone(store_pid, 45.0)  # it stops gracefully (a checkpoint); slow on a busy CI
    assert not alive(store_pid), f"the embedded store (pid {store_pid}) outlived a killed server"
    assert processes_using(data_dir) == []

    second = await servers.start(env)
    status, after = await servers.http(second).request("GET", f"/api/orders/{order_id}", service)
    assert status == 200, after
    assert after["data"]["order"]["state"] == "assigned"
    assert [(e["seq"], e["state"]) for e in after["data"]["events"]] == [(1, "created"), (2, "assigned")]
    await stop_cleanly(second, data_dir)
