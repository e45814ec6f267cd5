"""Local delivery without a task per recipient.

python-socketio's manager encodes a broadcast once but then starts one
asyncio task per recipient, each awaiting a queue put (ANCHORS.md: a third
of the CPU under load). Here the packet is encoded once and put straight on
each recipient's Engine.IO send queue; the socket's own writer task sends
it, in order with everything else queued for that socket. Rooms with no
local member cost a dictionary look-up and nothing else (no encoding).
"""

from __future__ import annotations

import json
from typing import Any

import socketio
from engineio import packet as eio_packet

# One encoder for every packet (json.dumps with arguments builds a new
# encoder per call); compact and ASCII-only, as python-socketio encodes.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def encode_event(namespace: str, event: str, args: list[Any]) -> str:
    """A Socket.IO v5 EVENT packet, without python-socketio's per-packet scan
    for binary attachments (our protocol is JSON-only)."""
    prefix = "2" if namespace == "/" else f"2{namespace},"
    return prefix + _dumps([event, *args])


def encode_ack(namespace: str, ack_id: int, args: list[Any]) -> str:
    prefix = "3" if namespace == "/" else f"3{namespace},"
    return f"{prefix}{ack_id}{_dumps(args)}"


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
    pkt = eio_packet.Packet(eio_packet.MESSAGE, encode_event(namespace, event, args))
    sockets = manager.server.eio.sockets
    sent = 0
    for sid, eio_sid in list(members.items()):
        if sid in skip:
            continue
        sock = sockets.get(eio_sid)
        if sock is None or sock.closed:
            continue
        sock.queue.put_nowait(pkt)
        sent += 1
    return sent


def has_local_members(manager: Any, namespace: str, room: str) -> bool:
    rooms = manager.rooms.get(namespace)
    return bool(rooms and rooms.get(room))


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
