"""Websocket sessions without a task switch per frame.

aiohttp's WebSocketResponse parses frames in `data_received` and parks each
one on a queue for a reader task; python-engineio then starts a task per
message and a writer task drains a second queue per socket. Every inbound
GPS point thus costs several event-loop hand-offs before anything is sent.

Here aiohttp's own frame parser (its C reader) is kept, but the queue it
feeds is replaced by one that acts on each message where it is parsed:

- A Socket.IO event the server has a synchronous handler for (a technician's
  `location`) is parsed, handled, fanned out and acked inside the same
  `data_received` call, and every frame it produces is written straight to
  the recipients' transports, encoded once for all of them.
- Anything else runs as before: a task per message through python-engineio,
  with replies through the socket's queue and its writer task. A frame is
  written directly only while that queue is empty, so nothing overtakes what
  is queued.
- Everything one read of the socket produces is written per recipient in
  one go (corked: one syscall for a backlog's many acks), and work gathered
  per key (a technician's position fan-out, `gather`) runs once per read
  with every item of that key: a server that fell behind catches up in
  fewer, larger steps, and the fan-out can skip what a newer fix of the
  same read supersedes.
- A client that stops reading is dropped once MAX_BUFFERED bytes wait for it
  (it reconnects and replays what it missed), so memory stays bounded.
- Liveness: a session with no frame for ping_interval + ping_timeout ends
  (Engine.IO clients answer the server's pings, so a live one never idles).
- Once the handshake is answered the connection leaves aiohttp
  (`DirectWebSocketResponse.detach`): the transport's protocol becomes a
  `_LinkProtocol`, and aiohttp's request handler, its request and its two
  tasks are freed. An idle session is its link, its parser and its
  Engine.IO/Socket.IO state; nothing waits on it.

The hooks are aiohttp's `WebSocketResponse._post_start`, the reader's queue
class and the request handler's `transport`/`_manager`, and more
(realtime/transport/README.md lists them all); the lock files pin aiohttp,
and tests/transport/test_contract.py fails, naming the hook, if one moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from aiohttp import WebSocketError, WSCloseCode, WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.web import BaseRequest, WebSocketResponse
from aiohttp.web_ws import DEFAULT_CHUNK_SIZE  # type: ignore[attr-defined]  # the one web_ws gives its queue
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet

log = logging.getLogger(__name__)

T = TypeVar("T")

# A client that lets this much pile up unread is dropped (it reconnects and
# its streams replay); browsers and apps that read normally never come close.
# REALTIME_MAX_UNSENT_BYTES sets it.
MAX_BUFFERED: Final = 4 * 1024 * 1024
# Slow-path messages of one socket in flight before its reading pauses.
MAX_INFLIGHT: Final = 64
# How long a websocket this side closed keeps reading (and discarding) while
# the client answers the close frame, before the connection is dropped.
LINGER_S: Final = 2.0

# Engine.IO v4 packet types a client may send in a text frame: close, ping,
# pong, message, upgrade, noop.
CLIENT_EIO_TYPES: Final = frozenset("123456")

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_PING = WSMsgType.PING
_CLOSE = WSMsgType.CLOSE


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def text_frame(text: str) -> bytes:
    """One server-to-client text frame (unmasked, unfragmented)."""
    return _frame(0x1, text.encode())


# A fast handler: (socket, Engine.IO message payload) -> handled?
FastPath = Callable[[Any, str], bool]


class ReadBatch:
    """What the socket read being handled produced: corked links and
    gathered work. One per server (its links share it): reads do not nest."""

    __slots__ = ("active", "gathered", "links")

    def __init__(self) -> None:
        self.active = False
        self.links: list[DirectLink] = []
        # key -> (flush, the items gathered under it), in first-arrival order
        self.gathered: dict[Any, tuple[Callable[[list[Any]], None], list[Any]]] = {}

    def gather(self, key: Any, item: T, flush: Callable[[list[T]], None]) -> None:
        """Collect `item` under `key` until the end of the socket read being
        handled, then call `flush` once with every item gathered under that key,
        in arrival order; outside a read, flush([item]) now. A backlog read at
        once is thus handled in one step per key (e.g. per technician)."""
        if not self.active:
            flush([item])
            return
        entry = self.gathered.get(key)
        if entry is None:
            self.gathered[key] = (flush, [item])
        else:
            entry[1].append(item)


class _ChunkParser:
    """Wraps aiohttp's frame parser: one socket read is one chunk.

    It also enforces what aiohttp's reader does not on a server: every frame
    from a client is masked (RFC 6455 section 5.1; an unmasked one is a
    protocol error, close code 1002). The frames' boundaries are followed
    here from their headers alone (a few operations per frame; the payloads
    are never touched)."""

    __slots__ = ("_head", "_need", "link", "reader")

    def __init__(self, reader: Any, link: DirectLink) -> None:
        self.reader = reader
        self.link = link
        self._need = 0  # bytes of the current frame still to come
        self._head = b""  # a frame header split across reads

    def feed_eof(self) -> None:
        self.reader.feed_eof()

    def _all_masked(self, data: bytes) -> bool:
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        pos = self._need
        while pos < n:
            if n - pos < 2:
                self._head = data[pos:]
                self._need = 0
                return True
            second = data[pos + 1]
            if not second & 0x80:
                return False
            size = second & 0x7F
            header = 2 if size < 126 else 4 if size == 126 else 10
            if n - pos < header:
                self._head = data[pos:]
                self._need = 0
                return True
            if size == 126:
                size = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif size == 127:
                size = int.from_bytes(data[pos + 2:pos + 10], "big")
            pos += header + 4 + size
        self._need = pos - n
        return True

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.link.closed:  # closing: what the client still sends is discarded
            return False, b""
        if not self._all_masked(data):
            self.link.fail(WebSocketError(WSCloseCode.PROTOCOL_ERROR, "unmasked client frame"))
            return False, b""
        chunk = self.link.batch
        if chunk.active:  # not expected: reads do not nest
            return self.reader.feed_data(data)  # type: ignore[no-any-return]
        chunk.active = True
        try:
            return self.reader.feed_data(data)  # type: ignore[no-any-return]
        finally:
            try:
                while chunk.gathered:
                    gathered, chunk.gathered = chunk.gathered, {}
                    for flush, items in gathered.values():
                        try:
                            flush(items)
                        except Exception:
                            log.exception("deferred fan-out failed")
            finally:
                chunk.active = False
                links, chunk.links = chunk.links, []
                for link in links:
                    link.flush()


# The clock's resolution: pings and liveness checks are due in slots this long.
CLOCK_SLOT_S: Final = 0.25


class Timed(Protocol):
    """What the clock needs of a session (a DirectLink): its loop, the slot it
    waits in, and its duty."""

    loop: asyncio.AbstractEventLoop
    _slot: int

    def _tick(self) -> None: ...


class LinkClock:
    """One timer for every session of a server: each link's next duty (its
    liveness check, or the Engine.IO ping due next) sits in the slot of
    CLOCK_SLOT_S it falls in, and the clock wakes once per slot that holds
    any. A TimerHandle per session cost ~0.5 KB (tracemalloc)."""

    def __init__(self) -> None:
        self._slots: dict[int, set[Timed]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._handle_slot = 0

    def at(self, link: Timed, when: float) -> None:
        """`link._tick()` at `when` (time.monotonic()), or up to a slot later."""
        slot = math.ceil(when / CLOCK_SLOT_S)
        if link._slot == slot:
            return
        self.drop(link)
        link._slot = slot
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
        members.add(link)
        if self._handle is None or slot < self._handle_slot:
            self._schedule(link.loop, slot)

    def drop(self, link: Timed) -> None:
        members = self._slots.get(link._slot)
        if members is not None:
            members.discard(link)
            if not members:
                del self._slots[link._slot]
        link._slot = 0

    def _schedule(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_slot = slot
        delay = max(0.0, slot * CLOCK_SLOT_S - time.monotonic())
        self._handle = loop.call_later(delay, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now_slot = math.floor(time.monotonic() / CLOCK_SLOT_S)
        for slot in sorted(s for s in self._slots if s <= now_slot):
            for link in self._slots.pop(slot, ()):
                link._slot = 0
                try:
                    link._tick()
                except Exception:  # one session's failure must not stop the clock
                    log.exception("session timer failed")
        # The ticks above may have set the timer for their own next duty; an
        # earlier slot still waiting must not sleep until then.
        if self._slots:
            first = min(self._slots)
            if self._handle is None or first < self._handle_slot:
                self._schedule(loop, first)


class DirectLink:
    """One websocket session's transport, as the fan-out writes to it."""

    __slots__ = ("_backlog", "_inflight", "_lingering", "_out", "_paused", "_slot", "batch", "clock",
                 "closed", "done", "fast", "last_rx", "loop", "max_unsent", "ping_at", "pinger", "sock",
                 "timeout", "transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop, timeout: float,
                 batch: ReadBatch, max_unsent: int = MAX_BUFFERED,
                 clock: LinkClock | None = None) -> None:
        self.max_unsent = max_unsent
        # The server's: a link corks its writes while any of the server's
        # reads is being handled (reads do not nest).
        self.batch = batch
        self.transport: Any = transport
        self.loop = loop
        self.timeout = timeout
        self.sock: Any = None
        self.fast: FastPath | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self.last_rx = time.monotonic()
        self._inflight = 0
        # Slow-path messages parsed but not started (MAX_INFLIGHT run at once),
        # as their raw text: reading is paused meanwhile, so this holds at
        # most what one read of the socket brought.
        self._backlog: deque[str | bytes] | None = None
        self._paused = False
        self._lingering = False  # our close frame is sent; the connection is closing
        self._out: list[bytes] = []
        # The server's clock serves both the liveness check and the Engine.IO
        # ping that is due next (pinger(sock) sends it).
        self.ping_at = 0.0
        self.pinger: Callable[[Any], None] | None = None
        self._slot = 0
        self.clock = clock if clock is not None else LinkClock()
        self.clock.at(self, self.last_rx + timeout)

    # -- writing ---------------------------------------------------------
    def write(self, frame: bytes) -> None:
        batch = self.batch
        if batch.active:  # corked until the read being handled is done
            if not self._out:
                batch.links.append(self)
            self._out.append(frame)
            return
        self._write(frame)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, frame: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.max_unsent:
            self.report("stopped_reading")
            self.finish()
            transport.abort()
            return
        transport.write(frame)

    def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.write(text_frame(data))
        else:
            self.write(_frame(0x2, data))

    # -- reading ---------------------------------------------------------
    def on_message(self, msg: Any) -> None:
        """Called by aiohttp's frame parser, inside data_received."""
        self.last_rx = time.monotonic()
        kind = msg[0]
        if kind is _TEXT:
            data = msg[1]
            if not data or data[0] not in CLIENT_EIO_TYPES:
                self.report("junk_frame")
                return
            if data[0] == "4" and self.fast is not None and self.sock is not None:
                try:
                    if self.fast(self.sock, data[1:]):
                        return
                except Exception:  # never let one message break the connection
                    log.exception("fast path failed; handing the message to the event handlers")
            self._slow(data)
        elif kind is _BINARY:
            self._slow(msg[1])
        elif kind is _PING:
            self.write(_frame(0xA, msg[1]))
        elif kind is _CLOSE:
            # The closing handshake: echo the client's code (aiohttp's reader
            # has refused invalid ones), then close the connection.
            code = msg[1]
            self.end(code if isinstance(code, int) and code else WSCloseCode.OK)
        # PONG and anything else: nothing to do

    def _slow(self, data: str | bytes) -> None:
        """A message for python-engineio's handlers. At most MAX_INFLIGHT of
        one socket run at once; the rest of what the current read brought
        waits here as text (not as a task, a coroutine and its frames: ~14 KB
        each under load, measured), and the socket is not read again until
        the backlog is gone. A client that pipelines thousands of requests
        thus costs the server its own read buffer, and its messages take
        turns with everyone else's."""
        if self.sock is None or self.closed:
            return
        if self._inflight >= MAX_INFLIGHT:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append(data)
            self._pause()
            return
        self._start(data)

    def _start(self, data: str | bytes) -> None:
        self._inflight += 1
        if self._inflight >= MAX_INFLIGHT:
            self._pause()
        self.loop.create_task(self._receive(data))

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    @property
    def unread(self) -> bool:
        """Whether the server, not the client, is the reason nothing new was
        read lately: messages are waiting for their turn."""
        return self._paused or bool(self._backlog)

    async def _receive(self, data: str | bytes) -> None:
        try:
            await self.sock.receive(eio_packet.Packet(encoded_packet=data))
        except eio_exceptions.SocketIsClosedError:
            self.finish()
        except (ValueError, eio_exceptions.EngineIOError):  # the client's packet
            self.report("undecodable_packet")
        except Exception:  # our bug: logged, and the session goes on
            log.exception("handling a message failed")
        finally:
            self._done_one()

    def _done_one(self) -> None:
        self._inflight -= 1
        backlog = self._backlog
        if backlog and not self.closed:
            self._start(backlog.popleft())
            return
        self._backlog = None
        if self._paused and self._inflight <= MAX_INFLIGHT // 2:
            self._paused = False
            # The client was waiting on us: reading resumes where it paused.
            self.last_rx = time.monotonic()
            transport = self.transport
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.resume_reading()

    def report(self, kind: str) -> None:
        """Hostile input from this client: counted, logged at most once per
        interval per kind (realtime/transport/hostile.py)."""
        hostile = getattr(getattr(self.sock, "server", None), "hostile", None)
        if hostile is not None:
            hostile.report(kind)

    def fail(self, exc: BaseException) -> None:
        """The parser found a protocol violation (bad frame, too big, not
        masked): a close frame with its code (1009 too big, 1002 protocol
        error, 1007 bad UTF-8), then the connection is closed (RFC 6455 7.1.7)."""
        if self.closed:
            return
        code = getattr(exc, "code", WSCloseCode.PROTOCOL_ERROR)
        self.report("websocket_protocol_error")
        self.end(int(code) if isinstance(code, int) else int(WSCloseCode.PROTOCOL_ERROR))

    def end(self, code: int = WSCloseCode.OK) -> None:
        """Close the websocket from this side (RFC 6455 7.1): what is queued
        for it and a close frame, then our half of the TCP connection; what
        the client still sends is read and discarded until it closes its
        half, or for LINGER_S. (Closing at once with unread input makes the
        kernel send a reset, which can overtake the close frame: a client
        refused for an oversized frame would see a bare disconnect.)"""
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self._lingering:
            if transport.get_write_buffer_size() > self.max_unsent:
                # It stopped reading: no close frame would get through.
                self._out = []
                transport.abort()
            else:
                out, self._out = self._out, []
                out.append(_frame(0x8, int(code).to_bytes(2, "big")))
                transport.write(b"".join(out))
                self._linger(transport)
        self.finish()

    def _linger(self, transport: Any) -> None:
        self._lingering = True
        try:
            if transport.can_write_eof():
                transport.write_eof()
            if self._paused:
                transport.resume_reading()
        except Exception:  # a transport that cannot half-close just goes
            transport.abort()
            return
        # Then it goes, whatever is still unsent: a client that stopped reading
        # must not hold the connection (and its buffer) open by never taking it.
        self.loop.call_later(LINGER_S, transport.abort)

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.clock.drop(self)
        if not self.done.done():
            self.done.set_result(None)

    def ping_after(self, delay: float) -> None:
        """Send the next Engine.IO ping in `delay` seconds, on this link's timer."""
        if self.closed:
            return
        self.ping_at = time.monotonic() + delay
        self.clock.at(self, min(self.ping_at, self.last_rx + self.timeout))

    def _tick(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        if self.ping_at and now >= self.ping_at:
            self.ping_at = 0.0
            if self.pinger is not None and self.sock is not None:
                self.pinger(self.sock)
        if self.unread:  # the server is behind, not the client silent
            self.last_rx = now
        idle = now - self.last_rx
        if idle >= self.timeout:
            log.debug("websocket idle for %.0f s: closing", idle)
            self.end(WSCloseCode.GOING_AWAY)
            return
        due = self.last_rx + self.timeout
        if self.ping_at:
            due = min(due, self.ping_at)
        self.clock.at(self, due)


# aiohttp's compiled reader (the default) or its pure-Python fallback.
_COMPILED_QUEUE: Final = WebSocketDataQueue.__module__.endswith("_c")


class _Inbox(WebSocketDataQueue):
    """The parser's destination: hands each message to the link at once.

    With the compiled reader the base class's __init__ is skipped: it makes a
    deque (held by two bound methods) that nothing here reads, ~0.9 KB per
    session. The parser only reads the queue's size and limit (both zero,
    so it never stalls) and calls the three methods overridden below."""

    __slots__ = ("link",)

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop, link: DirectLink) -> None:
        if not _COMPILED_QUEUE:
            super().__init__(protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        self.link = link

    def feed_data(self, data: Any, size: int) -> None:
        self.link.on_message(data)

    def feed_eof(self) -> None:
        self.link.finish()

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        self.link.fail(exc)


class _LinkProtocol(asyncio.Protocol):
    """An upgraded connection's protocol once aiohttp has let go of it
    (DirectWebSocketResponse.detach): each read goes to the frame parser, and
    the connection's end to the link. Nothing else stays behind for an idle
    session: no request handler, no task, no copy of the handshake."""

    __slots__ = ("link", "parser")

    def __init__(self, link: DirectLink, parser: _ChunkParser) -> None:
        self.link = link
        self.parser = parser

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # the reader reports protocol errors itself; anything else ends it
            self.link.fail(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.link.transport = None
        self.parser.feed_eof()
        self.link.finish()


class DirectWebSocketResponse(WebSocketResponse):
    """A websocket response whose frames go to a DirectLink, not a queue."""

    link: DirectLink

    def __init__(self, *, timeout: float, max_msg_size: int, batch: ReadBatch,
                 max_unsent: int = MAX_BUFFERED, clock: LinkClock | None = None) -> None:
        super().__init__(max_msg_size=max_msg_size, compress=False, autoping=False)
        self._link_timeout = timeout
        self._max_unsent = max_unsent
        self._clock = clock
        self._batch = batch
        self._detached = False

    def _post_start(self, request: BaseRequest, protocol: str | None, writer: Any) -> None:
        self._ws_protocol = protocol
        self._writer = writer
        loop = request._loop
        self.link = DirectLink(request.protocol.transport, loop, self._link_timeout,
                               self._batch, self._max_unsent, self._clock)
        inbox = _Inbox(request.protocol, loop, self.link)
        self._reader = inbox
        self._parser = WebSocketReader(inbox, self._max_msg_size, compress=False, decode_text=True)
        self._chunks = _ChunkParser(self._parser, self.link)
        request.protocol.set_parser(self._chunks)  # type: ignore[arg-type]
        request.protocol.keep_alive(False)

    def detach(self, request: BaseRequest) -> None:
        """Take the connection from aiohttp once the handshake is written.

        The transport's protocol becomes a _LinkProtocol, and aiohttp's request
        handler is told the connection is gone: when the web handler returns,
        its two tasks end and the request, its headers and the handler object
        are freed (~6 KB per session) instead of being held until the socket
        closes. write_eof() then leaves the websocket open."""
        handler = request.protocol
        transport = handler.transport
        self._detached = True
        if transport is None or transport.is_closing():
            self.link.finish()
            return
        transport.set_protocol(_LinkProtocol(self.link, self._chunks))
        handler._payload_parser = None
        handler.transport = None  # its connection loop must not close what is now ours
        manager = handler._manager
        if manager is not None:
            manager.connection_lost(handler, None)

    async def write_eof(self) -> None:  # type: ignore[override]
        if self._detached:
            self._eof_sent = True
            return
        await super().write_eof()

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"",
                    drain: bool = True) -> bool:
        self.link.end(int(code))
        self._set_closed()
        return True
