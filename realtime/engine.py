"""The engine: memory (one node) or Redis (any number of nodes), chosen by
REDIS_URL. Both give the same pieces with the same interfaces, so the rest
of the server does not know which one runs."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio.cluster import RedisCluster

from chat.limits import LocalRateLimiter, SendLimits
from chat.routing import AgentDirectory, MemoryAgentDirectory, PumpLock, local_lock
from kernel.rate import MemoryRateLimiter
from realtime.presence import Presence
from realtime.presence.memory import MemoryPresence
from realtime.settings import Settings
from realtime.transport.bus import Bus
from realtime.transport.cluster import ClusterManager
from realtime.transport.fanout import LocalManager
from storage.redis.cells import ClusterPositions
from storage.redis.client import AnyRedis, redis_client
from storage.redis.directory import RedisAgentDirectory
from storage.redis.fallback import FallbackDirectory, FallbackPositions
from storage.redis.lock import redis_lock
from storage.redis.positions import RedisPositions
from storage.redis.presence import RedisPresence, RedisUserSets
from storage.redis.rate_limits import shared_limiter
from tracking.positions import MemoryPositions, PositionStore
from tracking.service import RateLimiter

# Shared-state calls are small and many; a bounded pool keeps a burst from
# opening thousands of connections, and the timeout turns a dead Redis into
# a prompt error instead of a hung handler.
STATE_POOL = 32
STATE_TIMEOUT_S = 2.0


@dataclass
class Engine:
    name: str
    node_id: str
    bus: Bus
    positions: PositionStore
    limiter: RateLimiter
    tech_presence: Presence
    agent_presence: Presence
    # Every user with a socket on any namespace: whoever has none gets
    # notifications instead (outbox/relay.py).
    user_presence: Presence
    directory: AgentDirectory
    pump_lock: PumpLock
    chat_limits: SendLimits
    manager: ClusterManager | LocalManager = field(default_factory=LocalManager)
    redis: AnyRedis | None = field(default=None, repr=False)

    async def close(self) -> None:
        await self.positions.flush()
        if isinstance(self.manager, ClusterManager):
            await self.manager.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def build_engine(settings: Settings, *,
                 on_link_restored: Callable[[], Awaitable[None]] | None = None,
                 on_bus_received: Callable[[str], None] | None = None) -> Engine:
    """The memory engine (no REDIS_URL: one node) or the Redis engine. The
    callbacks matter only with Redis: the cluster link came back after an
    outage; a bus signal arrived from another node."""
    node_id = uuid.uuid4().hex[:12]
    ttl = settings.presence_ttl_s
    # Every key starts with the channel name: deployments (or test runs)
    # sharing one Redis stay apart.
    prefix = settings.redis_channel
    if not settings.redis_url:
        return Engine(
            name="memory", node_id=node_id, bus=Bus(), positions=MemoryPositions(),
            limiter=MemoryRateLimiter(settings.location_rate, settings.location_burst),
            tech_presence=MemoryPresence(), agent_presence=MemoryPresence(),
            user_presence=MemoryPresence(),
            directory=MemoryAgentDirectory(), pump_lock=local_lock(),
            chat_limits=SendLimits(
                LocalRateLimiter(settings.chat_send_rate, settings.chat_send_burst),
                LocalRateLimiter(settings.chat_conversation_rate, settings.chat_conversation_burst)),
        )
    # One Redis, or a Redis Cluster (storage/redis/client.py): every key below
    # is one slot's, and positions split their GEO index into cells there.
    redis = redis_client(settings.redis_url, max_connections=STATE_POOL, timeout_s=STATE_TIMEOUT_S)
    positions = (ClusterPositions(redis, prefix) if isinstance(redis, RedisCluster)
                 else RedisPositions(redis, prefix))
    manager = ClusterManager(settings.redis_url, channel=settings.redis_channel,
                             on_link_restored=on_link_restored, on_bus_received=on_bus_received)
    return Engine(
        name="redis", node_id=node_id, bus=manager.bus, redis=redis, manager=manager,
        # While Redis is away each node keeps serving its own clients from
        # memory (storage/redis/fallback.py).
        positions=FallbackPositions(positions),
        # Rate limits stay per node: a technician's stream goes to the node
        # holding its socket (docs/tracking.md).
        limiter=MemoryRateLimiter(settings.location_rate, settings.location_burst),
        tech_presence=RedisPresence(redis, "technician", node_id, ttl, prefix),
        agent_presence=RedisPresence(redis, "agent", node_id, ttl, prefix),
        user_presence=RedisUserSets(redis, node_id, ttl, prefix),
        directory=FallbackDirectory(RedisAgentDirectory(redis, prefix)),
        pump_lock=redis_lock(redis, f"{prefix}:chat:pump"),
        # Chat limits are cluster-wide: one user's connections, and one
        # conversation's senders, are often on different nodes.
        chat_limits=SendLimits(
            shared_limiter(redis, f"{prefix}:rl:chat:user:", settings.chat_send_rate,
                           settings.chat_send_burst),
            shared_limiter(redis, f"{prefix}:rl:chat:conv:", settings.chat_conversation_rate,
                           settings.chat_conversation_burst)),
    )
