"""Checks of the aiohttp internals the direct websocket path uses (realtime/transport/wsdirect.py)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from tests.transport.contract import (
    expect,
    mod,
    resolve,
)

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
