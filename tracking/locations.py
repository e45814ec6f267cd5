"""GPS points: the filter every point passes, and the per-technician rate limit.

Filters follow Traccar's reference set where it applies to phones: invalid
fixes, future timestamps, out-of-order points (an old point never moves the
marker back), impossible jumps, poor accuracy.
"""

from __future__ import annotations

import math
import time
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


class TokenBucket:
    """rate tokens per second up to burst; one per message."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self, now: float | None = None) -> int:
        """0 when a token was taken, else milliseconds until one is free."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - self.tokens) / self.rate * 1000))


class MemoryRateLimiter:
    """Per-key token buckets in this process. Both engines use it: a
    technician's stream goes to the one node holding its socket, so the
    bucket lives there (docs/tracking.md)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str) -> int:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                # Full buckets carry no state worth keeping: forget them first.
                now = time.monotonic()
                for k in [k for k, b in self._buckets.items()
                          if b.tokens + (now - b.stamp) * b.rate >= b.burst]:
                    del self._buckets[k]
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take()
