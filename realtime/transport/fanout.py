"""Local delivery without a task per recipient.

python-socketio's manager encodes a broadcast once but then starts one
asyncio task per recipient, each awaiting a queue put (ANCHORS.md: a third
of the CPU under load). Here the packet is encoded once, and the same
websocket frame is written straight to every recipient's transport
(realtime/transport/wsdirect.py); a recipient whose send queue holds something (or a
long-polling one) gets the packet on that queue instead, so nothing
overtakes what is queued. Rooms with no local member cost a dictionary
look-up and nothing else (no encoding).
"""

from __future__ import annotations

from typing import Any

import socketio
from engineio import packet as eio_packet

from realtime.transport import jsonwire
from realtime.transport.wsdirect import text_frame

# One encoder for every packet: compact, ASCII-only, never NaN or Infinity.
_dumps = jsonwire.dumps


def encode_event(namespace: str, event: str, args: list[Any]) -> str:
    """A Socket.IO v5 EVENT packet, without python-socketio's per-packet scan
    for binary attachments (our protocol is JSON-only)."""
    prefix = "2" if namespace == "/" else f"2{namespace},"
    return prefix + _dumps([event, *args])


def encode_ack(namespace: str, ack_id: int, args: list[Any]) -> str:
    return ack_packet(namespace, ack_id, _dumps(args))


def ack_packet(namespace: str, ack_id: int, args_json: str) -> str:
    """A Socket.IO ACK packet whose arguments are already a JSON array."""
    prefix = "3" if namespace == "/" else f"3{namespace},"
    return f"{prefix}{ack_id}{args_json}"


def local_emit(manager: Any, event: str, data: Any, namespace: str,
               room: str | list[str] | None, skip_sid: Any = None) -> int:
    """Deliver to this node's members of `room` (a list means the union,
    each member once); returns how many sockets got it."""
    rooms = manager.rooms.get(namespace)
    if not rooms:
        return 0
    if isinstance(room, list | tuple):
        members: dict[str, str] = {}
        for r in room:
            bucket = rooms.get(r)
            if bucket:
                members.update(bucket._fwdm)
    else:
        bucket = rooms.get(room)
        if not bucket:
            return 0
        members = bucket._fwdm
    if not members:
        return 0
    if skip_sid is not None:
        skip = set(skip_sid) if isinstance(skip_sid, list | tuple | set) else {skip_sid}
    else:
        skip = set()
    args = list(data) if isinstance(data, tuple) else ([] if data is None else [data])
    text = "4" + encode_event(namespace, event, args)
    frame: bytes | None = None
    pkt: Any = None
    sockets = manager.server.eio.sockets
    sent = 0
    for sid, eio_sid in list(members.items()):
        if sid in skip:
            continue
        sock = sockets.get(eio_sid)
        if sock is None or sock.closed:
            continue
        link = getattr(sock, "link", None)
        if link is not None and sock.queue.empty():
            if frame is None:
                frame = text_frame(text)
            link.write(frame)
        else:
            if pkt is None:
                pkt = eio_packet.Packet(eio_packet.MESSAGE, text[1:])
            sock.queue.put_nowait(pkt)
        sent += 1
    return sent


def deliver(sock: Any, text: str) -> None:
    """One Socket.IO packet to one socket, directly when nothing is queued."""
    link = getattr(sock, "link", None)
    if link is not None and sock.queue.empty():
        link.write(text_frame("4" + text))
    else:
        sock.queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, text))


class LocalManager(socketio.AsyncManager):  # type: ignore[misc]
    """The memory engine's manager, with the task-free local delivery."""

    async def emit(self, event: str, data: Any, namespace: str, room: Any = None,
                   skip_sid: Any = None, callback: Any = None, to: Any = None,
                   **kwargs: Any) -> None:
        if callback is not None:
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                               callback=callback, to=to, **kwargs)
            return
        local_emit(self, event, data, namespace, to or room, skip_sid)
