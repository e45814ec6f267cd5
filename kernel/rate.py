"""Token buckets in this process, per key: the rate limits every domain
shares (a technician's GPS stream, chat sends; the HTTP edge's per-client
limits). Redis-shared buckets are storage/redis/rate_limits.py."""

from __future__ import annotations

import math
import time


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
