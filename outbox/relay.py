"""The relay: committed outbox records out to webhook endpoints and to the
people who are not connected (docs/webhooks.md, docs/notifications.md).

Work is split by partition (records.PARTITIONS) under leases in the store:
each node holds about its share (all partitions over the nodes alive), renews
them every third of REALTIME_OUTBOX_LEASE_S, and a dead node's leases lapse
so that the others take its partitions over. A node works only its own
partitions:

1. fan-out: each undone record becomes, in one transaction, a delivery per
   matching endpoint, and for each person it matters to who has no live
   socket on any node, a notification in their inbox with a delivery per
   Web Push subscription and per `notification.created` endpoint;
2. sending: due heads of their chains are claimed for a bounded time (no
   other node takes them meanwhile), sent with a bounded number in flight
   per target, and recorded: delivered (the next of the chain becomes due),
   or due again after the retry schedule, or dead after the last try.

Everything is at least once: a node that dies between a send and its record
leaves the delivery to be sent again, with the same `webhook-id`."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kernel.clock import now_ms
from outbox.notices import DEFAULT_LANG, Notice, held_until, notices_for, presence_key, words
from outbox.records import PARTITIONS, topic_matches
from outbox.retry import DEFAULT_SCHEDULE_S, next_wait_s

log = logging.getLogger(__name__)

# Web Push: a few quick tries (a push service that fails longer is down, and
# the inbox still holds the notification).
PUSH_SCHEDULE_S: Final = (5.0, 60.0, 600.0)
# The longest pause after a round (see _work).
MAX_YIELD_S: Final = 1.0
# How long a stopping node keeps fanning out its partitions' last records.
DRAIN_S: Final = 2.0
# After a wake, how long a round waits for more commits to join it.
GATHER_S: Final = 0.01
# How often a node looks for chains left without a head (a node that died
# between finishing a delivery and promoting the next), and how many at most.
# A chain is repaired only when two looks this far apart find the same
# delivery first in line and no head: a promotion takes milliseconds, so a
# chain caught between finishing and promoting is never taken for stuck.
REPAIR_EVERY_S: Final = 30.0
REPAIR_LIMIT: Final = 500
# Fan-outs of one record that fail before it is set aside.
POISON_TRIES: Final = 5
# How often the endpoints are re-read (besides the signal on every change).
ENDPOINTS_REFRESH_S: Final = 30.0

Online = Callable[[list[str]], Awaitable[set[str]]]


class Sender(Protocol):
    async def webhook(self, endpoint: dict[str, Any], msg_id: str, body: str) -> dict[str, Any]:
        """POST a signed delivery; the attempt: {ts, result, status, latency_ms, error}."""

    async def webpush(self, subscription: dict[str, Any], body: str, ttl_s: int, urgency: str,
                      topic: str) -> dict[str, Any]: ...


class OutboxStore(Protocol):
    async def heartbeat(self, node: str, now: int, until: int) -> int: ...
    async def leave(self, node: str) -> None: ...
    async def renew(self, node: str, now: int, until: int) -> set[int]: ...
    async def claim(self, part: int, node: str, now: int, until: int) -> bool: ...
    async def release(self, part: int, node: str) -> None: ...
    async def held_parts(self, now: int) -> set[int]: ...
    async def undone(self, parts: Any, limit: int) -> list[dict[str, Any]]: ...
    async def fan_out(self, rec_ids: list[str], deliveries: list[dict[str, Any]],
                      notifications: list[dict[str, Any]]) -> None: ...
    async def take_due(self, parts: Any, now: int, limit: int, node: str,
                       hold_ms: int, skip: list[str]) -> list[dict[str, Any]]: ...
    async def unclaim(self, ids: list[str], now: int) -> None: ...
    async def repair(self, parts: Any, suspects: dict[str, str], now: int,
                     limit: int) -> dict[str, str]: ...
    async def delivered(self, delivery: dict[str, Any], attempt: dict[str, Any],
                        now: int) -> dict[str, Any] | None: ...
    async def failed(self, delivery: dict[str, Any], attempt: dict[str, Any],
                     next_ts: int | None, now: int, dead_reason: str = ...) -> dict[str, Any] | None: ...
    async def dropped(self, delivery_id: str, reason: str, now: int) -> None: ...
    async def hurry(self, target: str, now: int) -> int: ...
    async def endpoints(self) -> list[dict[str, Any]]: ...
    async def notification_read(self, note_id: str) -> bool: ...
    async def give_up(self, rec_id: str, reason: str) -> None: ...
    async def endpoint(self, endpoint_id: str) -> dict[str, Any] | None: ...
    async def subscription(self, sub_id: str) -> dict[str, Any] | None: ...
    async def forget_subscription(self, sub_id: str) -> None: ...
    async def subscriptions_of(self, user_ids: list[str]) -> dict[str, list[dict[str, Any]]]: ...
    async def prefs_of(self, user_ids: list[str]) -> dict[str, dict[str, Any]]: ...


class Observer(Protocol):
    def attempt(self, channel: str, result: str) -> None: ...
    def dead(self, channel: str) -> None: ...
    def lag(self, seconds: float) -> None: ...
    def undone_age(self, seconds: float) -> None: ...
    def partitions(self, n: int) -> None: ...


@dataclass(frozen=True)
class RelayConfig:
    lease_s: float = 10.0
    poll_s: float = 0.25
    schedule: tuple[float, ...] = DEFAULT_SCHEDULE_S
    push_schedule: tuple[float, ...] = PUSH_SCHEDULE_S
    # Sends in flight at once per endpoint (or push service) on one node; as
    # many more may wait for a turn. Past that a node leaves them in the store.
    per_target: int = 8
    # Sends in flight on one node over all targets.
    max_inflight: int = 256
    send_timeout_s: float = 10.0
    # Records fanned out in one transaction: big enough to keep up under load,
    # small enough that one transaction never holds the store for long.
    batch: int = 50


def iso(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def envelope(topic: str, ts: int, data: dict[str, Any]) -> str:
    """A webhook body (Standard Webhooks' payload shape)."""
    return json.dumps({"type": topic, "timestamp": iso(ts), "data": data},
                      separators=(",", ":"), ensure_ascii=False, default=str)


def notification_id(rec_id: str, user_id: str) -> str:
    return "ntf_" + hashlib.sha256(f"{rec_id}|{user_id}".encode()).hexdigest()[:24]


def notification_out(doc: dict[str, Any]) -> dict[str, Any]:
    """A notification as the inbox, the push payload and the gateway see it."""
    out = {k: v for k, v in doc.items() if k not in ("_id", "source", "read_ts", "expire_at")}
    out["id"] = doc["_id"]
    return out


class Relay:
    def __init__(self, store: OutboxStore, sender: Sender, online: Online, node: str,
                 config: RelayConfig, observe: Observer,
                 signal: Callable[[], None] | None = None) -> None:
        self.store, self.sender, self.online = store, sender, online
        self.node, self.config, self.observe = node, config, observe
        self.parts: set[int] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, int] = {}
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._endpoints: list[dict[str, Any]] = []
        self._failing: set[str] = set()
        self._poison: dict[str, int] = {}
        # Chains without a head at the last repair look: chain -> first in line.
        self._stuck: dict[str, str] = {}
        self._signal = signal
        self._closing = False

    # -- life --------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._leases(), name="outbox-leases"),
                       asyncio.create_task(self._work(), name="outbox-work"),
                       asyncio.create_task(self._refresh(), name="outbox-endpoints")]

    async def close(self) -> None:
        # The loops also stop on the flag: PyMongo may turn a cancellation
        # inside an operation into an error of its own, which a loop that
        # keeps going after store errors would otherwise outlive.
        self._closing = True
        pending = set(self._tasks)
        for _ in range(3):  # a cancellation a driver swallowed is repeated
            for t in pending:
                t.cancel()
            if not pending:
                break
            _, pending = await asyncio.wait(pending, timeout=self.config.send_timeout_s / 3 + 1)
        # What this node committed last is fanned out before it goes (a
        # bounded try): a deploy hands the next node deliveries, not a backlog.
        if self.parts:
            try:
                await asyncio.wait_for(self._drain(), DRAIN_S)
            except Exception as exc:  # the next owner of the partitions does it
                log.info("outbox records left to the next owner: %s", type(exc).__name__)
        # Sends under way finish (each is bounded by its timeout): what they
        # learn is recorded, so nothing is sent twice for a graceful stop.
        if self._sending:
            await asyncio.wait(self._sending, timeout=self.config.send_timeout_s + 1)
        try:
            await self.store.leave(self.node)
        except Exception as exc:  # the leases then lapse by themselves
            log.warning("outbox leases not released: %s", type(exc).__name__)

    async def _drain(self) -> None:
        while True:
            recs = await self.store.undone(set(self.parts), self.config.batch)
            if recs:
                await self._fan_out_batch(recs)
            if len(recs) < self.config.batch:
                return

    def wake(self) -> None:
        """A record was committed: look now rather than at the next poll."""
        self._wake.set()

    def poke(self) -> None:
        """As wake, and tell the other nodes (the record's partition may be theirs)."""
        self._wake.set()
        if self._signal is not None:
            self._signal()

    async def reload_endpoints(self) -> None:
        self._endpoints = await self.store.endpoints()

    # -- leases ------------------------------------------------------------
    async def _leases(self) -> None:
        every = self.config.lease_s / 3
        while not self._closing:
            try:
                await self._lease_round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                log.warning("outbox lease round failed: %s", type(exc).__name__)
            if self._closing:
                return
            await asyncio.sleep(every)

    async def _lease_round(self) -> None:
        now = now_ms()
        until = now + int(self.config.lease_s * 1000)
        live = await self.store.heartbeat(self.node, now, until)
        held = await self.store.renew(self.node, now, until)
        share = math.ceil(PARTITIONS / max(1, live))
        if len(held) > share:
            for p in sorted(held)[share:]:
                await self.store.release(p, self.node)
                held.discard(p)
        elif len(held) < share:
            taken = await self.store.held_parts(now)
            free = [p for p in range(PARTITIONS) if p not in taken]
            random.shuffle(free)
            for p in free[:share - len(held)]:
                if await self.store.claim(p, self.node, now, until):
                    held.add(p)
        gained = held - self.parts
        self.parts = held
        self.observe.partitions(len(held))
        if gained:
            self._wake.set()

    async def _refresh(self) -> None:
        while not self._closing:
            try:
                await self.reload_endpoints()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                log.warning("webhook endpoints not read: %s", type(exc).__name__)
            if self._closing:
                return
            await asyncio.sleep(ENDPOINTS_REFRESH_S)

    # -- work --------------------------------------------------------------
    async def _work(self) -> None:
        repaired_at = 0.0
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
                # Woken by a commit: let the commits of the next moment join
                # this round (a round per batch, not per record, under load).
                await asyncio.sleep(GATHER_S)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.parts:
                continue
            if time.monotonic() - repaired_at > REPAIR_EVERY_S:
                repaired_at = time.monotonic()
                try:
                    self._stuck = await self.store.repair(set(self.parts), self._stuck, now_ms(),
                                                          REPAIR_LIMIT)
                except Exception as exc:
                    log.warning("outbox repair failed: %s", type(exc).__name__)
            t0 = time.monotonic()
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: the next round tries again
                if self._closing:
                    return
                log.warning("outbox round failed: %s", type(exc).__name__)
                await asyncio.sleep(self.config.poll_s)
            # Background work yields to the requests of the moment: a round
            # is followed by a pause twice as long as it took, so the relay
            # holds the store at most a third of the time. A slow store (a
            # burst of writes) slows the relay, never the requests.
            if not self._closing:
                await asyncio.sleep(min(2 * (time.monotonic() - t0), MAX_YIELD_S))

    async def _round(self) -> None:
        parts = set(self.parts)
        while True:
            recs = await self.store.undone(parts, self.config.batch)
            self.observe.undone_age(max(0.0, (now_ms() - recs[0]["ts"]) / 1000) if recs else 0.0)
            if recs:
                await self._fan_out_batch(recs)
            if len(recs) < self.config.batch:
                break
        room = self.config.max_inflight - sum(self._inflight.values())
        if room <= 0:
            return
        # Per target at most per_target in flight and as many waiting: each
        # waits for at most one send's timeout, within the claim's hold.
        cap = 2 * self.config.per_target
        full = [t for t, n in self._inflight.items() if n >= cap]
        hold_ms = int(self.config.send_timeout_s * 3000)
        due = await self.store.take_due(parts, now_ms(), room, self.node, hold_ms, skip=full)
        extra = []
        for d in due:
            if self._inflight.get(d["target"], 0) >= cap:
                extra.append(d["_id"])
            else:
                self._start_send(d)
        if extra:
            await self.store.unclaim(extra, now_ms())

    async def _fan_out_batch(self, recs: list[dict[str, Any]]) -> None:
        """Records in one transaction (a few store round trips per batch, not
        per record: under load the relay keeps up by batching); a batch that
        fails is split, so one record that always fails is found and set aside
        rather than stall its partition."""
        try:
            await self._fan_out(recs)
        except Exception as exc:
            if len(recs) > 1:
                for rec in recs:
                    await self._fan_out_batch([rec])
                return
            rec = recs[0]
            n = self._poison[rec["_id"]] = self._poison.get(rec["_id"], 0) + 1
            if n < POISON_TRIES:
                raise
            log.error("outbox record %s (%s) set aside after %d failed fan-outs: %s",
                      rec["_id"], rec["topic"], n, type(exc).__name__)
            await self.store.give_up(rec["_id"], type(exc).__name__)
        for rec in recs:
            self._poison.pop(rec["_id"], None)

    async def _fan_out(self, recs: list[dict[str, Any]]) -> None:
        now = now_ms()
        # Each key's records in pos order (a chain is one key to one endpoint).
        recs = sorted(recs, key=lambda r: (r["key"], r["pos"]))
        deliveries: list[dict[str, Any]] = []
        for rec in recs:
            body = None
            for ep in self._endpoints:
                if topic_matches(ep.get("types") or ["*"], rec["topic"]):
                    body = body or envelope(rec["topic"], rec["ts"], rec["data"])
                    deliveries.append(self._webhook_delivery(ep, rec["_id"], rec["topic"], rec["key"],
                                                             rec["pos"], rec["part"], rec["ts"], body,
                                                             now))
        notices = [(rec, n) for rec in recs for n in notices_for(rec, now)]
        notes: list[dict[str, Any]] = []
        if notices:
            online = await self.online(sorted({presence_key(n.namespace, n.user_id)
                                               for _, n in notices}))
            seen: set[tuple[str, str]] = set()
            away = []
            for rec, n in notices:  # one notification per person per record (the first)
                if (rec["_id"], n.user_id) not in seen and (
                        n.always or presence_key(n.namespace, n.user_id) not in online):
                    seen.add((rec["_id"], n.user_id))
                    away.append((rec, n))
            if away:
                users = sorted({n.user_id for _, n in away})
                prefs = await self.store.prefs_of(users)
                subs = await self.store.subscriptions_of(users)
                for rec, n in away:
                    note = self._notification(rec, n, prefs.get(n.user_id) or {}, now)
                    if note is None:
                        continue
                    notes.append(note)
                    deliveries.extend(self._notification_deliveries(rec, note, subs.get(n.user_id, []),
                                                                    now))
        await self.store.fan_out([r["_id"] for r in recs], deliveries, notes)

    def _notification(self, rec: dict[str, Any], n: Notice, prefs: dict[str, Any],
                      now: int) -> dict[str, Any] | None:
        if n.conversation_id and n.conversation_id in (prefs.get("muted_conversations") or []):
            return None
        lang = prefs.get("lang") or DEFAULT_LANG
        title, body = words(n, lang)
        held = None if n.urgent else held_until(prefs.get("quiet_hours"), now)
        return {"_id": notification_id(rec["_id"], n.user_id), "user_id": n.user_id,
                "role": n.role, "kind": n.kind, "topic": rec["topic"], "title": title,
                "body": body, "lang": lang, "link": n.link, "collapse_key": n.collapse_key,
                "priority": n.priority, "ttl_s": n.ttl_s, "expires_ts": now + n.ttl_s * 1000,
                "data": n.data, "ts": now, "event_ts": rec["ts"], "held_until": held,
                "read": False, "source": rec["_id"]}

    def _notification_deliveries(self, rec: dict[str, Any], note: dict[str, Any],
                                 subs: list[dict[str, Any]], now: int) -> list[dict[str, Any]]:
        due = note["held_until"] or now
        out = []
        view = notification_out(note)
        push_body = json.dumps(view, separators=(",", ":"), ensure_ascii=False)
        for sub in subs:
            out.append({
                "_id": f"{sub['_id']}:{note['_id']}", "msg_id": note["_id"], "source": rec["_id"],
                "channel": "webpush",
                "target": sub["_id"], "user_id": note["user_id"], "topic": "notification.created",
                "chain": f"{sub['_id']}|{note['_id']}", "ordered": False, "pos": 1,
                "part": rec["part"], "ts": now, "created_ts": now, "status": "pending", "open": True,
                "next_ts": due, "held": note["held_until"] is not None, "tries": 0, "attempts": [],
                "body": push_body, "ttl_s": note["ttl_s"], "expires_ts": note["expires_ts"],
                "urgency": "high" if note["priority"] == "high" else "normal",
                "collapse": note["collapse_key"]})
        for ep in self._endpoints:
            if topic_matches(ep.get("types") or ["*"], "notification.created"):
                d = self._webhook_delivery(ep, note["_id"], "notification.created",
                                           f"user:{note['user_id']}", 1, rec["part"], now,
                                           envelope("notification.created", now, view), now,
                                           ordered=False)
                d["next_ts"], d["held"] = due, note["held_until"] is not None
                d["source"] = rec["_id"]
                out.append(d)
        return out

    @staticmethod
    def _webhook_delivery(ep: dict[str, Any], msg_id: str, topic: str, key: str, pos: int, part: int,
                          ts: int, body: str, now: int, ordered: bool = True) -> dict[str, Any]:
        chain = f"{ep['_id']}|{key}" if ordered else f"{ep['_id']}|{msg_id}"
        return {"_id": f"{ep['_id']}:{msg_id}", "msg_id": msg_id, "channel": "webhook",
                "target": ep["_id"], "topic": topic, "chain": chain, "ordered": ordered, "pos": pos,
                "part": part, "ts": ts, "created_ts": now, "status": "pending", "open": True,
                "next_ts": now, "tries": 0, "attempts": [], "body": body}

    # -- sending -----------------------------------------------------------
    def _start_send(self, d: dict[str, Any]) -> None:
        target = d["target"]
        self._inflight[target] = self._inflight.get(target, 0) + 1
        task = asyncio.create_task(self._send(d))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, d: dict[str, Any]) -> None:
        target, channel = d["target"], d["channel"]
        sem = self._sems.get(target)
        if sem is None:
            sem = self._sems[target] = asyncio.Semaphore(self.config.per_target)
        try:
            async with sem:
                attempt = await self._attempt(d)
            if attempt is None:
                return
            now = now_ms()
            self.observe.attempt(channel, attempt["result"])
            if attempt["result"] == "ok":
                promoted = await self.store.delivered(d, attempt, now)
                if not d.get("held"):  # held by quiet hours: not lag
                    self.observe.lag(max(0.0, (now - int(d["ts"])) / 1000))
                if target in self._failing:
                    self._failing.discard(target)
                    if await self.store.hurry(target, now):
                        self._wake.set()
                if promoted is not None:
                    self._wake.set()
                return
            if attempt["result"] == "gone":
                await self.store.forget_subscription(target)
                await self.store.dropped(d["_id"], "subscription_gone", now)
                return
            self._failing.add(target)
            schedule = self.config.schedule if channel == "webhook" else self.config.push_schedule
            wait = next_wait_s(schedule, int(d.get("tries") or 0) + 1)
            next_ts = None if wait is None else now + int(wait * 1000)
            reason = "retries_exhausted"
            if d.get("expires_ts") and next_ts is not None and next_ts > d["expires_ts"]:
                next_ts, reason = None, "expired"
            await self.store.failed(d, attempt, next_ts, now, reason)
            if next_ts is None:
                self.observe.dead(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the claim lapses and the delivery is tried again
            log.warning("delivery %s not recorded: %s", d["_id"], type(exc).__name__)
        finally:
            left = self._inflight.get(target, 1) - 1
            if left:
                self._inflight[target] = left
            else:
                self._inflight.pop(target, None)
                self._sems.pop(target, None)

    async def _attempt(self, d: dict[str, Any]) -> dict[str, Any] | None:
        now = now_ms()
        if d.get("expires_ts") and now > int(d["expires_ts"]):
            await self.store.dropped(d["_id"], "expired", now)
            return None
        if d.get("held") and await self.store.notification_read(d["msg_id"]):
            # Held by quiet hours, and seen meanwhile (the app connected, or
            # the user read the inbox): no push for what was read.
            await self.store.dropped(d["_id"], "read", now)
            return None
        if d["channel"] == "webhook":
            ep = next((e for e in self._endpoints if e["_id"] == d["target"]), None) \
                or await self.store.endpoint(d["target"])
            if ep is None:
                await self.store.dropped(d["_id"], "endpoint_removed", now)
                return None
            return await self.sender.webhook(ep, d["msg_id"], d["body"])
        sub = await self.store.subscription(d["target"])
        if sub is None:
            await self.store.dropped(d["_id"], "unsubscribed", now)
            return None
        ttl = max(0, (int(d["expires_ts"]) - now) // 1000) if d.get("expires_ts") else 86_400
        topic = hashlib.sha256(str(d.get("collapse") or d["msg_id"]).encode()).hexdigest()[:32]
        return await self.sender.webpush(sub, d["body"], ttl, str(d.get("urgency") or "normal"), topic)
