"""The Socket.IO server: python-socketio's AsyncServer, hardened at the packet edge.

- JSON only: binary packets (and the attachment frames behind them) are
  refused, closing the "announce many attachments" DoS; an event that asked
  for an ack gets an `invalid` reply.
- A malformed packet (bad JSON, an event whose first element is not a name)
  is dropped with a reply where possible, never an exception in the log.
- The websocket transport never negotiates permessage-deflate: it multiplies
  memory per connection and latency under load (measured in ANCHORS.md).
- A websocket session holds no task of its own beyond aiohttp's handler:
  its outbound queue writes at once and its pings wait on a timer.

The engine.io driver, packet dispatch, socket queue and ping task are
private API of python-socketio 5.x / python-engineio 4.x; the lock files
pin the versions, and tests/transport/test_contract.py fails, naming the
hook, if an upgrade moves one (realtime/transport/README.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import engineio
import socketio
from aiohttp.web import WebSocketResponse
from engineio import packet as eio_packet
from engineio.async_drivers import aiohttp as eio_aiohttp
from engineio.async_socket import AsyncSocket
from socketio import packet

from realtime.transport import jsonwire
from realtime.transport.fanout import ack_packet, deliver, encode_ack
from realtime.transport.hostile import Hostile
from realtime.transport.wsdirect import (
    CLIENT_EIO_TYPES,
    MAX_BUFFERED,
    DirectLink,
    DirectWebSocketResponse,
    LinkClock,
    ReadBatch,
)

log = logging.getLogger(__name__)

# How long a server-ended long-polling session waits for the client's next
# GET to take its CLOSE packet (a live client polls again at once).
POLL_CLOSE_WAIT_S = 5.0

# Names the Socket.IO protocol reserves for the server's own lifecycle
# events; a client emitting one must not reach the connect/disconnect logic.
RESERVED_EVENTS = frozenset({
    "connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener",
})


class _PlainWebSocket(eio_aiohttp.WebSocket):  # type: ignore[misc]
    """engine.io's aiohttp websocket without permessage-deflate, and deaf to
    frames that are not Engine.IO packets (python-engineio decodes them
    outside its error handling and logs a traceback per garbage frame)."""

    async def wait(self) -> Any:
        while True:
            data = await super().wait()
            if isinstance(data, bytes) or (data and data[0] in CLIENT_EIO_TYPES):
                return data
            self.server.hostile.report("junk_frame")

    async def __call__(self, environ: dict[str, Any]) -> WebSocketResponse:
        request = environ["aiohttp.request"]
        server = self.server
        sock = getattr(self.handler, "__self__", None)
        if sock is not None and not sock.connected:
            # A websocket-only session: frames handled where they are parsed.
            direct = DirectWebSocketResponse(
                timeout=server.ping_interval + server.ping_timeout,
                max_msg_size=server.max_http_buffer_size,
                max_unsent=getattr(server, "max_unsent_bytes", MAX_BUFFERED),
                clock=server.link_clock, batch=server.read_batch)
            await direct.prepare(request)
            compact_environ(environ)
            _open_direct(sock, direct.link)
            direct.detach(request)
            return direct
        # An upgrade from long-polling: the stock handshake, without deflate.
        ws: WebSocketResponse = WebSocketResponse(max_msg_size=server.max_http_buffer_size,
                                                  compress=False)
        self._sock = ws
        await ws.prepare(request)
        self.environ = environ
        await self.handler(self)
        return ws


# What a session's WSGI-style environ keeps once its websocket is open: what
# the namespaces' handshakes read (the query string, for refusing tokens in
# it; Host, for the origin check) and what identifies the client in logs.
# The rest (every header, copied under a new key) would be held by
# python-socketio for the life of the session.
ENVIRON_KEPT = ("QUERY_STRING", "PATH_INFO", "REQUEST_METHOD", "REMOTE_ADDR", "HTTP_HOST",
                "HTTP_ORIGIN", "HTTP_USER_AGENT", "HTTP_X_FORWARDED_FOR", "wsgi.url_scheme")


def compact_environ(environ: dict[str, Any]) -> None:
    """Shrink the environ in place (every holder sees the same dict): clear()
    gives its table back, and the few kept keys get a small one."""
    kept = {k: environ[k] for k in ENVIRON_KEPT if k in environ}
    environ.clear()
    environ.update(kept)


class _QuietInvalidSession(logging.Filter):
    """python-engineio logs a request for an ended session at ERROR; that is a
    client racing its own disconnect (a long-poll after close), not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid session")


def quiet_engineio_logs() -> None:
    logger = logging.getLogger("engineio.server")
    if not any(isinstance(f, _QuietInvalidSession) for f in logger.filters):
        logger.addFilter(_QuietInvalidSession())


def _open_direct(sock: Any, link: DirectLink) -> None:
    """Serve a websocket-only Engine.IO session through its link
    (realtime/transport/wsdirect.py): inbound frames are handled as they are parsed,
    and what python-engineio sends (pings, replies of the slower handlers) is
    written as it is queued. Nothing waits for the session: its end runs
    from the link's `done`."""
    link.sock = sock
    sock.__class__ = _DirectSocket
    link.fast = sock.server.fast_message
    queued, sock.queue = sock.queue, _DirectQueue(link)
    while not queued.empty():  # what was queued before the switch (the open packet)
        pkt = queued.get_nowait()
        if pkt is not None:
            link.send(pkt.encode())
    sock.link = link
    link.pinger = _ping_now
    handle = sock.server.handshake_pings.pop(sock, None)
    if handle is not None and not handle.cancelled():
        # The first ping was timed before the link existed: the link's timer takes it.
        handle.cancel()
        link.ping_after(max(0.0, handle.when() - asyncio.get_running_loop().time()))
    sock.connected = True
    sock.upgraded = True
    link.done.add_done_callback(lambda _: _direct_ended(sock, link))


class _DirectSocket(AsyncSocket):  # type: ignore[misc]
    """An Engine.IO socket served by a DirectLink. python-engineio ends a
    session whose pong is late by ping_timeout (on every send, and in its
    service task); while the link holds unread messages the pong is waiting
    behind them, on the server's side: the client is not late, the server is.
    The deadline then restarts from now (issue 14: a pipelining client lost
    2,715 acks to this)."""

    async def check_ping_timeout(self) -> bool:
        link = getattr(self, "link", None)
        if link is not None and link.unread and getattr(self, "last_ping", None):
            self.last_ping: float = time.time()
        return bool(await super().check_ping_timeout())


def _direct_ended(sock: Any, link: DirectLink) -> None:
    sock.link = None
    link.end()
    task = asyncio.ensure_future(sock.close(wait=False, abort=True,
                                            reason=sock.server.reason.TRANSPORT_CLOSE))
    ending = sock.server.ending
    ending.add(task)
    task.add_done_callback(ending.discard)


class _DirectQueue:
    """Stands in for an Engine.IO socket's outbound queue when a DirectLink
    serves it: a packet is written the moment python-engineio queues it, so
    a session needs no writer task and no asyncio.Queue (four deques)."""

    __slots__ = ("link",)

    def __init__(self, link: Any) -> None:
        self.link = link

    def put_nowait(self, pkt: Any) -> None:
        if pkt is None:  # python-engineio's "stop the writer"
            return
        self.link.send(pkt.encode())
        if pkt.packet_type == eio_packet.CLOSE:  # the server ended the session
            self.link.end()

    async def put(self, pkt: Any) -> None:
        self.put_nowait(pkt)

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def get_nowait(self) -> Any:
        raise asyncio.QueueEmpty

    async def get(self) -> Any:  # only long-polling reads the queue
        await self.link.done
        return None

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


def _ping_now(sock: Any) -> None:
    """python-engineio's ping, without a task asleep per socket in between."""
    sock.server.handshake_pings.pop(sock, None)
    if not sock.closing and not sock.closed:
        sock.last_ping = time.time()
        sock.queue.put_nowait(eio_packet.Packet(eio_packet.PING))


class _EngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """Engine.IO server whose sockets wait for their next ping on a timer
    rather than in a task of their own (a task, a coroutine and a sleep per
    connection: ~1.5 KB each): a websocket session's on the server's one
    LinkClock (realtime/transport/wsdirect.py), anything else (a handshake, long-polling)
    on a TimerHandle."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link_clock = LinkClock()  # every websocket session's pings and liveness
        self.read_batch = ReadBatch()  # the read being handled, of any session
        # Pings timed during a handshake, before a websocket session's link
        # exists (and for long-polling sessions); each entry goes when it
        # fires or moves.
        self.handshake_pings: dict[Any, asyncio.TimerHandle] = {}
        # Sessions whose end (python-engineio's close, the disconnect
        # handlers) is running.
        self.ending: set[asyncio.Task[Any]] = set()

    async def sessions_ended(self) -> None:
        """Wait until the ends of the websocket sessions under way (their
        disconnect handlers) are done: a graceful stop must not stop the
        services those handlers use before they finish. (aiohttp waits for its
        request handlers; a session's end is not one of them.)"""
        await asyncio.sleep(0)  # a link that just ended starts its end's task
        while self.ending:
            await asyncio.gather(*list(self.ending), return_exceptions=True)

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(target, "__func__", None) is AsyncSocket._send_ping and not args and not kwargs:
            sock = target.__self__
            link = getattr(sock, "link", None)
            if link is not None:  # a websocket session: its link's one timer
                link.ping_after(self.ping_interval)
                return None
            handle = asyncio.get_running_loop().call_later(self.ping_interval, _ping_now, sock)
            self.handshake_pings[sock] = handle
            return handle
        return super().start_background_task(target, *args, **kwargs)

    async def disconnect(self, sid: str | None = None) -> None:
        """End a session from the server. For a long-polling session
        python-engineio waits until the client's next GET takes the CLOSE
        packet, for ever if that GET never comes (a client gone, or one
        that gave up after its POST was refused): the caller, a refused
        POST's own request among them, would hang. The wait is bounded."""
        sock = self.sockets.get(sid) if sid is not None else None
        if sock is None or sock.upgraded:
            await super().disconnect(sid)
            return
        await sock.close(wait=False, reason=self.reason.SERVER_DISCONNECT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sock.queue.join(), POLL_CLOSE_WAIT_S)
        self.sockets.pop(sid, None)


# A reply dict, or the reply already as JSON text, or None (not handled here).
FastHandler = Callable[[str, dict[str, Any]], "Mapping[str, Any] | str | None"]


def refusal(code: str, message: str) -> socketio.exceptions.ConnectionRefusedError:
    """A handshake refusal whose `connect_error` data is {code, message}."""
    return socketio.exceptions.ConnectionRefusedError(message, {"code": code, "message": message})


class _EngineJson:
    """What python-engineio parses an Engine.IO message's text with before
    python-socketio sees it (it tries JSON on any message not starting with
    a digit, which no Socket.IO packet does): the strict, depth-bounded
    parser, so that `4` + 30,000 `[` ends in its "not JSON" branch, not in a
    RecursionError logged with a traceback (the long-polling POST path).
    python-engineio keeps this on its Packet class, for the process."""

    loads = staticmethod(jsonwire.loads)
    dumps = staticmethod(json.dumps)  # with python-engineio's own arguments


eio_packet.Packet.json = _EngineJson


# A session that has joined no namespace this long after its Engine.IO
# handshake is closed (REALTIME_JOIN_TIMEOUT_S). Real clients send their
# namespace CONNECT with the first frame after the open packet.
JOIN_TIMEOUT_S = 10.0


class RealtimeServer(socketio.AsyncServer):  # type: ignore[misc]
    def __init__(self, *, join_timeout_s: float = JOIN_TIMEOUT_S,
                 max_unsent_bytes: int = MAX_BUFFERED,
                 count_hostile: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        quiet_engineio_logs()
        self.join_timeout_s = join_timeout_s
        # eio sid -> the timer that closes the session if it joins no namespace
        self._join_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._closing_unjoined: set[asyncio.Task[Any]] = set()
        # Counted, rate-limited reports of junk from clients (realtime/transport/hostile.py),
        # shared with the engine.io layer and every websocket link.
        self.hostile = Hostile(count=count_hostile)
        self.eio.hostile = self.hostile
        # What one websocket may hold unsent before it is cut (a slow reader).
        self.eio.max_unsent_bytes = max_unsent_bytes
        self.eio._async = {**self.eio._async, "websocket": _PlainWebSocket}
        self.eio.fast_message = self.fast_message
        # namespace -> event -> synchronous handler (sid, payload) -> reply,
        # or None when this message needs the regular (async) handler.
        self.fast_handlers: dict[str, dict[str, FastHandler]] = {}
        # Work gathered until the end of the socket read being handled (one
        # step per key for a backlog read at once): wsdirect.ReadBatch.
        self.gather = self.eio.read_batch.gather

    def on_fast(self, namespace: str, event: str, handler: FastHandler) -> None:
        """Serve `event` of `namespace` where its frame is parsed (no task):
        the handler answers at once, or returns None for the regular path."""
        self.fast_handlers.setdefault(namespace, {})[event] = handler

    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return _EngineServer

    def fast_message(self, sock: Any, data: str) -> bool:
        """Handle a Socket.IO EVENT packet inside the frame parser's call when
        its namespace has a synchronous handler for it (wsdirect.py). False:
        the packet goes the regular way (which also gives every error reply,
        so nothing is lost by declining)."""
        if data[:1] != "2":
            return False
        if data[1:2] == "/":
            comma = data.find(",", 1)
            if comma < 0:
                return False
            namespace, i = data[1:comma], comma + 1
        else:
            namespace, i = "/", 1
        handlers = self.fast_handlers.get(namespace)
        if handlers is None:
            return False
        j = i
        n = len(data)
        while j < n and j - i <= jsonwire.MAX_ACK_DIGITS and "0" <= data[j] <= "9":
            j += 1
        if not data.startswith('["', j):
            return False
        end = data.find('"', j + 2)
        handler = handlers.get(data[j + 2:end])
        if handler is None:
            return False
        try:
            # The handler checks every value (and declines what it does not
            # accept, which the regular path then parses strictly).
            args = jsonwire.loads_checked_later(data[j:])
        except ValueError:  # refused or malformed: the regular path replies `invalid`
            return False
        if len(args) != 2 or not isinstance(args[1], dict):
            return False
        sid = self.manager.sid_from_eio_sid(sock.sid, namespace)
        if sid is None:
            return False
        reply = handler(sid, args[1])
        if reply is None:
            return False
        if j > i:
            ack_id = int(data[i:j])
            if isinstance(reply, str):
                deliver(sock, ack_packet(namespace, ack_id, f"[{reply}]"))
            else:
                deliver(sock, encode_ack(namespace, ack_id, [reply]))
        return True

    async def _handle_event_internal(self, server: Any, sid: str, eio_sid: str, data: Any,
                                     namespace: str, id: Any) -> None:
        """As python-socketio's, with the ack encoded directly (no per-packet
        binary scan, one shared JSON encoder)."""
        r = await server._trigger_event(data[0], namespace, sid, *data[1:])
        if r is self.not_handled or id is None:
            return
        args = [] if r is None else list(r) if isinstance(r, tuple) else [r]
        await self.eio.send(eio_sid, encode_ack(namespace or "/", id, args))

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        self._arm_join_deadline(eio_sid)

    def _arm_join_deadline(self, eio_sid: str) -> None:
        if eio_sid not in self._join_deadlines:
            self._join_deadlines[eio_sid] = asyncio.get_running_loop().call_later(
                self.join_timeout_s, self._join_deadline, eio_sid)

    async def _handle_disconnect(self, eio_sid: str, namespace: str | None,
                                 reason: Any = None) -> None:
        """A client leaving its last namespace while keeping the session has
        the same deadline to join one again as a new session."""
        await super()._handle_disconnect(eio_sid, namespace, reason)
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None and not (sock.closing or sock.closed) and not self.joined_any(eio_sid):
            self._arm_join_deadline(eio_sid)

    def joined_any(self, eio_sid: str) -> bool:
        return any(self.manager.sid_from_eio_sid(eio_sid, ns) is not None
                   for ns in self.namespace_handlers)

    def _join_deadline(self, eio_sid: str) -> None:
        """A session that joined no namespace in time holds memory for
        nobody (2,000 of them stayed open past 70 s before): closed."""
        self._join_deadlines.pop(eio_sid, None)
        if eio_sid not in self.eio.sockets or self.joined_any(eio_sid):
            return
        self.hostile.report("no_namespace_joined")
        task = asyncio.ensure_future(self.eio.disconnect(eio_sid))
        self._closing_unjoined.add(task)
        task.add_done_callback(self._closing_unjoined.discard)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        handle = self._join_deadlines.pop(eio_sid, None)
        if handle is not None:
            handle.cancel()
        await super()._handle_eio_disconnect(eio_sid, reason)
        # python-engineio closes a polling client that said goodbye without
        # answering its pending long-poll GET, which then hangs for
        # ping_interval + ping_timeout (and holds up a graceful stop): wake it
        # with an empty answer. Only then: when the server ends a session,
        # the CLOSE packet it queues next must be that GET's answer.
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None and not sock.upgraded and reason == self.reason.CLIENT_DISCONNECT:
            sock.queue.put_nowait(None)

    async def close_all(self) -> None:
        """Graceful stop: tell every client goodbye (a CLOSE packet, which also
        answers pending long-polls), then stop the background tasks."""
        for sock in list(self.eio.sockets.values()):
            try:
                await sock.close(wait=False)
            except Exception as exc:  # a broken socket must not stop the shutdown
                log.info("closing a socket at shutdown failed: %s", type(exc).__name__)
        await self.eio.sessions_ended()  # those whose client left just before
        for handle in self._join_deadlines.values():
            handle.cancel()
        self._join_deadlines.clear()
        if self._closing_unjoined:
            await asyncio.gather(*list(self._closing_unjoined), return_exceptions=True)
        await self.shutdown()

    async def _reply_error(self, eio_sid: str, namespace: str | None, ack_id: int | None,
                           code: str, message: str) -> None:
        """An error ack, when the packet carried an ack id and its namespace
        is one this client joined (nothing is sent to a namespace it did not)."""
        if ack_id is None or self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is None:
            return
        err = {"ok": False, "error": {"code": code, "message": message}}
        await self.eio.send(eio_sid, encode_ack(namespace or "/", ack_id, [err]))

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's, with the packet read here: the header with a
        bounded ack id, then the JSON through realtime/transport/jsonwire.py (depth,
        numbers, keys), so that a packet whose JSON is refused is still
        answered `invalid` on its ack id. Every drop is counted, never logged
        per packet (realtime/transport/hostile.py)."""
        if not isinstance(data, str):
            # A binary frame: an attachment of a packet we refused, or noise.
            return
        head = jsonwire.split_packet(data)
        if head is None:  # no type, or an ack id too long to be one: no reply possible
            self.hostile.report("malformed_packet")
            return
        kind, namespace, ack_id, body = head
        try:
            payload = jsonwire.loads(body) if body else None
        except ValueError as exc:
            self.hostile.report("malformed_packet")
            if kind in (packet.EVENT, packet.BINARY_EVENT):
                await self._reply_error(eio_sid, namespace, ack_id, "invalid", jsonwire.why(exc))
            return
        if kind == packet.EVENT:
            if not (isinstance(payload, list) and payload and isinstance(payload[0], str)):
                await self._reply_error(eio_sid, namespace, ack_id, "invalid", "an event needs a name")
                return
            if payload[0] in RESERVED_EVENTS:
                await self._reply_error(eio_sid, namespace, ack_id, "invalid",
                                        f"{payload[0][:64]!r} is a reserved event name")
                return
            await self._handle_event(eio_sid, namespace, ack_id, payload)
        elif kind == packet.ACK:
            await self._handle_ack(eio_sid, namespace, ack_id, payload)
        elif kind == packet.CONNECT:
            await self._handle_connect(eio_sid, namespace, payload)
        elif kind == packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == packet.BINARY_EVENT:
            await self._reply_error(eio_sid, namespace, ack_id, "invalid",
                                    "binary payloads are not accepted; send JSON")
        else:  # BINARY_ACK (refused: JSON only), or CONNECT_ERROR, which only servers send
            self.hostile.report("malformed_packet")
