"""Bookings as a service: availability, holds, confirmation, the expiry
sweep, and the live views of watchers (docs/scheduling.md).

Reads go through this node's caches of calendars and schedules, kept fresh
by the change signals every node receives (`schedule_changed`,
`calendar_changed`) and by a short time to live; writes go to the store,
which decides exclusivity in a transaction (storage/schedules.py). A stale
cache can only show a slot that a hold then refuses, never book one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal, Protocol

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, Invalid, NotFound, RateLimited, Unavailable
from kernel.locks import KeyedLocks
from kernel.rate import MemoryRateLimiter
from kernel.tasks import BackgroundTasks
from orders.model import Event, Order
from scheduling.availability import Day, Drives, Request, availability, free_starts
from scheduling.calendar import Calendar
from scheduling.schedule import Hold, HoldEnd, Item, Taken, place, shown
from tracking.eta import EtaConfig
from tracking.geo import haversine_m

log = logging.getLogger(__name__)

# How many technicians one query considers: a district's worth and more.
MAX_TECHNICIANS: Final = 2000
MAX_DAYS: Final = 14
DAY_MS: Final = 24 * 3600 * 1000
# A hold with no technician named tries this many best fits before `conflict`.
HOLD_TRIES: Final = 5
# A confirmed order's address may be this far from where the hold was made
# (the same home, geocoded again); farther, the drive around it is not what
# was checked.
HOLD_PLACE_M: Final = 500
# A `conflict` suggests this many next free start times.
NEXT_STARTS: Final = 5
# The expiry sweep's period: a slot comes back within it (plus a write and
# a signal) of its hold's expiry.
SWEEP_S: Final = 0.25
# Per user and node (the backend is not limited): a week of a district's
# availability costs tens of milliseconds of this node's CPU, and every
# hold or release is a transaction and a signal to every node.
QUERY_RATE: Final = (5.0, 20.0)  # per second, burst
HOLD_RATE: Final = (1.0, 10.0)


class Calendars(Protocol):
    async def serving(self, skill: str | None, limit: int) -> list[Calendar]: ...

    async def get(self, technician_id: str) -> tuple[Calendar, int] | None: ...

    async def of(self, technician_ids: list[str]) -> dict[str, Calendar]: ...


class Schedules(Protocol):
    async def items_of(self, technician_ids: list[str]) -> dict[str, tuple[int, list[Item]]]: ...

    async def get_hold(self, hold_id: str) -> Hold | None: ...

    async def hold(self, hold: Hold, limit: int, now: int) -> Hold: ...

    async def end_hold(self, hold_id: str, customer_id: str | None, end: HoldEnd,
                       now: int) -> tuple[Hold, bool]: ...

    async def due(self, now: int, limit: int) -> list[str]: ...

    async def confirm(self, hold_id: str, order: Order, events: list[Event],
                      now: int) -> tuple[Order, bool]: ...


Changed = Callable[[list[str]], Awaitable[None]]
HoldEnded = Callable[[Hold, str], Awaitable[None]]
# A watcher's view moved: its key, and start time -> new count where it changed.
ViewChanged = Callable[[str, dict[int, int]], Awaitable[None]]
OrderNotify = Callable[[Order, Event], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Query:
    lat: float
    lng: float
    skill: str | None
    from_day: date
    days: int
    duration_min: int
    granularity_min: int = 30

    def request(self, now: int) -> Request:
        return Request(self.lat, self.lng, self.duration_min * 60_000,
                       self.granularity_min * 60_000, now)


@dataclass(frozen=True, slots=True)
class HoldSpec:
    start_ms: int
    duration_min: int
    lat: float
    lng: float
    skill: str | None
    technician_id: str | None = None


@dataclass(frozen=True, slots=True)
class BookingConfig:
    hold_ttl_s: float = 300.0
    max_holds: int = 2  # live holds per customer
    cache_ttl_s: float = 30.0


@dataclass
class View:
    """A watcher's counts per start time, and the technicians they come
    from: what a change is compared against (scheduling.service.diff)."""

    query: Query
    counts: dict[int, int]
    technicians: set[str] = field(default_factory=set)


@dataclass
class _Cached:
    version: int
    items: list[Item]
    at: float


class SchedulingService:
    def __init__(self, calendars: Calendars, schedules: Schedules, eta: EtaConfig, *,
                 changed: Changed, hold_ended: HoldEnded, order_notify: OrderNotify,
                 view_changed: ViewChanged, config: BookingConfig | None = None) -> None:
        self.calendars = calendars
        self.schedules = schedules
        self.eta = eta
        self.cfg = config or BookingConfig()
        self._changed = changed
        self._hold_ended = hold_ended
        self._order_notify = order_notify
        self._view_changed = view_changed
        # This node's watchers (keyed by socket), their views kept current.
        self._views: dict[str, View] = {}
        self._cals: dict[str | None, tuple[float, list[Calendar]]] = {}
        self._items: dict[str, _Cached] = {}
        self._refreshing: dict[str, asyncio.Future[None]] = {}
        self._background = BackgroundTasks("scheduling")
        self._tech_locks = KeyedLocks()
        # Schedules a change signal could not re-read: the sweep tries again.
        self._dirty: set[str] = set()
        self._closed = False
        self._wake = asyncio.Event()
        self._query_limits = MemoryRateLimiter(*QUERY_RATE)
        self._hold_limits = MemoryRateLimiter(*HOLD_RATE)

    def admit(self, kind: Literal["query", "hold"], who: str) -> None:
        """Count one query or one hold/release of `who`; `rate_limited` when
        they go faster than QUERY_RATE / HOLD_RATE."""
        limits = self._query_limits if kind == "query" else self._hold_limits
        wait = limits.take(who)
        if wait:
            raise RateLimited(f"too many {'availability queries' if kind == 'query' else 'holds'}"
                              "; slow down", wait)

    # -- reads -------------------------------------------------------------
    async def serving(self, q: Query) -> list[Calendar]:
        """The calendars of technicians who could come (skill and area)."""
        cached = self._cals.get(q.skill)
        if cached is None or time.monotonic() - cached[0] > self.cfg.cache_ttl_s:
            await self._load_calendars(q.skill)
            cached = self._cals[q.skill]
        return [c for c in cached[1] if c.serves(q.lat, q.lng, q.skill)]

    async def _load_calendars(self, skill: str | None) -> None:
        """(Re)read the calendars of a skill; views move with what changed."""
        found = await self.calendars.serving(skill, MAX_TECHNICIANS)
        old = self._cals.get(skill)
        self._cals[skill] = (time.monotonic(), found)
        if old is None or not self._views:
            return
        before = {c.technician_id: c for c in old[1]}
        after = {c.technician_id: c for c in found}
        moved = [t for t in before.keys() | after.keys() if before.get(t) != after.get(t)]
        if moved:
            items = await self.items(moved)
            for tech in moved:
                await self._move_views(functools.partial(
                    self._diff_calendar_of, before.get(tech), after.get(tech), items[tech]),
                    skill=skill)

    async def items(self, technician_ids: list[str]) -> dict[str, list[Item]]:
        """Each technician's schedule, from this node's cache where fresh."""
        t = time.monotonic()
        stale = [i for i in technician_ids
                 if (c := self._items.get(i)) is None or t - c.at > self.cfg.cache_ttl_s]
        if stale:
            for tech, (version, items) in (await self.schedules.items_of(stale)).items():
                await self._put_items(tech, version, items)
        return {i: self._items[i].items if i in self._items else [] for i in technician_ids}

    async def _put_items(self, tech: str, version: int, items: list[Item]) -> None:
        """Keep what was read if it is newer than what this node knew; the
        watchers' views move with it (a change seen through a signal and
        one seen by a refresh are told alike, and once)."""
        known = self._items.get(tech)
        if known is not None and known.version >= version:
            known.at = time.monotonic()
            return
        self._items[tech] = _Cached(version, items, time.monotonic())
        if known is not None and self._views:
            cal = self._calendar_known(tech)
            if cal is not None:
                # Only the shifts that hold a changed item can change (fits()
                # looks no further than the shift), and views of one query
                # share one computation.
                moved = set(known.items) ^ set(items)
                spans = [(i.start_ms, i.end_ms) for i in moved]
                memo: dict[Query, tuple[set[int], set[int]]] = {}
                await self._move_views(
                    lambda v: self._diff(v, cal, known.items, cal, items, spans, memo), tech=tech)

    def _calendar_known(self, tech: str) -> Calendar | None:
        for _, cals in self._cals.values():
            for c in cals:
                if c.technician_id == tech:
                    return c
        return None

    async def _move_views(self, diff: Callable[[View], dict[int, int]], *,
                          tech: str | None = None, skill: str | bool | None = False) -> None:
        for key, view in list(self._views.items()):
            if tech is not None and tech not in view.technicians:
                continue
            if skill is not False and view.query.skill != skill:
                continue
            changes = diff(view)
            if changes:
                await self._view_changed(key, changes)

    async def watch(self, key: str, q: Query) -> View:
        """Start (or replace) a watcher's live view; returns it in full."""
        view = await self.view(q)
        self._views[key] = view
        return view

    def unwatch(self, key: str) -> None:
        self._views.pop(key, None)

    @property
    def watchers(self) -> int:
        return len(self._views)

    async def availability(self, q: Query) -> dict[int, list[str]]:
        """start time -> ids of the technicians who can take the job then."""
        cals = await self.serving(q)
        items = await self.items([c.technician_id for c in cals])
        now = now_ms()
        busy = {tech: shown(its, now) for tech, its in items.items()}
        return availability(cals, busy, q.request(now), q.skill, q.from_day, q.days, self.eta)

    async def view(self, q: Query) -> View:
        found = await self.availability(q)
        techs = {c.technician_id for c in await self.serving(q)}
        return View(q, {t: len(ids) for t, ids in found.items()}, techs)

    async def conflicts(self, technician_ids: list[str], order: Order) -> dict[str, dict[str, Any]]:
        """For dispatch: which of these technicians could not take the order's
        window (their hours, another order or hold, the drive between), and
        with what it collides. Read fresh: a dispatch round is rare."""
        window, address = order["window"], order["address"]
        job = Item(order["order_id"], "order", window["start_ts"], window["end_ts"],
                   address["lat"], address["lng"])
        found = await self.schedules.items_of(technician_ids)
        cals = await self.calendars.of(technician_ids)
        now = now_ms()
        out: dict[str, dict[str, Any]] = {}
        for tech in technician_ids:
            try:
                place(found[tech][1], job, cals.get(tech), self.eta, now)
            except Taken as exc:
                out[tech] = exc.details
        return out

    # -- holds -------------------------------------------------------------
    async def hold(self, customer_id: str, spec: HoldSpec) -> Hold:
        now = now_ms()
        if spec.start_ms < now:
            raise Invalid("the start is in the past", [{"field": "start_ts", "error": "in the past"}])
        if spec.start_ms > now + MAX_DAYS * DAY_MS:
            raise Invalid(f"at most {MAX_DAYS} days ahead",
                          [{"field": "start_ts", "error": f"more than {MAX_DAYS} days ahead"}])
        end = spec.start_ms + spec.duration_min * 60_000
        q = Query(spec.lat, spec.lng, spec.skill, _day(spec.start_ms) - timedelta(days=1), 3,
                  spec.duration_min, 1)
        cals = await self.serving(q)
        if spec.technician_id is not None:
            cals = [c for c in cals if c.technician_id == spec.technician_id]
            if not cals:
                raise Conflict("this technician does not serve this place or skill",
                               {"reason": "not_serving", "next": []})
        expires = now + int(self.cfg.hold_ttl_s * 1000)
        by_id = {c.technician_id: c for c in cals}
        tried: set[str] = set()
        stale = False
        for fresh in (False, True):
            if fresh:
                if not stale:
                    break  # this node's copy said taken, and nothing it said free was not
                # What this node took for free was taken: its copy is behind.
                await self._reread([c.technician_id for c in cals])
            for tech in (await self._best_fits(cals, spec, end, now))[:HOLD_TRIES]:
                if tech in tried:
                    continue
                tried.add(tech)
                hold = Hold("h-" + uuid.uuid4().hex, tech, customer_id, spec.start_ms, end,
                            spec.lat, spec.lng, expires, spec.skill)
                # Racers for one technician on this node take turns, and each
                # looks again before its transaction: a loser here costs no
                # store work, not a transaction that conflicts with the winner's.
                async with self._tech_locks.hold(tech, None, "this schedule is busy; retry"):
                    if not self._fits_now(hold, by_id[tech], now):
                        continue
                    try:
                        made = await self.schedules.hold(hold, self.cfg.max_holds, now)
                    except Taken:
                        stale = True
                        continue  # taken meanwhile (on another node): the next best
                    except Unavailable as exc:
                        if (exc.details or {}).get("reason") != "contended":
                            raise
                        stale = True
                        continue  # fought over on other nodes: the next best
                await self._changed([tech])
                return made
        raise Conflict("this time was just taken", {
            "reason": "taken",
            "next": await self._next_starts(spec, cals)})

    def _fits_now(self, hold: Hold, cal: Calendar, now: int) -> bool:
        """Whether the hold fits the technician's schedule as this node knows
        it now: kept current by this node's own writes and by every other
        node's signals, so an earlier racer's win is seen here without a read
        (the store's transaction still decides)."""
        known = self._items.get(hold.technician_id)
        try:
            place(known.items if known is not None else [], hold.item(), cal, self.eta, now)
        except Taken:
            return False
        return True

    async def _reread(self, technician_ids: list[str]) -> None:
        for tech, (version, items) in (await self.schedules.items_of(technician_ids)).items():
            await self._put_items(tech, version, items)

    async def _best_fits(self, cals: list[Calendar], spec: HoldSpec, end: int,
                         now: int) -> list[str]:
        """Who can take the job, the shortest drive to it first (from the job
        before, or from home for a day's first job); equal drives in random
        order, so that customers racing for one time spread over the
        technicians instead of all trying the same one first."""
        items = await self.items([c.technician_id for c in cals])
        at = (spec.lat, spec.lng)
        drives = Drives(at, self.eta)
        ranked: list[tuple[int, float, str]] = []
        for cal in cals:
            probe = Item("probe", "hold", spec.start_ms, end, spec.lat, spec.lng,
                         expires_ms=now + 1)
            try:
                placed = place(items[cal.technician_id], probe, cal, self.eta, now)
            except Taken:
                continue
            i = placed.index(probe)
            before = placed[i - 1] if i > 0 else None
            origin = (before.lat, before.lng) if before is not None else cal.home or at
            ranked.append((drives(origin), random.random(), cal.technician_id))
        return [tech for _, _, tech in sorted(ranked)]

    async def _next_starts(self, spec: HoldSpec, cals: list[Calendar]) -> list[int]:
        """The next free start times after the one refused (any technician
        of these; a named one: theirs), as this node knows them."""
        q = Query(spec.lat, spec.lng, spec.skill, _day(spec.start_ms) - timedelta(days=1), 3,
                  spec.duration_min, 30)
        found = await self.availability(q)
        ids = {c.technician_id for c in cals}
        return [t for t, techs in found.items()
                if t > spec.start_ms and ids.intersection(techs)][:NEXT_STARTS]

    async def release(self, actor: Actor, hold_id: str) -> Hold:
        customer = None if actor.role in ("service", "admin") else actor.id
        hold, ended = await self.schedules.end_hold(hold_id, customer, "released", now_ms())
        if ended:
            await self._ended(hold, "released")
        elif hold.state == "confirmed":
            raise Conflict("the hold was confirmed: cancel the order instead",
                           {"reason": "confirmed", "order_id": hold.order_id})
        return hold

    async def get_hold(self, actor: Actor, hold_id: str) -> Hold:
        hold = await self.schedules.get_hold(hold_id)
        if hold is None:
            raise NotFound(f"no hold {hold_id!r}")
        if actor.role not in ("service", "admin", "agent") and actor.id != hold.customer_id:
            raise Forbidden("this hold is someone else's")
        return hold

    async def _ended(self, hold: Hold, reason: str) -> None:
        await self._changed([hold.technician_id])
        await self._hold_ended(hold, reason)

    async def expire_due(self) -> int:
        """End the holds whose time is up; each slot goes back to everyone."""
        now = now_ms()
        ended = 0
        for hold_id in await self.schedules.due(now, 200):
            hold, mine = await self.schedules.end_hold(hold_id, None, "expired", now)
            if mine:  # another node's sweep may have ended it first
                ended += 1
                await self._ended(hold, "expired")
        return ended

    def start(self) -> None:
        self._background.spawn(self._sweep())

    async def close(self) -> None:
        # The sweep also ends by itself at its next turn: a cancellation lost
        # inside a store call (Python 3.11's wait_for can drop one that races
        # a result) must not leave it running past the app.
        self._closed = True
        self._wake.set()
        await self._background.close()

    async def _sweep(self) -> None:
        while not self._closed:
            try:
                await self.expire_due()
            except Exception as exc:  # the store is down: the next sweep retries
                log.warning("hold expiry sweep failed: %s", type(exc).__name__)
            if self._dirty and not self._closed:
                dirty, self._dirty = list(self._dirty), set()
                try:
                    await self._reread(dirty)
                except Exception as exc:
                    self._dirty.update(dirty)
                    log.warning("schedules not re-read after a signal: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SWEEP_S)

    # -- confirmation ------------------------------------------------------
    async def confirm(self, actor: Actor, hold_id: str, spec: dict[str, Any]) -> tuple[Order, bool]:
        """The backend, after payment: the hold becomes its order, assigned to
        the held technician for the held time, in one transaction."""
        hold = await self.schedules.get_hold(hold_id)
        if hold is None:
            raise NotFound(f"no hold {hold_id!r}")
        window = spec.get("window")
        if window is not None and (window["start_ts"], window["end_ts"]) != (hold.start_ms,
                                                                             hold.end_ms):
            raise Invalid("the window is not the held time", [
                {"field": "window", "error": f"the hold is {hold.start_ms}..{hold.end_ms}"}])
        address = spec["address"]
        if haversine_m(address["lat"], address["lng"], hold.lat, hold.lng) > HOLD_PLACE_M:
            raise Invalid("the address is not where the hold was made", [
                {"field": "address", "error": f"more than {HOLD_PLACE_M} m from the held place"}])
        ts = now_ms()
        order: Order = {
            "order_id": spec["order_id"], "customer_id": spec["customer_id"],
            "service": spec["service"], "address": spec["address"],
            "window": {"start_ts": hold.start_ms, "end_ts": hold.end_ms},
            "skills": list(spec.get("skills") or ([hold.skill] if hold.skill else [])),
            "technician_id": hold.technician_id, "state": "assigned", "seq": 2,
            "created_ts": ts, "updated_ts": ts, "rating": None, "hold_id": hold_id,
        }
        who = actor.as_dict()
        events: list[Event] = [
            {"order_id": order["order_id"], "seq": 1, "type": "state_changed", "state": "created",
             "ts": ts, "actor": who, "data": {"hold_id": hold_id}},
            {"order_id": order["order_id"], "seq": 2, "type": "state_changed", "state": "assigned",
             "ts": ts, "actor": who,
             "data": {"technician_id": hold.technician_id, "hold_id": hold_id}},
        ]
        made, created = await self.schedules.confirm(hold_id, order, events, ts)
        if created:
            await self._changed([hold.technician_id])
            for event in events:
                await self._order_notify(made, event)
            await self._hold_ended(dataclasses.replace(
                hold, state="confirmed", order_id=made["order_id"]), "confirmed")
        return made, created

    # -- change signals ------------------------------------------------------
    async def schedule_changed(self, tech: str) -> None:
        """A signal: the technician's schedule moved (on some node). Re-read
        it if this node keeps it; the views move with it."""
        if tech in self._items:
            try:
                version, items = (await self.schedules.items_of([tech]))[tech]
            except Exception:
                self._dirty.add(tech)  # the sweep reads it again (the views wait)
                raise
            await self._put_items(tech, version, items)

    async def calendar_changed(self, tech: str) -> None:
        """A signal: a calendar was set. Re-read the calendar lists this node
        keeps; the views move with what changed."""
        for skill in list(self._cals):
            await self._load_calendars(skill)

    def _diff_calendar_of(self, before: Calendar | None, after: Calendar | None,
                          items: list[Item], view: View) -> dict[int, int]:
        return self._diff(view, before, items, after, items)

    def _diff(self, view: View, cal_a: Calendar | None, items_a: list[Item],
              cal_b: Calendar | None, items_b: list[Item],
              spans: list[tuple[int, int]] | None = None,
              memo: dict[Query, tuple[set[int], set[int]]] | None = None) -> dict[int, int]:
        """How a change of one technician (their schedule, or their calendar)
        moves a view's counts: start time -> new count, only where it moved.
        `spans`: only shifts meeting these can have moved."""
        q = view.query
        found = memo.get(q) if memo is not None else None
        if found is None:
            now = now_ms()
            req = q.request(now)
            found = (self._starts(cal_a, items_a, q, req, now, spans),
                     self._starts(cal_b, items_b, q, req, now, spans))
            if memo is not None:
                memo[q] = found
        old, new = found
        either = cal_b or cal_a
        if either is not None:
            tech = either.technician_id
            if cal_b is not None and cal_b.serves(q.lat, q.lng, q.skill):
                view.technicians.add(tech)
            else:
                view.technicians.discard(tech)
        out: dict[int, int] = {}
        for t in old - new:
            view.counts[t] = out[t] = max(0, view.counts.get(t, 0) - 1)
        for t in new - old:
            view.counts[t] = out[t] = view.counts.get(t, 0) + 1
        for t, n in out.items():
            if n == 0:
                view.counts.pop(t, None)
        return dict(sorted(out.items()))

    def _starts(self, cal: Calendar | None, items: list[Item], q: Query, req: Request,
                now: int, spans: list[tuple[int, int]] | None = None) -> set[int]:
        if cal is None or not cal.serves(q.lat, q.lng, q.skill):
            return set()
        working = cal.working(q.from_day, q.days)
        if spans is not None:
            working = [w for w in working if any(a < w[1] and b > w[0] for a, b in spans)]
            if not working:
                return set()
        return set(free_starts(cal, working, Day(shown(items, now)), req, self.eta))


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()
