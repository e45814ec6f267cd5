"""Quick single-process measurements with the official Python client.

    python -m loadtest.quick tracking --techs 100 --rate 5 --duration 20
    python -m loadtest.quick chat --pairs 20 --rate 50 --duration 20
    python -m loadtest.quick orders --orders 50 --rate 50
    python -m loadtest.quick availability --techs 200 --queries 200
    python -m loadtest.quick hold-latency --techs 50 --subscribers 10 --rate 50 --duration 20
    python -m loadtest.quick contention --techs 50 --customers 400 --rate 1000 --duration 3

Each starts its own SecantusDB and `python -m realtime` (pinned to CPU 0 with
taskset when available; the generator runs on CPU 1), drives it with
`socketio.AsyncClient`s over real TCP, and prints medians and percentiles.
hold-latency and contention run two nodes sharing Redis and the store
(loadtest/booking.py). The full side-by-side benchmark is `python -m loadtest`
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import socketio

from realtime.auth import mint_token
from realtime.settings import Settings

SECRET = "loadtest-secret-0123456789abcdef"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_busy_seconds() -> float:
    """CPU time every process of the machine used so far (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(cpu: str) -> list[str]:
    """`taskset -c cpu` where it helps (a machine with more than one CPU)."""
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def server_env(port: int, mongo_port: int, data_dir: Path, limits: bool) -> dict[str, str]:
    """The environment of one `python -m realtime` of a measurement."""
    env = {**os.environ, "REALTIME_JWT_SECRET": SECRET, "REALTIME_PORT": str(port),
           "REALTIME_HOST": "127.0.0.1", "REALTIME_DATA_DIR": str(data_dir),
           "MONGO_URL": f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true",
           "REALTIME_LOG_LEVEL": os.environ.get("LOADTEST_SERVER_LOG_LEVEL", "WARNING")}
    if not limits:
        env.update({"REALTIME_LOCATION_RATE": "1000", "REALTIME_LOCATION_BURST": "1000",
                    "REALTIME_CHAT_SEND_RATE": "1000", "REALTIME_CHAT_SEND_BURST": "1000",
                    "REALTIME_CHAT_CONVERSATION_RATE": "1000",
                    "REALTIME_CHAT_CONVERSATION_BURST": "1000",
                    "REALTIME_HANDSHAKE_RATE": "0", "REALTIME_HTTP_IP_RATE": "0",
                    "REALTIME_HTTP_USER_RATE": "0"})
    return env


class Stack:
    """A store and one server process, pinned apart from the generator."""

    def __init__(self, limits: bool = False) -> None:
        # limits=False lifts the per-user rate limits (location, chat sends) out
        # of a measurement's way; loadtest/abuse.py keeps the defaults.
        self.limits = limits
        self.tmp = Path(tempfile.mkdtemp(prefix="rt-quick-"))
        self.mongo_port, self.port = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        exe = str(Path(sys.executable).parent / "secantusd-py")
        self.procs.append(subprocess.Popen(
            [*pin("1"), exe, "--host", "127.0.0.1", "--port", str(self.mongo_port),
             "--storage-path", ":memory:", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = server_env(self.port, self.mongo_port, self.tmp, self.limits)
        env.pop("REDIS_URL", None)
        # LOADTEST_SERVER_LOG=path keeps the server's log (else it is discarded).
        log_path = os.environ.get("LOADTEST_SERVER_LOG")
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        # LOADTEST_SERVER_SRC=<another checkout>: serve that code (before/after runs).
        self.procs.append(subprocess.Popen([*pin("0"), sys.executable, "-m", "realtime"],
                                           env=env, stdout=out, stderr=out,
                                           cwd=os.environ.get("LOADTEST_SERVER_SRC")))
        self.settings = Settings(jwt_secret=SECRET)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                try:
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("server not ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, role: str, sub: str) -> str:
        return mint_token(self.settings, sub=sub, role=role)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            p.wait(15)
        shutil.rmtree(self.tmp, ignore_errors=True)


async def client(stack: Stack, ns: str, role: str, sub: str) -> socketio.AsyncClient:
    c = socketio.AsyncClient(reconnection=False)
    await c.connect(stack.url, namespaces=[ns], auth={"token": stack.token(role, sub)},
                    transports=["websocket"], wait_timeout=20)
    return c


async def http(stack: Stack, method: str, path: str, body: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.request(
            method, stack.url + path, json=body,
            headers={"Authorization": f"Bearer {stack.token('service', 'backend')}"}) as r:
        return await r.json()


async def assigned_order(stack: Stack, order_id: str, customer_id: str, technician_id: str,
                         set_off: bool = False) -> None:
    await http(stack, "POST", "/api/orders", {
        "order_id": order_id, "customer_id": customer_id, "service": {"code": "x", "name": "x"},
        "address": {"lat": 31.23, "lng": 121.47, "text": "x"},
        "window": {"start_ts": 0, "end_ts": 1}})
    await http(stack, "POST", f"/api/orders/{order_id}/assign", {"technician_id": technician_id})
    if set_off:  # positions reach the order's watchers once it is en route
        await http(stack, "POST", f"/api/orders/{order_id}/events", {"state": "en_route"})


async def run_tracking(stack: Stack, techs: int, rate: float, duration: float) -> dict[str, Any]:
    """`techs` technicians, each sending `rate` points/s, each watched by one customer."""
    run = uuid.uuid4().hex[:6]
    latencies: list[float] = []
    acks: list[float] = []
    tech_clients, watchers = [], []
    for i in range(techs):
        oid, cid, tid = f"q{run}-{i}", f"qc{run}-{i}", f"qt{run}-{i}"
        await assigned_order(stack, oid, cid, tid, set_off=True)
        t = await client(stack, "/tracking", "technician", tid)
        w = await client(stack, "/tracking", "customer", cid)

        def on_position(data: dict[str, Any]) -> None:
            latencies.append(time.time() * 1000 - data["ts"])

        w.on("position", on_position, namespace="/tracking")
        await w.call("watch", {"order_id": oid}, namespace="/tracking")
        tech_clients.append(t)
        watchers.append(w)

    async def drive(i: int, t: socketio.AsyncClient) -> int:
        sent = 0
        interval = 1.0 / rate
        start = time.monotonic() + (i / techs) * interval
        while (now := time.monotonic()) < start + duration:
            await asyncio.sleep(max(0.0, start + sent * interval - now))
            t0 = time.perf_counter()
            ts = int(time.time() * 1000)
            await t.call("location", {"lat": 31.0 + sent * 1e-5, "lng": 121.0, "ts": ts},
                         namespace="/tracking", timeout=30)
            acks.append((time.perf_counter() - t0) * 1000)
            sent += 1
        return sent

    t0 = time.monotonic()
    sent = sum(await asyncio.gather(*(drive(i, t) for i, t in enumerate(tech_clients))))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1.0)
    for c in tech_clients + watchers:
        await c.disconnect()
    return {"scenario": "tracking", "technicians": techs, "offered_per_s": techs * rate,
            "accepted_per_s": round(sent / elapsed, 1), "delivered": len(latencies), "sent": sent,
            "fanout_ms": {"p50": round(pct(latencies, 50), 2), "p99": round(pct(latencies, 99), 2)},
            "ack_ms": {"p50": round(pct(acks, 50), 2), "p99": round(pct(acks, 99), 2)}}


async def store_baseline(stack: Stack, pairs: int, rate: float,
                         duration: float) -> list[float]:
    """What a chat send costs the store alone, at the same rate and
    concurrency, straight from PyMongo: the idempotency look-up, the
    conversation read, and the transaction that bumps its seq and inserts
    the message. The server's ack can be no faster than this."""
    from pymongo import AsyncMongoClient, ReturnDocument

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{stack.mongo_port}/?directConnection=true")
    db = client["realtime_baseline"]
    convs, msgs = db["conversations"], db["messages"]
    run = uuid.uuid4().hex[:6]
    for i in range(pairs):
        await convs.insert_one({"_id": f"b{run}-{i}", "last_seq": 0})
    times: list[float] = []
    interval = pairs / rate

    async def drive(i: int) -> None:
        conv_id, n = f"b{run}-{i}", 0
        start = time.monotonic() + (i / pairs) * interval
        while (now := time.monotonic()) < start + duration:
            await asyncio.sleep(max(0.0, start + n * interval - now))
            t0 = time.perf_counter()
            await msgs.find_one({"conversation_id": conv_id, "sender_id": "c", "client_msg_id": str(n)})
            await convs.find_one({"_id": conv_id})

            async def txn(session: Any, n: int = n) -> None:
                conv = await convs.find_one_and_update(
                    {"_id": conv_id}, {"$inc": {"last_seq": 1}},
                    return_document=ReturnDocument.AFTER, session=session)
                assert conv is not None
                await msgs.insert_one({"conversation_id": conv_id, "seq": conv["last_seq"],
                                       "sender_id": "c", "client_msg_id": str(n),
                                       "body": "您好，师傅大概几点到？"}, session=session)

            async with client.start_session() as session:
                await session.with_transaction(txn)
            times.append((time.perf_counter() - t0) * 1000)
            n += 1

    try:
        await asyncio.gather(*(drive(i) for i in range(pairs)))
    finally:
        await client.close()
    return times


async def run_chat(stack: Stack, pairs: int, rate: float, duration: float) -> dict[str, Any]:
    """`pairs` order chats (customer → technician), `rate` sends/s in total;
    before them, the same load on the store alone (`store_baseline`)."""
    store = await store_baseline(stack, pairs, rate, duration)
    run = uuid.uuid4().hex[:6]
    senders, convs = [], []
    recv: list[float] = []
    acks: list[float] = []
    sent_at: dict[str, float] = {}
    for i in range(pairs):
        oid, cid, tid = f"qc{run}-{i}", f"qcc{run}-{i}", f"qct{run}-{i}"
        await assigned_order(stack, oid, cid, tid)
        c = await client(stack, "/chat", "customer", cid)
        t = await client(stack, "/chat", "technician", tid)
        reply = await c.call("open", {"kind": "order", "order_id": oid}, namespace="/chat")
        conv = reply["data"]["conversation"]["conversation_id"]

        def on_message(m: dict[str, Any]) -> None:
            if m["client_msg_id"] in sent_at:
                recv.append((time.perf_counter() - sent_at[m["client_msg_id"]]) * 1000)

        t.on("message", on_message, namespace="/chat")
        senders.append((c, t))
        convs.append(conv)

    interval = pairs / rate

    async def drive(i: int) -> int:
        c, _ = senders[i]
        n = 0
        start = time.monotonic() + (i / pairs) * interval
        while (now := time.monotonic()) < start + duration:
            await asyncio.sleep(max(0.0, start + n * interval - now))
            cmid = f"{i}-{n}"
            sent_at[cmid] = time.perf_counter()
            await c.call("send", {"conversation_id": convs[i], "client_msg_id": cmid,
                                  "body": "您好，师傅大概几点到？"}, namespace="/chat", timeout=30)
            acks.append((time.perf_counter() - sent_at[cmid]) * 1000)
            n += 1
        return n

    t0 = time.monotonic()
    sent = sum(await asyncio.gather(*(drive(i) for i in range(pairs))))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1.0)
    for c, t in senders:
        await c.disconnect()
        await t.disconnect()
    return {"scenario": "chat", "conversations": pairs, "offered_per_s": rate,
            "sent_per_s": round(sent / elapsed, 1), "sent": sent, "received": len(recv),
            "send_ack_ms": {"p50": round(pct(acks, 50), 2), "p99": round(pct(acks, 99), 2)},
            "send_receive_ms": {"p50": round(pct(recv, 50), 2), "p99": round(pct(recv, 99), 2)},
            "store_alone_ms": {"p50": round(pct(store, 50), 2), "p99": round(pct(store, 99), 2)},
            "ack_over_store_ms": {"p50": round(pct(acks, 50) - pct(store, 50), 2),
                                  "p99": round(pct(acks, 99) - pct(store, 99), 2)},
            "median_ack_ms": round(statistics.median(acks), 2) if acks else None}


ORDER_PATH = ("en_route", "arrived", "in_service", "completed")


async def run_orders(stack: Stack, orders: int, rate: float) -> dict[str, Any]:
    """`orders` assigned orders, each subscribed to on `/orders` by its
    customer and by an agent; the backend then pushes every order through
    en_route → arrived → in_service → completed over the HTTP API, `rate`
    events/s in total. Push latency = the POST sent → the `order_event`
    received by each subscriber; and the POST's own round trip."""
    run = uuid.uuid4().hex[:6]
    subs: list[socketio.AsyncClient] = []
    pushed: list[float] = []
    posts: list[float] = []
    sent_at: dict[tuple[str, str], float] = {}
    oids = [f"qo{run}-{i}" for i in range(orders)]
    agent = await client(stack, "/orders", "agent", f"qa{run}")
    subs.append(agent)

    expected = orders * len(ORDER_PATH) * 2  # to the customer and to the agent
    all_in = asyncio.Event()

    def on_event(e: dict[str, Any]) -> None:
        t = sent_at.get((e["order_id"], e["state"]))
        if t is not None:
            pushed.append((time.perf_counter() - t) * 1000)
            if len(pushed) >= expected:
                all_in.set()

    agent.on("order_event", on_event, namespace="/orders")
    for i, oid in enumerate(oids):
        cid = f"qoc{run}-{i}"
        await assigned_order(stack, oid, cid, f"qot{run}-{i}")
        c = await client(stack, "/orders", "customer", cid)
        c.on("order_event", on_event, namespace="/orders")
        for who in (c, agent):
            reply = await who.call("subscribe", {"order_id": oid}, namespace="/orders")
            assert reply["ok"], reply
        subs.append(c)

    steps = [(oid, state) for state in ORDER_PATH for oid in oids]
    interval = 1.0 / rate
    headers = {"Authorization": f"Bearer {stack.token('service', 'backend')}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def post(oid: str, state: str) -> None:
            t0 = sent_at[(oid, state)] = time.perf_counter()
            async with session.post(f"{stack.url}/api/orders/{oid}/events",
                                    json={"state": state}) as r:
                body = await r.json()
            posts.append((time.perf_counter() - t0) * 1000)
            assert body["ok"], body

        start = time.monotonic()
        last: dict[str, asyncio.Future[None]] = {}
        for k, (oid, state) in enumerate(steps):
            await asyncio.sleep(max(0.0, start + k * interval - time.monotonic()))
            previous = last.get(oid)
            if previous is not None:  # an order's previous step must be stored first
                await previous
            last[oid] = asyncio.ensure_future(post(oid, state))
        await asyncio.gather(*last.values())
        elapsed = time.monotonic() - start
    with contextlib.suppress(TimeoutError):  # what is missing then is reported as missing
        await asyncio.wait_for(all_in.wait(), 10)
    for c in subs:
        await c.disconnect()
    return {"scenario": "orders", "orders": orders, "offered_per_s": rate,
            "posted_per_s": round(len(steps) / elapsed, 1), "events": len(steps),
            "pushes_expected": expected, "pushes_received": len(pushed),
            "post_ms": {"p50": round(pct(posts, 50), 2), "p99": round(pct(posts, 99), 2)},
            "push_ms": {"p50": round(pct(pushed, 50), 2), "p99": round(pct(pushed, 99), 2)}}


async def run_availability(stack: Stack, techs: int, queries: int) -> dict[str, Any]:
    """One district: `techs` technicians working 09:00-18:00 every day within
    20 km of the centre, two booked orders each in the coming week; then
    `queries` availability queries one after another (7 days, 60-minute
    jobs, a 30-minute grid), timed at the client (docs/benchmarks.md)."""
    import datetime as dt
    import random

    rnd = random.Random(7)
    centre = (31.2304, 121.4737)

    def near(km: float) -> tuple[float, float]:
        return (centre[0] + rnd.uniform(-km, km) / 111.0,
                centre[1] + rnd.uniform(-km, km) / 95.0)

    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    tz = dt.timezone(dt.timedelta(hours=8))
    headers = {"Authorization": f"Bearer {stack.token('service', 'backend')}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for i in range(techs):
            home = near(10)
            async with s.put(f"{stack.url}/api/technicians/t{i}/calendar", json={
                    "weekly": [{"weekday": d, "start": "09:00", "end": "18:00"} for d in range(7)],
                    "home": {"lat": home[0], "lng": home[1]}, "skills": ["plumbing"],
                    "area": {"circle": {"lat": centre[0], "lng": centre[1], "radius_m": 20_000}}}) as r:
                assert r.status == 200, await r.text()
            booked, tries = 0, 0
            while booked < 2:
                # An assignment the schedule refuses (overlap, or no time to
                # drive there: docs/scheduling.md) is drawn again elsewhere.
                tries += 1
                assert tries <= 50, f"no room for two orders of t{i}"
                day = tomorrow + dt.timedelta(days=rnd.randrange(7))
                start = dt.datetime.combine(day, dt.time(rnd.randrange(9, 16)), tz)
                where = near(10)
                oid = f"avail-{i}-{tries}"
                async with s.post(f"{stack.url}/api/orders", json={
                        "order_id": oid, "customer_id": f"c{i}",
                        "service": {"code": "plumbing", "name": "水管维修"},
                        "address": {"lat": where[0], "lng": where[1], "text": "x"},
                        "window": {"start_ts": int(start.timestamp() * 1000),
                                   "end_ts": int(start.timestamp() * 1000) + 3_600_000}}) as r:
                    assert r.status == 201, await r.text()
                async with s.post(f"{stack.url}/api/orders/{oid}/assign",
                                  json={"technician_id": f"t{i}"}) as r:
                    if r.status == 409:
                        continue
                    assert r.status == 200, await r.text()
                booked += 1
        lat_ms: list[float] = []
        sizes: list[int] = []
        pids = [p.pid for p in stack.procs]
        cpu0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in pids), time.process_time()
        t_start = time.perf_counter()
        for _ in range(queries):
            where = near(8)
            t0 = time.perf_counter()
            async with s.post(f"{stack.url}/api/availability", json={
                    "lat": where[0], "lng": where[1], "skill": "plumbing",
                    "from_date": tomorrow.isoformat(), "days": 7, "duration_min": 60,
                    "granularity_min": 30}) as r:
                body = await r.json()
            lat_ms.append((time.perf_counter() - t0) * 1000)
            assert body["ok"], body
            sizes.append(len(body["data"]["slots"]))
    seconds = time.perf_counter() - t_start
    machine = machine_busy_seconds() - cpu0[0]
    ours = sum(cpu_seconds(p) for p in pids) - cpu0[1] + time.process_time() - cpu0[2]
    split = await availability_split(stack, near(8), tomorrow)
    slowest = sorted(range(len(lat_ms)), key=lambda k: -lat_ms[k])[:5]
    return {"scenario": "availability", "technicians": techs, "orders": 2 * techs,
            "queries": queries, "slots_per_reply": statistics.median(sizes),
            "p50_ms": round(pct(lat_ms, 50), 1), "p90_ms": round(pct(lat_ms, 90), 1),
            "p99_ms": round(pct(lat_ms, 99), 1), "max_ms": round(max(lat_ms), 1),
            "over_50_ms": sum(1 for v in lat_ms if v > 50),
            "slowest": [[k, round(lat_ms[k], 1)] for k in slowest], **split,
            "others_cpu_pct_of_a_core": round(100 * (machine - ours) / seconds, 1)}


async def availability_split(stack: Stack, where: tuple[float, float], day: Any,
                             rounds: int = 30) -> dict[str, Any]:
    """Where a query's time goes, in this process against the same store: the
    service's computation alone (its caches warm, as on a node between
    refreshes), and the store reads a cold cache makes (every calendar of
    the skill, every schedule), each on its own (docs/benchmarks.md)."""
    from pymongo import AsyncMongoClient

    from realtime.services import tracking_config
    from scheduling.service import Query, SchedulingService
    from storage.calendars import MongoCalendarStore
    from storage.schedules import MongoScheduleStore, ScheduleBook

    eta = tracking_config(Settings(jwt_secret=SECRET)).eta
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{stack.mongo_port}/?directConnection=true")
    db = mongo[Settings(jwt_secret=SECRET).mongo_db]
    calendars = MongoCalendarStore(db)
    schedules = MongoScheduleStore(mongo, db, ScheduleBook(db, eta))

    async def nothing(*args: Any) -> None:
        return None

    service = SchedulingService(calendars, schedules, eta, changed=nothing, hold_ended=nothing,
                                order_notify=nothing, view_changed=nothing)
    q = Query(where[0], where[1], "plumbing", day, 7, 60, 30)
    compute, cal_reads, schedule_reads = [], [], []
    try:
        await service.availability(q)  # fills the caches
        for _ in range(rounds):
            t0 = time.perf_counter()
            await service.availability(q)
            compute.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            cals = await calendars.serving("plumbing", 2000)
            cal_reads.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await schedules.items_of([c.technician_id for c in cals])
            schedule_reads.append((time.perf_counter() - t0) * 1000)
    finally:
        await mongo.close()
    return {"in_process_ms": {
        "compute_warm_p50": round(statistics.median(compute), 1),
        "read_calendars_p50": round(statistics.median(cal_reads), 1),
        "read_schedules_p50": round(statistics.median(schedule_reads), 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.quick")
    ap.add_argument("scenario", choices=["tracking", "chat", "orders", "availability",
                                         "hold-latency", "contention"])
    ap.add_argument("--techs", type=int, default=None,
                    help="technicians (default 100; hold-latency, contention: 50, the hot slots)")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--orders", type=int, default=50)
    ap.add_argument("--rate", type=float, default=None,
                    help="tracking: points/s per technician (default 5); chat: sends/s in total (50); "
                         "orders: events/s in total (50); hold-latency: holds/s (50); "
                         "contention: holds/s offered (1000)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of load (default 20; contention: 3)")
    ap.add_argument("--queries", type=int, default=200, help="availability: queries to time")
    ap.add_argument("--subscribers", type=int, default=10,
                    help="hold-latency: watchers of the district on node B")
    ap.add_argument("--days", type=int, default=7, help="hold-latency: days the watchers see")
    ap.add_argument("--no-baseline", action="store_true",
                    help="hold-latency: skip the store-alone run of the same holds")
    ap.add_argument("--customers", type=int, default=400,
                    help="contention: distinct customers, half on each node")
    ap.add_argument("--named", action="store_true",
                    help="contention: each hold names a technician (else the server picks)")
    ap.add_argument("--homes", action="store_true",
                    help="contention: technicians have home bases (the best fit varies by place)")
    ap.add_argument("--cold", action="store_true",
                    help="contention: no availability query first (the nodes' caches start empty)")
    ap.add_argument("--raw", type=Path, default=None,
                    help="hold-latency, contention: write one JSON line per hold there")
    args = ap.parse_args()
    techs = args.techs or (50 if args.scenario in ("hold-latency", "contention") else 100)
    if args.scenario in ("hold-latency", "contention"):
        from loadtest import booking

        raw: list[dict[str, Any]] = []
        if args.scenario == "hold-latency":
            result = asyncio.run(booking.run(
                "hold-latency", techs=techs, subscribers=args.subscribers, rate=args.rate or 50.0,
                duration=args.duration or 20.0, days=args.days, baseline=not args.no_baseline,
                raw=raw))
        else:
            result = asyncio.run(booking.run(
                "contention", techs=techs, customers=args.customers, rate=args.rate or 1000.0,
                duration=args.duration or 3.0, named=args.named, homes=args.homes, warm=not args.cold,
                raw=raw))
        if args.raw is not None:
            args.raw.write_text("".join(json.dumps(r) + "\n" for r in raw))
        print(json.dumps(result, ensure_ascii=False))
        return
    duration = args.duration or 20.0
    stack = Stack()
    stack.start()
    try:
        async def go() -> dict[str, Any]:
            await stack.ready()
            if args.scenario == "tracking":
                return await run_tracking(stack, techs, args.rate or 5.0, duration)
            if args.scenario == "orders":
                return await run_orders(stack, args.orders, args.rate or 50.0)
            if args.scenario == "availability":
                return await run_availability(stack, techs, args.queries)
            return await run_chat(stack, args.pairs, args.rate or 50.0, duration)

        print(json.dumps(asyncio.run(go()), ensure_ascii=False))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
