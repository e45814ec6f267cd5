"""Which Redis REDIS_URL names, and a client for it: one Redis (the default,
`redis://` or `rediss://`), or a Redis Cluster (`redis+cluster://host:port`
or `rediss+cluster://`, any number of comma-separated seed nodes;
docs/scaling.md). The scheme says it, not a probe at start: a node that
took a cluster for one Redis (or the reverse) would fail in ways far from
the cause."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

# Either client: the commands the state classes use exist on both with the
# same shape (a cluster routes each by its key's slot).
AnyRedis: TypeAlias = aioredis.Redis | RedisCluster

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """`redis+cluster://[user:password@]host:port[,host:port...]`; a
    ValueError says what is wrong (settings validation shows it at start)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL: {parts.scheme}://")
    if parts.path not in ("", "/") and parts.path.strip("/") != "0":
        raise ValueError("a Redis Cluster has only database 0")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a cluster seed node must be host:port, not {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    return ClusterUrl(tuple(nodes), parts.scheme.lower().startswith("rediss"),
                      unquote(user) or None, unquote(password) or None)


def cluster_client(url: str, *, max_connections: int, timeout_s: float,
                   keepalive: bool = False) -> RedisCluster:
    """A cluster client: each master gets a pool of at most `max_connections`
    (past it a command fails at once, as a full pool of one Redis does after
    its wait); a dead master's slots are found again on its replica by the
    client's topology refresh."""
    c = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in c.nodes], username=c.username,
        password=c.password, ssl=c.tls, max_connections=max_connections,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        socket_keepalive=keepalive)


# redis-py's cluster client has no waiting pool: past its bound a command
# fails at once (MaxConnectionsError) where one Redis's pool would wait its
# turn. A burst of connects (each claims presence) then failed state calls
# in the benchmark; so each master's bound is this many times one Redis's.
CLUSTER_POOL_FACTOR = 4


def redis_client(url: str, *, max_connections: int, timeout_s: float) -> AnyRedis:
    """A client of what `url` names, with a bounded pool and short timeouts."""
    if is_cluster(url):
        return cluster_client(url, max_connections=max_connections * CLUSTER_POOL_FACTOR,
                              timeout_s=timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s)
    return aioredis.Redis(connection_pool=pool)
