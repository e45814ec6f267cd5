"""Presence shared through Redis, with TTLs: a killed node's users go offline
by themselves within the TTL, and a user connected to two nodes is online
until both connections are gone."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

HEARTBEAT_CHUNK = 100


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisPresence:
    """Per user a sorted set of nodes scored by when their claim expires.

    A node claims each local user on connect and refreshes the claims of all
    its users every ttl/3; on the user's last local disconnect it drops the
    claim. A killed node stops refreshing, so its claims lapse within the TTL.
    `rt:presence:{kind}` scores every user by their latest claim so a sweeper
    can announce who lapsed (exactly one node wins each ZREM).
    """

    def __init__(self, redis: aioredis.Redis, kind: str, node_id: str, ttl_s: float,
                 prefix: str = "rt") -> None:
        self._r = redis
        self.kind, self.node, self.ttl = kind, node_id, ttl_s
        self.prefix = prefix
        self.local: dict[str, int] = {}

    def _key(self, user_id: str) -> str:
        return f"{self.prefix}:presence:{self.kind}:{user_id}"

    @property
    def _all(self) -> str:
        return f"{self.prefix}:presence:{self.kind}"

    async def _claim(self, user_ids: list[str]) -> None:
        if not user_ids:
            return
        until = time.time() + self.ttl
        async with self._r.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.zadd(self._key(u), {self.node: until})
                pipe.expire(self._key(u), math.ceil(self.ttl) + 5)
                pipe.zadd(self._all, {u: until}, gt=True)
            await pipe.execute()

    async def connect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) + 1
        self.local[user_id] = n
        try:
            was_online = await self.online([user_id], local_too=False)
            await self._claim([user_id])
        except (RedisError, OSError):
            # Redis away: this node vouches for its own users; the next
            # heartbeat claims them in Redis again.
            return n == 1
        return not was_online

    async def disconnect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) - 1
        if n > 0:
            self.local[user_id] = n
            return False
        self.local.pop(user_id, None)
        try:
            await self._r.zrem(self._key(user_id), self.node)
            gone = not await self.online([user_id])
            if gone:
                await self._r.zrem(self._all, user_id)
        except (RedisError, OSError):
            return True  # as far as this node can tell; the claim lapses by its TTL
        return gone

    def here(self, user_id: str) -> bool:
        return user_id in self.local

    async def online(self, user_ids: list[str], local_too: bool = True) -> set[str]:
        if not user_ids:
            return set()
        local = {u for u in user_ids if u in self.local} if local_too else set()
        # This node's own users are online (it claims them): only the rest
        # need Redis (an area view of this node's technicians asks nothing).
        ask = [u for u in user_ids if u not in local]
        if not ask:
            return local
        now = time.time()
        try:
            if len(ask) == 1:
                claims = [await self._r.zcount(self._key(ask[0]), now, "+inf")]
            else:
                # Many at once (an area view's batch): one command. Every
                # user's latest claim is its score in the all-users set, kept
                # there until its last claim is dropped (Redis >= 6.2). It can
                # lag the per-user claims by one heartbeat (ttl/3) in two
                # races: a node dies after another node's later claim was
                # dropped, or a claim lands while another node drops its last.
                scores = await self._r.zmscore(self._all, ask)
                claims = [s is not None and s > now for s in scores]
        except (RedisError, OSError):
            return local
        return local | {u for u, c in zip(ask, claims, strict=True) if c}

    async def heartbeat(self) -> None:
        """Refresh every local claim, in small pipelines with a yield between
        them: one pipeline for thousands of users stalls the event loop for
        tens of milliseconds (measured as a p99 spike every TTL/3)."""
        users = list(self.local)
        for i in range(0, len(users), HEARTBEAT_CHUNK):
            await self._claim(users[i:i + HEARTBEAT_CHUNK])
            await asyncio.sleep(0)

    async def sweep(self) -> list[str]:
        """Users whose every claim lapsed (a node died): each reported once, cluster-wide."""
        now = time.time()
        lapsed = await self._r.zrangebyscore(self._all, "-inf", now)
        gone = []
        for raw in lapsed:
            u = _text(raw)
            if await self.online([u]):
                continue
            if await self._r.zrem(self._all, u):
                gone.append(u)
        return gone

    async def count(self) -> int:
        try:
            return int(await self._r.zcount(self._all, time.time(), "+inf"))
        except (RedisError, OSError):
            return len(self.local)

    def snapshot(self) -> dict[str, Any]:
        return {"node": self.node, "local_users": len(self.local)}
