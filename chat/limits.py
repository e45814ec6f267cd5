"""How fast chat messages may be sent: token buckets per user and per
conversation (docs/protocol.md, Support chat). The engine chooses where the
buckets live: this process (memory engine) or Redis, shared by every node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kernel.rate import MemoryRateLimiter


class Limiter(Protocol):
    async def take(self, key: str) -> int:
        """0 when `key` may go on (a token was spent), else milliseconds until it may."""


class LocalRateLimiter:
    """This process's buckets (the limiter of tracking's `location`), behind the
    async interface a shared limiter needs."""

    def __init__(self, rate: float, burst: float) -> None:
        self._buckets = MemoryRateLimiter(rate, burst)

    async def take(self, key: str) -> int:
        return self._buckets.take(key)


@dataclass(frozen=True, slots=True)
class SendLimits:
    # One person's sends, from all their connections together.
    per_user: Limiter
    # Everyone's sends into one conversation together (what its readers must take in).
    per_conversation: Limiter
