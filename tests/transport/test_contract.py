"""The transport's hooks into library internals, checked against the
installed aiohttp, python-engineio, python-socketio, redis-py and bidict.

realtime/transport/ overrides, calls and reads private parts of those
libraries (realtime/transport/README.md lists each hook and why it is
there). An upgrade that moves one of them must fail here, first, with the
hook's name: `./scripts/upgrade` runs this module before anything else.

Every check drives the real library (no mocks, no network, no server):
signatures are compared with what our code calls or overrides, attributes
are read off objects built here, and behaviours (a frame parsed by aiohttp's
reader, a websocket-only Engine.IO connect, the Redis manager's own-message
bytes) are exercised directly. Library modules are imported inside the
checks, so a module that moved fails its hooks by name instead of failing
the collection of this file. (tests/conftest.py imports the app: if
realtime/transport itself no longer imports, collection stops there, and
the traceback names the library module; its rows in the README follow.)
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import inspect
import json
import logging
import re
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "realtime" / "transport" / "README.md"
LOCK = ROOT / "requirements-test.lock"

# Libraries whose internals the transport uses; their versions must be the
# locked ones (bidict: python-socketio's rooms are bidicts, read via _fwdm).
PINNED = ("aiohttp", "python-engineio", "python-socketio", "redis", "bidict")

# Servers built here log nowhere (and add no handler to the libraries' loggers).
QUIET = logging.getLogger("tests.transport.contract")
QUIET.disabled = True

# What python-engineio may call on a socket's queue: the methods
# realtime/transport/sio.py's stand-in queue implements.
QUEUE_METHODS = frozenset({"get", "get_nowait", "put", "put_nowait", "task_done", "join",
                           "empty", "qsize"})


class ContractBroken(AssertionError):
    """A library no longer behaves as a hook of the transport expects."""


def expect(ok: object, why: str) -> None:
    if not ok:
        raise ContractBroken(why)


CheckResult = Awaitable[None] | None


@dataclass(frozen=True)
class Hook:
    name: str  # as in realtime/transport/README.md
    check: Callable[[], CheckResult]


async def failure_of(hook: Hook) -> str | None:
    """None when the hook holds, else a message that starts with its name."""
    try:
        result = hook.check()
        if result is not None:
            await result
    except Exception as exc:  # a moved module, a renamed attribute, a changed behaviour
        return (f"hook {hook.name!r} broke: {type(exc).__name__}: {exc}\n"
                f"  (realtime/transport/README.md says what it is for and what to do)")
    return None


# -- helpers -------------------------------------------------------------------
def mod(name: str) -> Any:
    return importlib.import_module(name)


def resolve(target: str) -> Any:
    """'package.module:Attr.attr' -> the object."""
    module, _, path = target.partition(":")
    obj = mod(module)
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def params(func: Any) -> list[str]:
    """Parameter names in order, as written: '*' before keyword-only ones,
    '*args' and '**kwargs' for the variadic ones."""
    out: list[str] = []
    star = False
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name)
    return out


def signature_is(target: str, *expected: str) -> Callable[[], None]:
    """The library's `target` takes exactly these parameters (what our code calls)."""
    def check() -> None:
        got = params(resolve(target))
        expect(got == list(expected),
               f"{target} takes ({', '.join(got)}); the transport uses ({', '.join(expected)})")
    return check


def overridden_as(target: str, ours: Callable[[], Any]) -> Callable[[], None]:
    """Our override has the library method's parameters, in its order."""
    def check() -> None:
        lib, mine = params(resolve(target)), params(ours())
        expect(lib == mine,
               f"{target} now takes ({', '.join(lib)}); our override takes ({', '.join(mine)})")
    return check


def all_of(*checks: Callable[[], CheckResult]) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        for one in checks:
            result = one()
            if result is not None:
                await result
    return check


def source_of(target: str) -> str:
    return inspect.getsource(resolve(target))


def assigned_on_self(cls: type) -> set[str]:
    """Every `self.x = ...` in a class's body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names: set[str] = set()
    for node in ast.walk(tree):
        targets: list[ast.expr]
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                names.add(target.attr)
    return names


def no_clash(ours: Callable[[], type], lib: str, stock: Callable[[], Any],
             intended: frozenset[str]) -> Callable[[], None]:
    """What our subclass defines or sets on `self` must not be something the
    library class (or an instance of it) already has, except the hooks we
    override or set on purpose: a library that adds a name we use would be
    silently overridden."""
    def check() -> None:
        cls = ours()
        base = resolve(lib)
        expect(issubclass(cls, base), f"{cls.__name__} is no longer a {lib}")
        lib_names = set(dir(base)) | set(vars(stock()))
        mine = {n for n in vars(cls)
                if not (n.startswith("__") and n.endswith("__")) and not n.startswith("_abc_")}
        mine |= assigned_on_self(cls)
        clashes = sorted(n for n in mine if n in lib_names and n not in intended)
        expect(not clashes, f"{lib} now has {clashes}, which {cls.__name__} defines too")
    return check


def absent_on(stock: Callable[[], Any], names: tuple[str, ...], what: str) -> Callable[[], None]:
    """Attributes we add onto a library's objects must not exist there."""
    def check() -> None:
        obj = stock()
        there = sorted(n for n in names if hasattr(obj, n))
        expect(not there, f"{what} now has {there}, which the transport sets on it")
    return check


def ours(target: str) -> Callable[[], Any]:
    return lambda: resolve(target)


# -- objects built cheaply ---------------------------------------------------------
def engineio_server(**kwargs: Any) -> Any:
    engineio = mod("engineio")
    kwargs.setdefault("logger", QUIET)
    return engineio.AsyncServer(async_mode="aiohttp", **kwargs)


def socketio_server(**kwargs: Any) -> Any:
    socketio = mod("socketio")
    return socketio.AsyncServer(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET, **kwargs)


def engineio_socket(**server_kwargs: Any) -> Any:
    async_socket = mod("engineio.async_socket")
    return async_socket.AsyncSocket(engineio_server(**server_kwargs), "sid-1")


@functools.cache
def realtime_server() -> Any:
    """Ours, for the classes it installs (its engine.io server, its websocket driver)."""
    sio = mod("realtime.transport.sio")
    return sio.RealtimeServer(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET)


def redis_manager_class() -> type:
    return resolve("socketio:AsyncRedisManager")


def redis_manager() -> Any:
    return redis_manager_class()("redis://127.0.0.1:1/0", channel="contract")


# -- aiohttp: the websocket reader ---------------------------------------------------
MASK = b"\x11\x22\x33\x44"


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (masked, unfragmented, short)."""
    assert len(payload) < 126
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK + body


def probe_queue(base: type, init_base: bool, loop: asyncio.AbstractEventLoop) -> Any:
    """A queue like wsdirect's: overrides what the reader calls; skips the
    base __init__ when aiohttp's reader is compiled."""
    chunk = resolve("aiohttp.web_ws:DEFAULT_CHUNK_SIZE")

    class Probe(base):
        __slots__ = ("got",)

        def __init__(self) -> None:
            if init_base:
                super().__init__(None, chunk, loop=loop)
            self.got: list[Any] = []

        def feed_data(self, data: Any, size: int) -> None:
            self.got.append(data)

        def feed_eof(self) -> None:
            self.got.append("eof")

        def set_exception(self, exc: BaseException, *args: Any) -> None:
            self.got.append(exc)

    return Probe()


def reader_delivers(module_name: str, init_base: bool | None) -> Callable[[], Awaitable[None]]:
    """aiohttp's reader, built as wsdirect builds it, hands each message to the
    queue's feed_data at once: (WSMsgType member, data, extra) tuples, text
    decoded, a close frame's code as an int; a protocol error goes to
    set_exception as a WebSocketError with its close code; eof to feed_eof."""
    async def check() -> None:
        aiohttp = mod("aiohttp")
        module = mod(module_name)
        queue_cls = module.WebSocketDataQueue
        compiled = queue_cls.__module__.endswith("_c")
        expect(queue_cls.__module__ in ("aiohttp._websocket.reader_c", "aiohttp._websocket.reader_py"),
               f"WebSocketDataQueue lives in {queue_cls.__module__}; wsdirect tells the compiled "
               "reader by a module name ending in _c")
        skip = compiled if init_base is None else not init_base
        loop = asyncio.get_running_loop()

        def reader(max_size: int) -> tuple[Any, Any]:
            queue = probe_queue(queue_cls, not skip, loop)
            return queue, module.WebSocketReader(queue, max_size, compress=False, decode_text=True)

        queue, parser = reader(1024)
        frames = (masked(0x1, "héllo".encode()) + masked(0x2, b"\x00\x01") + masked(0x9, b"pi")
                  + masked(0xA, b"po") + masked(0x8, (1001).to_bytes(2, "big") + b"bye"))
        # Split mid-frame, as reads are: the parser keeps its state between them.
        expect(parser.feed_data(frames[:5]) == (False, b""), "feed_data no longer returns (eof, tail)")
        expect(parser.feed_data(frames[5:]) == (False, b""), "feed_data no longer returns (eof, tail)")
        kinds = aiohttp.WSMsgType
        want = [(kinds.TEXT, "héllo"), (kinds.BINARY, b"\x00\x01"), (kinds.PING, b"pi"),
                (kinds.PONG, b"po"), (kinds.CLOSE, 1001)]
        expect(len(queue.got) == len(want), f"the reader fed {queue.got!r}")
        for msg, (kind, data) in zip(queue.got, want, strict=True):
            expect(isinstance(msg, tuple) and msg[0] is kind,
                   f"a {kind.name} message is fed as {msg!r}: wsdirect compares msg[0] by identity")
            if kind in (kinds.PING, kinds.PONG):  # bytes or bytearray: echoed as given
                same = isinstance(msg[1], bytes | bytearray) and bytes(msg[1]) == data
            else:
                same = type(msg[1]) is type(data) and msg[1] == data
            expect(same, f"a {kind.name} message carries {msg[1]!r}, not {data!r}")
        parser.feed_eof()
        expect(queue.got[-1] == "eof", "feed_eof no longer reaches the queue's feed_eof")

        websocket_error = aiohttp.WebSocketError
        for frame, max_size, code in ((masked(0x3, b"x"), 1024, 1002),  # reserved opcode
                                      (masked(0x1, b"too long"), 4, 1009),
                                      (masked(0x1, b"\xff\xfe"), 1024, 1007)):
            queue, parser = reader(max_size)
            eof, _ = parser.feed_data(frame)
            exc = queue.got[-1] if queue.got else None
            expect(eof and isinstance(exc, websocket_error) and exc.code == code,
                   f"a bad frame (expected close code {code}) reached the queue as {queue.got!r}")
    return check


# -- aiohttp: the request handler ----------------------------------------------------
async def _request_handler_feeds_our_parser() -> None:
    """set_parser takes any object with feed_data -> (eof, tail) and feed_eof;
    data_received feeds it, and connection_lost ends it; keep_alive(False)."""
    web = mod("aiohttp.web")
    web_protocol = mod("aiohttp.web_protocol")
    web_server = mod("aiohttp.web_server")
    loop = asyncio.get_running_loop()

    async def handler(request: Any) -> Any:
        return web.Response()

    class Parser:
        def __init__(self) -> None:
            self.got: list[Any] = []

        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            self.got.append(data)
            return False, b""

        def feed_eof(self) -> None:
            self.got.append("eof")

    server = web_server.Server(handler, loop=loop)
    protocol = web_protocol.RequestHandler(server, loop=loop)
    parser = Parser()
    protocol.set_parser(parser)
    protocol.keep_alive(False)
    protocol.data_received(b"frame bytes")
    expect(parser.got == [b"frame bytes"], f"data_received fed the parser {parser.got!r}")
    protocol.connection_lost(None)
    expect(parser.got[-1] == "eof", "connection_lost no longer calls the parser's feed_eof")


async def _request_handler_lets_go() -> None:
    """detach: the handler's `_manager` is its Server, and Server.connection_lost
    (handler, None) forgets the connection; `transport` and `_payload_parser`
    are the slots detach clears."""
    web = mod("aiohttp.web")
    web_protocol = mod("aiohttp.web_protocol")
    web_server = mod("aiohttp.web_server")
    loop = asyncio.get_running_loop()

    async def handler(request: Any) -> Any:
        return web.Response()

    server = web_server.Server(handler, loop=loop)
    protocol = web_protocol.RequestHandler(server, loop=loop)
    expect(protocol._manager is server, "RequestHandler._manager is not its Server")
    slots = {s for k in type(protocol).__mro__ for s in getattr(k, "__slots__", ())}
    for name in ("_manager", "_payload_parser", "transport"):
        expect(name in slots, f"RequestHandler has no slot {name!r}")
    expect(protocol._payload_parser is None and protocol.transport is None,
           "a new RequestHandler's _payload_parser / transport are not None")
    server.connection_made(protocol, object())
    expect(protocol in server._connections, "Server.connection_made no longer records the handler")
    server.connection_lost(protocol, None)
    expect(protocol not in server._connections, "Server.connection_lost(handler, None) kept it")


def _base_request_loop() -> None:
    base_request = resolve("aiohttp.web_request:BaseRequest")
    expect("_loop" in base_request.ATTRS, "BaseRequest no longer has a _loop attribute")
    expect("self._loop = loop" in inspect.getsource(base_request.__init__),
           "BaseRequest.__init__ no longer stores its loop as _loop")
    expect(isinstance(base_request.protocol, property), "BaseRequest.protocol is not a property")


def _websocket_response_state() -> None:
    """What our _post_start sets is what aiohttp's own sets, and what it reads exists."""
    response_cls = resolve("aiohttp.web_ws:WebSocketResponse")
    stock = inspect.getsource(response_cls._post_start)
    for name in ("_ws_protocol", "_writer", "_reader", "_parser"):
        expect(f"self.{name} =" in stock, f"aiohttp's _post_start no longer sets {name}")
    ws = response_cls(max_msg_size=123, compress=False, autoping=False)
    expect(ws._max_msg_size == 123, "WebSocketResponse no longer keeps max_msg_size as _max_msg_size")
    for name in ("_reader", "_parser", "_writer", "_ws_protocol"):
        expect(getattr(ws, name, "missing") is None, f"a fresh WebSocketResponse has no {name} = None")
    expect("self._post_start(request, protocol, writer)" in inspect.getsource(response_cls.prepare),
           "WebSocketResponse.prepare no longer calls _post_start(request, protocol, writer)")


def _websocket_response_eof() -> None:
    response_cls = resolve("aiohttp.web_ws:WebSocketResponse")
    ws = response_cls()
    expect(ws._eof_sent is False, "WebSocketResponse has no _eof_sent flag")
    expect("if self._eof_sent:" in inspect.getsource(response_cls.write_eof),
           "WebSocketResponse.write_eof no longer returns early on _eof_sent")


def _websocket_response_close() -> None:
    response_cls = resolve("aiohttp.web_ws:WebSocketResponse")
    ws = response_cls()
    ws._set_closed()
    expect(ws.closed, "WebSocketResponse._set_closed() no longer marks it closed")


def _server_logger() -> None:
    """realtime/app.py filters aiohttp's per-request error line (HostileLogFilter)."""
    web_protocol = mod("aiohttp.web_protocol")
    expect(web_protocol.server_logger.name == "aiohttp.server", "aiohttp's server logger was renamed")
    expect(inspect.signature(web_protocol.RequestHandler.__init__).parameters["logger"].default
           is web_protocol.server_logger, "RequestHandler no longer logs to aiohttp.server by default")
    text = inspect.getsource(web_protocol.RequestHandler.handle_error)
    expect('"Error handling request' in text, "handle_error no longer logs 'Error handling request'")


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
    engineio = mod("engineio")

    class Server(engineio.AsyncServer):  # type: ignore[name-defined]
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
    async_socket = mod("engineio.async_socket")

    class Fresh(async_socket.AsyncSocket):  # type: ignore[name-defined]
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
    async_socket = mod("engineio.async_socket")
    sock = engineio_socket()
    for name in ("server", "sid", "queue", "last_ping", "connected", "upgraded", "closing", "closed"):
        expect(name in vars(sock), f"AsyncSocket no longer has {name!r}")
    expect(not any("__slots__" in vars(k) for k in type(sock).__mro__[:-1]),
           "AsyncSocket has __slots__: its class can no longer be swapped")

    class Sub(async_socket.AsyncSocket):  # type: ignore[name-defined]
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
    eio_packet = mod("engineio.packet")
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

    class Packet(eio_packet.Packet):  # type: ignore[name-defined]
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


# -- socketio: the server ---------------------------------------------------------
async def _engineio_server_class() -> None:
    """BaseServer.__init__ builds self.eio from _engineio_server_class(),
    passing the engine.io options on."""
    engineio = mod("engineio")
    socketio = mod("socketio")

    class Eio(engineio.AsyncServer):  # type: ignore[name-defined]
        pass

    class Server(socketio.AsyncServer):  # type: ignore[name-defined]
        def _engineio_server_class(self) -> type:
            return Eio

    server = Server(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET, ping_interval=7)
    expect(type(server.eio) is Eio, "self.eio is no longer built from _engineio_server_class()")
    expect(server.eio.ping_interval == 7, "engine.io options no longer reach its constructor")


def recording_server() -> Any:
    socketio = mod("socketio")

    class Server(socketio.AsyncServer):  # type: ignore[name-defined]
        def __init__(self, **kwargs: Any) -> None:
            self.calls: list[tuple[Any, ...]] = []
            super().__init__(**kwargs)

        async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
            self.calls.append(("message", eio_sid, data))

        async def _handle_disconnect(self, eio_sid: str, namespace: str | None,
                                     reason: Any = None) -> None:
            self.calls.append(("disconnect", eio_sid, namespace, reason))

        async def _handle_event_internal(self, server: Any, sid: str, eio_sid: str, data: Any,
                                         namespace: str, id: Any) -> None:
            self.calls.append(("event", server, sid, eio_sid, data, namespace, id))

    return Server(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET, async_handlers=False)


async def _handle_eio_message() -> None:
    server = recording_server()
    await server.eio._trigger_event("message", "E1", '2["x"]', run_async=False)
    expect(server.calls == [("message", "E1", '2["x"]')],
           "engine.io messages no longer reach the server's _handle_eio_message(eio_sid, data)")


async def _handle_eio_connect() -> None:
    """The environ socketio keeps is the very dict engine.io passed
    (sio.compact_environ shrinks it in place later)."""
    server = recording_server()
    environ: dict[str, Any] = {"QUERY_STRING": ""}
    await server.eio._trigger_event("connect", "E1", environ, run_async=False)
    expect(server.environ.get("E1") is environ, "_handle_eio_connect no longer keeps the environ itself")


async def _handle_eio_disconnect() -> None:
    server = recording_server()
    await server.manager.connect("E1", "/")
    await server.eio._trigger_event("disconnect", "E1", "transport close", run_async=False)
    expect(("disconnect", "E1", "/", "transport close") in server.calls,
           "engine.io's disconnect no longer reaches _handle_eio_disconnect(eio_sid, reason), "
           "and it no longer calls _handle_disconnect(eio_sid, namespace, reason)")


async def _handle_event_internal() -> None:
    server = recording_server()
    sid = await server.manager.connect("E1", "/")
    await server._handle_event("E1", "/", 7, ["ev", {"a": 1}])
    expect(server.calls == [("event", server, sid, "E1", ["ev", {"a": 1}], "/", 7)],
           f"_handle_event called {server.calls!r}")


async def _trigger_event() -> None:
    server = socketio_server()
    sid = await server.manager.connect("E1", "/")
    expect(await server._trigger_event("nothing", "/", sid) is server.not_handled,
           "_trigger_event no longer returns not_handled for an unknown event")


def _server_attributes() -> None:
    server = socketio_server()
    expect(server.not_handled is not None and isinstance(server.namespace_handlers, dict),
           "not_handled / namespace_handlers changed")
    for name in ("CLIENT_DISCONNECT", "SERVER_DISCONNECT", "TRANSPORT_CLOSE"):
        expect(isinstance(getattr(server.reason, name), str), f"socketio's reason has no {name}")
    expect(isinstance(server.eio.sockets, dict), "eio.sockets is no longer a dict")
    expect(server.manager.server is server, "the manager no longer knows its server")


async def _rooms_fwdm() -> None:
    """manager.rooms[namespace][room] is a bidict whose _fwdm maps sid -> eio_sid
    (fanout.local_emit), and whose len/bool/iteration give the sids (rooms.LocalRooms)."""
    bidict = mod("bidict")
    server = socketio_server()
    manager = server.manager
    sid = await manager.connect("E1", "/ns")
    await manager.enter_room(sid, "/ns", "room-1")
    bucket = manager.rooms.get("/ns", {}).get("room-1")
    expect(isinstance(bucket, bidict.bidict), f"a room is a {type(bucket).__name__}, not a bidict")
    expect(isinstance(bucket._fwdm, dict) and dict(bucket._fwdm.items()) == {sid: "E1"},
           "room._fwdm no longer maps sid -> eio_sid")
    expect(len(bucket) == 1 and bool(bucket) and list(bucket) == [sid], "a room no longer counts its sids")
    expect(manager.sid_from_eio_sid("E1", "/ns") == sid, "sid_from_eio_sid(eio_sid, namespace) changed")
    expect(manager.sid_from_eio_sid("E2", "/ns") is None, "sid_from_eio_sid no longer returns None")
    expect(manager.rooms.get("/missing") is None, "manager.rooms is no longer a dict of namespaces")


async def _manager_emit() -> None:
    """AsyncServer.emit calls manager.emit(event, data, namespace, room=...,
    skip_sid=..., callback=..., **more): LocalManager.emit must accept it."""
    socketio = mod("socketio")
    calls: list[tuple[Any, ...]] = []

    class Manager(socketio.AsyncManager):  # type: ignore[name-defined]
        async def emit(self, event: str, data: Any, namespace: str, room: Any = None,
                       skip_sid: Any = None, callback: Any = None, to: Any = None,
                       **kwargs: Any) -> None:
            calls.append((event, data, namespace, room, skip_sid, callback, to))

    server = socketio_server(client_manager=Manager())
    await server.emit("ev", {"a": 1}, to="room-1", namespace="/ns", skip_sid="s1")
    expect(calls == [("ev", {"a": 1}, "/ns", "room-1", "s1", None, None)],
           f"AsyncServer.emit called manager.emit as {calls!r}")


def _wire_format() -> None:
    """fanout encodes Socket.IO packets itself and jsonwire reads their header:
    both must agree with python-socketio's Packet."""
    sio_packet = mod("socketio.packet")
    fanout = mod("realtime.transport.fanout")
    jsonwire = mod("realtime.transport.jsonwire")
    for namespace in ("/", "/tracking"):
        data = ["position", {"lat": 31.2, "name": "上海", "n": None}]
        theirs = sio_packet.Packet(sio_packet.EVENT, data=data, namespace=namespace).encode()
        mine = fanout.encode_event(namespace, data[0], data[1:])
        expect(mine == theirs, f"an EVENT encodes as {theirs!r}; fanout writes {mine!r}")
        theirs = sio_packet.Packet(sio_packet.ACK, data=[{"ok": True}], namespace=namespace, id=12).encode()
        mine = fanout.encode_ack(namespace, 12, [{"ok": True}])
        expect(mine == theirs, f"an ACK encodes as {theirs!r}; fanout writes {mine!r}")
    for text in ('2["x",1]', '2/ns,5["x"]', '3/ns,7[1]', '0/ns?token=1,{"a":1}', '1/ns,', "0"):
        pkt = sio_packet.Packet(encoded_packet=text)
        head = jsonwire.split_packet(text)
        expect(head is not None and (head.kind, head.namespace, head.ack_id)
               == (pkt.packet_type, pkt.namespace, pkt.id),
               f"{text!r}: python-socketio reads {(pkt.packet_type, pkt.namespace, pkt.id)}, "
               f"jsonwire.split_packet {head}")


# -- socketio: the Redis manager ---------------------------------------------------
def recording_redis_manager() -> Any:
    base = redis_manager_class()

    class Manager(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__("redis://127.0.0.1:1/0", channel="contract")
            self.published: list[Any] = []
            self.emits: list[Any] = []
            self.callbacks: list[Any] = []
            self.feed: list[Any] = []

        async def _publish(self, data: Any) -> None:
            self.published.append(data)

        async def _listen(self) -> AsyncIterator[Any]:
            for message in self.feed:
                yield message

        async def _handle_emit(self, message: Any) -> None:
            self.emits.append(message)

        async def _handle_callback(self, message: Any) -> None:
            self.callbacks.append(message)

    manager = Manager()
    socketio_server(client_manager=manager)
    return manager


async def _publish() -> None:
    """emit hands this host's _handle_emit the message, then _publish(message)."""
    manager = recording_redis_manager()
    await manager.emit("ev", {"a": 1}, namespace="/ns", room="room-1")
    expect(len(manager.published) == 1 and manager.emits == manager.published,
           "AsyncPubSubManager.emit no longer calls _handle_emit(message) then _publish(message)")


async def _listen_thread() -> None:
    """_thread iterates _listen(), decodes what it yields (bytes) with
    manager.json, sends emits from other hosts to _handle_emit, skips this
    host's, and sends callbacks to _handle_callback whatever their host."""
    manager = recording_redis_manager()
    await manager.emit("ev", [1], namespace="/", room="r")
    own = manager.published[0]
    manager.emits.clear()
    other = dict(own, host_id="another-host")
    callback = {"method": "callback", "host_id": manager.host_id, "sid": "s", "namespace": "/",
                "id": 1, "args": []}
    manager.feed = [manager.json.dumps(m).encode() for m in (own, other, callback)]
    await manager._thread()  # ends when _listen ends
    expect([m["host_id"] for m in manager.emits] == ["another-host"],
           f"_thread handed _handle_emit {manager.emits!r}")
    expect(manager.callbacks == [callback], "_thread no longer hands callbacks to _handle_callback")


async def _handle_emit() -> None:
    """The message our _handle_emit reads (and cluster._signal imitates)."""
    manager = recording_redis_manager()
    await manager.emit("ev", ("a", 2), namespace="/ns", room="room-1", skip_sid="s1")
    message = manager.published[0]
    want = {"method", "event", "data", "binary", "namespace", "room", "skip_sid", "callback", "host_id"}
    expect(set(message) == want, f"an emit is published as {sorted(message)}")
    expect(message["method"] == "emit" and message["data"] == ["a", 2] and message["room"] == "room-1"
           and message["skip_sid"] == "s1" and message["binary"] is False and message["callback"] is None,
           f"an emit is published as {message!r}")


async def _redis_connect() -> None:
    """Stock _redis_connect sets redis, pubsub and connected (ours does the
    same); redis_url and channel are where the constructor left them."""
    manager = redis_manager()
    expect((manager.redis_url, manager.channel) == ("redis://127.0.0.1:1/0", "contract"),
           "redis_url / channel changed")
    expect((manager.redis, manager.pubsub, manager.connected) == (None, None, False),
           "a new manager's redis / pubsub / connected changed")
    manager._redis_connect()  # builds clients; connects nothing
    try:
        expect(manager.redis is not None and manager.pubsub is not None and manager.connected is True,
               "_redis_connect no longer sets redis, pubsub and connected")
    finally:
        await manager.pubsub.aclose()
        await manager.redis.aclose()


async def _thread_attribute() -> None:
    """initialize() starts _thread through server.start_background_task and
    keeps the task as `thread` (cluster.aclose cancels it)."""
    manager = recording_redis_manager()
    manager.initialize()
    task = manager.thread
    expect(isinstance(task, asyncio.Future), f"manager.thread is {task!r}, not the listener's task")
    await task  # _listen yields nothing: _thread ends


async def _own_message_bytes() -> None:
    """cluster._listen drops this host's messages before decoding them by
    finding b'"host_id": "<host_id>"' in the published JSON (unless it holds
    b'"method": "callback"'): the manager's json.dumps must write exactly that."""
    manager = recording_redis_manager()
    expect(re.fullmatch(r"[0-9a-f]{32}", manager.host_id), f"host_id is {manager.host_id!r}")
    await manager.emit("ev", {"host": "x"}, namespace="/", room="r")
    await manager._return_callback("another-host", "sid", "/", 3, "answer")
    emit, callback = manager.published
    raw = manager.json.dumps(emit).encode()
    expect(f'"host_id": "{manager.host_id}"'.encode() in raw,
           f"the manager publishes {raw!r}: cluster._listen would not recognise its own")
    expect(json.loads(raw) == emit, "manager.json does not round-trip")
    raw = manager.json.dumps(callback).encode()
    expect(b'"method": "callback"' in raw, f"a callback is published as {raw!r}")


async def _pubsub_message() -> None:
    """What pubsub.listen() yields: {'type', 'channel' (bytes), 'data' (bytes)}."""
    aioredis = mod("redis.asyncio")
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        message = await pubsub.handle_message([b"message", b"realtime", b"{}"])
        expect(message is not None and message["type"] == "message" and message["channel"] == b"realtime"
               and message["data"] == b"{}", f"a pub/sub message is {message!r}")
    finally:
        await pubsub.aclose()
        await client.aclose()


# -- the table ---------------------------------------------------------------------
WS = "aiohttp.web_ws:WebSocketResponse"
AS = "engineio.async_socket:AsyncSocket"
ES = "engineio:AsyncServer"
SS = "socketio:AsyncServer"
RM = "socketio:AsyncRedisManager"
DIRECT = "realtime.transport.wsdirect:DirectWebSocketResponse"
REALTIME = "realtime.transport.sio:RealtimeServer"
CLUSTER = "realtime.transport.cluster:ClusterManager"
LOCAL = "realtime.transport.fanout:LocalManager"


def our_engine_server() -> Any:
    return type(realtime_server().eio)


def our_websocket_driver() -> Any:
    return realtime_server().eio._async["websocket"]


HOOKS: list[Hook] = [
    # aiohttp
    Hook("aiohttp._websocket.reader.WebSocketReader", all_of(
        lambda: expect(params(resolve("aiohttp._websocket.reader_py:WebSocketReader.__init__"))
                       == ["self", "queue", "max_msg_size", "compress", "decode_text"],
                       "WebSocketReader(queue, max_msg_size, compress, decode_text) changed"),
        reader_delivers("aiohttp._websocket.reader", None))),
    Hook("aiohttp._websocket.reader.WebSocketDataQueue", all_of(
        signature_is("aiohttp._websocket.reader_py:WebSocketDataQueue.feed_data", "self", "data", "size"),
        signature_is("aiohttp._websocket.reader_py:WebSocketDataQueue.feed_eof", "self"),
        signature_is("aiohttp._websocket.reader_py:WebSocketDataQueue.set_exception",
                     "self", "exc", "exc_cause"),
        reader_delivers("aiohttp._websocket.reader", None))),
    Hook("aiohttp._websocket.reader_py.WebSocketDataQueue.__init__", all_of(
        signature_is("aiohttp._websocket.reader_py:WebSocketDataQueue.__init__",
                     "self", "protocol", "limit", "*", "loop"),
        reader_delivers("aiohttp._websocket.reader_py", True))),
    Hook("aiohttp.web_ws.DEFAULT_CHUNK_SIZE",
         lambda: expect(isinstance(resolve("aiohttp.web_ws:DEFAULT_CHUNK_SIZE"), int), "not an int")),
    Hook("aiohttp.web_ws.WebSocketResponse._post_start", all_of(
        overridden_as(f"{WS}._post_start", ours(f"{DIRECT}._post_start")),
        _websocket_response_state)),
    Hook("aiohttp.web_ws.WebSocketResponse.write_eof", all_of(
        overridden_as(f"{WS}.write_eof", ours(f"{DIRECT}.write_eof")), _websocket_response_eof)),
    Hook("aiohttp.web_ws.WebSocketResponse.close", all_of(
        overridden_as(f"{WS}.close", ours(f"{DIRECT}.close")), _websocket_response_close)),
    Hook("aiohttp.web_request.BaseRequest._loop", _base_request_loop),
    Hook("aiohttp.web_protocol.RequestHandler.set_parser", all_of(
        signature_is("aiohttp.web_protocol:RequestHandler.set_parser", "self", "parser", "data_received_cb"),
        signature_is("aiohttp.web_protocol:RequestHandler.keep_alive", "self", "val"),
        _request_handler_feeds_our_parser)),
    Hook("aiohttp.web_protocol.RequestHandler._manager", all_of(
        signature_is("aiohttp.web_server:Server.connection_lost", "self", "handler", "exc"),
        _request_handler_lets_go)),
    Hook("aiohttp.web_protocol.server_logger", _server_logger),
    Hook("no-clash:aiohttp.web_ws.WebSocketResponse", no_clash(
        ours(DIRECT), WS, lambda: resolve(WS)(),
        frozenset({"_post_start", "write_eof", "close", "_ws_protocol", "_writer", "_reader", "_parser",
                   "_eof_sent"}))),
    # engineio
    Hook("engineio.AsyncServer._async['websocket']", _websocket_driver_table),
    Hook("engineio.async_drivers.aiohttp.WebSocket", all_of(
        overridden_as("engineio.async_drivers.aiohttp:WebSocket.wait", lambda: our_websocket_driver().wait),
        overridden_as("engineio.async_drivers.aiohttp:WebSocket.__call__",
                      lambda: our_websocket_driver().__call__),
        _websocket_driver_class)),
    Hook("engineio.AsyncSocket.queue", _socket_queue),
    Hook("engineio.AsyncSocket._send_ping", _send_ping),
    Hook("engineio.AsyncSocket.check_ping_timeout", all_of(
        signature_is(f"{AS}.check_ping_timeout", "self"), _check_ping_timeout)),
    Hook("engineio.AsyncSocket.__class__", _socket_state),
    Hook("engineio.AsyncSocket.close", all_of(
        signature_is(f"{AS}.close", "self", "wait", "abort", "reason"),
        signature_is(f"{AS}.receive", "self", "pkt"))),
    Hook("engineio.AsyncServer.start_background_task",
         overridden_as(f"{ES}.start_background_task", lambda: our_engine_server().start_background_task)),
    Hook("engineio.AsyncServer.disconnect", all_of(
        overridden_as(f"{ES}.disconnect", lambda: our_engine_server().disconnect),
        signature_is(f"{ES}.send", "self", "sid", "data"))),
    Hook("engineio.AsyncServer._service_task", _service_task),
    Hook("engineio.packet.Packet.json", _packet_json),
    Hook("engineio.packet.Packet", _packet),
    Hook("engineio.exceptions", _exceptions),
    Hook("engineio.base_server.default_logger", _invalid_session_log),
    Hook("no-clash:engineio.AsyncServer", all_of(
        no_clash(our_engine_server, ES, engineio_server,
                 frozenset({"start_background_task", "disconnect"})),
        absent_on(engineio_server, ("hostile", "fast_message", "max_unsent_bytes"),
                  "engineio.AsyncServer"))),
    Hook("no-clash:engineio.AsyncSocket", absent_on(engineio_socket, ("link",), "engineio.AsyncSocket")),
    Hook("no-clash:engineio.async_drivers.aiohttp.WebSocket", no_clash(
        our_websocket_driver, "engineio.async_drivers.aiohttp:WebSocket",
        lambda: resolve("engineio.async_drivers.aiohttp:WebSocket")(None, None),
        frozenset({"wait", "_sock", "environ"}))),
    # socketio: the server
    Hook("socketio.AsyncServer._engineio_server_class", all_of(
        overridden_as(f"{SS}._engineio_server_class", ours(f"{REALTIME}._engineio_server_class")),
        _engineio_server_class)),
    Hook("socketio.AsyncServer._handle_eio_message", all_of(
        overridden_as(f"{SS}._handle_eio_message", ours(f"{REALTIME}._handle_eio_message")),
        _handle_eio_message)),
    Hook("socketio.AsyncServer._handle_eio_connect", all_of(
        overridden_as(f"{SS}._handle_eio_connect", ours(f"{REALTIME}._handle_eio_connect")),
        _handle_eio_connect)),
    Hook("socketio.AsyncServer._handle_eio_disconnect", all_of(
        overridden_as(f"{SS}._handle_eio_disconnect", ours(f"{REALTIME}._handle_eio_disconnect")),
        _handle_eio_disconnect)),
    Hook("socketio.AsyncServer._handle_disconnect", all_of(
        overridden_as(f"{SS}._handle_disconnect", ours(f"{REALTIME}._handle_disconnect")),
        _handle_eio_disconnect)),
    Hook("socketio.AsyncServer._handle_event_internal", all_of(
        overridden_as(f"{SS}._handle_event_internal", ours(f"{REALTIME}._handle_event_internal")),
        _handle_event_internal)),
    Hook("socketio.AsyncServer._trigger_event", all_of(
        signature_is(f"{SS}._trigger_event", "self", "event", "namespace", "*args"), _trigger_event)),
    Hook("socketio.AsyncServer._handle_event", all_of(
        signature_is(f"{SS}._handle_event", "self", "eio_sid", "namespace", "id", "data"),
        signature_is(f"{SS}._handle_ack", "self", "eio_sid", "namespace", "id", "data"),
        signature_is(f"{SS}._handle_connect", "self", "eio_sid", "namespace", "data"))),
    Hook("socketio.AsyncServer.not_handled", _server_attributes),
    Hook("socketio.AsyncManager.rooms._fwdm", all_of(
        signature_is("socketio:AsyncManager.sid_from_eio_sid", "self", "eio_sid", "namespace"),
        _rooms_fwdm)),
    Hook("socketio.AsyncManager.emit", all_of(
        overridden_as("socketio:AsyncManager.emit", ours(f"{LOCAL}.emit")), _manager_emit)),
    Hook("socketio.packet.Packet", _wire_format),
    Hook("no-clash:socketio.AsyncServer", no_clash(
        ours(REALTIME), SS, socketio_server,
        frozenset({"_engineio_server_class", "_handle_eio_message", "_handle_eio_connect",
                   "_handle_eio_disconnect", "_handle_disconnect", "_handle_event_internal"}))),
    Hook("no-clash:socketio.AsyncManager", no_clash(
        ours(LOCAL), "socketio:AsyncManager", lambda: resolve("socketio:AsyncManager")(),
        frozenset({"emit"}))),
    # socketio: the Redis manager
    Hook("socketio.AsyncRedisManager._publish", all_of(
        overridden_as(f"{RM}._publish", ours(f"{CLUSTER}._publish")), _publish)),
    Hook("socketio.AsyncRedisManager._listen", all_of(
        overridden_as(f"{RM}._listen", ours(f"{CLUSTER}._listen")), _listen_thread)),
    Hook("socketio.AsyncRedisManager._handle_emit", all_of(
        overridden_as(f"{RM}._handle_emit", ours(f"{CLUSTER}._handle_emit")), _handle_emit)),
    Hook("socketio.AsyncRedisManager._redis_connect", all_of(
        overridden_as(f"{RM}._redis_connect", ours(f"{CLUSTER}._redis_connect")), _redis_connect)),
    Hook("socketio.AsyncRedisManager._redis_listen_with_retries",
         overridden_as(f"{RM}._redis_listen_with_retries", ours(f"{CLUSTER}._redis_listen_with_retries"))),
    Hook("socketio.AsyncRedisManager.thread", _thread_attribute),
    Hook("socketio.AsyncRedisManager.host_id", _own_message_bytes),
    Hook("redis.asyncio.client.PubSub.listen", _pubsub_message),
    Hook("no-clash:socketio.AsyncRedisManager", no_clash(
        ours(CLUSTER), RM, redis_manager,
        frozenset({"name", "_publish", "_listen", "_handle_emit", "_redis_connect",
                   "_redis_listen_with_retries", "redis", "pubsub", "connected"}))),
]


@pytest.mark.parametrize("hook", HOOKS, ids=[h.name for h in HOOKS])
async def test_hook(hook: Hook) -> None:
    problem = await failure_of(hook)
    assert problem is None, problem


async def test_a_broken_hook_is_reported_by_name() -> None:
    """The checker can fail, and says which hook."""
    wrong = Hook("engineio.AsyncSocket.check_ping_timeout",
                 signature_is(f"{AS}.check_ping_timeout", "self", "deliberately_wrong"))
    problem = await failure_of(wrong)
    assert problem is not None
    assert problem.startswith("hook 'engineio.AsyncSocket.check_ping_timeout' broke:"), problem
    assert "deliberately_wrong" in problem
    gone = Hook("aiohttp.web_ws.DEFAULT_CHUNK_SIZE",
                lambda: expect(resolve("aiohttp.web_ws:NO_SUCH_NAME") is not None, "unreachable"))
    problem = await failure_of(gone)
    assert problem is not None and "'aiohttp.web_ws.DEFAULT_CHUNK_SIZE'" in problem, problem
    assert "NO_SUCH_NAME" in problem


def test_every_hook_is_in_the_readme_and_the_other_way_round() -> None:
    listed = set(re.findall(r"^\| `([^`]+)`", README.read_text(encoding="utf-8"), re.MULTILINE))
    checked = {h.name for h in HOOKS}
    assert len(checked) == len(HOOKS), "two hooks share a name"
    assert listed - checked == set(), f"listed in README.md but not checked here: {sorted(listed - checked)}"
    assert checked - listed == set(), f"checked here but not in README.md: {sorted(checked - listed)}"


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("package", PINNED)
def test_installed_version_is_the_locked_one(package: str) -> None:
    pins = locked_versions()
    assert package in pins, f"{package} is not pinned in requirements-test.lock"
    installed = metadata.version(package)
    assert installed == pins[package], (
        f"{package} {installed} is installed but requirements-test.lock pins {pins[package]}: "
        "the hooks were checked against the locked versions. Run ./scripts/upgrade to move the lock "
        "(it runs this contract test first), or scripts/setup --test to install what is locked.")
