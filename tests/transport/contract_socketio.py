"""Checks of the python-socketio internals the transport uses: the server, the rooms, the Redis manager."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from tests.transport.contract import (
    QUIET,
    expect,
    mod,
    redis_manager,
    redis_manager_class,
    socketio_server,
)


# -- socketio: the server ---------------------------------------------------------
async def _engineio_server_class() -> None:
    """BaseServer.__init__ builds self.eio from _engineio_server_class(),
    passing the engine.io options on."""
    engineio: Any = mod("engineio")
    socketio: Any = mod("socketio")

    class Eio(engineio.AsyncServer):
        pass

    class Server(socketio.AsyncServer):
        def _engineio_server_class(self) -> type:
            return Eio

    server = Server(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET, ping_interval=7)
    expect(type(server.eio) is Eio, "self.eio is no longer built from _engineio_server_class()")
    expect(server.eio.ping_interval == 7, "engine.io options no longer reach its constructor")


def recording_server() -> Any:
    socketio: Any = mod("socketio")

    class Server(socketio.AsyncServer):
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
    socketio: Any = mod("socketio")
    calls: list[tuple[Any, ...]] = []

    class Manager(socketio.AsyncManager):
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
    base: type = redis_manager_class()

    class Manager(base):
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
