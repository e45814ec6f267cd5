"""Who is online on which node: technicians and agents, memory and Redis backends."""

from __future__ import annotations

from typing import Protocol


class Presence(Protocol):
    async def connect(self, user_id: str) -> bool:
        """Count a local connection; True when the user just came online."""

    async def disconnect(self, user_id: str) -> bool:
        """Uncount a local connection; True when the user is now offline everywhere."""

    async def online(self, user_ids: list[str]) -> set[str]: ...

    def here(self, user_id: str) -> bool:
        """Whether the user has a live connection on this node."""

    async def heartbeat(self) -> None: ...

    async def sweep(self) -> list[str]:
        """Users whose claims lapsed because their node died (each reported once)."""

    async def count(self) -> int: ...
