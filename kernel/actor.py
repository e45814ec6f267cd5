"""Who acts: a user from a verified token (id and role), or the server
itself (role ``system``: dispatch assigns, the geofence marks arrival)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Actor:
    id: str
    role: str  # customer | technician | agent | admin | service | system

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role}
