"""GPS points: the filter every point passes (the per-technician rate limit
is kernel/rate.py's token buckets).

Filters follow Traccar's reference set where it applies to phones: invalid
fixes, future timestamps, out-of-order points (an old point never moves the
marker back), impossible jumps, poor accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from tracking.geo import haversine_m

# A phone clock may run a little ahead; more than this is a broken clock.
MAX_FUTURE_MS: Final = 30_000


@dataclass(frozen=True, slots=True)
class Point:
    """An accepted-shape point, already in WGS-84."""

    lat: float
    lng: float
    ts: int
    accuracy: float | None = None
    speed: float | None = None
    heading: float | None = None


# Refusals (the point is malformed), with the field and reason for `details`.
INVALID_REASONS = {
    "out_of_range": {"field": "lat/lng", "error": "must be finite, lat within ±90, lng within ±180"},
    "future": {"field": "ts", "error": f"more than {MAX_FUTURE_MS // 1000} s in the future"},
}


@dataclass(frozen=True, slots=True)
class FilterConfig:
    max_speed_mps: float = 70.0  # 252 km/h: no urban technician moves faster
    max_accuracy_m: float = 200.0


def check_point(p: Point, last: Point | None, cfg: FilterConfig, now_ms: int) -> str | None:
    """None when the point is accepted, else the reason it is not:
    `out_of_range` (non-finite or out of range) or `future` (both refused as
    invalid), or dropped: `stale`, `teleport`, `inaccurate`."""
    if not (math.isfinite(p.lat) and math.isfinite(p.lng)) or abs(p.lat) > 90 or abs(p.lng) > 180:
        return "out_of_range"
    if p.ts > now_ms + MAX_FUTURE_MS:
        return "future"
    if p.accuracy is not None and p.accuracy > cfg.max_accuracy_m:
        return "inaccurate"
    if last is not None:
        if p.ts <= last.ts:
            return "stale"
        dt = (p.ts - last.ts) / 1000.0
        if haversine_m(last.lat, last.lng, p.lat, p.lng) / dt > cfg.max_speed_mps:
            return "teleport"
    return None
