"""A real Redis Cluster for tests: 3 masters and 3 replicas, each a
`redis-server --cluster-enabled yes` on a loopback port, joined with
`redis-cli --cluster create`. A master can be killed (its replica is then
promoted) and started again on its port, where it rejoins as a replica."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import free_port, stop_process, wait_port

# Failover starts once a master has been unreachable this long (the
# cluster's node timeout); low here so a test sees it within seconds.
NODE_TIMEOUT_MS = 1000


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} is not installed; run ./scripts/test, which installs it")
    return exe


class RedisCluster:
    def __init__(self, masters: int = 3, replicas: int = 1, cpu: str | None = None) -> None:
        # `cpu`: pin every node to these CPUs (taskset), as the benchmark does.
        self.pin = ["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []
        self.dir = Path(tempfile.mkdtemp(prefix="rcluster-"))
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # The cluster bus's port is given: its default (port + 10000) may be
        # past 65535 for an ephemeral port.
        self.bus_ports = {p: free_port() for p in self.ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [_exe("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        self.wait_ok()

    @property
    def url(self) -> str:
        """What REDIS_URL says for a cluster (docs/scaling.md): any two nodes."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}"

    def start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [*self.pin, _exe("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_ports[port]),
             # A replica takes over however long ago it last heard its master
             # (default: not after 10 node timeouts, which a loaded test
             # machine's replica can exceed, and then no failover ever comes).
             "--cluster-replica-validity-factor", "0",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.procs[port], timeout=20)

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run([_exe("redis-cli"), "-p", str(port), *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def masters(self) -> list[int]:
        """Ports of the live masters, as the live nodes see them."""
        out = []
        for port in self.alive():
            role = self.cli(port, "role").split("\n", 1)[0].strip()
            if role == "master":
                out.append(port)
        return out

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        slot = int(self.cli(self.alive()[0], "cluster", "keyslot", key))
        for line in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no master serves slot {slot}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and agrees on 3 masters."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [self.cli(p, "cluster", "info") for p in self.alive()]
                if all("cluster_state:ok" in s for s in states):
                    return
                last = states[0]
            except subprocess.SubprocessError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"the Redis Cluster is not ok after {timeout}s: {last}")

    def kill(self, port: int) -> None:
        stop_process(self.procs[port], signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
