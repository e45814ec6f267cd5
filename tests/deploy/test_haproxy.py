"""HAProxy (deploy/haproxy.cfg, the real binary) in front of three real nodes
sharing one Redis and one MongoDB: long-polling works through it and breaks
without its sticky cookie, websocket clients survive a node's graceful stop
by reconnecting through it and replaying with `since_seq`, and a node whose
/readyz fails is sent no new connections.

The nodes start once for the module (a start takes seconds); the tests that
stop one each stop their own: n2 (the default drain) and n3 (a long drain,
ended by a second SIGTERM). Which node a client is on: the balancer's cookie
in its jar, checked against the nodes' own /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import socketio

from realtime.settings import Settings
from tests.cluster_harness import Cluster, token
from tests.deploy.haproxy import Haproxy
from tests.harness import MongoServer, RedisServer, ServerProcess, a_window, uid, until
from tests.server_procs import log_text, server_process, start

NS = "/orders"
DRAIN_S = float(Settings.model_fields["drain_s"].default)  # n2 drains as shipped
LONG_DRAIN_S = 60.0  # n3: not ready until a second SIGTERM
RECONNECT_S = 1.5  # the clients' reconnection delay
NODES = {"n1": 0.0, "n2": DRAIN_S, "n3": LONG_DRAIN_S}  # HAProxy's server name -> drain


class LbClient:
    """A Socket.IO client through the balancer, as an app's would be: a cookie
    jar of its own (a browser tab's; aiohttp's default jar ignores cookies
    from an IP address such as 127.0.0.1, and the sticky cookie is one);
    `reconnect`: after any disconnect it did not ask for, it connects again
    (socket.io's JS client does, the server's goodbye included; python-
    socketio's own reconnection takes that goodbye as final); and following
    one order as docs/protocol.md says: it keeps the highest seq seen, drops
    repeats and, connected again, subscribes with `since_seq`."""

    def __init__(self, url: str, transports: list[str], reconnect: bool = False) -> None:
        self.url = url
        self.transports = transports
        self.reconnect = reconnect
        self.closing = False
        self.token = token("agent")
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sio = socketio.AsyncClient(http_session=self.http, reconnection=False)
        self.order_id: str | None = None
        self.last = 0
        self.seqs: list[int] = []  # each event once, in order
        self.gaps: list[tuple[int, int]] = []
        self.replays: list[list[int]] = []  # the events of each re-subscribe's reply
        self.connects = 0
        self.disconnected = asyncio.Event()
        self.resubscribed = asyncio.Event()
        self.resubscribed_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.sio.on("connect", self._on_connect, namespace=NS)
        self.sio.on("disconnect", self._on_disconnect, namespace=NS)
        self.sio.on("order_event", self._on_event, namespace=NS)

    async def connect(self, wait_timeout: float = 10) -> LbClient:
        await self.sio.connect(self.url, namespaces=[NS], auth={"token": self.token},
                               transports=self.transports, wait_timeout=wait_timeout)
        return self

    @property
    def node(self) -> str | None:
        """The node the balancer's cookie names (the one this client is on)."""
        return next((c.value for c in self.http.cookie_jar if c.key == "SERVERID"), None)

    async def call(self, event: str, data: Any) -> Any:
        return await self.sio.call(event, data, namespace=NS, timeout=10)

    async def follow(self, order_id: str) -> None:
        self.order_id = order_id
        reply = await self.call("subscribe", {"order_id": order_id})
        assert reply["ok"], reply
        self._take(reply["data"]["events"])

    def _take(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            seq = int(e["seq"])
            if seq <= self.last:
                continue  # in a reply and pushed too: allowed, dropped
            if seq != self.last + 1:
                self.gaps.append((self.last, seq))
            self.seqs.append(seq)
            self.last = seq

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_connect(self, *args: Any) -> None:
        self.connects += 1
        if self.connects > 1 and self.order_id is not None:
            # Not awaited here: the reply comes through this client's reader.
            self._spawn(self._resubscribe())

    async def _resubscribe(self) -> None:
        self.resubscribed_at = time.monotonic()
        reply = await self.call("subscribe", {"order_id": self.order_id, "since_seq": self.last})
        assert reply["ok"], reply
        events = reply["data"]["events"]
        self.replays.append([int(e["seq"]) for e in events])
        self._take(events)
        self.resubscribed.set()

    async def _on_disconnect(self, *args: Any) -> None:
        self.disconnected.set()
        if self.reconnect and not self.closing:
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        while not self.closing:
            await asyncio.sleep(RECONNECT_S)
            with contextlib.suppress(socketio.exceptions.ConnectionError):
                await self.connect()
                return

    async def _on_event(self, data: Any) -> None:
        if isinstance(data, dict) and data.get("order_id", self.order_id) == self.order_id:
            self._take([data])

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.sio.disconnect()
        for task in list(self._tasks):
            task.cancel()
        await self.http.close()


@dataclass
class Stack:
    cluster: Cluster
    nodes: dict[str, ServerProcess]  # by HAProxy's server name
    lb: Haproxy
    session: aiohttp.ClientSession

    def __post_init__(self) -> None:
        self.clients: list[LbClient] = []

    def running(self) -> list[str]:
        return [name for name, s in self.nodes.items() if s.proc is not None and s.proc.poll() is None]

    async def client(self, transports: list[str], reconnect: bool = False,
                     url: str | None = None) -> LbClient:
        c = LbClient(url or self.lb.url, transports, reconnect)
        self.clients.append(c)
        return await c.connect()

    async def api(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """The backend's HTTP API, through the balancer."""
        async with self.session.request(method, self.lb.url + path, json=body,
                                        headers={"Authorization": f"Bearer {token('service', 'backend')}"}
                                        ) as r:
            reply = await r.json()
            assert r.status == expect, (method, path, r.status, reply)
            return reply["data"]

    async def new_order(self) -> str:
        body = {"order_id": uid("o-"), "customer_id": uid("c-"),
                "service": {"code": "aircon_repair", "name": "空调维修"},
                "address": {"lat": 31.2304, "lng": 121.4737, "text": "人民广场 1 号"},
                "window": a_window()}
        return str((await self.api("POST", "/api/orders", body, expect=201))["order"]["order_id"])

    async def connections(self, name: str) -> int:
        """Sockets on /orders, as the node itself counts them."""
        return int(await self.cluster.metric(self.nodes[name], f'realtime_connections{{namespace="{NS}"}}')
                   or 0)

    async def get(self, name: str, path: str) -> tuple[int, Any]:
        async with self.session.get(self.nodes[name].url + path) as r:
            return r.status, await r.json(content_type=None)


async def exited(node: ServerProcess, timeout: float) -> int | None:
    """The node's exit code once it exits within `timeout`, else None."""
    assert node.proc is not None
    try:
        return await asyncio.to_thread(node.proc.wait, timeout)
    except subprocess.TimeoutExpired:
        return None


async def stop_node(node: ServerProcess) -> None:
    """SIGTERM, and a second one should it drain (that ends the drain)."""
    proc = node.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    if await exited(node, 1.0) is None:
        proc.send_signal(signal.SIGTERM)
        if await exited(node, 20.0) is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
async def stack(redis_server: RedisServer, mongo_server: MongoServer) -> AsyncIterator[Stack]:
    session = aiohttp.ClientSession()
    # HAProxy reaches the nodes from 127.0.0.1: trusted, so its X-Forwarded-For counts.
    cluster = Cluster(redis_server.url, mongo_server.url, session,
                      REALTIME_TRUSTED_PROXIES="127.0.0.1")
    nodes = {name: server_process({**cluster.env, "REALTIME_DRAIN_S": str(drain)})
             for name, drain in NODES.items()}
    for s in nodes.values():  # server_process drops store URLs from the environment: ours are meant
        s.env.update(REDIS_URL=redis_server.url, MONGO_URL=mongo_server.url)
    cluster.nodes.extend(nodes.values())
    lb: Haproxy | None = None
    stack: Stack | None = None
    try:
        await asyncio.gather(*(start(s) for s in nodes.values()))
        lb = Haproxy([s.port for s in nodes.values()]).start()
        await lb.wait_status(dict.fromkeys(nodes, "UP"))
        stack = Stack(cluster, nodes, lb, session)
        yield stack
    finally:
        if stack is not None:
            await asyncio.gather(*(c.close() for c in stack.clients), return_exceptions=True)
        if lb is not None:
            lb.stop()
        await asyncio.gather(*(stop_node(s) for s in nodes.values()), return_exceptions=True)
        await session.close()


@pytest.fixture(autouse=True)
async def close_clients(stack: Stack) -> AsyncIterator[None]:
    """Each test's clients go with it: the next one counts sockets per node."""
    yield
    clients, stack.clients = stack.clients, []
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def up(stack: Stack, *names: str) -> None:
    missing = [n for n in names if n not in stack.running()]
    if missing:
        pytest.fail(f"nodes {missing} were stopped by an earlier test of this module")


# -- long-polling ------------------------------------------------------------------------

async def test_long_polling_works_through_haproxy(stack: Stack) -> None:
    """Polling clients: every request of a session (handshake, posts, long
    polls) reaches the node that created it, by the cookie HAProxy set."""
    up(stack, "n1", "n2", "n3")
    before = {n: int(row["hrsp_4xx"]) for n, row in (await stack.lb.servers()).items()}
    oid = await stack.new_order()
    clients = [await stack.client(["polling"]) for _ in range(4)]
    for c in clients:
        await c.follow(oid)
        missing = await c.call("subscribe", {"order_id": uid("missing-")})
        assert missing["ok"] is False and missing["error"]["code"] == "not_found", missing
        again = await c.call("subscribe", {"order_id": oid, "since_seq": 1})
        assert again["ok"] and again["data"]["events"] == [], again
    assert all(c.sio.transport() == "polling" for c in clients)
    on = [c.node for c in clients]
    assert None not in on and len(set(on)) >= 2, f"sticky cookies {on}: not spread over the nodes"

    # Pushed through pending long-polls, made on whichever node the backend reaches.
    await stack.api("POST", f"/api/orders/{oid}/assign", {"technician_id": uid("t-")})
    await stack.api("POST", f"/api/orders/{oid}/events", {"state": "en_route"})

    async def all_pushed() -> bool:
        return all(c.seqs == [1, 2, 3] for c in clients)

    await until(all_pushed, 10, every=0.05, what="order events pushed to every polling client")
    assert [c.gaps for c in clients] == [[]] * len(clients)
    assert [c.node for c in clients] == on, "a session moved"
    after = {n: int(row["hrsp_4xx"]) for n, row in (await stack.lb.servers()).items()}
    assert after == before, f"nodes answered 4xx (a request reached the wrong node): {before} -> {after}"


async def raw_polling(url: str, session: aiohttp.ClientSession) -> tuple[str, list[tuple[int, str]]]:
    """An Engine.IO polling session by hand: the handshake, then three
    requests of that session (each a PONG, harmless); their statuses and bodies."""
    async with session.get(f"{url}/socket.io/?EIO=4&transport=polling") as r:
        body = await r.text()
        assert r.status == 200, body
    sid = str(json.loads(body[1:])["sid"])
    replies = []
    for _ in range(3):
        async with session.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="3") as r:
            replies.append((r.status, await r.text()))
    return sid, replies


async def test_long_polling_breaks_without_stickiness(stack: Stack) -> None:
    """The same nodes behind the same cfg without its cookie (round-robin):
    a session's requests land on nodes that never created it."""
    up(stack, "n1", "n2", "n3")
    plain = Haproxy([s.port for s in stack.nodes.values()], sticky=False).start()
    try:
        await plain.wait_status(dict.fromkeys(stack.nodes, "UP"))
        # One TCP connection per request, each with the client's cookies (none here).
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         cookie_jar=jar) as s:
            sid, replies = await raw_polling(plain.url, s)
        invalid = [r for r in replies if r == (400, f'"Invalid session {sid}"')]
        assert len(invalid) >= 2 and len(invalid) + replies.count((200, "OK")) == 3, replies

        # The same requests through the sticky cfg: every one reaches the session's node.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         cookie_jar=jar) as s:
            sid, replies = await raw_polling(stack.lb.url, s)
            assert replies == [(200, "OK")] * 3, replies
            async with s.post(f"{stack.lb.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                              data="1") as r:  # CLOSE: end the session
                assert r.status == 200

        # A real polling client cannot even join its namespace.
        lost = LbClient(plain.url, ["polling"])
        stack.clients.append(lost)
        t0 = time.monotonic()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await lost.connect(wait_timeout=2)
        assert not lost.sio.connected and time.monotonic() - t0 < 10

        # Websocket clients need no stickiness: one connection, one node.
        ws = await stack.client(["websocket"], url=plain.url)
        reply = await ws.call("subscribe", {"order_id": uid("missing-")})
        assert reply["ok"] is False and reply["error"]["code"] == "not_found", reply
    finally:
        plain.stop()


async def test_metrics_are_not_served_through_haproxy(stack: Stack) -> None:
    for path in ("/metrics", "/%6Detrics", "/metrics/"):
        async with stack.session.get(stack.lb.url + path) as r:
            assert r.status == 404, (path, r.status)
    async with stack.session.get(stack.lb.url + "/healthz") as r:
        assert r.status == 200


# -- a graceful stop -----------------------------------------------------------------------

async def test_websocket_clients_survive_a_graceful_stop(stack: Stack) -> None:
    """SIGTERM to n2: its /readyz fails and HAProxy marks it down while its
    clients are still served; when the drain ends it closes their sockets,
    they reconnect through HAProxy to the other nodes and replay, with
    `since_seq`, what was committed while they were away."""
    up(stack, "n1", "n2", "n3")
    oid = await stack.new_order()
    others = [n for n in stack.running() if n != "n2"]
    before = {n: await stack.connections(n) for n in stack.running()}
    clients = [await stack.client(["websocket"], reconnect=True) for _ in range(6)]
    for c in clients:
        await c.follow(oid)
    victims = [c for c in clients if c.node == "n2"]
    assert victims, f"no client on n2: {[c.node for c in clients]}"
    assert await stack.connections("n2") - before["n2"] == len(victims)

    n2 = stack.nodes["n2"]
    assert n2.proc is not None
    t0 = time.monotonic()
    n2.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        status, body = await stack.get("n2", "/readyz")
        return status == 503 and body["error"]["details"] == {"status": "draining"}

    await until(draining, 5, every=0.05, what="n2's /readyz answering 503 draining")
    await stack.lb.wait_status({"n2": "DOWN"}, timeout=DRAIN_S)
    marked_down = time.monotonic() - t0
    assert not any(c.disconnected.is_set() for c in clients), \
        f"a client was cut off before HAProxy marked n2 down ({marked_down:.1f} s)"

    # While it drains, n2 still serves its clients: they get this live.
    await stack.api("POST", f"/api/orders/{oid}/assign", {"technician_id": uid("t-")})

    async def got(n: int) -> bool:
        return all(c.seqs == list(range(1, n + 1)) for c in clients)

    await until(lambda: got(2), 10, every=0.05, what="seq 2 on every client")

    # The drain ends: n2 says goodbye to its clients, and only to them.
    await asyncio.wait_for(asyncio.gather(*(c.disconnected.wait() for c in victims)), DRAIN_S + 10)
    cut_off = time.monotonic() - t0
    # While they are away (they come back after RECONNECT_S), two more events.
    await stack.api("POST", f"/api/orders/{oid}/events", {"state": "en_route"})
    await stack.api("POST", f"/api/orders/{oid}/events", {"state": "arrived"})
    committed = time.monotonic()

    await asyncio.wait_for(asyncio.gather(*(c.resubscribed.wait() for c in victims)), 20)
    await until(lambda: got(4), 10, every=0.05, what="seqs 1..4 on every client")
    code = await exited(n2, 20)
    stopped = time.monotonic() - t0
    assert code == 0, f"n2 exit code {code}\n{log_text(n2)[-3000:]}"
    assert cut_off >= DRAIN_S, f"n2 closed its sockets {cut_off:.1f} s after SIGTERM"

    for c in victims:
        assert c.resubscribed_at > committed, "a client came back before the events were committed"
        assert c.replays == [[3, 4]], c.replays  # replayed with since_seq=2, not pushed
        assert c.connects == 2 and c.node in others, (c.connects, c.node)
    for c in clients:
        assert c.gaps == [] and c.seqs == [1, 2, 3, 4], (c.gaps, c.seqs)
        if c not in victims:
            assert c.connects == 1 and not c.disconnected.is_set()
    assert sum([await stack.connections(n) - before[n] for n in others]) == len(clients)
    assert stack.cluster.errors() == [], stack.cluster.errors()
    print(f"n2: marked down after {marked_down:.2f} s, sockets closed after {cut_off:.2f} s, "
          f"exited after {stopped:.2f} s; {len(victims)} of {len(clients)} clients moved")


# -- readiness -----------------------------------------------------------------------------

async def test_a_node_not_ready_gets_no_new_connections(stack: Stack) -> None:
    """n3 draining (its /readyz answers 503 for a minute): HAProxy marks it
    down, and every new connection, websocket or polling, goes to the others."""
    up(stack, "n1", "n3")
    n3 = stack.nodes["n3"]
    assert n3.proc is not None
    n3.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        return (await stack.get("n3", "/readyz"))[0] == 503

    await until(draining, 5, every=0.05, what="n3's /readyz answering 503")
    assert (await stack.get("n3", "/healthz"))[0] == 200  # alive, not ready
    await stack.lb.wait_status({"n3": "DOWN"}, timeout=10)
    others = [n for n in stack.running() if n != "n3"]
    before = {n: await stack.connections(n) for n in stack.running()}
    sessions_before = int((await stack.lb.servers())["n3"]["stot"])

    new = [await stack.client(["websocket" if i % 2 else "polling"]) for i in range(6)]
    for c in new:  # each session answers
        reply = await c.call("subscribe", {"order_id": uid("missing-")})
        assert reply["error"]["code"] == "not_found", reply
    assert {c.node for c in new} <= set(others), [c.node for c in new]
    after = {n: await stack.connections(n) for n in stack.running()}
    assert after["n3"] == before["n3"], (before, after)
    assert sum(after[n] - before[n] for n in others) == len(new), (before, after)
    assert int((await stack.lb.servers())["n3"]["stot"]) == sessions_before

    # A second SIGTERM ends the drain: n3 stops now, not in a minute.
    for c in new:
        await c.close()
    t0 = time.monotonic()
    n3.proc.send_signal(signal.SIGTERM)
    code = await exited(n3, 15)
    assert code == 0, f"n3 exit code {code}\n{log_text(n3)[-3000:]}"
    assert time.monotonic() - t0 < 15
    assert "SIGTERM again: the drain ends now" in log_text(n3)
    assert stack.cluster.errors() == [], stack.cluster.errors()
