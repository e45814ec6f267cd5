"""Checks of the python-engineio internals the transport uses (realtime/transport/sio.py)."""

from __future__ import annotations

import inspect
import json
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.transport.contract import (
    QUEUE_METHODS,
    QUIET,
    ContractBroken,
    engineio_server,
    engineio_socket,
    expect,
    mod,
    params,
    resolve,
    source_of,
)


# -- engineio -------------------------------------------------------------------
@dataclass
class Connect:
    server: Any
    driver: Any
    returned: Any
    environ: dict[str, Any]
    started: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]


async def websocket_only_connect() -> Connect:
    """A websocket-only Engine.IO connect through python-engineio's own
    _handle_connect, with a recording websocket driver in `_async`."""
    engineio: Any = mod("engineio")

    class Server(engineio.AsyncServer):
        started: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]

        def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> None:
            self.started.append((target, args, kwargs))

    class Driver:
        made: ClassVar[list[Any]] = []

        def __init__(self, handler: Any, server: Any) -> None:
            self.handler = handler
            self.server = server
            Driver.made.append(self)

        async def __call__(self, environ: dict[str, Any]) -> str:
            sock = self.handler.__self__
            queued = []
            while not sock.queue.empty():
                queued.append(sock.queue.get_nowait())
            self.seen = (sock.connected, sock.upgraded, queued, environ)
            return "the driver's response"

    server = Server(async_mode="aiohttp", logger=QUIET)
    server.started = []
    table = server._async
    expect(isinstance(table, dict) and "websocket" in table, "engineio's _async has no 'websocket'")
    server._async = {**table, "websocket": Driver}
    environ = {"REQUEST_METHOD": "GET", "QUERY_STRING": "EIO=4&transport=websocket",
               "HTTP_CONNECTION": "Upgrade", "HTTP_UPGRADE": "websocket"}
    returned = await server._handle_connect(environ, "websocket")
    expect(len(Driver.made) == 1, "python-engineio did not build the websocket driver from _async")
    return Connect(server, Driver.made[0], returned, environ, server.started)


async def _websocket_driver_table() -> None:
    engineio_aiohttp = mod("engineio.async_drivers.aiohttp")
    expect(engineio_server()._async["websocket"] is engineio_aiohttp.WebSocket,
           "async_mode aiohttp no longer uses engineio.async_drivers.aiohttp.WebSocket")
    run = await websocket_only_connect()
    expect(run.driver.server is run.server, "the driver is not built with (handler, server)")
    expect(run.returned == "the driver's response",
           "_handle_connect no longer returns what the websocket driver returns")


async def _websocket_driver_class() -> None:
    """_PlainWebSocket: built as (handler, server); handler.__self__ is the
    session's AsyncSocket, not yet connected for a websocket-only session;
    __call__(environ) gets the environ holding 'aiohttp.request' and must set
    _sock and environ and await handler(self), as the stock one does."""
    async_socket = mod("engineio.async_socket")
    driver_cls = resolve("engineio.async_drivers.aiohttp:WebSocket")
    expect(params(driver_cls.__init__) == ["self", "handler", "server"],
           f"WebSocket.__init__ takes {params(driver_cls.__init__)}")
    expect(params(driver_cls.__call__) == ["self", "environ"], "WebSocket.__call__ changed")
    expect(params(driver_cls.wait) == ["self"], "WebSocket.wait changed")
    stock = inspect.getsource(driver_cls.__call__)
    for snippet in ("environ['aiohttp.request']", "self._sock =", "self.environ = environ",
                    "await self.handler(self)", "return self._sock"):
        expect(snippet in stock, f"WebSocket.__call__ no longer does {snippet!r}")
    for method in ("send", "close", "wait"):
        expect("self._sock" in inspect.getsource(getattr(driver_cls, method)),
               f"WebSocket.{method} no longer uses self._sock")
    expect("'aiohttp.request': request" in source_of("engineio.async_drivers.aiohttp:translate_request"),
           "translate_request no longer puts the aiohttp request in the environ")
    run = await websocket_only_connect()
    sock = run.driver.handler.__self__
    expect(isinstance(sock, async_socket.AsyncSocket) and sock.sid in run.server.sockets,
           "the driver's handler is not bound to the session's AsyncSocket")
    connected, upgraded, _, environ = run.driver.seen
    expect(connected is False and upgraded is False,
           "a websocket-only session is already connected when its driver runs")
    expect(environ is run.environ, "the driver does not get the request's environ")


async def _socket_queue() -> None:
    """The queue: what python-engineio calls on it is what our stand-in has;
    the OPEN packet is queued before the driver runs; None ends a poll."""
    used = set()
    for module in ("engineio.async_socket", "engineio.async_server"):
        used |= set(re.findall(r"\.queue\.(\w+)", inspect.getsource(mod(module))))
    expect(used <= QUEUE_METHODS, f"python-engineio now calls {sorted(used - QUEUE_METHODS)} on a queue")
    eio_packet = mod("engineio.packet")
    run = await websocket_only_connect()
    queued = run.driver.seen[2]
    expect([p.packet_type for p in queued] == [eio_packet.OPEN],
           f"before the websocket driver runs the queue holds {queued!r}, not the OPEN packet")
    sock = engineio_socket()
    await sock.queue.put(None)
    expect(await sock.poll() == [], "a None on the queue no longer ends a long-poll")


async def _send_ping() -> None:
    """schedule_ping starts sock._send_ping (bound, no arguments) through
    server.start_background_task; _send_ping sets last_ping and queues a PING
    (sio._ping_now does the same without the task)."""
    async_socket = mod("engineio.async_socket")
    eio_packet = mod("engineio.packet")
    run = await websocket_only_connect()
    pings = [(t, a, k) for t, a, k in run.started
             if getattr(t, "__func__", None) is async_socket.AsyncSocket._send_ping]
    expect(len(pings) == 1 and pings[0][1:] == ((), {}),
           f"the connect started {run.started!r}, not sock._send_ping with no arguments")
    expect(pings[0][0].__self__ is run.driver.handler.__self__, "the ping is not the session's own")
    expect(params(async_socket.AsyncSocket._send_ping) == ["self"], "_send_ping takes arguments")
    # Ours returns a TimerHandle (or None) for it, not a task: nothing may use the result.
    expect(re.search(r"^\s*self\.server\.start_background_task\(self\._send_ping\)\s*$",
                     source_of("engineio.async_socket:AsyncSocket.schedule_ping"), re.MULTILINE),
           "schedule_ping now uses what start_background_task returns")
    sock = engineio_socket(ping_interval=0)
    before = time.time()
    await sock._send_ping()
    expect(sock.last_ping and sock.last_ping >= before, "_send_ping no longer sets last_ping")
    pkt = sock.queue.get_nowait()
    expect(pkt.packet_type == eio_packet.PING, "_send_ping no longer queues a PING")
    sock.schedule_ping()
    expect(sock.last_ping is None, "schedule_ping no longer clears last_ping")


async def _check_ping_timeout() -> None:
    """It reads last_ping when called: a late pong closes the session, and a
    subclass that moves last_ping first (sio._DirectSocket) keeps it open."""
    async_socket: Any = mod("engineio.async_socket")

    class Fresh(async_socket.AsyncSocket):
        async def check_ping_timeout(self) -> bool:
            self.last_ping = time.time()
            return bool(await super().check_ping_timeout())

    late = engineio_socket(ping_timeout=5)
    late.last_ping = time.time() - 60
    expect(await late.check_ping_timeout() is False and late.closed,
           "a pong 60 s late no longer ends the session")
    fresh = engineio_socket(ping_timeout=5)
    fresh.__class__ = Fresh
    fresh.last_ping = time.time() - 60
    expect(await fresh.check_ping_timeout() is True and not fresh.closed,
           "check_ping_timeout no longer reads last_ping at the time it is called")
    expect("check_ping_timeout()" in source_of("engineio.async_socket:AsyncSocket.send"),
           "AsyncSocket.send no longer checks the ping timeout")


def _socket_state() -> None:
    """sio._open_direct swaps the socket's class and sets its state directly."""
    async_socket: Any = mod("engineio.async_socket")
    sock = engineio_socket()
    for name in ("server", "sid", "queue", "last_ping", "connected", "upgraded", "closing", "closed"):
        expect(name in vars(sock), f"AsyncSocket no longer has {name!r}")
    expect(not any("__slots__" in vars(k) for k in type(sock).__mro__[:-1]),
           "AsyncSocket has __slots__: its class can no longer be swapped")

    class Sub(async_socket.AsyncSocket):
        pass

    sock.__class__ = Sub
    sock.link = None
    expect(isinstance(sock, async_socket.AsyncSocket), "the class swap failed")
    reason = resolve("engineio:AsyncServer.reason")
    for name in ("TRANSPORT_CLOSE", "SERVER_DISCONNECT", "CLIENT_DISCONNECT"):
        expect(isinstance(getattr(reason, name), str), f"engineio's reason has no {name}")


async def _service_task() -> None:
    """Nothing of ours removes an ended websocket session from `sockets`:
    python-engineio's service task does (started at the first connect)."""
    expect(engineio_server().start_service_task is True, "monitor_clients is no longer on by default")
    text = source_of("engineio.async_server:AsyncServer._service_task")
    for snippet in ("if s.closed:", "del self.sockets[s.sid]", "await s.check_ping_timeout()"):
        expect(snippet in text, f"_service_task no longer does {snippet!r}")
    run = await websocket_only_connect()
    expect(any(getattr(t, "__func__", None) is type(run.server)._service_task for t, _, _ in run.started),
           "the first connect no longer starts the service task")


def _packet_json() -> None:
    """Packet.json is read per packet as self.json: loads(text) only when the
    character after the type is not a digit, a ValueError leaves the text as
    the data; dumps(data, separators=...) encodes."""
    eio_packet: Any = mod("engineio.packet")
    expect("json" in vars(eio_packet.Packet), "engineio's Packet no longer has a json attribute")
    calls: list[tuple[str, Any]] = []

    class Strict:
        @staticmethod
        def loads(text: str) -> Any:
            calls.append(("loads", text))
            raise ValueError("refused")

        @staticmethod
        def dumps(value: Any, **kwargs: Any) -> str:
            calls.append(("dumps", kwargs))
            return json.dumps(value, **kwargs)

    class Packet(eio_packet.Packet):
        json = Strict

    refused = Packet(encoded_packet='4[[["deep"]]]')
    expect(refused.data == '[[["deep"]]]', "a ValueError from json.loads no longer leaves the text")
    Packet(encoded_packet='42["location",{}]')
    expect(calls == [("loads", '[[["deep"]]]')], f"engineio parsed JSON as {calls!r}")
    calls.clear()
    expect(Packet(eio_packet.MESSAGE, {"a": 1}).encode() == '4{"a":1}', "a dict no longer encodes")
    expect(calls == [("dumps", {"separators": (",", ":")})], f"engineio encodes with {calls!r}")


def _packet() -> None:
    eio_packet = mod("engineio.packet")
    expect((eio_packet.OPEN, eio_packet.CLOSE, eio_packet.PING, eio_packet.MESSAGE) == (0, 1, 2, 4),
           "Engine.IO packet type numbers changed")
    pkt = eio_packet.Packet(encoded_packet='42["x"]')
    expect((pkt.packet_type, pkt.data) == (eio_packet.MESSAGE, '2["x"]'), "a message decodes otherwise")
    expect(eio_packet.Packet(eio_packet.MESSAGE, '2["x"]').encode() == '42["x"]',
           "a message encodes otherwise")
    expect(eio_packet.Packet(eio_packet.PING).encode() == "2", "a PING encodes otherwise")
    binary = eio_packet.Packet(encoded_packet=b"\x01")
    expect((binary.packet_type, binary.data) == (eio_packet.MESSAGE, b"\x01"),
           "a binary frame decodes otherwise")
    try:
        eio_packet.Packet(encoded_packet="")
    except ValueError:
        pass
    else:
        raise ContractBroken("an empty text frame no longer raises ValueError")


def _exceptions() -> None:
    exceptions = mod("engineio.exceptions")
    expect(issubclass(exceptions.SocketIsClosedError, exceptions.EngineIOError)
           and issubclass(exceptions.UnknownPacketError, exceptions.EngineIOError),
           "engineio's exception classes changed")


def _invalid_session_log() -> None:
    """sio.quiet_engineio_logs filters this line off the 'engineio.server' logger."""
    base_server = mod("engineio.base_server")
    expect(base_server.default_logger.name == "engineio.server", "engineio's logger was renamed")
    expect(engineio_server(logger=False).logger is base_server.default_logger,
           "logger=False no longer means the 'engineio.server' logger")
    text = source_of("engineio.async_server:AsyncServer.handle_request")
    expect("_log_error_once(f'Invalid session {sid}'" in text,
           "the 'Invalid session' line changed")
    expect("self.logger.error(" in source_of("engineio.base_server:BaseServer._log_error_once"),
           "_log_error_once no longer logs at ERROR")
