"""Who acts: a user from a verified token (id and role), or the server
itself (role ``system``: dispatch assigns, the geofence marks arrival)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class ActorRef(TypedDict):
    """An actor on the wire and in stored events."""

    id: str
    role: str


@dataclass(frozen=True, slots=True)
class Actor:
    id: str
    role: str  # customer | technician | agent | admin | service | system

    def as_dict(self) -> ActorRef:
        return {"id": self.id, "role": self.role}
