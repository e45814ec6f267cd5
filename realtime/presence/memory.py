"""Presence on one node: how many live connections each user has.

A user with two connections is online until both are gone. The Redis
backend (many nodes) keeps the same interface with TTL'd claims.
"""

from __future__ import annotations


class MemoryPresence:
    def __init__(self) -> None:
        self.local: dict[str, int] = {}

    async def connect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) + 1
        self.local[user_id] = n
        return n == 1

    async def disconnect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) - 1
        if n <= 0:
            self.local.pop(user_id, None)
            return True
        self.local[user_id] = n
        return False

    def here(self, user_id: str) -> bool:
        return user_id in self.local

    async def online(self, user_ids: list[str]) -> set[str]:
        return {u for u in user_ids if u in self.local}

    async def heartbeat(self) -> None:
        return None  # nothing expires in one process

    async def sweep(self) -> list[str]:
        return []  # a node cannot outlive itself

    async def count(self) -> int:
        return len(self.local)
