"""A CPU cap for the servers under test: a cgroup whose processes may use
`share` of one core, handed out in short periods.

Why: on a fast machine a server's capacity outruns the generator (one core,
shared with Redis and the store), so a burst of 3x capacity cannot be
offered. Capping every server alike (ours, the Node peer, the raw ceiling)
to a third of its core is a machine a third as fast; the generator and the
services keep their own core, so the same burst now fits under its ceiling.
A short period (10 ms) keeps throttling from adding more latency than a
slower core would: work is cut into 10 ms slices, never held for 100 ms.

cgroup v1 (`/sys/fs/cgroup/cpu`) and v2 (`cpu.max`) are supported; without
either, or without the right to create a group, the run stops with a clear
message rather than measuring uncapped servers as capped ones.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 10_000
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")


class CpuQuota:
    def __init__(self, share: float, name: str = "loadtest-servers") -> None:
        if not 0.05 <= share <= 1.0:
            raise SystemExit(f"--server-cpu must be between 0.05 and 1 (a share of one core), not {share}")
        self.share = share
        quota = int(PERIOD_US * share)
        try:
            if (V1 / "cpu.cfs_quota_us").exists():
                self.path = V1 / f"{name}-{os.getpid()}"
                self.path.mkdir(exist_ok=True)
                (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            elif (V2 / "cgroup.controllers").exists():
                if "cpu" not in (V2 / "cgroup.subtree_control").read_text().split():
                    (V2 / "cgroup.subtree_control").write_text("+cpu")
                self.path = V2 / f"{name}-{os.getpid()}"
                self.path.mkdir(exist_ok=True)
                (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                raise OSError("no cpu cgroup controller mounted")
        except OSError as exc:
            raise SystemExit("--server-cpu needs a writable cpu cgroup (run as root on Linux): "
                             f"{exc}") from None

    def add(self, pid: int) -> None:
        """Every thread of `pid`, now and later, runs under the cap."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self) -> float:
        """Seconds the group's processes have spent throttled (waiting for quota)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        if "throttled_time" in stat:  # v1: nanoseconds
            return int(stat["throttled_time"]) / 1e9
        return int(stat.get("throttled_usec", 0)) / 1e6

    def close(self) -> None:
        with contextlib.suppress(OSError):  # still busy if a process outlived the run
            self.path.rmdir()
