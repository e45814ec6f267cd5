"""Side-by-side benchmark: the same lean generator against ours and the
Node.js socket.io reference peer (memory and Redis engines), plus the raw
aiohttp ceiling, in one run on one machine. Writes results/<run>.json, a PNG
plot per run and docs/benchmarks.md.

    python -m loadtest bench [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from loadtest.cpuquota import CpuQuota
from loadtest.targets import ROOT, SECRET, Services, Target, gc_window, pin

P99_LIMIT_MS = 100.0
GC_PAUSE_LIMIT_S = 0.02
DELIVERY_MIN = 0.999
# The generator is saturated (its figures say nothing about the server) when
# it uses most of its core or its event loop lags.
GEN_CPU_MAX = 0.92
GEN_LAG_MAX_MS = 50.0


def token(sub: str, role: str, **extra: Any) -> str:
    claims = {"sub": sub, "role": role, "exp": int(time.time()) + 7200, **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def setup_orders(target: Target, techs: int, run: str) -> list[tuple[str, str, str]]:
    """(technician, customer, order) triples; ours needs the orders to exist,
    assigned and en route (the relay follows the technician's current job)."""
    triples = [(f"t{run}-{i}", f"c{run}-{i}", f"o{run}-{i}") for i in range(techs)]
    if target.kind != "ours":
        return triples
    headers = {"Authorization": f"Bearer {token('backend', 'service')}"}
    url = target.urls[0]
    sem = asyncio.Semaphore(20)
    async with aiohttp.ClientSession(headers=headers) as s:
        async def one(t: str, c: str, o: str) -> None:
            async with sem:
                body = {"order_id": o, "customer_id": c, "service": {"code": "x", "name": "x"},
                        "address": {"lat": 31.2304, "lng": 121.4737, "text": "x"},
                        "window": {"start_ts": 0, "end_ts": 1}}
                async with s.post(f"{url}/api/orders", json=body) as r:
                    await r.read()
                async with s.post(f"{url}/api/orders/{o}/assign", json={"technician_id": t}) as r:
                    await r.read()
                # On the way: positions reach an order's watchers from then on
                # (docs/tracking.md); older servers accept the same step.
                async with s.post(f"{url}/api/orders/{o}/events", json={"state": "en_route"}) as r:
                    await r.read()
        await asyncio.gather(*(one(*x) for x in triples))
    return triples


def orders_for(target: Target, services: Services, techs: int) -> list[tuple[str, str, str]]:
    """The orders a tracking run needs, created once per store and size and
    shared by every step and target on that store: creating them is the slow
    part of a step (the embedded store is a Python process), and trails of
    runs piling up in the store would slow later scenarios."""
    if target.kind != "ours":
        return [(f"t{i}", f"c{i}", f"o{i}") for i in range(techs)]
    if techs not in services.orders:
        services.orders[techs] = asyncio.run(setup_orders(target, techs, uuid.uuid4().hex[:6]))
    return services.orders[techs]


def run_generator(target: Target, triples: list[tuple[str, str, str]], *, rate: float,
                  duration: float, warmup: float, watchers_per_tech: int = 2, area: bool = True,
                  idle: bool = False, burst: dict[str, Any] | None = None,
                  drain_s: float = 2.0,
                  on_mark: Callable[[str], None] | None = None) -> dict[str, Any]:
    urls = target.urls
    cfg = {
        "url": urls[0], "ns": "/tracking", "rate": rate, "duration": duration, "warmup": warmup,
        "idle": idle, "burst": burst, "connect_parallel": 100, "drain_s": drain_s,
        "techs": [{"token": token(t, "technician", oid=o), "order_id": o} for t, _, o in triples],
        "watchers": [{"token": token(c, "customer"), "order_id": o}
                     for _, c, o in triples for _ in range(watchers_per_tech)],
        "area": token("ops", "admin") if area else None,
    }
    if len(urls) > 1:  # technicians on the first half of the nodes, watchers on the rest
        half = len(urls) // 2
        cfg["watchers_url"] = urls[half]
        cfg["tech_urls"], cfg["watcher_urls"] = urls[:half], urls[half:]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
        path = f.name
    err: list[str] = []

    def read_stderr(stream: Any) -> None:  # "mark <name>" lines: the generator's phases
        for line in stream:
            for part in line.split("\r"):
                if part.startswith("mark ") and on_mark is not None:
                    on_mark(part[5:].strip())
            err.append(line)

    try:
        proc = subprocess.Popen([*pin("1"), "node", str(ROOT / "loadtest/gen/gen.mjs"), path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
        reader.start()
        assert proc.stdout is not None
        # stdout is read here and stderr by the thread (communicate() would
        # close the stream under the thread's feet).
        killer = threading.Timer(duration + warmup + 300, proc.kill)
        killer.start()
        try:
            stdout = proc.stdout.read()
            proc.wait()
        finally:
            killer.cancel()
        reader.join(10)
    finally:
        os.unlink(path)
    if proc.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"generator failed: {''.join(err)[-2000:]}")
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def verdict(r: dict[str, Any]) -> str:
    gen = r["generator"]
    if gen["cpu_ratio"] > GEN_CPU_MAX or gen["loop_lag_p99_ms"] > GEN_LAG_MAX_MS:
        return "generator-bound"
    p99 = r["latency_ms"]["p99"]
    ok = (p99 is not None and p99 <= P99_LIMIT_MS
          and (r["delivered_ratio"] or 0) >= DELIVERY_MIN)
    return "ok" if ok else "over"


def ramp(target: Target, services: Services, rates: list[float], techs: int,
         duration: float, warmup: float, log: Any, refine: int = 2) -> dict[str, Any]:
    """Raise the rate step by step until a step fails; then bisect `refine`
    times between the last rate that held and the first that did not, so
    two servers' capacities compare to within a few percent rather than a
    step. A step that fails is run once more before it counts (these
    machines are noisy, and a step the generator could not drive says
    nothing; every target gets the same second chance)."""
    runs: list[dict[str, Any]] = []

    def step(rate: float) -> bool:
        for attempt in (1, 2):
            r = one_step(target, services, rate, techs, duration, warmup)
            r["attempt"] = attempt
            runs.append(r)
            log(f"{target.name:12s} rate={rate:>7.0f}/s  p50={r['latency_ms']['p50']}  "
                f"p99={r['latency_ms']['p99']}  delivered={r['delivered_ratio']}  {r['verdict']}"
                f"  gen_cpu={r['generator']['cpu_ratio']:.2f}"
                + ("  (second try)" if attempt == 2 else ""))
            if r["verdict"] == "ok":
                return True
        return False

    capacity, failed = 0.0, None
    for rate in rates:
        if not step(rate):
            failed = rate
            break
        capacity = rate
    for _ in range(refine):
        if failed is None or capacity == 0:
            break
        mid = round((capacity + failed) / 2, -2)
        if mid in (capacity, failed):
            break
        if step(mid):
            capacity = mid
        else:
            failed = mid
    runs.sort(key=lambda r: (r["rate"], r["attempt"]))
    return {"target": target.name, "capacity": capacity, "runs": runs}


def one_step(target: Target, services: Services, rate: float, techs: int, duration: float,
             warmup: float) -> dict[str, Any]:
    target.start(services, ["0"])
    try:
        triples = orders_for(target, services, techs)
        cpu0 = target.cpu_seconds()
        redis0 = services.redis_cpu(target)
        r = run_generator(target, triples, rate=rate, duration=duration, warmup=warmup)
        cpu = target.cpu_seconds() - cpu0
        # Each Redis process's CPU over the run (one Redis, or each master).
        r["redis_cpu_s"] = [round(b - a, 2) for a, b in zip(redis0, services.redis_cpu(target),
                                                            strict=True)]
        r["gc_max_ms"] = target.gc_max_ms()
    finally:
        target.stop()
    r["verdict"] = verdict(r)
    r["server_cpu_s"] = cpu
    r["cpu_us_per_delivery"] = cpu / (r["sent"] * 2 + r["sent"]) * 1e6 if r.get("sent") else None
    return {"rate": rate, **{k: r[k] for k in (
        "verdict", "latency_ms", "ack_ms", "delivered_ratio", "sent", "delivered_measured",
        "generator", "server_cpu_s", "cpu_us_per_delivery", "gc_max_ms", "redis_cpu_s")}}


# The most points/s the generator offers in a burst. It shares CPU 1 with
# Redis and the store, and at ~40,000 points/s with their deliveries it is
# itself saturated: a burst beyond that measures its backlog, not the server's.
BURST_MAX_RATE = 40_000.0


def burst(target: Target, services: Services, capacity: float, techs: int,
          log: Any, max_rate: float = BURST_MAX_RATE) -> dict[str, Any]:
    """Half of capacity, then 3x capacity (at most max_rate) for 10 s, then
    half again: how long after the burst until points sent are delivered
    within the p99 limit."""
    base = max(250.0, capacity / 2)
    warmup, before, length, after = 3.0, 5.0, 10.0, 25.0
    rate = min(3 * max(capacity, base), max(max_rate, base))
    spec = {"factor": rate / base, "seconds": length, "at_ms": (warmup + before) * 1000}
    target.start(services, ["0"])
    try:
        triples = orders_for(target, services, techs)
        r = run_generator(target, triples, rate=base, duration=before + length + after,
                          warmup=warmup, burst=spec, drain_s=5.0)
        gc_max = target.gc_max_ms()
        rss = target.rss_kb()
    finally:
        target.stop()
    end_sec = int(warmup + before + length)
    last_sec = int(warmup + before + length + after) - 1
    seconds = r.get("by_send_second", [])
    out = {"target": target.name, "base_rate": base, "burst_rate": rate,
           "burst_x_capacity": rate / max(capacity, base),
           "recovery_s": recovery(seconds, end_sec, last_sec, RECOVERY_HOLD_S),
           "recovery_strict_s": recovery(seconds, end_sec, last_sec, None),
           "delivered_ratio": r.get("delivered_ratio"),
           "gc_max_ms": gc_max, "rss_after_kb": rss, "by_send_second": r.get("by_send_second"),
           "generator": r["generator"]}
    log(f"burst {target.name}: base {base:.0f}/s, burst {rate:.0f}/s "
        f"({out['burst_x_capacity']:.2f}x capacity), recovered after {out['recovery_s']} s "
        f"(strictly: {out['recovery_strict_s']} s), delivered {out['delivered_ratio']}")
    return out


# A burst is over for a target once this many consecutive seconds' points are
# delivered with p99 within the limit (a settling time). The strict reading
# (every later second within the limit) is reported too; on these machines a
# single noisy second 20 s later moves it, whatever the target did.
RECOVERY_HOLD_S = 5


def recovery(seconds: list[dict[str, Any]], end_sec: int, last_sec: int,
             hold: int | None) -> int | None:
    """Seconds after `end_sec` until the per-send-second p99 stays within the
    limit for `hold` seconds in a row (None: until `last_sec`)."""
    buckets = {b["sec"]: b for b in seconds}

    def within(j: int) -> bool:
        b = buckets.get(j)
        return b is not None and b["p99"] is not None and b["p99"] <= P99_LIMIT_MS

    for k in range(end_sec, last_sec + 1):
        stop = last_sec + 1 if hold is None else k + hold
        if stop > last_sec + 1:
            return None
        if all(within(j) for j in range(k, stop)):
            return k - end_sec
    return None


def many_sockets(target: Target, services: Services, techs: int, watchers: int, rate: float,
                 log: Any) -> dict[str, Any]:
    """Tracking load with ~10,000 sockets connected: p99 and the longest GC pause."""
    marks: dict[str, dict[float, float]] = {}
    target.start(services, ["0"])
    try:
        triples = orders_for(target, services, techs)
        r = run_generator(target, triples, rate=rate, duration=10.0, warmup=5.0,
                          watchers_per_tech=watchers,
                          on_mark=lambda name: marks.__setitem__(name, target.gc_buckets()))
        gc_max = target.gc_max_ms()
        rss = target.rss_kb()
    finally:
        target.stop()
    # Pauses while the sockets were connected and under load (the measured
    # window), apart from the connection and watch storm before it.
    window = (gc_window(marks["measure-start"], marks["measure-end"], GC_PAUSE_LIMIT_S)
              if "measure-start" in marks and "measure-end" in marks and target.kind == "ours"
              else None)
    out = {"target": target.name, "sockets": techs * (1 + watchers) + 1, "rate": rate,
           "connected": r["connected"], "latency_ms": r["latency_ms"],
           "delivered_ratio": r["delivered_ratio"], "gc_max_ms": gc_max, "gc_window": window,
           "rss_kb": rss, "generator": r["generator"], "verdict": verdict(r)}
    log(f"sockets {target.name}: {out['sockets']} sockets at {rate:.0f}/s: "
        f"p50={r['latency_ms']['p50']} p99={r['latency_ms']['p99']} "
        f"delivered={r['delivered_ratio']} gc_max_ms={gc_max} window={window} {out['verdict']}")
    return out


def idle_rss(target: Target, services: Services, conns: int) -> dict[str, Any]:
    """RSS per idle connection: sampled while the generator holds `conns` sockets."""
    target.start(services, ["0"])
    try:
        triples = asyncio.run(setup_orders(target, 1, uuid.uuid4().hex[:6]))
        time.sleep(1)
        before = target.rss_kb()
        cfg = {"url": target.urls[0], "ns": "/tracking", "idle": True, "duration": 8,
               "connect_parallel": 100, "area": None, "watchers": [],
               "techs": [{"token": token(f"idle{i}", "technician", oid=triples[0][2]),
                          "order_id": triples[0][2]} for i in range(conns)]}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(cfg, f)
        proc = subprocess.Popen([*pin("1"), "node", str(ROOT / "loadtest/gen/gen.mjs"), f.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        held = 0
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("holding"):
                held = int(line.split()[1])
                break
        time.sleep(2)
        after = target.rss_kb()
        proc.wait(60)
        os.unlink(f.name)
    finally:
        target.stop()
    return {"target": target.name, "connections": held, "rss_before_kb": before,
            "rss_after_kb": after, "kb_per_connection": (after - before) / max(1, held)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m loadtest bench")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    ap.add_argument("--techs", type=int, default=500)
    ap.add_argument("--targets", default="ours-memory,node-memory,ours-redis,node-redis,"
                                          "ours-redis-2,node-redis-2,raw")
    ap.add_argument("--scenarios", default="ramp,idle,burst,sockets",
                    help="ramp (capacity), idle (RSS per connection), burst (3x capacity "
                         "for 10 s), sockets (10,000 connected under load)")
    ap.add_argument("--sockets-rate", type=float, default=1000.0)
    ap.add_argument("--burst-max", type=float, default=BURST_MAX_RATE,
                    help="the most points/s a burst offers (the generator's ceiling here)")
    ap.add_argument("--server-cpu", type=float, default=None,
                    help="cap every server process together at this share of one core "
                         "(a slower machine, so that a 3x burst fits under the generator's "
                         "ceiling; loadtest/cpuquota.py)")
    ap.add_argument("--capacities", default="",
                    help="name=points/s,... : the capacity a burst is sized from when the run "
                         "has no ramp of that target (default 1000)")
    args = ap.parse_args(argv)
    duration, warmup = (5.0, 2.0) if args.quick else (8.0, 3.0)
    rates: list[float] = [1000, 2000, 4000, 6000, 8000, 12000, 16000, 24000, 32000, 40000]
    quota = CpuQuota(args.server_cpu) if args.server_cpu is not None else None
    catalog = {
        "ours-memory": Target("ours-memory", "ours", quota=quota),
        "ours-redis": Target("ours-redis", "ours", redis=True, quota=quota),
        "node-memory": Target("node-memory", "node", quota=quota),
        "node-redis": Target("node-redis", "node", redis=True, quota=quota),
        # Two nodes sharing the server core: technicians on one, watchers on the other.
        "ours-redis-2": Target("ours-redis-2", "ours", redis=True, nodes=2, quota=quota),
        "node-redis-2": Target("node-redis-2", "node", redis=True, nodes=2, quota=quota),
        # Four nodes (technicians on two, watchers on two) on one Redis, or on a
        # Redis Cluster of 3 masters (issue 20); the Node peer with socket.io's
        # sharded adapter on the same cluster.
        "ours-redis-4": Target("ours-redis-4", "ours", redis=True, nodes=4, quota=quota),
        "ours-cluster-4": Target("ours-cluster-4", "ours", redis=True, cluster=True, nodes=4,
                                 quota=quota),
        "ours-cluster-2": Target("ours-cluster-2", "ours", redis=True, cluster=True, nodes=2,
                                 quota=quota),
        "node-cluster-2": Target("node-cluster-2", "node", redis=True, cluster=True, nodes=2,
                                 quota=quota),
        "raw": Target("raw", "raw", quota=quota),
    }
    # BENCH_BEFORE=<a checkout of older code>: `before-memory` and `before-redis`
    # run that code, for a before/after comparison inside one run (the same
    # machine minutes, the same Node peer).
    before = os.environ.get("BENCH_BEFORE")
    if before:
        catalog["before-memory"] = Target("before-memory", "ours", quota=quota, src=Path(before))
        catalog["before-redis"] = Target("before-redis", "ours", redis=True, quota=quota,
                                         src=Path(before))
    scenarios = set(args.scenarios.split(","))
    names = [n for n in args.targets.split(",") if n]
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                               "techs": args.techs, "watchers_per_tech": 2, "ramps": [], "idle": [],
                               "burst": [], "sockets": [], "server_cpu_share": args.server_cpu}

    def log(msg: str) -> None:
        print(msg, flush=True)

    services = Services().start()
    single = [n for n in names if n != "raw" and catalog[n].nodes == 1]
    try:
        if "ramp" in scenarios:
            for name in names:
                if catalog[name].kind == "ours" and services.orders:
                    services.fresh()  # each of ours starts on an empty store
                results["ramps"].append(ramp(catalog[name], services, rates, args.techs,
                                             duration, warmup, log))
        if "idle" in scenarios:
            for name in single:
                results["idle"].append(idle_rss(catalog[name], services, 2000))
                log(f"idle {name}: {results['idle'][-1]['kb_per_connection']:.1f} KB/connection")
        caps = {r["target"]: r["capacity"] for r in results["ramps"]}
        for item in filter(None, args.capacities.split(",")):
            key, _, value = item.partition("=")
            caps.setdefault(key, float(value))
        if "burst" in scenarios:
            for name in single:
                results["burst"].append(burst(catalog[name], services, caps.get(name) or 1000.0,
                                              args.techs, log, args.burst_max))
        if "sockets" in scenarios:
            services.fresh()  # a store without the trails of every earlier run
            for name in single:
                results["sockets"].append(many_sockets(catalog[name], services, 2000, 4,
                                                       args.sockets_rate, log))
    finally:
        services.stop()
        if quota is not None:
            quota.close()
    out_dir = ROOT / "loadtest/results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / f"bench-{stamp}.png")
    write_markdown(results, out_dir / f"bench-{stamp}.md")
    log(f"wrote loadtest/results/bench-{stamp}.json|md|png; curate docs/benchmarks.md from them")
    log(json.dumps({r["target"]: r["capacity"] for r in results["ramps"]}))


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "node": version(["node", "--version"]), "platform": platform.platform(),
            "redis": version(["redis-server", "--version"])}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for ramp_ in results["ramps"]:
        last = {r["rate"]: r for r in ramp_["runs"]}  # a step's deciding attempt
        done = [last[k] for k in sorted(last) if last[k]["latency_ms"]["p99"] is not None]
        xs = [r["rate"] for r in done]
        p99 = [r["latency_ms"]["p99"] for r in done]
        p50 = [r["latency_ms"]["p50"] for r in done]
        line, = ax.plot(xs, p99, marker="o", label=f"{ramp_['target']} p99")
        ax.plot(xs, p50, marker=".", linestyle="--", color=line.get_color(), label=f"{ramp_['target']} p50")
    ax.axhline(P99_LIMIT_MS, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered points/s (each delivered to 2 watchers + area)")
    ax.set_ylabel("delivery latency, ms")
    ax.set_title("tracking relay: latency against offered rate")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    caps = {r["target"]: r["capacity"] for r in results["ramps"]}
    lines = [f"# Benchmark run {results['started']}", "",
             f"Machine: {results['machine']}", "",
             *([f"Every server capped at {results['server_cpu_share']:g} of one core "
                "(--server-cpu).", ""] if results.get("server_cpu_share") else []),
             "| target | capacity (points/s, p99 ≤ 100 ms, ≥ 99.9 % delivered) | ratio ours/Node |",
             "| --- | --- | --- |"]
    pairs = {"ours-memory": "node-memory", "ours-redis": "node-redis", "ours-redis-2": "node-redis-2",
             "before-memory": "node-memory", "before-redis": "node-redis"}
    for k, v in caps.items():
        node = pairs.get(k)
        ratio = f"{v / caps[node]:.2f}" if node and caps.get(node) else ""
        lines.append(f"| {k} | {v:,.0f} | {ratio} |")
    lines += ["", "| target | rate | p50 ms | p99 ms | delivered | CPU µs/delivery | longest GC pause ms "
                  "| verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ramp_ in results["ramps"]:
        for r in ramp_["runs"]:
            cpu = r["cpu_us_per_delivery"]
            gc_ms = r.get("gc_max_ms")
            gc_txt = "–" if gc_ms is None else f"{gc_ms:.1f}"
            tries = " (2nd try)" if r.get("attempt") == 2 else ""
            if r["latency_ms"]["p50"] is None:
                lines.append(f"| {ramp_['target']} | {r['rate']:,.0f}{tries} | – | – | – | – | {gc_txt} "
                             f"| {r['verdict']} |")
                continue
            lines.append(f"| {ramp_['target']} | {r['rate']:,.0f}{tries} | {r['latency_ms']['p50']:.1f} | "
                         f"{r['latency_ms']['p99']:.1f} | {r['delivered_ratio']:.4f} | {cpu:.1f} | "
                         f"{gc_txt} | {r['verdict']} |")
    if results["idle"]:
        lines += ["", "| target | idle connections | KB per connection |", "| --- | --- | --- |"]
        for i in results["idle"]:
            lines.append(f"| {i['target']} | {i['connections']} | {i['kb_per_connection']:.1f} |")
    if results.get("burst"):
        lines += ["", f"| target | base rate | burst rate (10 s) | × capacity | recovered after "
                      f"({RECOVERY_HOLD_S} s within p99) | strictly (every later second) | delivered "
                      "| longest GC pause ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        def secs(v: int | None) -> str:
            return "not within 25 s" if v is None else f"{v} s"

        for b in results["burst"]:
            gc_ms = "–" if b.get("gc_max_ms") is None else f"{b['gc_max_ms']:.1f}"
            lines.append(f"| {b['target']} | {b['base_rate']:,.0f} | {b['burst_rate']:,.0f} | "
                         f"{b.get('burst_x_capacity', 3.0):.2f} | {secs(b['recovery_s'])} | "
                         f"{secs(b.get('recovery_strict_s'))} | "
                         f"{(b['delivered_ratio'] or 0):.4f} | {gc_ms} |")
    if results.get("sockets"):
        lines += ["", "| target | sockets | rate | p50 ms | p99 ms | delivered | GC pauses > 20 ms "
                      "under load (longest ≤) | longest GC pause ms, whole run | RSS MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in results["sockets"]:
            lat = x["latency_ms"]
            gc_ms = "–" if x.get("gc_max_ms") is None else f"{x['gc_max_ms']:.1f}"
            w = x.get("gc_window")
            window = "–" if not w else f"{w['over_limit']} of {w['pauses']} (≤ {w['longest_under_ms']:g} ms)"
            p50 = "–" if lat["p50"] is None else f"{lat['p50']:.1f}"
            p99 = "–" if lat["p99"] is None else f"{lat['p99']:.1f}"
            lines.append(f"| {x['target']} | {x['sockets']:,} | {x['rate']:,.0f} | {p50} | {p99} | "
                         f"{(x['delivered_ratio'] or 0):.4f} | {window} | {gc_ms} | "
                         f"{x['rss_kb'] / 1024:.0f} |")
    path.write_text("\n".join(lines) + "\n")
