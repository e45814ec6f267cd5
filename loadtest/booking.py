"""Bookings across two nodes (issue 16; docs/benchmarks.md, Bookings).

    python -m loadtest.quick hold-latency --techs 50 --subscribers 10 --rate 50 --duration 20
    python -m loadtest.quick contention --techs 50 --customers 400 --rate 1000 --duration 3

Both start a redis-server, one SecantusDB and two `python -m realtime` nodes
sharing them (the same REDIS_URL, REALTIME_REDIS_CHANNEL, MONGO_URL and
database, as tests/cluster_harness.py does). With taskset and more than one
CPU, both nodes run on CPU 0 and the store, Redis and this generator on
CPU 1 (as the two-node targets of `python -m loadtest bench` do;
LOADTEST_NODE_CPUS=0,1 puts node B on CPU 1). Each scenario reports the CPU
every process used during its measured window (`others`: the rest of the
machine), the warnings the nodes logged, and their counters of what the
store gate shed. LOADTEST_KEEP_LOGS=1 keeps the nodes' logs (their
directory is printed as `logs`).

hold-latency: `--subscribers` customers watch one district's week of
60-minute starts on node B; customers hold on node A, `--rate` holds/s for
`--duration` s, each at one of the week's spaced-out starts (9:00, 12:00,
15:00, 18:00 every day: a hold moves the counts around its own start only,
so the change that carries a start's new count is that start's hold's). Two
holds per customer (the per-customer limit), none released: the week has
room for every hold (`--techs` × 28 starts). Latency: the hold sent on A →
the `availability_changed` carrying its start's lower count received on B,
for every subscriber. Before the nodes' run, the same holds at the same
rate go to the store alone (`store_baseline`; `--no-baseline` skips it).

contention: `--techs` technicians who each work one hour tomorrow (10:00-
11:00, no home base): 50 hot slots at one start time. `--customers` distinct
customers, half on each node, offer `--rate` holds/s for that start for
`--duration` s, open loop; a customer whose hold was accepted stops (it
goes to pay). `--named`: each hold names one of the technicians at random
(one schedule document per slot takes the race) instead of letting the
server pick the best fit. `--homes`: the technicians have home bases (within
10 km) and work 09:00-11:00, so the best fit for 10:00 depends on where the
customer is; without, every technician is an equal fit (the drive to a
day's first job without a home is 0) and the server ranks them by id.
Before the load, one `availability` query on each node fills its caches
(customers look before they hold); `--cold` leaves them empty.
Afterwards the store is read directly: two live holds overlapping on one
technician would be a double booking.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import socketio

from loadtest.quick import SECRET, cpu_seconds, free_port, machine_busy_seconds, pct, pin, server_env
from realtime.auth import mint_token
from realtime.settings import Settings

NS = "/booking"
CENTRE = (31.2304, 121.4737)  # People's Square, Shanghai
TZ = dt.timezone(dt.timedelta(hours=8))  # the calendars' default, Asia/Shanghai
SKILL = "plumbing"
HOLD_STARTS = (9, 12, 15, 18)  # hold-latency: 3 h apart, a hold moves ±(1 h + the drive)


def ms(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50": round(pct(values, 50), 1), "p90": round(pct(values, 90), 1),
            "p99": round(pct(values, 99), 1), "max": round(max(values), 1) if values else math.nan}


class Cluster:
    """Redis, SecantusDB and `nodes` server processes sharing them."""

    def __init__(self, nodes: int = 2) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rt-booking-"))
        self.redis_port, self.mongo_port = free_port(), free_port()
        self.ports = [free_port() for _ in range(nodes)]
        self.db = f"booking_{uuid.uuid4().hex[:6]}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.settings = Settings(jwt_secret=SECRET)

    def start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("redis-server is not installed (./scripts/test installs it)")
        self.procs["redis"] = subprocess.Popen(
            [*pin("1"), redis, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["store"] = subprocess.Popen(
            [*pin("1"), str(Path(sys.executable).parent / "secantusd-py"), "--host", "127.0.0.1",
             "--port", str(self.mongo_port), "--storage-path", ":memory:", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # LOADTEST_NODE_CPUS=0,1: node A on CPU 0, node B on CPU 1 (beside the
        # store, Redis and the generator) instead of both on CPU 0.
        cpus = os.environ.get("LOADTEST_NODE_CPUS", "").split(",")
        for i, port in enumerate(self.ports):
            cpu = cpus[i].strip() if i < len(cpus) and cpus[i].strip() else "0"
            data = self.tmp / f"node{i}"
            data.mkdir()
            env = server_env(port, self.mongo_port, data, limits=False)
            env.update({"REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                        "REALTIME_REDIS_CHANNEL": f"bk-{self.db}", "REALTIME_MONGO_DB": self.db,
                        "REALTIME_LOG_LEVEL": os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "INFO")})
            with open(self.log(i), "ab") as out:
                self.procs[f"node{'AB'[i] if i < 2 else i}"] = subprocess.Popen(
                    [*pin(cpu), sys.executable, "-m", "realtime"], env=env, stdout=out,
                    stderr=subprocess.STDOUT, cwd=os.environ.get("LOADTEST_SERVER_SRC"))
        # The generator beside the store and Redis, away from the nodes.
        if pin("1"):
            os.sched_setaffinity(0, {1})

    def log(self, i: int) -> Path:
        return self.tmp / f"node{i}.log"

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/?directConnection=true"

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(len(self.ports)):
                for _ in range(600):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with s.get(f"{self.url(i)}/readyz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"node {i} not ready:\n{self.log(i).read_text()[-3000:]}")
                text = self.log(i).read_text()
                if "INFO" in os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "INFO") and \
                        "store ready (MONGO_URL); redis engine" not in text:
                    raise RuntimeError(f"node {i} is not on the shared stores:\n{text[-3000:]}")

    def token(self, role: str, sub: str) -> str:
        return mint_token(self.settings, sub=sub, role=role)

    def cpu(self) -> dict[str, float]:
        out = {name: cpu_seconds(p.pid) for name, p in self.procs.items() if p.poll() is None}
        out["generator"] = time.process_time()
        out["machine"] = machine_busy_seconds()
        return out

    def warnings(self) -> dict[str, Any]:
        """The nodes' WARNING and worse lines, counted by message (numbers
        and ids blanked): the eight most frequent."""
        kinds: Counter[str] = Counter()
        for i in range(len(self.ports)):
            for line in self.log(i).read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line or " CRITICAL " in line \
                        or "Traceback" in line:
                    text = line.split(" ", 3)[-1] if line[:4].isdigit() else line
                    kinds[f"node{i}: " + re.sub(r"[0-9a-f]{6,}|\d+", "#", text)[:160]] += 1
        return dict(kinds.most_common(8))

    async def metrics(self, prefixes: Iterable[str]) -> dict[str, dict[str, float]]:
        """Samples of the nodes' /metrics whose series start with these."""
        out: dict[str, dict[str, float]] = {}
        async with aiohttp.ClientSession() as s:
            for i in range(len(self.ports)):
                async with s.get(self.url(i) + "/metrics") as r:
                    text = await r.text()
                found = {}
                for line in text.splitlines():
                    if any(line.startswith(p) for p in prefixes):
                        series, value = line.rsplit(" ", 1)
                        if float(value):
                            found[series] = float(value)
                out[f"node{'AB'[i] if i < 2 else i}"] = found
        return out

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not os.environ.get("LOADTEST_KEEP_LOGS"):
            shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Each process's CPU over a window, in % of one core; `others`: what
    the rest of the machine used meanwhile (a noisy neighbour shows here)."""
    out = {k: round(100 * (after[k] - before[k]) / seconds, 1) for k in after if k in before}
    machine = out.pop("machine")
    out["others"] = round(machine - sum(out.values()), 1)
    return out


async def connect(url: str, token: str) -> socketio.AsyncClient:
    c = socketio.AsyncClient(reconnection=False)
    await c.connect(url, namespaces=[NS], auth={"token": token}, transports=["websocket"],
                    wait_timeout=30)
    return c


async def connect_many(cl: Cluster, node: int, role: str, subs: list[str],
                       setup: Callable[[int, socketio.AsyncClient], None] | None = None
                       ) -> list[socketio.AsyncClient]:
    """One socket per identity, a few handshakes at a time."""
    gate = asyncio.Semaphore(16)

    async def one(k: int, sub: str) -> socketio.AsyncClient:
        async with gate:
            c = await connect(cl.url(node), cl.token(role, sub))
        if setup is not None:
            setup(k, c)
        return c

    return list(await asyncio.gather(*(one(k, s) for k, s in enumerate(subs))))


async def close_all(clients: list[socketio.AsyncClient]) -> None:
    gate = asyncio.Semaphore(32)

    async def one(c: socketio.AsyncClient) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await c.disconnect()

    await asyncio.gather(*(one(c) for c in clients))


async def put_calendars(cl: Cluster, ids: list[str], body: Callable[[int], dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {cl.token('service', 'backend')}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for k, tech in enumerate(ids):
            async with s.put(f"{cl.url(0)}/api/technicians/{tech}/calendar", json=body(k)) as r:
                assert r.status == 200, await r.text()


def near(rnd: random.Random, km: float) -> tuple[float, float]:
    return (CENTRE[0] + rnd.uniform(-km, km) / 111.0, CENTRE[1] + rnd.uniform(-km, km) / 95.0)


def at(day: dt.date, hour: int) -> int:
    return int(dt.datetime.combine(day, dt.time(hour), TZ).timestamp() * 1000)


def error_of(reply: Any) -> str:
    """`ok`, or the error's code (with a conflict's reason)."""
    if isinstance(reply, str):  # "timeout": no reply within the call's timeout
        return reply
    if not isinstance(reply, dict):
        return repr(reply)[:40]
    if reply.get("ok"):
        return "ok"
    err = reply.get("error") or {}
    reason = (err.get("details") or {}).get("reason")
    return f"{err.get('code')}:{reason}" if reason else str(err.get("code"))


async def open_loop(n: int, rate: float, fire: Callable[[int], Coroutine[Any, Any, None]]
                    ) -> tuple[float, list[float]]:
    """Start `fire(k)` at k / rate s, whatever earlier ones are doing; returns
    the send window's length (first to last start) and each start's lag
    behind its schedule (ms), then waits for all of them."""
    tasks: list[asyncio.Task[None]] = []
    lag: list[float] = []
    t0 = time.perf_counter() + 0.2
    for k in range(n):
        due = t0 + k / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        lag.append((time.perf_counter() - due) * 1000)
        tasks.append(asyncio.create_task(fire(k)))
    window = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return window, lag


async def store_baseline(cl: Cluster, calendars: list[dict[str, Any]], starts: list[int],
                         n: int, rate: float) -> list[float]:
    """What a hold costs the store alone, at the same rate: the hold
    transaction of storage/schedules.py (the customer's live holds, the
    schedule read, decided and written under its version, the hold record),
    straight from this process, into a database of its own with the same
    calendars; each hold on a technician and start of its own, drawn at
    random (no server picking a best fit, so fewer collisions than through
    a node). A node's ack can be no faster than this."""
    from pymongo import AsyncMongoClient

    from realtime.services import tracking_config
    from scheduling.calendar import calendar_of
    from scheduling.schedule import Hold
    from storage.calendars import MongoCalendarStore
    from storage.schedules import MongoScheduleStore, ScheduleBook

    eta = tracking_config(cl.settings).eta
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cl.mongo_url)
    db = mongo[cl.db + "_baseline"]
    cals = MongoCalendarStore(db)
    store = MongoScheduleStore(mongo, db, ScheduleBook(db, eta))
    await store.ensure_indexes()
    for cal in calendars:
        await cals.put(calendar_of(cal), 0)
    times: list[float] = []
    rnd = random.Random(16)
    pairs = [(start, cal["technician_id"]) for cal in calendars for start in starts]
    rnd.shuffle(pairs)  # every hold its own technician and start, in no order

    async def fire(k: int) -> None:
        now = int(time.time() * 1000)
        where = near(rnd, 2)
        start, tech = pairs[k]
        hold = Hold(f"hb-{k}", tech, f"b{k // 2}", start, start + 3_600_000, where[0], where[1],
                    now + 300_000, SKILL)
        t0 = time.perf_counter()
        await store.hold(hold, 2, now)
        times.append((time.perf_counter() - t0) * 1000)

    try:
        await open_loop(n, rate, fire)
    finally:
        await mongo.close()
    return times


# -- hold -> availability_changed on the other node ---------------------------

async def run_hold_latency(cl: Cluster, techs: int, subscribers: int, rate: float,
                           duration: float, days: int = 7, baseline: bool = True,
                           raw: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    rnd = random.Random(16)
    first = dt.datetime.now(TZ).date() + dt.timedelta(days=1)
    tech_ids = [f"hl{run}-{i}" for i in range(techs)]
    calendars = [{
        "technician_id": tech, "timezone": "Asia/Shanghai",
        "weekly": [{"weekday": d, "start": "08:00", "end": "20:00"} for d in range(7)],
        "home": dict(zip(("lat", "lng"), near(rnd, 3), strict=True)), "skills": [SKILL],
        "area": {"circle": {"lat": CENTRE[0], "lng": CENTRE[1], "radius_m": 20_000}}}
        for tech in tech_ids]
    await put_calendars(cl, tech_ids, lambda k: {
        key: v for key, v in calendars[k].items() if key != "technician_id"})
    # The starts holds go to: 3 h apart, and in an order that spreads
    # consecutive holds over the week (the same start again only every
    # len(starts) holds).
    starts = [at(first + dt.timedelta(days=d), h) for h in HOLD_STARTS for d in range(days)]
    n = int(rate * duration)
    if n > len(starts) * techs:
        raise SystemExit(f"{n} holds do not fit {len(starts)} starts x {techs} technicians")
    store_alone = await store_baseline(cl, calendars, starts, n, rate) if baseline else []
    watched = set(starts)
    # subscriber -> start -> [(arrival, count)]
    seen: list[dict[int, list[tuple[float, int]]]] = [defaultdict(list) for _ in range(subscribers)]
    arrived = asyncio.Event()

    def listen(k: int, c: socketio.AsyncClient) -> None:
        def changed(data: dict[str, Any]) -> None:
            t = time.perf_counter()
            for ch in data["changes"]:
                if ch["start_ts"] in watched:
                    seen[k][ch["start_ts"]].append((t, ch["count"]))
            arrived.set()
        c.on("availability_changed", changed, namespace=NS)

    query = {"lat": CENTRE[0], "lng": CENTRE[1], "skill": SKILL, "from_date": first.isoformat(),
             "days": days, "duration_min": 60, "granularity_min": 30}
    subs = await connect_many(cl, 1, "customer", [f"hw{run}-{k}" for k in range(subscribers)],
                              listen)
    watch_ms: list[float] = []
    initial: dict[int, int] = {}
    for c in subs:
        t0 = time.perf_counter()
        reply = await c.call("watch_availability", query, namespace=NS, timeout=60)
        watch_ms.append((time.perf_counter() - t0) * 1000)
        assert reply["ok"], reply
        initial = {s["start_ts"]: s["count"] for s in reply["data"]["slots"]}
    missing = [s for s in starts if initial.get(s) != techs]
    assert not missing, f"starts not free for all {techs} technicians: {missing[:3]}"
    customers = await connect_many(cl, 0, "customer", [f"hc{run}-{k}" for k in range((n + 1) // 2)])

    sent: dict[int, float] = {}
    replies: dict[int, tuple[float, Any]] = {}

    async def fire(k: int) -> None:
        where = near(rnd, 2)
        body = {"start_ts": starts[k % len(starts)], "duration_min": 60, "lat": where[0],
                "lng": where[1], "skill": SKILL}
        sent[k] = t0 = time.perf_counter()
        try:
            reply = await customers[k // 2].call("hold", body, namespace=NS, timeout=30)
        except TimeoutError:
            reply = "timeout"
        replies[k] = ((time.perf_counter() - t0) * 1000, reply)

    cpu0, w0 = cl.cpu(), time.perf_counter()
    window, lag = await open_loop(n, rate, fire)
    ok = [k for k in range(n) if error_of(replies[k][1]) == "ok"]
    per_start: dict[int, list[int]] = defaultdict(list)
    for k in sorted(ok, key=lambda k: sent[k]):
        per_start[starts[k % len(starts)]].append(k)

    def lowered(sub: int, start: int) -> list[float]:
        """When this subscriber saw the start's count go down, in order."""
        out, last = [], initial[start]
        for t, count in seen[sub][start]:
            out.extend([t] * max(0, last - count))
            last = count
        return out

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            len(lowered(s, start)) < len(ks) for s in range(subscribers)
            for start, ks in per_start.items()):
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 0.5)
    elapsed = time.perf_counter() - w0
    cpu = cpu_share(cpu0, cl.cpu(), elapsed)
    # The i-th hold of a start (by send time) lowered its count the i-th time.
    push: list[float] = []
    last_sub: dict[int, float] = {}
    for s in range(subscribers):
        for start, ks in per_start.items():
            for k, t in zip(ks, lowered(s, start), strict=False):
                v = (t - sent[k]) * 1000
                push.append(v)
                last_sub[k] = max(last_sub.get(k, 0.0), v)
    if raw is not None:  # one record per hold: when sent (s), its ack, its pushes
        t_first = min(sent.values())
        for k in range(n):
            reply = replies[k][1]
            raw.append({"k": k, "sent_s": round(sent[k] - t_first, 4),
                        "ack_ms": round(replies[k][0], 2), "result": error_of(reply),
                        "technician": reply["data"]["technician"] if error_of(reply) == "ok" else None,
                        "start_ts": starts[k % len(starts)], "last_push_ms": last_sub.get(k)})
    metrics = await cl.metrics(["realtime_store_shed_total", "realtime_acks_total{namespace=\"/booking\"",
                                'realtime_bus_received_total{signal="schedule_changed"'])
    await close_all(subs + customers)
    return {
        "scenario": "hold-latency", "technicians": techs, "subscribers_on_B": subscribers,
        "view": f"{days} days x 60-min jobs on a 30-min grid", "offered_per_s": rate,
        "sent": n, "sent_per_s": round((n - 1) / window, 1) if n > 1 else None,
        "send_lag_ms": ms(lag), "replies": dict(Counter(error_of(r) for _, r in replies.values())),
        "hold_ack_ms": ms([replies[k][0] for k in ok]), "store_alone_hold_ms": ms(store_alone),
        "hold_to_push_ms": ms(push), "pushes_expected": len(ok) * subscribers,
        "pushes_received": len(push),
        "hold_to_last_subscriber_ms": ms(list(last_sub.values())),
        "watch_ms": ms(watch_ms), "cpu_pct_of_a_core": cpu, "node_counters": metrics,
        "node_warnings": cl.warnings()}


# -- contention for a few hot slots --------------------------------------------

async def run_contention(cl: Cluster, techs: int, customers: int, rate: float, duration: float,
                         named: bool, homes: bool = False, warm: bool = True,
                         raw: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from pymongo import AsyncMongoClient

    run = uuid.uuid4().hex[:6]
    rnd = random.Random(1000)
    day = dt.datetime.now(TZ).date() + dt.timedelta(days=1)
    slot = at(day, 10)
    tech_ids = [f"ct{run}-{i}" for i in range(techs)]
    # One hour of work tomorrow and no home base: one start (10:00) each.
    # With homes: 09:00-11:00 from a home within 10 km (the drive to 10:00
    # fits), so the best fit differs with the customer's place.
    def calendar(k: int) -> dict[str, Any]:
        cal: dict[str, Any] = {
            "weekly": [], "skills": [SKILL],
            "exceptions": [{"date": day.isoformat(), "kind": "extra",
                            "start": "09:00" if homes else "10:00", "end": "11:00"}],
            "area": {"circle": {"lat": CENTRE[0], "lng": CENTRE[1], "radius_m": 20_000}}}
        if homes:
            cal["home"] = dict(zip(("lat", "lng"), near(rnd, 10), strict=True))
        return cal

    await put_calendars(cl, tech_ids, calendar)
    names = [f"cc{run}-{k}" for k in range(customers)]
    socks = (await connect_many(cl, 0, "customer", names[0::2])
             + await connect_many(cl, 1, "customer", names[1::2]))
    by_name = dict(zip(names[0::2] + names[1::2], socks, strict=True))
    if warm:  # customers look before they hold: each node's caches hold the district
        for c in (socks[0], socks[-1]):
            reply = await c.call("availability", {
                "lat": CENTRE[0], "lng": CENTRE[1], "skill": SKILL, "from_date": day.isoformat(),
                "days": 1, "duration_min": 60}, namespace=NS, timeout=60)
            assert reply["ok"] and reply["data"]["slots"], reply
    won: set[str] = set()
    # sent, replied, customer, result, reply, the technician named
    results: list[tuple[float, float, str, str, Any, str | None]] = []
    n = int(rate * duration)
    turn = 0

    async def fire(k: int) -> None:
        nonlocal turn
        for _ in range(customers):  # the next customer still without a hold
            who = names[turn % customers]
            turn += 1
            if who not in won:
                break
        else:
            return
        where = near(rnd, 2)
        body: dict[str, Any] = {"start_ts": slot, "duration_min": 60, "lat": where[0],
                                "lng": where[1], "skill": SKILL}
        if named:
            body["technician_id"] = rnd.choice(tech_ids)
        t0 = time.perf_counter()
        try:
            reply = await by_name[who].call("hold", body, namespace=NS, timeout=30)
        except TimeoutError:
            reply = "timeout"
        t1 = time.perf_counter()
        result = error_of(reply)
        if result == "ok":
            won.add(who)
        results.append((t0, t1, who, result, reply, body.get("technician_id")))

    cpu0, w0 = cl.cpu(), time.perf_counter()
    window, lag = await open_loop(n, rate, fire)
    elapsed = time.perf_counter() - w0
    cpu = cpu_share(cpu0, cl.cpu(), elapsed)
    metrics = await cl.metrics(["realtime_store_shed_total", "realtime_acks_total{namespace=\"/booking\"",
                                "realtime_store_latency_seconds_count"])
    await close_all(socks)

    first_sent = min(r[0] for r in results)
    if raw is not None:  # one record per hold sent
        raw.extend({"sent_s": round(r[0] - first_sent, 4), "reply_ms": round((r[1] - r[0]) * 1000, 2),
                    "customer": r[2], "result": r[3], "named": r[5],
                    "technician": r[4]["data"]["technician"] if r[3] == "ok" else None}
                   for r in results)
    accepted = [r for r in results if r[3] == "ok"]
    by_result = Counter(r[3] for r in results)
    last_win = max((r[1] for r in accepted), default=first_sent)
    # A `taken` answered while a slot was surely still free: before a hold
    # that then got one was sent (named: one of the same technician).
    won_sent: dict[str | None, float] = {}
    for r in accepted:
        key = r[5] if named else None
        won_sent[key] = max(won_sent.get(key, 0.0), r[0])
    early_taken = sum(1 for r in results if r[3] == "conflict:taken"
                      and r[1] < won_sent.get(r[5] if named else None, 0.0))

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cl.mongo_url)
    try:
        db = mongo[cl.db]
        now = int(time.time() * 1000)
        docs = [d async for d in db["schedules"].find({"_id": {"$in": tech_ids}})]
        holds = [h async for h in db["holds"].find({"technician_id": {"$in": tech_ids}})]
        owners = [o async for o in db["hold_owners"].find({"_id": {"$in": names}})]
    finally:
        await mongo.close()

    def overlaps(spans: list[tuple[int, int]]) -> int:
        spans = sorted(spans)
        return sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1])

    sched_items = {d["_id"]: [i for i in d.get("items", [])
                              if i["kind"] == "order" or i.get("expires_ms", 0) > now] for d in docs}
    live_holds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for h in holds:
        if h["state"] == "live" and h["expires_ms"] > now:
            live_holds[h["technician_id"]].append(h)
    acked = {r[4]["data"]["hold_id"] for r in accepted}
    in_holds = {h["_id"] for hs in live_holds.values() for h in hs}
    in_schedules = {i["ref"] for items in sched_items.values() for i in items if i["kind"] == "hold"}
    return {
        "scenario": "contention", "technicians": techs, "hot_slots": techs,
        "pick": "named technician" if named else "server's best fit",
        "homes": homes, "caches_warmed": warm, "customers": customers,
        "offered_per_s": rate, "scheduled": n, "sent": len(results),
        "sent_per_s": round((n - 1) / window, 1) if n > 1 else None, "send_lag_ms": ms(lag),
        "accepted": len(accepted), "results": dict(by_result.most_common()),
        "reply_ms": ms([(r[1] - r[0]) * 1000 for r in results]),
        "accepted_reply_ms": ms([(r[1] - r[0]) * 1000 for r in accepted]),
        "conflict_reply_ms": ms([(r[1] - r[0]) * 1000 for r in results if r[3].startswith("conflict")]),
        "all_taken_after_ms": round((last_win - first_sent) * 1000, 1),
        "taken_while_slots_free": early_taken,
        "store": {
            "double_bookings_schedules": sum(overlaps([(i["start_ms"], i["end_ms"]) for i in items])
                                             for items in sched_items.values()),
            "double_bookings_holds": sum(overlaps([(h["start_ms"], h["end_ms"]) for h in hs])
                                         for hs in live_holds.values()),
            "technicians_with_more_than_one_live_hold": sum(
                1 for hs in live_holds.values() if len(hs) > 1),
            "live_holds": len(in_holds), "in_schedules": len(in_schedules),
            "acked_not_stored": len(acked - in_holds), "stored_not_acked": len(in_holds - acked),
            "holds_not_in_schedules": len(in_holds - in_schedules),
            "schedule_items_without_hold": len(in_schedules - in_holds),
            "customers_over_limit": sum(1 for o in owners if len(o.get("holds", [])) > 2),
            "hold_records": Counter(h["state"] for h in holds)},
        "accepted_equals_slots": len(accepted) == techs,
        "window_s": round(elapsed, 1), "cpu_pct_of_a_core": cpu, "node_counters": metrics,
        "node_warnings": cl.warnings()}


async def run(scenario: str, **kw: Any) -> dict[str, Any]:
    cl = Cluster()
    cl.start()
    try:
        await cl.ready()
        if scenario == "hold-latency":
            result = await run_hold_latency(cl, **kw)
        else:
            result = await run_contention(cl, **kw)
        if os.environ.get("LOADTEST_KEEP_LOGS"):
            result["logs"] = str(cl.tmp)
        return result
    finally:
        cl.stop()
