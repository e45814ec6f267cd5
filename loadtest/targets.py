"""Servers under test, started pinned to one core: ours (memory or Redis
engine, one or more nodes), the Node.js socket.io reference peer (memory or
Redis adapter), and the raw aiohttp ceiling."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.cpuquota import CpuQuota
from tests.redis_cluster import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789abcdef-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Services:
    """The shared backing services: one Redis and one SecantusDB, on core 1."""

    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rt-bench-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_port: int = 0
    mongo_port: int = 0
    # Orders created on this store, by number of technicians (bench.orders_for).
    orders: dict[int, list[tuple[str, str, str]]] = field(default_factory=dict)
    # A Redis Cluster (3 masters, no replicas, on core 1), started when a
    # target first needs it.
    cluster: RedisCluster | None = None

    def cluster_url(self) -> str:
        if self.cluster is None:
            self.cluster = RedisCluster(replicas=0, cpu="1")
        return self.cluster.url

    def redis_cpu(self, target: Target) -> list[float]:
        """CPU seconds so far of each Redis process the target uses."""
        if not target.redis:
            return []
        if target.cluster:
            assert self.cluster is not None
            return [cpu_seconds(self.cluster.procs[p].pid) for p in self.cluster.ports]
        return [cpu_seconds(self.procs[0].pid)]

    def start(self) -> Services:
        self.redis_port, self.mongo_port = free_port(), free_port()
        self.procs.append(subprocess.Popen(
            [*pin("1"), "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        # No TTL sweeper: every 60 s it walks every collection in Python, on
        # the generator's core, and the trails of a run grow into the hundreds
        # of thousands (no trail expires within a benchmark; a real MongoDB's
        # TTL monitor uses the index). Its bursts starved the generator.
        config = self.tmp / "secantusd.toml"
        config.write_text("[storage]\nttl_sweep_seconds = 0\n")
        self.procs.append(subprocess.Popen(
            [*pin("1"), str(Path(sys.executable).parent / "secantusd-py"), "--config", str(config),
             "--host", "127.0.0.1", "--port", str(self.mongo_port), "--storage-path", ":memory:",
             "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in (self.redis_port, self.mongo_port):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
        return self

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/?directConnection=true"

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def fresh(self) -> Services:
        """An empty Redis and store from here on."""
        self.stop()
        self.procs.clear()
        self.orders.clear()
        self.tmp = Path(tempfile.mkdtemp(prefix="rt-bench-"))
        return self.start()


@dataclass
class Target:
    name: str  # ours-memory | ours-redis | node-memory | node-redis | raw
    kind: str  # ours | node | raw
    nodes: int = 1
    redis: bool = False
    cluster: bool = False  # on the Redis Cluster (REDIS_URL redis+cluster://)
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    quota: CpuQuota | None = None  # every server process under one CPU cap (--server-cpu)
    src: Path | None = None  # ours from another checkout (bench's BENCH_BEFORE)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self, services: Services, cpus: list[str]) -> Target:
        for i in range(self.nodes):
            port = free_port()
            self.ports.append(port)
            cpu = cpus[i % len(cpus)]
            if self.kind == "ours":
                env = {**os.environ, "REALTIME_JWT_SECRET": SECRET, "REALTIME_PORT": str(port),
                       "REALTIME_HOST": "127.0.0.1", "MONGO_URL": services.mongo_url,
                       "REALTIME_DATA_DIR": str(services.tmp), "REALTIME_LOG_LEVEL": "WARNING",
                       "REALTIME_LOCATION_RATE": "100", "REALTIME_LOCATION_BURST": "200",
                       # The generator opens thousands of sockets from one address;
                       # the per-address limits (docs/operations.md) are for attackers.
                       "REALTIME_HANDSHAKE_RATE": "0", "REALTIME_HTTP_IP_RATE": "0",
                       "REALTIME_REDIS_CHANNEL": f"bench{services.redis_port}",
                       # The relay is compared, and the Node peer stores nothing: with
                       # trails on, SecantusDB (~1,800 inserts/s of one core) took the
                       # generator's core from 2,000 points/s up and starved it.
                       "REALTIME_TRAILS": os.environ.get("BENCH_TRAILS", "false")}
                env.pop("REDIS_URL", None)
                if self.redis:
                    env["REDIS_URL"] = services.cluster_url() if self.cluster else services.redis_url
                cmd = [*pin(cpu), sys.executable, "-m", "realtime"]
                health = "/readyz"
            elif self.kind == "node":
                env = {**os.environ, "PORT": str(port), "JWT_SECRET": SECRET}
                env.pop("REDIS_URL", None)
                if self.cluster:  # socket.io's sharded adapter on the cluster's masters
                    services.cluster_url()
                    assert services.cluster is not None
                    env["REDIS_CLUSTER"] = ",".join(
                        f"redis://127.0.0.1:{p}" for p in services.cluster.ports)
                elif self.redis:
                    env["REDIS_URL"] = services.redis_url
                cmd = [*pin(cpu), "node", str(ROOT / "loadtest/peer/server.mjs")]
                health = "/healthz"
            else:
                env = dict(os.environ)
                cmd = [*pin(cpu), sys.executable, "-m", "loadtest.rawpeer", "--port", str(port)]
                health = "/healthz"
            log_dir = os.environ.get("BENCH_LOG_DIR")  # keep the servers' logs (debugging a run)
            err = (open(Path(log_dir) / f"{self.name}-{port}.log", "wb")
                   if log_dir else subprocess.DEVNULL)
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=self.src or ROOT,
                                               stdout=subprocess.DEVNULL,
                                               stderr=err))
            if not isinstance(err, int):
                err.close()  # the child has its own copy
            if self.quota is not None:
                self.quota.add(self.procs[-1].pid)
            wait_http(f"http://127.0.0.1:{port}{health}")
        return self

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()
        self.ports.clear()

    def rss_kb(self) -> int:
        return sum(rss_kb(p.pid) for p in self.procs)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def gc_max_ms(self) -> float | None:
        """Ours: the longest garbage-collection pause of any node (its /metrics)."""
        if self.kind != "ours":
            return None
        longest = 0.0
        for url in self.urls:
            with urllib.request.urlopen(f"{url}/metrics", timeout=120) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("realtime_gc_pause_max_seconds "):
                        longest = max(longest, float(line.split()[1]) * 1000)
        return round(longest, 1)

    def gc_buckets(self) -> dict[float, float]:
        """Ours: garbage-collection pauses so far, cumulative counts by upper
        bound in seconds (all nodes and generations together)."""
        counts: dict[float, float] = {}
        if self.kind != "ours":
            return counts
        for url in self.urls:
            with urllib.request.urlopen(f"{url}/metrics", timeout=120) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("realtime_gc_pause_seconds_bucket{"):
                        le = line.split('le="', 1)[1].split('"', 1)[0]
                        bound = float("inf") if le == "+Inf" else float(le)
                        counts[bound] = counts.get(bound, 0.0) + float(line.split()[-1])
        return counts


def gc_window(before: dict[float, float], after: dict[float, float],
              limit_s: float) -> dict[str, float | int | None]:
    """Pauses between two `gc_buckets` readings: how many exceeded `limit_s`,
    and the bucket bound the longest fell under."""
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(float("inf"), 0.0)
    over = total - diff.get(limit_s, 0.0)
    longest = next((b for b in sorted(diff) if diff[b] >= total), None) if total else None
    return {"pauses": int(total), "over_limit": int(over),
            "longest_under_ms": None if longest is None else longest * 1000}

