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
the traceback names the library module; its rows in the README follow.)"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

import pytest

from tests.transport.contract import (
    LOCK,
    PINNED,
    README,
    Hook,
    absent_on,
    all_of,
    engineio_server,
    engineio_socket,
    expect,
    failure_of,
    no_clash,
    ours,
    overridden_as,
    params,
    realtime_server,
    redis_manager,
    resolve,
    signature_is,
    socketio_server,
)
from tests.transport.contract_aiohttp import (
    _base_request_loop,
    _request_handler_feeds_our_parser,
    _request_handler_lets_go,
    _server_logger,
    _websocket_response_close,
    _websocket_response_eof,
    _websocket_response_state,
    reader_delivers,
)
from tests.transport.contract_engineio import (
    _check_ping_timeout,
    _exceptions,
    _invalid_session_log,
    _packet,
    _packet_json,
    _send_ping,
    _service_task,
    _socket_queue,
    _socket_state,
    _websocket_driver_class,
    _websocket_driver_table,
)
from tests.transport.contract_socketio import (
    _engineio_server_class,
    _handle_eio_connect,
    _handle_eio_disconnect,
    _handle_eio_message,
    _handle_emit,
    _handle_event_internal,
    _listen_thread,
    _manager_emit,
    _own_message_bytes,
    _publish,
    _pubsub_message,
    _redis_connect,
    _rooms_fwdm,
    _server_attributes,
    _thread_attribute,
    _trigger_event,
    _wire_format,
)

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
