"""Presence on one node: how many live connections each user has.

A user with two connections is online until both are gone. The Redis
backend (many nodes) keeps the same interface with TTL'd keys.
"""

from __future__ import annotations


class MemoryPresence:
    def __init__(self) -> None:
        self._conns: dict[str, int] = {}

    async def connect(self, user_id: str) -> bool:
        """Count a connection; True when it is the user's first."""
        n = self._conns.get(user_id, 0) + 1
        self._conns[user_id] = n
        return n == 1

    async def disconnect(self, user_id: str) -> bool:
        """Uncount a connection; True when it was the user's last."""
        n = self._conns.get(user_id, 0) - 1
        if n <= 0:
            self._conns.pop(user_id, None)
            return True
        self._conns[user_id] = n
        return False

    async def online(self, user_ids: list[str]) -> set[str]:
        return {u for u in user_ids if u in self._conns}

    def count(self) -> int:
        return len(self._conns)
