"""This node's side of a namespace's rooms, as the namespaces use them: who
is in a room here, and delivery to them with no task per emit
(fanout.local_emit). The namespaces go through this and never reach into
python-socketio's manager (`manager.rooms`, its bidicts) or a socket's link.

A room's members on other nodes are not here: a cross-node emit goes through
`AsyncNamespace.emit` (the manager publishes it) or a bus signal."""

from __future__ import annotations

from typing import Any

from realtime.transport.fanout import local_emit


class LocalRooms:
    __slots__ = ("_server", "namespace")

    def __init__(self, server: Any, namespace: str) -> None:
        self._server = server
        self.namespace = namespace

    def _room(self, room: str) -> Any:
        rooms = self._server.manager.rooms.get(self.namespace)
        return rooms.get(room) if rooms else None

    def count(self, room: str) -> int:
        """How many of this node's sockets are in `room`."""
        members = self._room(room)
        return len(members) if members else 0

    def has_members(self, room: str) -> bool:
        return bool(self._room(room))

    def sids(self, room: str) -> list[str]:
        """This node's sockets in `room` (a copy: safe to leave rooms while iterating)."""
        members = self._room(room)
        return list(members) if members else []

    def emit(self, event: str, data: Any, room: str | list[str]) -> int:
        """Deliver to this node's members of `room` only (a list: each member
        of the union once); how many sockets got it."""
        return local_emit(self._server.manager, event, data, self.namespace, room)
