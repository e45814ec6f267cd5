"""Benchmark of the transactional outbox's webhooks (outbox/relay.py,
realtime/outbound.py): a node's commit-to-receipt lag, its drain rate, and
its memory through an endpoint's outage.

    python -m loadtest.outbox_bench --scenario lag --rate 200 --seconds 60
    python -m loadtest.outbox_bench --scenario throughput --backlog 5000
    python -m loadtest.outbox_bench --scenario outage --rate 100 --seconds 600

Each run starts its own webhook receiver (aiohttp on a loopback port: it
answers 200 at once and records every POST's receipt time, `webhook-id` and
the body's data.event; it can answer 503 instead, or stop listening) and
its own `python -m realtime` on a fresh embedded store (--mongo-url: an
existing MongoDB, in a database of the run's own that is dropped at the
end), with REALTIME_WEBHOOKS pointing at the receiver (types ["order.*"]).
The backend's side is plain HTTP with a `service` token: each order is
created, assigned, then en_route, arrived, in_service, completed (six
events, six webhook deliveries), several orders at a time.

- lag: events at --rate per second for --seconds, paced by a schedule of
  tokens (event k is released at start + k/rate, whatever the ones before
  cost); then committed, delivered, duplicates, missing, out of order, and
  the lag from the event's server timestamp to its receipt (p50/p90/p99/max;
  the server stamps an event just before its transaction, so the lag
  includes the commit; the lag from the POST's answer is reported too).
- throughput: with the receiver not listening (connections refused), a
  backlog of --backlog events is committed and the relay has fanned it out
  into deliveries (its undone-age gauge in /metrics reads 0); then the
  receiver listens and the node's deliveries per second (median of 1 s
  buckets) and the drain time are measured.
- outage: --rate events/s for --seconds; the receiver answers 503 (or, with
  --down-mode closed, refuses connections) from 10% to 90% of the run; the
  server's RSS (VmRSS) is sampled every second; then whether every event
  was delivered once the backlog drained (within --drain-timeout).

A summary is printed and the full result written to
loadtest/results/outbox-<scenario>-<timestamp>.json. The server's log lines
at WARNING and above are kept in the result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from realtime.auth import mint_token
from realtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "outbox-bench-secret-0123456789abcdef"
STEPS = ("create", "assign", "en_route", "arrived", "in_service", "completed")
# Retry schedules (REALTIME_WEBHOOK_RETRY_S) by scenario; None: the server's default.
# throughput: heads refused while the backlog builds retry every second; the
# 20th wait is long so that no head dies however long the build takes (the
# first success after the receiver listens makes every head due at once:
# MongoOutboxStore.hurry), and heads of the newest orders are always on 1 s.
THROUGHPUT_RETRY = ",".join(["1"] * 19 + ["86400"])
# outage: the short schedule, its last wait (60 s) repeated up to the 20
# waits the server takes (about 16 minutes of tries), so that heads outlive
# the default 8-minute outage; recovery stays quick (at most ~60 s to a
# head's next try, and the first success hurries the rest).
OUTAGE_RETRY = ",".join(["2", "5", "10", "20", "30"] + ["60"] * 15)


# -- small helpers -------------------------------------------------------------
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def rounded(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def spread(values: list[float]) -> dict[str, float | None]:
    return {"n": len(values), "p50": rounded(pct(values, 50)), "p90": rounded(pct(values, 90)),
            "p99": rounded(pct(values, 99)), "max": rounded(max(values) if values else None),
            "min": rounded(min(values) if values else None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now_ms() -> float:
    return time.time() * 1000


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": affinity,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg())}


CODE_FILES = ("outbox/relay.py", "outbox/records.py", "outbox/retry.py", "outbox/notices.py",
              "storage/outbox.py", "realtime/outbound.py", "realtime/services.py")


def code_fingerprint() -> dict[str, Any]:
    """What the server ran: the commit, and the outbox's files as they were
    at the start (they may differ from the commit)."""
    import hashlib

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except OSError:
        head = None
    files = {}
    for name in CODE_FILES:
        with contextlib.suppress(OSError):
            files[name] = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]
    return {"git_head": head, "sha256_12": files}


def proc_status_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_busy_s() -> float:
    """CPU time every process of the machine used so far (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the embedded store's supervisor and the store)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                todo.append(int(k))
    return out


# -- the webhook receiver ---------------------------------------------------------
@dataclass
class Receipt:
    recv_ms: float
    webhook_id: str
    event_ts: int | None
    order_id: str | None
    seq: int | None
    topic: str | None


class Receiver:
    """A webhook endpoint on a loopback port: `up` (200 at once), `down`
    (503 at once) or `closed` (not listening: connections are refused, and
    connections already open are cut)."""

    def __init__(self, secret: str) -> None:
        from standardwebhooks.webhooks import Webhook

        self.port = free_port()
        self.mode = "closed"
        self.receipts: list[Receipt] = []
        self.answered_503 = 0
        self.cut = 0
        self.bad_signature = 0
        self.bad_body = 0
        self._verifier = Webhook(secret)
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _bind(self) -> None:
        # Bound but not listening: the port stays ours and a connect is refused.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.setblocking(False)
        self._sock = sock

    async def prepare(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._bind()

    async def listen(self) -> None:
        """Start answering (200)."""
        self.mode = "up"
        if self._site is None:
            assert self._runner is not None and self._sock is not None
            self._site = web.SockSite(self._runner, self._sock)
            await self._site.start()

    def down(self) -> None:
        """Answer 503 to every POST (still listening)."""
        self.mode = "down"

    def up(self) -> None:
        self.mode = "up"

    async def close(self) -> None:
        """Stop listening and cut the connections open (refused from now on)."""
        self.mode = "closed"
        if self._site is not None:
            await self._site.stop()
            self._site = None
            assert self._runner is not None
            server = self._runner.server
            if server is not None:
                for handler in list(server.connections):
                    handler.force_close()
            self._bind()  # the old socket was closed with its server

    async def shutdown(self) -> None:
        self.mode = "closed"
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._site = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        t = now_ms()
        if self.mode == "closed":
            self.cut += 1
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        if self.mode == "down":
            self.answered_503 += 1
            return web.Response(status=503, text="down for the benchmark")
        raw = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        body: Any
        try:
            body = self._verifier.verify(raw, headers)
        except Exception:
            self.bad_signature += 1
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        wid = request.headers.get("webhook-id", "")
        event_ts = order_id = seq = topic = None
        if isinstance(body, dict):
            data = body.get("data") or {}
            event = data.get("event") or {}
            order = data.get("order") or {}
            topic = body.get("type")
            event_ts = event.get("ts")
            seq = event.get("seq")
            order_id = order.get("order_id") or event.get("order_id")
        else:
            self.bad_body += 1
        self.receipts.append(Receipt(t, wid, event_ts, order_id, seq, topic))
        return web.Response(status=200, text="ok")


# -- the server ----------------------------------------------------------------
class Server:
    """One `python -m realtime` on a fresh embedded store (or --mongo-url)."""

    def __init__(self, args: argparse.Namespace, webhook_url: str, webhook_secret: str,
                 retry: str | None) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="rt-outbox-bench-"))
        self.port = free_port()
        self.db_name = f"outboxbench_{uuid.uuid4().hex[:8]}" if args.mongo_url else None
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.store_pids: list[int] = []
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("REALTIME_") and k not in ("MONGO_URL", "REDIS_URL")}
        env.update({
            "REALTIME_JWT_SECRET": SECRET, "REALTIME_HOST": "127.0.0.1",
            "REALTIME_PORT": str(self.port), "REALTIME_DATA_DIR": str(self.tmp / "data"),
            "REALTIME_LOG_LEVEL": args.server_log_level,
            # The backend's edge bucket (1000/s) must not shape the load.
            "REALTIME_HTTP_SERVICE_RATE": "0",
            "REALTIME_WEBHOOKS": json.dumps([{"url": webhook_url, "secret": webhook_secret,
                                              "types": ["order.*"],
                                              "description": "loadtest.outbox_bench"}]),
        })
        if retry:
            env["REALTIME_WEBHOOK_RETRY_S"] = retry
        if args.mongo_url:
            env["MONGO_URL"] = args.mongo_url
            assert self.db_name is not None
            env["REALTIME_MONGO_DB"] = self.db_name
        if args.redis_url:
            env["REDIS_URL"] = args.redis_url
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        self.env = env
        self.settings = Settings(jwt_secret=SECRET)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        return mint_token(self.settings, sub="outbox-bench", role="service", ttl_s=24 * 3600)

    def start(self) -> None:
        out = open(self.log_path, "ab")
        try:
            # Its own session: a Ctrl-C reaches only us, and we stop it in order.
            self.proc = subprocess.Popen([sys.executable, "-m", "realtime"], env=self.env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            out.close()

    async def ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
                        if r.status == 200:
                            self.store_pids = descendants(self.proc.pid)
                            return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int | None:
        return proc_status_kb(self.pid)

    def store_rss_kb(self) -> int | None:
        vals = [proc_status_kb(p) for p in self.store_pids]
        known = [v for v in vals if v is not None]
        return sum(known) if known else None

    def cpu_s(self) -> dict[str, float | None]:
        """CPU seconds so far: the server, its store, the machine, this process."""
        store = [proc_cpu_s(p) for p in self.store_pids]
        known = [v for v in store if v is not None]
        return {"server": proc_cpu_s(self.pid), "store": sum(known) if known else None,
                "machine": machine_busy_s(), "bench": time.process_time()}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_problems(self, keep: int = 100) -> dict[str, Any]:
        """The log's lines at WARNING and above (and tracebacks)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {"warnings": 0, "errors": 0, "lines": []}
        counts: Counter[str] = Counter()
        picked: list[str] = []
        for line in lines:
            level = next((lv for lv in ("CRITICAL", "ERROR", "WARNING") if f" {lv} " in line), None)
            if level is None and line.startswith("Traceback"):
                level = "ERROR"
            if level is not None:
                counts[level] += 1
                if len(picked) < keep:
                    picked.append(line[:500])
        return {"warnings": counts["WARNING"], "errors": counts["ERROR"] + counts["CRITICAL"],
                "lines": picked}

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # The store's supervisor stops it when the server goes; make sure.
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in self.store_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self.store_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGTERM)
        if self.db_name and self.args.mongo_url:
            try:
                from pymongo import MongoClient

                client: MongoClient[dict[str, Any]] = MongoClient(self.args.mongo_url,
                                                                  serverSelectionTimeoutMS=5000)
                client.drop_database(self.db_name)
                client.close()
            except Exception as exc:
                print(f"warning: database {self.db_name} not dropped: {exc}", file=sys.stderr)

    def remove_tmp(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the backend's side: orders over HTTP ------------------------------------------------
@dataclass
class Commit:
    ack_ms: float  # when the POST's answer came back
    event_ts: int  # the server's timestamp of the event


@dataclass
class Driver:
    url: str
    token: str
    run: str
    committed: dict[tuple[str, int], Commit] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    post_ms: list[float] = field(default_factory=list)
    first_post: float | None = None
    last_ack: float | None = None
    orders_started: int = 0
    max_queue: int = 0

    async def _post(self, s: aiohttp.ClientSession, path: str, body: dict[str, Any],
                    step: str) -> dict[str, Any] | None:
        t0 = time.monotonic()
        if self.first_post is None:
            self.first_post = t0
        try:
            async with s.post(self.url + path, json=body) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[f"{step}:{type(exc).__name__}"] += 1
            return None
        t1 = time.monotonic()
        self.post_ms.append((t1 - t0) * 1000)
        try:
            reply = json.loads(text)
        except ValueError:
            reply = None
        if status >= 300 or not isinstance(reply, dict) or not reply.get("ok"):
            code = (reply or {}).get("error", {}).get("code") if isinstance(reply, dict) else None
            self.errors[f"{step}:{status}:{code}"] += 1
            return None
        self.last_ack = t1
        data = reply.get("data")
        return data if isinstance(data, dict) else None

    def _commit(self, order_id: str, seq: Any, ts: Any) -> None:
        if isinstance(seq, int) and isinstance(ts, int):
            self.committed[(order_id, seq)] = Commit(now_ms(), ts)
        else:  # answered ok, yet no event: counted, never matched
            self.errors["ok_without_event"] += 1

    async def step(self, s: aiohttp.ClientSession, order_id: str, tech: str, step: str) -> bool:
        if step == "create":
            start = int(time.time() * 1000) + 86_400_000  # tomorrow: no lateness projections
            data = await self._post(s, "/api/orders", {
                "order_id": order_id, "customer_id": f"obc-{order_id}",
                "service": {"code": "bench", "name": "outbox bench"},
                "address": {"lat": 31.2304, "lng": 121.4737, "text": "bench"},
                "window": {"start_ts": start, "end_ts": start + 3_600_000}}, step)
            if data is None:
                return False
            order = data.get("order") or {}
            if not data.get("created"):
                self.errors["create:not_created"] += 1
                return False
            self._commit(order_id, order.get("seq"), order.get("created_ts"))
            return True
        if step == "assign":
            data = await self._post(s, f"/api/orders/{order_id}/assign", {"technician_id": tech}, step)
        else:
            data = await self._post(s, f"/api/orders/{order_id}/events", {"state": step}, step)
        if data is None:
            return False
        event = data.get("event") or {}
        self._commit(order_id, event.get("seq"), event.get("ts"))
        return True

    async def worker(self, s: aiohttp.ClientSession, wid: int, tokens: asyncio.Queue[int | None]) -> None:
        """Orders one after another, each step taking one token."""
        n = 0
        while True:
            order_id, tech = f"ob{self.run}-{wid}-{n}", f"obt{self.run}-{wid}-{n}"
            n += 1
            for step in STEPS:
                tok = await tokens.get()
                if tok is None:
                    return
                if step == "create":
                    self.orders_started += 1
                if not await self.step(s, order_id, tech, step):
                    break  # this order is abandoned; the next one starts

    async def drive(self, events: int, workers: int, rate: float | None,
                    start: float | None = None, on_tick: Callable[[float], None] | None = None) -> float:
        """`events` events by `workers` concurrent orders; paced at `rate`/s
        (tokens released on an absolute schedule) or as fast as they go.
        Returns the monotonic time the schedule started."""
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        timeout = aiohttp.ClientTimeout(total=30)
        headers = {"Authorization": f"Bearer {self.token}"}
        conn = aiohttp.TCPConnector(limit=workers + 4)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=conn) as s:
            start = time.monotonic() + 0.2 if start is None else start
            tasks = [asyncio.create_task(self.worker(s, i, tokens)) for i in range(workers)]
            if rate is None:
                for k in range(events):
                    tokens.put_nowait(k)
            else:
                k = 0
                while k < events:
                    now = time.monotonic()
                    due = min(events, int((now - start) * rate) + 1) if now >= start else 0
                    while k < due:
                        tokens.put_nowait(k)
                        k += 1
                    self.max_queue = max(self.max_queue, tokens.qsize())
                    if on_tick is not None:
                        on_tick(now - start)
                    await asyncio.sleep(max(0.0, min(0.05, start + k / rate - time.monotonic())))
            for _ in range(workers):
                tokens.put_nowait(None)
            await asyncio.gather(*tasks)
        return start

    def summary(self, start: float) -> dict[str, Any]:
        end = self.last_ack or start
        elapsed = max(1e-9, end - start)
        return {"committed": len(self.committed), "orders_started": self.orders_started,
                "commit_seconds": round(elapsed, 2),
                "commit_rate_per_s": round(len(self.committed) / elapsed, 1),
                "post_ms": spread(self.post_ms), "errors": dict(self.errors),
                "most_tokens_waiting": self.max_queue}


# -- matching what was committed with what was received -------------------------------
def tally(driver: Driver, rx: Receiver, since_ms: float | None = None) -> dict[str, Any]:
    """committed vs delivered: duplicates, missing, out of order, extras, lag."""
    seen_ids: Counter[str] = Counter(r.webhook_id for r in rx.receipts)
    duplicates = sum(n - 1 for n in seen_ids.values() if n > 1)
    first: dict[tuple[str, int], Receipt] = {}
    ids_of: dict[tuple[str, int], set[str]] = defaultdict(set)
    extra_topics: Counter[str] = Counter()
    for r in rx.receipts:
        if r.order_id is None or r.seq is None:
            extra_topics[str(r.topic)] += 1
            continue
        key = (r.order_id, int(r.seq))
        ids_of[key].add(r.webhook_id)
        if key not in first:
            first[key] = r
        if key not in driver.committed:
            extra_topics[str(r.topic)] += 1
    committed = set(driver.committed)
    delivered = committed & set(first)
    missing = sorted(committed - set(first))
    # The same event under two webhook-ids: two records of one change.
    twice_recorded = sum(1 for k in delivered if len(ids_of[k]) > 1)
    # Per order, the first receipts must come in seq order.
    out_of_order = 0
    by_order: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (oid, seq), r in first.items():
        by_order[oid].append((r.recv_ms, seq))
    for items in by_order.values():
        items.sort()
        out_of_order += sum(1 for a, b in itertools.pairwise(items) if b[1] < a[1])
    lag = [first[k].recv_ms - ts for k in delivered if (ts := first[k].event_ts) is not None]
    lag_ack = [first[k].recv_ms - driver.committed[k].ack_ms for k in delivered]
    return {"committed": len(committed), "delivered": len(delivered), "missing": len(missing),
            "missing_examples": [list(k) for k in missing[:10]],
            "posts_received": len(rx.receipts), "duplicates": duplicates,
            "events_under_two_ids": twice_recorded, "out_of_order": out_of_order,
            "unexpected": dict(extra_topics), "bad_signature": rx.bad_signature,
            "bad_body": rx.bad_body,
            "lag_ms": spread(lag), "lag_from_ack_ms": spread(lag_ack)}


def lag_series(driver: Driver, rx: Receiver, bucket_s: float = 10.0) -> list[dict[str, Any]]:
    """p50/p99 lag by commit time, in buckets of bucket_s (does it grow?)."""
    first: dict[tuple[str, int], Receipt] = {}
    for r in rx.receipts:
        if r.order_id is not None and r.seq is not None:
            first.setdefault((r.order_id, int(r.seq)), r)
    if not driver.committed:
        return []
    t0 = min(c.event_ts for c in driver.committed.values())
    buckets: dict[int, list[float]] = defaultdict(list)
    for k, c in driver.committed.items():
        got = first.get(k)
        if got is not None:
            buckets[int((c.event_ts - t0) / 1000 / bucket_s)].append(got.recv_ms - c.event_ts)
    return [{"from_s": b * bucket_s, "n": len(v), "p50": rounded(pct(v, 50)), "p99": rounded(pct(v, 99)),
             "max": rounded(max(v))} for b, v in sorted(buckets.items())]


def explain_missing(driver: Driver, rx: Receiver, left: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each order with events never received: its first missing event,
    the node's delivery of it (status, when it was fanned out) matched by
    type and timestamp, and when the event before it was received. A
    delivery fanned out as `waiting` while the one ahead of it was being
    delivered, and still waiting with no head, is a chain that lost its
    promotion."""
    got: dict[tuple[str, int], float] = {}
    for r in rx.receipts:
        if r.order_id is not None and r.seq is not None:
            got.setdefault((r.order_id, int(r.seq)), r.recv_ms)
    firsts: dict[str, int] = {}
    for oid, seq in sorted(set(driver.committed) - set(got)):
        firsts.setdefault(oid, seq)
    by_type_ts = {(str(d.get("type")), d.get("ts")): d for d in left}
    out = []
    for oid, seq in sorted(firsts.items())[:50]:
        commit = driver.committed[(oid, seq)]
        state = STEPS[seq - 1] if 1 <= seq <= len(STEPS) else "?"
        topic = "order." + {"create": "created", "assign": "assigned"}.get(state, state)
        d = by_type_ts.get((topic, commit.event_ts))
        prev = got.get((oid, seq - 1))
        item: dict[str, Any] = {
            "order_id": oid, "first_missing_seq": seq, "type": topic,
            "missing_of_order": sum(1 for k in driver.committed if k[0] == oid and k not in got),
            "event_ts": commit.event_ts, "previous_received_ms": rounded(prev, 0)}
        if d is not None:
            item.update({"delivery_status": d.get("status"), "fanned_out_ts": d.get("created_ts"),
                         "tries": d.get("tries"), "next_ts": d.get("next_ts")})
            if prev is not None and d.get("created_ts") is not None:
                # > 0: fanned out before the one ahead of it was received (then recorded).
                item["fanned_out_before_previous_received_ms"] = round(prev - float(d["created_ts"]), 1)
        out.append(item)
    return out


async def wait_drained(driver: Driver, rx: Receiver, timeout_s: float, server: Server) -> float | None:
    """Seconds until every committed event was received (None: not within timeout_s)."""
    t0 = time.monotonic()
    want = set(driver.committed)
    got: set[tuple[str, int]] = set()
    n = 0
    while True:
        for r in rx.receipts[n:]:
            if r.order_id is not None and r.seq is not None:
                got.add((r.order_id, int(r.seq)))
        n = len(rx.receipts)
        if want <= got:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s or not server.alive():
            return None
        await asyncio.sleep(0.2)


OUTBOX_METRICS = ("realtime_outbox_attempts_total", "realtime_outbox_dead_letters_total",
                  "realtime_outbox_lag_seconds_count", "realtime_outbox_lag_seconds_sum",
                  "realtime_outbox_undone_age_seconds", "realtime_outbox_partitions")


async def scrape(s: aiohttp.ClientSession, server: Server) -> dict[str, float]:
    """The node's outbox lines of /metrics (loopback may read them)."""
    async with s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(OUTBOX_METRICS):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def wait_fanned_out(server: Server, timeout_s: float) -> float | None:
    """Seconds until the relay has turned every record into deliveries: its
    gauge of the oldest undone record's age reads 0 twice, a second apart
    (None: not within timeout_s)."""
    t0 = time.monotonic()
    zeros = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() - t0 < timeout_s and server.alive():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                age = (await scrape(s, server)).get("realtime_outbox_undone_age_seconds")
                zeros = zeros + 1 if age == 0 else 0
                if zeros >= 2:
                    return time.monotonic() - t0
            await asyncio.sleep(1.0)
    return None


async def server_view(server: Server) -> dict[str, Any]:
    """The node's own counts: /metrics' outbox lines, and its dead letters."""
    out: dict[str, Any] = {}
    wid = None
    headers = {"Authorization": f"Bearer {server.token()}"}
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as s:
            out["metrics"] = await scrape(s, server)
            async with s.get(f"{server.url}/api/webhooks") as r:
                hooks = (await r.json())["data"]["webhooks"]
            wid = hooks[0]["id"] if hooks else None
            if wid is not None:
                for status in ("dead", "pending", "waiting"):
                    async with s.get(f"{server.url}/api/webhooks/{wid}/deliveries",
                                     params={"status": status, "limit": "200"}) as r:
                        items = (await r.json())["data"]["deliveries"]
                    out[f"{status}_deliveries"] = len(items) if len(items) < 200 else "200+"
                    out.setdefault("_left", []).extend(items)
                    if status == "dead" and items:
                        out["dead_reasons"] = dict(Counter(str(d.get("dead_reason")) for d in items))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


# -- scenarios -----------------------------------------------------------------------
async def scenario_lag(args: argparse.Namespace, server: Server, rx: Receiver,
                       driver: Driver) -> dict[str, Any]:
    await rx.listen()
    events = int(args.rate * args.seconds)
    cpu0 = server.cpu_s()
    start = await driver.drive(events, args.workers, args.rate)
    commit = driver.summary(start)
    cpu1 = server.cpu_s()  # CPU under load (not while waiting for the drain)
    wall = time.monotonic() - start
    drained = await wait_drained(driver, rx, args.drain_timeout, server)
    await asyncio.sleep(args.grace)  # late duplicates
    return {"offered_rate_per_s": args.rate, "offered_events": events, **commit,
            "drained_after_load_s": rounded(drained, 2), **tally(driver, rx),
            "lag_by_10s_ms": lag_series(driver, rx), **cpu_share(cpu0, cpu1, wall)}


def cpu_share(cpu0: dict[str, float | None], cpu1: dict[str, float | None], wall: float) -> dict[str, Any]:
    """CPU used over `wall` seconds, in % of one core: the server, its embedded
    store, this process, and everything else on the machine (other work
    sharing the cores makes every figure slower)."""
    def used(key: str) -> float | None:
        a, b = cpu0.get(key), cpu1.get(key)
        return None if a is None or b is None else b - a

    def share(v: float | None) -> float | None:
        return None if v is None else round(100 * v / max(wall, 1e-9), 1)

    ours = sum(v for v in (used("server"), used("store"), used("bench")) if v is not None)
    machine_s = used("machine")
    return {"cpu_pct_of_a_core": {"server": share(used("server")), "embedded_store": share(used("store")),
                                  "bench": share(used("bench")),
                                  "others": share(None if machine_s is None else machine_s - ours),
                                  "cores": os.cpu_count()}}


async def scenario_throughput(args: argparse.Namespace, server: Server, rx: Receiver,
                              driver: Driver) -> dict[str, Any]:
    # The receiver is bound but not listening: every try is refused.
    print(f"building a backlog of {args.backlog} events (receiver refusing connections)...", flush=True)
    cpu0 = server.cpu_s()
    t_build = time.monotonic()
    start = await driver.drive(args.backlog, args.workers, None)
    commit = driver.summary(start)
    build_s = time.monotonic() - t_build
    # The relay turns records into deliveries whether or not the receiver
    # listens; the drain measured is the sending alone.
    print(f"backlog of {len(driver.committed)} committed in {build_s:.1f} s; waiting for the relay's "
          "fan-out", flush=True)
    fanned = await wait_fanned_out(server, args.drain_timeout)
    early = len(rx.receipts)
    up_wall_ms = now_ms()
    t_up = time.monotonic()
    await rx.listen()
    print(f"fan-out done {fanned and round(fanned, 1)} s after the last commit; receiver listening",
          flush=True)
    drained = await wait_drained(driver, rx, args.drain_timeout, server)
    await asyncio.sleep(args.grace)
    cpu1 = server.cpu_s()
    wall = time.monotonic() - t_up
    after = [r.recv_ms for r in rx.receipts[early:]]
    rate = delivery_rate(after)
    out = {"backlog_requested": args.backlog, **commit, "build_seconds": round(build_s, 2),
           "fan_out_done_after_build_s": rounded(fanned, 2),
           "first_delivery_after_up_s": rounded((min(after) - up_wall_ms) / 1000, 2) if after else None,
           "drain_s_from_up": rounded(drained, 2), **rate, **tally(driver, rx)}
    out.pop("lag_ms", None)  # the backlog's age, not a lag
    out.pop("lag_from_ack_ms", None)
    out.update(cpu_share(cpu0, cpu1, wall + (t_up - t_build)))
    return out


def delivery_rate(recv_ms: list[float]) -> dict[str, Any]:
    """POSTs received per second: the median of the full 1 s buckets between
    the first and the last, the mean over that span, and the best bucket."""
    if not recv_ms:
        return {"deliveries_per_s_median": None, "deliveries_per_s_mean": None,
                "deliveries_per_s_max": None, "drain_s_first_to_last": None, "buckets": []}
    t0, t1 = min(recv_ms), max(recv_ms)
    counts = Counter(int((t - t0) / 1000) for t in recv_ms)
    full = [counts.get(b, 0) for b in range(int((t1 - t0) / 1000))]  # the last one is partial
    span = (t1 - t0) / 1000
    return {"deliveries_per_s_median": statistics.median(full) if full else None,
            "deliveries_per_s_mean": round(len(recv_ms) / span, 1) if span > 0 else None,
            "deliveries_per_s_max": max(counts.values()),
            "drain_s_first_to_last": round(span, 2),
            "buckets": [counts.get(b, 0) for b in range(int(span) + 1)]}


def per_second(times_ms: list[float], t0_ms: float) -> list[int]:
    counts = Counter(int((t - t0_ms) / 1000) for t in times_ms if t >= t0_ms)
    return [counts.get(b, 0) for b in range(max(counts) + 1)] if counts else []


async def scenario_outage(args: argparse.Namespace, server: Server, rx: Receiver,
                          driver: Driver) -> dict[str, Any]:
    await rx.listen()
    events = int(args.rate * args.seconds)
    down_at, up_at = 0.1 * args.seconds, 0.9 * args.seconds
    samples: list[tuple[float, int, int | None]] = []  # (s since start, server KB, store KB)
    marks: dict[str, float] = {}
    done = asyncio.Event()
    t_start = time.monotonic() + 0.2  # what drive() takes as its start
    t_start_ms = now_ms() + 200

    async def sample() -> None:
        k = 0
        while not done.is_set():
            at = t_start + k
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            kb = server.rss_kb()
            if kb is not None:
                samples.append((time.monotonic() - t_start, kb, server.store_rss_kb()))
            k += 1

    async def switch(when: float, to: str) -> None:
        await asyncio.sleep(max(0.0, t_start + when - time.monotonic()))
        if to == "down":
            marks["down_wall_ms"] = now_ms()
            if args.down_mode == "closed":
                await rx.close()
            else:
                rx.down()
            print(f"[{when:.0f} s] receiver down ({args.down_mode})", flush=True)
        else:
            marks["up_wall_ms"] = now_ms()
            marks["committed_at_up"] = float(len(driver.committed))
            if args.down_mode == "closed":
                await rx.listen()
            else:
                rx.up()
            print(f"[{when:.0f} s] receiver up", flush=True)

    progress_seen: set[int] = set()

    def progress(t: float) -> None:
        if int(t) % 60 == 0 and int(t) not in progress_seen and t >= 1:
            progress_seen.add(int(t))
            rss = server.rss_kb()
            print(f"[{t:.0f} s] committed {len(driver.committed)}, received {len(rx.receipts)}, "
                  f"RSS {rss and rss // 1024} MB", flush=True)

    sampler = asyncio.create_task(sample())
    phase_tasks = [asyncio.create_task(switch(down_at, "down")), asyncio.create_task(switch(up_at, "up"))]
    cpu0 = server.cpu_s()
    try:
        await driver.drive(events, args.workers, args.rate, start=t_start, on_tick=progress)
        commit = driver.summary(t_start)
        await asyncio.gather(*phase_tasks)
        end_of_run = time.monotonic() - t_start
        cpu1 = server.cpu_s()  # CPU over the run (not while waiting for the drain)
        t_drain = time.monotonic()
        print(f"load done; waiting up to {args.drain_timeout:.0f} s for the backlog to drain", flush=True)
        drained = await wait_drained(driver, rx, args.drain_timeout, server)
        drain_wait = time.monotonic() - t_drain
        await asyncio.sleep(args.grace)
    finally:
        done.set()
        for t in phase_tasks:
            t.cancel()
        await asyncio.gather(sampler, *phase_tasks, return_exceptions=True)
    wall = end_of_run

    def kb(lo: float, hi: float) -> list[float]:
        return [float(s[1]) for s in samples if lo <= s[0] < hi]

    def mb(v: float | None) -> float | None:
        return None if v is None else round(v / 1024, 1)

    before, during = kb(0, down_at), kb(down_at, up_at)
    last5 = kb(0.95 * args.seconds, args.seconds)
    after_drain = kb(end_of_run + drain_wait, math.inf) or kb(end_of_run, math.inf)
    store_during = [float(s[2]) for s in samples if s[2] is not None and down_at <= s[0] < up_at]
    # Recovery: from the receiver's return until every event committed before it was received.
    recovery_s = None
    up_ms = marks.get("up_wall_ms")
    if up_ms is not None:
        committed_before_up = {k for k, c in driver.committed.items() if c.ack_ms <= up_ms}
        got: dict[tuple[str, int], float] = {}
        for r in rx.receipts:
            if r.order_id is not None and r.seq is not None:
                got.setdefault((r.order_id, int(r.seq)), r.recv_ms)
        if committed_before_up and committed_before_up <= set(got):
            recovery_s = round((max(got[k] for k in committed_before_up) - up_ms) / 1000, 2)
    after_up = [r.recv_ms for r in rx.receipts if up_ms is not None and r.recv_ms >= up_ms]
    rate = delivery_rate(after_up)
    rate.pop("buckets", None)
    res = tally(driver, rx)
    return {
        "offered_rate_per_s": args.rate, "offered_events": events, **commit,
        "down_mode": args.down_mode, "down_from_s": down_at, "up_at_s": up_at,
        "answered_503": rx.answered_503, "connections_cut": rx.cut,
        "rss_mb": {"before_median": mb(statistics.median(before)) if before else None,
                   "during_median": mb(statistics.median(during)) if during else None,
                   "during_max": mb(max(during)) if during else None,
                   "after_recovery_median_last_5pct": mb(statistics.median(last5)) if last5 else None,
                   "after_drain": mb(after_drain[-1]) if after_drain else None,
                   "max": mb(max(s[1] for s in samples)) if samples else None},
        "store_rss_mb_during_max": mb(max(store_during)) if store_during else None,
        "recovery_s_from_up": recovery_s,
        "after_up_deliveries_per_s": rate,
        "drained_after_load_s": rounded(drained, 2),
        "all_delivered": res["missing"] == 0 and drained is not None,
        **res,
        "lag_by_10s_ms": lag_series(driver, rx),
        "rss_samples": [[round(t, 1), k, s] for t, k, s in samples],
        # Per second of the run (and of the drain): events committed, POSTs received.
        "committed_by_s": per_second([c.ack_ms for c in driver.committed.values()], t_start_ms),
        "received_by_s": per_second([r.recv_ms for r in rx.receipts], t_start_ms),
        **cpu_share(cpu0, cpu1, wall),
    }


# -- the run -------------------------------------------------------------------------
def print_summary(result: dict[str, Any]) -> None:
    r = result["result"]
    sc = result["scenario"]
    print()
    print(f"== outbox bench: {sc} ({result['started']}, {result['machine']['cores']} cores, "
          f"Python {result['machine']['python']}) ==")
    print(f"committed {r['committed']} events at {r['commit_rate_per_s']}/s"
          + (f" (offered {r['offered_rate_per_s']}/s)" if "offered_rate_per_s" in r else "")
          + f"; POST p50 {r['post_ms']['p50']} ms p99 {r['post_ms']['p99']} ms"
          + (f"; errors {r['errors']}" if r["errors"] else ""))
    print(f"delivered {r['delivered']}, missing {r['missing']}, duplicates {r['duplicates']}, "
          f"out of order {r['out_of_order']}, POSTs received {r['posts_received']}"
          + (f", unexpected {r['unexpected']}" if r["unexpected"] else "")
          + (f", bad signatures {r['bad_signature']}" if r["bad_signature"] else ""))
    for m in r.get("missing_detail", [])[:10]:
        print(f"  never received: {m['order_id']} from seq {m['first_missing_seq']} ({m['type']}, "
              f"{m['missing_of_order']} events); node's delivery: {m.get('delivery_status', 'not listed')}"
              + (f", fanned out {m['fanned_out_before_previous_received_ms']} ms before the previous "
                 "event was received" if "fanned_out_before_previous_received_ms" in m else ""))
    if "lag_ms" in r:
        lag = r["lag_ms"]
        print(f"lag commit→receipt ms: p50 {lag['p50']}  p90 {lag['p90']}  p99 {lag['p99']}  max {lag['max']}"
              f"   (from the POST's answer: p50 {r['lag_from_ack_ms']['p50']}, "
              f"p99 {r['lag_from_ack_ms']['p99']})")
    if sc == "throughput":
        print(f"backlog built in {r['build_seconds']} s, fanned out {r['fan_out_done_after_build_s']} s "
              f"later; first delivery {r['first_delivery_after_up_s']} s "
              f"after the receiver listened; drained {r['drain_s_from_up']} s after it "
              f"({r['drain_s_first_to_last']} s first→last)")
        print(f"deliveries/s: median of 1 s buckets {r['deliveries_per_s_median']}, "
              f"mean {r['deliveries_per_s_mean']}, best {r['deliveries_per_s_max']}")
    if sc == "outage":
        m = r["rss_mb"]
        print(f"receiver {r['down_mode']} from {r['down_from_s']:.0f} s to {r['up_at_s']:.0f} s "
              f"(503s answered {r['answered_503']}, connections cut {r['connections_cut']})")
        print(f"server RSS MB: before {m['before_median']}; during median {m['during_median']}, "
              f"max {m['during_max']}; after recovery {m['after_recovery_median_last_5pct']}; "
              f"after drain {m['after_drain']}")
        print(f"recovered (everything committed before the return received) "
              f"{r['recovery_s_from_up']} s after the return; "
              f"deliveries/s after it: median {r['after_up_deliveries_per_s']['deliveries_per_s_median']}, "
              f"best {r['after_up_deliveries_per_s']['deliveries_per_s_max']}")
        print(f"every event delivered: {'yes' if r['all_delivered'] else 'NO'}")
    cpu = r.get("cpu_pct_of_a_core")
    if cpu:
        print(f"CPU % of a core: server {cpu['server']}, embedded store {cpu['embedded_store']}, "
              f"bench {cpu['bench']}, everything else on the machine {cpu['others']} "
              f"({cpu['cores']} cores)")
    srv = result["server"]
    view = srv.get("view", {})
    dead = {k: v for k, v in view.get("metrics", {}).items() if k.startswith("realtime_outbox_dead")}
    attempts = {k.split("{", 1)[1].rstrip("}"): v for k, v in view.get("metrics", {}).items()
                if k.startswith("realtime_outbox_attempts_total")}
    print(f"server: attempts {attempts or '?'}; dead letters {dead or 0}; "
          f"left dead/pending/waiting {view.get('dead_deliveries')}/{view.get('pending_deliveries')}/"
          f"{view.get('waiting_deliveries')}; log warnings {srv['log']['warnings']}, "
          f"errors {srv['log']['errors']}; exit code {srv.get('exit_code')}")
    for line in srv["log"]["lines"][:10]:
        print(f"  log: {line}")


async def run(args: argparse.Namespace, holder: dict[str, Any]) -> dict[str, Any]:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    rx = Receiver(secret)
    await rx.prepare()
    holder["receiver"] = rx
    retry = args.retry_schedule
    if retry is None:
        retry = {"throughput": THROUGHPUT_RETRY, "outage": OUTAGE_RETRY}.get(args.scenario)
    server = Server(args, rx.url, secret, retry)
    holder["server"] = server
    server.start()
    try:
        await server.ready()
        print(f"server pid {server.pid} on {server.url} "
              f"({'MongoDB ' + args.mongo_url if args.mongo_url else 'embedded store'}"
              f"{', Redis' if args.redis_url else ''}); receiver on {rx.url}", flush=True)
        if args.scenario == "outage" and retry:
            budget = sum(float(x) for x in retry.split(","))
            if budget < 0.8 * args.seconds:
                print(f"note: the retry schedule's tries span ~{budget:.0f} s, less than the outage "
                      f"(~{0.8 * args.seconds:.0f} s): heads that fail that long die (dead letters)",
                      flush=True)
        driver = Driver(server.url, server.token(), uuid.uuid4().hex[:6])
        rss_start = server.rss_kb()
        if args.scenario == "lag":
            result = await scenario_lag(args, server, rx, driver)
        elif args.scenario == "throughput":
            result = await scenario_throughput(args, server, rx, driver)
        else:
            result = await scenario_outage(args, server, rx, driver)
        view: dict[str, Any] = (await server_view(server) if server.alive()
                                else {"error": "server not running"})
        left: list[dict[str, Any]] = view.pop("_left", [])
        if result.get("missing"):
            result["missing_detail"] = explain_missing(driver, rx, left)
        rss_end = server.rss_kb()
    finally:
        await rx.shutdown()
    return {"result": result, "retry_schedule": retry,
            "server_info": {"view": view, "rss_mb_start": rss_start and round(rss_start / 1024, 1),
                            "rss_mb_end": rss_end and round(rss_end / 1024, 1)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.outbox_bench",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scenario", choices=["lag", "throughput", "outage"], default="lag")
    ap.add_argument("--rate", type=float, default=None,
                    help="events/s offered (lag: 200, outage: 100)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds of load (lag: 60, outage: 600)")
    ap.add_argument("--backlog", type=int, default=5000, help="throughput: events committed first")
    ap.add_argument("--workers", type=int, default=None,
                    help="orders in flight at once (default: max(32, rate/2); throughput: 16)")
    ap.add_argument("--down-mode", choices=["503", "closed"], default="503",
                    help="outage: the receiver answers 503, or stops listening")
    ap.add_argument("--retry-schedule", default=None,
                    help="REALTIME_WEBHOOK_RETRY_S (default: lag: the server's; throughput: "
                         "nineteen 1 s waits then one day; outage: 2,5,10,20,30 then 60 s waits "
                         "to 20 in all)")
    ap.add_argument("--drain-timeout", type=float, default=None,
                    help="seconds to wait for every delivery after the load (lag: 60, "
                         "throughput: 900, outage: 600)")
    ap.add_argument("--grace", type=float, default=2.0,
                    help="seconds to keep listening after the last delivery (late duplicates)")
    ap.add_argument("--mongo-url", default=None,
                    help="an existing MongoDB (a database of the run's own, dropped at the end); "
                         "default: a fresh embedded store")
    ap.add_argument("--redis-url", default=None, help="REDIS_URL for the server (default: none)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the server (repeatable)")
    ap.add_argument("--server-log-level", default="INFO")
    ap.add_argument("--out", type=Path, default=None, help="the JSON's path (default: loadtest/results/)")
    args = ap.parse_args(argv)
    defaults = {"lag": (200.0, 60.0, 60.0), "throughput": (0.0, 0.0, 900.0), "outage": (100.0, 600.0, 600.0)}
    rate, seconds, drain = defaults[args.scenario]
    args.rate = args.rate if args.rate is not None else rate
    args.seconds = args.seconds if args.seconds is not None else seconds
    args.drain_timeout = args.drain_timeout if args.drain_timeout is not None else drain
    if args.workers is None:
        args.workers = 16 if args.scenario == "throughput" else max(32, int(args.rate / 2))
    if args.scenario != "throughput" and (args.rate <= 0 or args.seconds <= 0):
        ap.error("--rate and --seconds must be positive")

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine_info = machine()
    code = code_fingerprint()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    holder: dict[str, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the run in order even where SIGINT came ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    info: dict[str, Any] = {}
    interrupted = False
    server: Server | None = None
    try:
        info = asyncio.run(run(args, holder))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping the server", file=sys.stderr)
    finally:
        server = holder.get("server")
        exit_code: int | None = None
        log: dict[str, Any] = {}
        if server is not None:
            if server.proc is not None:
                exit_code = server.proc.poll()  # None: it was still running (as it should)
            server.stop()
            log = server.log_problems()
            if interrupted or not info:
                tail = server.log_tail(20)
                if tail and not interrupted:
                    print(f"server log (last lines):\n{tail}", file=sys.stderr)
            server.remove_tmp()
    if interrupted or not info:
        raise SystemExit(130 if interrupted else 1)
    result = {
        "scenario": args.scenario, "started": started,
        "command": shlex.join(["python", "-m", "loadtest.outbox_bench", *(sys.argv[1:] if argv is None
                                                                          else argv)]),
        "machine": {**machine_info, "loadavg_at_end": list(os.getloadavg())},
        "code": code,
        "config": {"rate": args.rate, "seconds": args.seconds, "backlog": args.backlog,
                   "workers": args.workers, "down_mode": args.down_mode,
                   "retry_schedule": info["retry_schedule"], "drain_timeout_s": args.drain_timeout,
                   "store": "mongodb" if args.mongo_url else "embedded",
                   "redis": bool(args.redis_url), "server_env_extra": args.env},
        "result": info["result"],
        # exit_code: None when the server was still running at the end (as it should be).
        "server": {**info["server_info"], "log": log, "exit_code": exit_code},
    }
    print_summary(result)
    out = args.out or ROOT / "loadtest" / "results" / f"outbox-{args.scenario}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
