"""Latest position per technician: latest wins, an older fix never overwrites a newer one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tracking.geo import haversine_m


@dataclass(frozen=True, slots=True)
class Position:
    technician_id: str
    lat: float  # WGS-84
    lng: float
    ts: int
    name: str | None = None
    speed: float | None = None
    heading: float | None = None
    accuracy: float | None = None
    # The order the technician was serving at this fix, and its ETA then.
    order_id: str | None = None
    eta_s: int | None = None
    distance_m: int | None = None
    status: str = "available"  # available | busy (offline is presence's word)
    skills: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(**{**d, "skills": tuple(d.get("skills") or ())})

    def as_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies field by field (hot path).
        return {
            "technician_id": self.technician_id, "lat": self.lat, "lng": self.lng, "ts": self.ts,
            "name": self.name, "speed": self.speed, "heading": self.heading,
            "accuracy": self.accuracy, "order_id": self.order_id, "eta_s": self.eta_s,
            "distance_m": self.distance_m, "status": self.status, "skills": list(self.skills),
        }


    def as_row(self) -> list[Any]:
        """The fields in declaration order: the compact form that crosses
        between nodes (nodes of one version read each other's rows)."""
        return [self.technician_id, self.lat, self.lng, self.ts, self.name, self.speed,
                self.heading, self.accuracy, self.order_id, self.eta_s, self.distance_m,
                self.status, list(self.skills)]

    @classmethod
    def from_row(cls, row: list[Any]) -> Position:
        (tid, lat, lng, ts, name, speed, heading, accuracy, order_id, eta_s, distance_m, status,
         skills) = row
        return cls(tid, lat, lng, ts, name, speed, heading, accuracy, order_id, eta_s, distance_m,
                   status, tuple(skills))


class PositionStore(Protocol):
    async def get(self, technician_id: str) -> Position | None: ...

    def put(self, pos: Position) -> bool:
        """Store `pos` unless a fix with ts >= pos.ts is already known; False
        then. Never waits: a shared store writes behind (latest-wins there
        too, atomically)."""

    def forget(self, technician_id: str) -> None:
        """The technician left this node (its latest position stays)."""

    async def flush(self) -> None:
        """Wait until what was put is stored (a graceful stop)."""

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float,
                     max_lng: float, limit: int) -> list[Position]: ...

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        """Nearest first, within radius_m."""


class MemoryPositions:
    """One node's positions (the memory engine)."""

    def __init__(self) -> None:
        self._latest: dict[str, Position] = {}

    async def get(self, technician_id: str) -> Position | None:
        return self._latest.get(technician_id)

    def put(self, pos: Position) -> bool:
        old = self._latest.get(pos.technician_id)
        if old is not None and old.ts >= pos.ts:
            return False
        self._latest[pos.technician_id] = pos
        return True

    def forget(self, technician_id: str) -> None:
        pass  # the position itself is the state: areas and nearby search read it

    async def flush(self) -> None:
        pass

    async def in_box(self, min_lat: float, min_lng: float, max_lat: float,
                     max_lng: float, limit: int) -> list[Position]:
        out = []
        for p in self._latest.values():
            if min_lat <= p.lat <= max_lat and min_lng <= p.lng <= max_lng:
                out.append(p)
                if len(out) >= limit:
                    break
        return out

    async def near(self, lat: float, lng: float, radius_m: float, limit: int) -> list[Position]:
        found = [(haversine_m(lat, lng, p.lat, p.lng), p) for p in self._latest.values()]
        found = [x for x in found if x[0] <= radius_m]
        found.sort(key=lambda x: x[0])
        return [p for _, p in found[:limit]]
