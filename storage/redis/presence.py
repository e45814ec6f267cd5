"""Presence shared through Redis, with TTLs: a killed node's users go offline
by themselves within the TTL, and a user connected to two nodes is online
until both connections are gone."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from redis.exceptions import RedisError

from storage.redis.client import AnyRedis

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

    def __init__(self, redis: AnyRedis, kind: str, node_id: str, ttl_s: float,
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


class RedisUserSets:
    """Whether a user has a socket on any node, for every user (customers
    too): whoever has none gets notifications instead (outbox/relay.py).

    Cheaper than claims per user, as it must hold every connected user: each
    node keeps one Redis set of its users (an add on a user's first local
    socket, a remove on their last) and its own liveness in a sorted set of
    nodes scored by when it lapses, refreshed each heartbeat: one command
    per node per heartbeat, however many users. A killed node stops
    refreshing; its set is ignored once it lapses and deleted by a sweep.
    After a Redis restart the heartbeat writes the node's set again."""

    def __init__(self, redis: AnyRedis, node_id: str, ttl_s: float, prefix: str = "rt") -> None:
        self._r = redis
        self.node, self.ttl, self.prefix = node_id, ttl_s, prefix
        self.local: dict[str, int] = {}

    def _set(self, node: str) -> str:
        return f"{self.prefix}:users:{node}"

    @property
    def _nodes(self) -> str:
        return f"{self.prefix}:users:nodes"

    async def connect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) + 1
        self.local[user_id] = n
        if n == 1:
            try:
                async with self._r.pipeline(transaction=False) as pipe:
                    pipe.sadd(self._set(self.node), user_id)
                    pipe.expire(self._set(self.node), self._keep)
                    pipe.zadd(self._nodes, {self.node: time.time() + self.ttl})
                    await pipe.execute()
            except (RedisError, OSError):
                pass  # the next heartbeat writes the set again
        return n == 1

    async def disconnect(self, user_id: str) -> bool:
        n = self.local.get(user_id, 0) - 1
        if n > 0:
            self.local[user_id] = n
            return False
        self.local.pop(user_id, None)
        try:
            await self._r.srem(self._set(self.node), user_id)
        except (RedisError, OSError):
            pass
        return True

    def here(self, user_id: str) -> bool:
        return user_id in self.local

    async def _live_nodes(self) -> list[str]:
        return [_text(n) for n in await self._r.zrangebyscore(self._nodes, time.time(), "+inf")]

    async def online(self, user_ids: list[str]) -> set[str]:
        local = {u for u in user_ids if u in self.local}
        ask = [u for u in user_ids if u not in local]
        if not ask:
            return local
        try:
            nodes = [n for n in await self._live_nodes() if n != self.node]
            if not nodes:
                return local
            async with self._r.pipeline(transaction=False) as pipe:
                for n in nodes:
                    pipe.smismember(self._set(n), ask)
                answers = await pipe.execute()
        except (RedisError, OSError):
            return local
        found = set(local)
        for flags in answers:
            found.update(u for u, f in zip(ask, flags, strict=True) if f)
        return found

    @property
    def _keep(self) -> int:
        """The keys' TTL: a dead node's set goes by itself too."""
        return math.ceil(self.ttl * 3) + 5

    async def heartbeat(self) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zadd(self._nodes, {self.node: time.time() + self.ttl})
            pipe.expire(self._nodes, self._keep)
            pipe.expire(self._set(self.node), self._keep)
            pipe.scard(self._set(self.node))
            *_, size = await pipe.execute()
        if size != len(self.local):
            users = list(self.local)
            await self._r.delete(self._set(self.node))
            for i in range(0, len(users), 1000):
                await self._r.sadd(self._set(self.node), *users[i:i + 1000])
                await asyncio.sleep(0)
            await self._r.expire(self._set(self.node), self._keep)

    async def sweep(self) -> list[str]:
        for raw in await self._r.zrangebyscore(self._nodes, "-inf", time.time() - self.ttl):
            node = _text(raw)
            if await self._r.zrem(self._nodes, node):
                await self._r.delete(self._set(node))
        return []

    async def count(self) -> int:
        try:
            nodes = await self._live_nodes()
            async with self._r.pipeline(transaction=False) as pipe:
                for n in nodes:
                    pipe.scard(self._set(n))
                return int(sum(await pipe.execute()))
        except (RedisError, OSError):
            return len(self.local)
