"""FeedbackService: feedback as work (docs/feedback.md).

An item moves through the status table of feedback/model.py; every step
(created, assigned, status, replied, user_replied, noted, tagged,
prioritized, overdue) is an event with the item's next `seq`, committed
only if the item did not move meanwhile (optimistic, like orders). The
author's thread (their public steps) has a seq of its own, `user_seq`, so
what they replay is gap-free too. The store keeps daily rollups in the same
transaction as each step (counts, response times, terms), which is what the
statistics read.

SLA: the first response is due REALTIME_FEEDBACK_SLA_MIN after creation.
A sweep on every node flags items past it (`overdue`, one conditional
commit: exactly one node's event) and the edge pushes them to the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo

from feedback import model
from feedback.analysis import Period, summarize
from feedback.model import OPEN, PUBLIC, check_assign, check_handler, check_status, is_staff
from feedback.ratings import follow_up_id
from feedback.terms import terms as terms_of
from feedback.terms import warm
from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, NotFound

log = logging.getLogger(__name__)

FEEDBACK_ACTOR: Final = Actor("feedback", "system")
MAX_COMMIT_ATTEMPTS: Final = 8
SWEEP_BATCH: Final = 100
UNSET: Final = object()


@dataclass
class Rollup:
    """What a step changes in its item's creation day's rollup: counters
    (`status`, `category`, `tag`, `term` -> key -> +-n; `n`) and durations
    appended (`frt`: to first response, `res`: to resolution, in ms)."""

    day: str
    inc: dict[str, dict[str, int]] = field(default_factory=dict)
    push: dict[str, int] = field(default_factory=dict)
    created: int = 0

    def add(self, kind: str, key: str, n: int) -> None:
        bucket = self.inc.setdefault(kind, {})
        bucket[key] = bucket.get(key, 0) + n


class FeedbackStore(Protocol):
    async def insert(self, item: dict[str, Any], event: dict[str, Any], rollup: Rollup) -> bool: ...

    async def get(self, feedback_id: str) -> dict[str, Any] | None: ...

    async def commit(self, feedback_id: str, expected_seq: int, changes: dict[str, Any],
                     event: dict[str, Any], rollup: Rollup | None) -> dict[str, Any] | None: ...

    async def events(self, feedback_id: str, since_seq: int, limit: int,
                     public: bool) -> list[dict[str, Any]]: ...

    async def search(self, query: dict[str, Any], offset: int, limit: int) -> list[dict[str, Any]]: ...

    async def mine(self, user_id: str, limit: int) -> list[dict[str, Any]]: ...

    async def due(self, now: int, limit: int) -> list[dict[str, Any]]: ...

    async def unrouted(self, limit: int) -> list[dict[str, Any]]: ...

    async def open_loads(self) -> dict[str, int]: ...

    async def days(self, keys: list[str],
                   fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]: ...

    def in_period(self, from_ts: int, to_ts: int) -> AsyncIterator[dict[str, Any]]: ...


# (item, event) after each committed step: the edge pushes it.
Changed = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]
# The agent the support routing rules choose for an item (None: nobody is
# available), given each agent's open items.
ChooseAgent = Callable[[dict[str, int]], Awaitable[str | None]]


class NoChange(Exception):
    pass


def local_day(ts_ms: int, tz: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz).strftime("%Y-%m-%d")


class FeedbackService:
    def __init__(self, store: FeedbackStore, changed: Changed, *, sla_min: float, tz: str,
                 choose_agent: ChooseAgent | None = None) -> None:
        self.store = store
        self._changed = changed
        self.sla_ms = int(sla_min * 60_000)
        self.tz = ZoneInfo(tz)
        self._choose = choose_agent
        self._task: asyncio.Task[None] | None = None
        # The sweep's period: often enough that an item is flagged within a
        # small part of its SLA, at most every 15 s.
        self.sweep_s = max(0.2, min(15.0, self.sla_ms / 1000 / 8))

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        # The dictionary loads (once per process, ~1 s) off the loop and before
        # the node serves: the first item's request must not wait for it.
        await asyncio.to_thread(warm)
        if self._task is None:
            self._task = asyncio.create_task(self._sweeper(), name="feedback-sweep")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- creating ----------------------------------------------------------
    async def create(self, actor: Actor, name: str | None, *, category: str, body: str,
                     order_id: str | None = None, technician_id: str | None = None,
                     priority: str = "normal", source: str = "user") -> dict[str, Any]:
        ts = now_ms()
        words = await asyncio.to_thread(terms_of, body)
        item = new_item(actor, name, category=category, body=body, order_id=order_id,
                        technician_id=technician_id, priority=priority, source=source, ts=ts,
                        sla_ms=self.sla_ms, day=local_day(ts, self.tz), terms=words)
        event = first_event(item, actor, name)
        await self.store.insert(item, event, created_rollup(item))
        await self._changed(item, event)
        return item

    async def follow_up(self, order: dict[str, Any],
                        rating: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Rollup]:
        """The follow-up item of a low rating (written by the rating's own
        transaction): the customer's, linked to the order and technician,
        routed to an agent afterwards."""
        parts = [f"{rating['stars']}星"]
        for dim, word in (("quality", "质量"), ("attitude", "态度"), ("efficiency", "效率")):
            if rating.get(dim) is not None:
                parts.append(f"{word}{rating[dim]}")
        body = "低分评价：" + " / ".join(parts)
        if rating.get("comment"):
            body += f"。{rating['comment']}"
        ts = now_ms()
        words = await asyncio.to_thread(terms_of, str(rating.get("comment") or ""))
        actor = Actor(str(order["customer_id"]), "customer")
        item = new_item(actor, None, category="rating", body=body[:4000],
                        order_id=str(order["order_id"]),
                        technician_id=order.get("technician_id"),
                        priority="urgent" if int(rating["stars"]) <= 1 else "high",
                        source="rating", ts=ts, sla_ms=self.sla_ms, day=local_day(ts, self.tz),
                        terms=words, item_id=follow_up_id(str(order["order_id"])))
        return item, first_event(item, actor, None), created_rollup(item)

    async def announce(self, feedback_id: str) -> dict[str, Any] | None:
        """After a follow-up's transaction: push its creation, route it."""
        item = await self.store.get(feedback_id)
        if item is None:
            return None
        events = await self.store.events(feedback_id, 0, 1, public=False)
        if events:
            await self._changed(item, events[0])
        return await self.route(feedback_id) or item

    # -- reading -----------------------------------------------------------
    async def get(self, actor: Actor, feedback_id: str) -> dict[str, Any]:
        item = await self.store.get(feedback_id)
        if item is None or not (is_staff(actor) or _is_author(actor, item)):
            raise NotFound(f"no feedback {feedback_id!r}")
        return item

    async def thread(self, actor: Actor, feedback_id: str, since_seq: int,
                     limit: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The item and its steps after `since_seq`: all of them for staff,
        the author's thread (their seq) for the author."""
        item = await self.get(actor, feedback_id)
        if is_staff(actor):
            return item, await self.store.events(feedback_id, since_seq, limit, public=False)
        events = await self.store.events(feedback_id, since_seq, limit, public=True)
        return item, [model.user_event(e) for e in events]

    async def inbox(self, actor: Actor, query: dict[str, Any], offset: int,
                    limit: int) -> list[dict[str, Any]]:
        if not is_staff(actor):
            raise Forbidden("the feedback inbox is for support staff")
        return await self.store.search(query, offset, limit)

    async def mine(self, actor: Actor, limit: int) -> list[dict[str, Any]]:
        return await self.store.mine(actor.id, limit)

    # -- steps -------------------------------------------------------------
    async def reply(self, actor: Actor, name: str | None, feedback_id: str,
                    text: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Support's answer to the author (the author's own answer when the
        actor is the author)."""

        def decide(item: dict[str, Any], now: int) -> Step:
            if _is_author(actor, item) and not is_staff(actor):
                if item["status"] not in model.AUTHOR_REPLY_FROM:
                    raise Conflict(f"this item is {item['status']}", {"status": item["status"]})
                step = Step("user_replied", {"text": text})
                if item["status"] in ("replied", "resolved"):
                    step.status(item, "in_progress")
                return step
            check_handler(actor, item)
            if item["status"] not in model.REPLY_FROM:
                raise Conflict(f"a {item['status']} item is reopened before a reply",
                               {"status": item["status"]})
            step = Step("replied", {"text": text})
            if item.get("assignee") is None and actor.role == "agent":
                step.changes["assignee"] = actor.id  # who answers, has it
                step.data["assignee"] = actor.id
            step.status(item, "replied")
            if item.get("first_response_ts") is None:
                step.changes.update(first_response_ts=now, sla_due_ts=None, overdue=False)
                step.push["frt"] = now - item["ts"]
            return step

        return await self._act(actor, name, feedback_id, decide)

    async def note(self, actor: Actor, name: str | None, feedback_id: str,
                   text: str) -> tuple[dict[str, Any], dict[str, Any]]:
        def decide(item: dict[str, Any], now: int) -> Step:
            if not is_staff(actor):
                raise Forbidden("internal notes are for support staff")
            return Step("noted", {"text": text})

        return await self._act(actor, name, feedback_id, decide)

    async def assign(self, actor: Actor, name: str | None, feedback_id: str,
                     to: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        def decide(item: dict[str, Any], now: int) -> Step:
            check_assign(actor, item, to)
            if item.get("assignee") == to:
                raise NoChange
            return Step("assigned", {"assignee": to, "previous": item.get("assignee")},
                        {"assignee": to})

        return await self._act(actor, name, feedback_id, decide)

    async def set_status(self, actor: Actor, name: str | None, feedback_id: str,
                         status: str) -> tuple[dict[str, Any], dict[str, Any]]:
        def decide(item: dict[str, Any], now: int) -> Step:
            check_handler(actor, item)
            if item["status"] == status:
                raise NoChange
            check_status(item["status"], status)
            step = Step("status", {})
            step.status(item, status)
            if status in ("resolved", "closed"):
                step.changes.update(sla_due_ts=None, overdue=False)
            if status == "resolved" and item.get("resolved_ts") is None:
                step.changes["resolved_ts"] = now
                step.push["res"] = now - item["ts"]
            return step

        return await self._act(actor, name, feedback_id, decide)

    async def set_tags(self, actor: Actor, name: str | None, feedback_id: str,
                       tags: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        wanted = list(dict.fromkeys(tags))

        def decide(item: dict[str, Any], now: int) -> Step:
            if not is_staff(actor):
                raise Forbidden("tags are set by support staff")
            before = list(item.get("tags") or [])
            if before == wanted:
                raise NoChange
            step = Step("tagged", {"tags": wanted, "previous": before}, {"tags": wanted})
            for t in set(before) - set(wanted):
                step.rollup("tag", t, -1)
            for t in set(wanted) - set(before):
                step.rollup("tag", t, 1)
            return step

        return await self._act(actor, name, feedback_id, decide)

    async def set_priority(self, actor: Actor, name: str | None, feedback_id: str,
                           priority: str) -> tuple[dict[str, Any], dict[str, Any]]:
        def decide(item: dict[str, Any], now: int) -> Step:
            if not is_staff(actor):
                raise Forbidden("priorities are set by support staff")
            if item.get("priority") == priority:
                raise NoChange
            return Step("prioritized", {"priority": priority, "previous": item.get("priority")},
                        {"priority": priority})

        return await self._act(actor, name, feedback_id, decide)

    async def update(self, actor: Actor, name: str | None, feedback_id: str, *,
                     assignee: Any = UNSET, status: str | None = None,
                     tags: list[str] | None = None,
                     priority: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Several fields at once (PATCH): one step each, in this order:
        assignee, tags, priority, status. A field already as asked is no step."""
        item = await self.get(actor, feedback_id)
        # Refused as a whole, before any step, when a part would be: the
        # steps then run one by one (a concurrent change can still refuse a
        # later one, after the earlier ones stand).
        if not is_staff(actor):
            raise Forbidden("feedback is changed by support staff")
        after = dict(item)
        if assignee is not UNSET:
            check_assign(actor, item, assignee)
            after["assignee"] = assignee
        if status is not None and status != item["status"]:
            check_handler(actor, after)
            check_status(item["status"], status)
        events: list[dict[str, Any]] = []
        steps: list[Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]] = []
        if assignee is not UNSET:
            steps.append(lambda: self.assign(actor, name, feedback_id, assignee))
        if tags is not None:
            steps.append(lambda: self.set_tags(actor, name, feedback_id, tags))
        if priority is not None:
            steps.append(lambda: self.set_priority(actor, name, feedback_id, priority))
        if status is not None:
            steps.append(lambda: self.set_status(actor, name, feedback_id, status))
        for run in steps:
            try:
                item, event = await run()
            except NoChange:
                continue
            events.append(event)
        return item, events

    # -- the SLA and routing ---------------------------------------------
    async def flag_overdue(self, now: int | None = None) -> list[dict[str, Any]]:
        """Flag the items whose first response is past due (each once, by
        whichever node commits first); returns them."""
        now = now or now_ms()
        flagged = []
        for found in await self.store.due(now, SWEEP_BATCH):
            def decide(item: dict[str, Any], at: int) -> Step:
                due = item.get("sla_due_ts")
                if item.get("overdue") or due is None or due > at:
                    raise NoChange
                return Step("overdue", {"due_ts": due, "assignee": item.get("assignee")},
                            {"overdue": True})
            try:
                item, _ = await self._act(FEEDBACK_ACTOR, None, found["id"], decide)
            except (NoChange, NotFound):
                continue
            flagged.append(item)
        return flagged

    async def route(self, feedback_id: str) -> dict[str, Any] | None:
        """Give an unassigned item that asks for routing (a follow-up of a
        low rating) to the agent the routing rules choose; None when nobody
        is available (the sweep tries again)."""
        if self._choose is None:
            return None
        agent = await self._choose(await self.store.open_loads())
        if agent is None:
            return None

        def decide(item: dict[str, Any], now: int) -> Step:
            if item.get("assignee") is not None or item["status"] not in OPEN:
                raise NoChange
            return Step("assigned", {"assignee": agent, "previous": None, "routed": True},
                        {"assignee": agent, "auto_route": False})
        try:
            item, _ = await self._act(FEEDBACK_ACTOR, None, feedback_id, decide)
        except NoChange:
            return None
        return item

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self.flag_overdue()
                for item in await self.store.unrouted(SWEEP_BATCH):
                    if await self.route(item["id"]) is None:
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: next round
                log.warning("feedback sweep: %s", type(exc).__name__)

    # -- analysis ----------------------------------------------------------
    async def stats(self, actor: Actor, period: Period, group_by: str) -> dict[str, Any]:
        if not is_staff(actor):
            raise Forbidden("feedback statistics are for support staff")
        days = period.days()
        previous = period.previous().days()
        now = {d["_id"]: d for d in await self.store.days(days)}
        # Of the period before, only its total and its terms (what rose).
        before = {d["_id"]: d for d in await self.store.days(previous, ("n", "term"))}
        return summarize(period, [now[d] for d in days if d in now],
                         [before[d] for d in previous if d in before], group_by)

    def export(self, actor: Actor, period: Period) -> AsyncIterator[dict[str, Any]]:
        if not is_staff(actor):
            raise Forbidden("the feedback export is for support staff")
        start, end = period.bounds_ms(self.tz)
        return self.store.in_period(start, end)

    # -- the commit loop -------------------------------------------------
    async def _act(self, actor: Actor, name: str | None, feedback_id: str,
                   decide: Callable[[dict[str, Any], int], Step]) -> tuple[dict[str, Any], dict[str, Any]]:
        for _ in range(MAX_COMMIT_ATTEMPTS):
            item = await self.get(actor, feedback_id) if actor is not FEEDBACK_ACTOR \
                else await self._system_get(feedback_id)
            now = now_ms()
            step = decide(item, now)
            public = step.type in PUBLIC
            event = {"feedback_id": feedback_id, "seq": item["seq"] + 1,
                     "user_seq": item.get("user_seq", 0) + 1 if public else None,
                     "type": step.type, "status": step.changes.get("status", item["status"]),
                     "actor": {**actor.as_dict(), "name": name}, "data": step.data, "ts": now}
            changes = {**step.changes, "seq": event["seq"], "updated_ts": now}
            if public:
                changes["user_seq"] = event["user_seq"]
            rollup = None
            if step.inc or step.push:
                rollup = Rollup(item["day"], step.inc, step.push)
            updated = await self.store.commit(feedback_id, item["seq"], changes, event, rollup)
            if updated is None:
                continue  # it moved meanwhile: decide again on what it is now
            await self._changed(updated, event)
            return updated, event
        raise Conflict("this item kept changing; try again")

    async def _system_get(self, feedback_id: str) -> dict[str, Any]:
        item = await self.store.get(feedback_id)
        if item is None:
            raise NotFound(f"no feedback {feedback_id!r}")
        return item


class Step:
    """One decided step: its event type and data, the item's changes, and
    what it changes in the rollup."""

    def __init__(self, type_: str, data: dict[str, Any],
                 changes: dict[str, Any] | None = None) -> None:
        self.type = type_
        self.data = data
        self.changes: dict[str, Any] = dict(changes or {})
        self.inc: dict[str, dict[str, int]] = {}
        self.push: dict[str, int] = {}

    def rollup(self, kind: str, key: str, n: int) -> None:
        bucket = self.inc.setdefault(kind, {})
        bucket[key] = bucket.get(key, 0) + n

    def status(self, item: dict[str, Any], target: str) -> None:
        if target == item["status"]:
            return
        self.changes["status"] = target
        self.data.setdefault("status", target)
        self.data.setdefault("previous", item["status"])
        self.rollup("status", item["status"], -1)
        self.rollup("status", target, 1)


def _is_author(actor: Actor, item: dict[str, Any]) -> bool:
    return (item.get("user") or {}).get("id") == actor.id and actor.role != "system"


def new_item(actor: Actor, name: str | None, *, category: str, body: str, order_id: str | None,
             technician_id: str | None, priority: str, source: str, ts: int, sla_ms: int,
             day: str, terms: list[str], item_id: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id or uuid.uuid4().hex, "category": category, "body": body,
        "order_id": order_id, "technician_id": technician_id,
        "user": {"id": actor.id, "role": actor.role, "name": name},
        "ts": ts, "updated_ts": ts, "status": "new", "assignee": None, "tags": [],
        "priority": priority, "source": source, "seq": 1, "user_seq": 1,
        "sla_due_ts": ts + sla_ms, "overdue": False, "first_response_ts": None,
        "resolved_ts": None, "auto_route": source != "user", "day": day, "terms": terms,
    }


def first_event(item: dict[str, Any], actor: Actor, name: str | None) -> dict[str, Any]:
    return {"feedback_id": item["id"], "seq": 1, "user_seq": 1, "type": "created",
            "status": "new", "actor": {**actor.as_dict(), "name": name},
            "data": {"category": item["category"], "body": item["body"],
                     "order_id": item["order_id"], "source": item["source"]},
            "ts": item["ts"]}


def created_rollup(item: dict[str, Any]) -> Rollup:
    r = Rollup(item["day"], created=1)
    r.add("status", "new", 1)
    r.add("category", item["category"], 1)
    r.add("source", item["source"], 1)
    for t in item["terms"]:
        r.add("term", t, 1)
    return r
