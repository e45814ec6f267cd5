"""Token buckets in Redis, shared by every node (chat send limits), with this
node's own buckets standing in while Redis is away."""

from __future__ import annotations

import time
from typing import Any, Final

from redis.exceptions import RedisError

from chat.limits import LocalRateLimiter
from storage.redis.client import AnyRedis
from storage.redis.fallback import _Degraded

# Once Redis fails, this node's buckets answer alone for this long before
# Redis is tried again: a Redis that hangs (rather than refuses) costs one
# send its timeout per interval, not every send.
RETRY_REDIS_S: Final = 1.0

# KEYS[1] = the bucket; ARGV = rate (tokens/s), burst. Returns 0 when a token
# was taken, else the milliseconds until one is free. Redis's own clock, so
# nodes whose clocks differ share one bucket fairly. A refusal writes nothing
# (the next call refills from the same stored point): a flood costs reads
# only. An absent key is a full bucket, so a key expires once it would be
# full again.
_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
if tokens < 1 then
  return math.max(1, math.ceil((1 - tokens) * 1000 / rate))
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return 0
"""


class RedisRateLimiter:
    """One bucket per key under `prefix` (the key is any string: Redis keys are
    binary-safe, and the prefix keeps kinds of keys apart)."""

    def __init__(self, redis: AnyRedis, prefix: str, rate: float, burst: float) -> None:
        self._take: Any = redis.register_script(_TAKE)
        self._prefix = prefix
        self._args = [repr(float(rate)), repr(float(burst))]

    async def take(self, key: str) -> int:
        return int(await self._take(keys=[self._prefix + key], args=self._args))


class SharedRateLimiter:
    """Redis when it answers, else this node's buckets: while Redis is away a
    limit holds per node instead of across the cluster, and sends go on."""

    def __init__(self, primary: RedisRateLimiter, local: LocalRateLimiter) -> None:
        self.primary = primary
        self.local = local
        self._d = _Degraded("rate limits")
        self._local_until = 0.0

    async def take(self, key: str) -> int:
        if time.monotonic() < self._local_until:
            return await self.local.take(key)
        try:
            return await self.primary.take(key)
        except (RedisError, OSError) as exc:
            self._d.note(exc)
            self._local_until = time.monotonic() + RETRY_REDIS_S
            return await self.local.take(key)


def shared_limiter(redis: AnyRedis, prefix: str, rate: float, burst: float) -> SharedRateLimiter:
    return SharedRateLimiter(RedisRateLimiter(redis, prefix, rate, burst), LocalRateLimiter(rate, burst))
