"""A technician's day: which of their orders is the current job, which are
queued, and when they will reach each one (docs/tracking.md, "Current and
queued jobs"; docs/scheduling.md, "Lateness").

Pure functions over the technician's orders (those in the technician
phase), their latest position and the clock: the node that holds the
technician, a `watch` on any node and the day view all compute the same
projection from the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from orders.lifecycle import UNDER_WAY
from tracking.eta import EtaConfig
from tracking.geo import haversine_m
from tracking.positions import Position

# Orders whose arrival is still ahead: what lateness is judged for.
AHEAD: Final = frozenset({"assigned", "en_route"})
# Lateness is said (a new warning per step) up to this many minutes late.
LATE_HORIZON_MIN: Final = 6 * 60
# A position older than this says nothing about where the technician is now.
POSITION_FRESH_MS: Final = 10 * 60_000


@dataclass(frozen=True, slots=True)
class Projection:
    """When the technician will reach an order, and on what that rests.

    basis: `live` (the current job's ETA from the GPS), `idle` (no job under
    way: the last position plus the drive), `queued` (behind the current
    job: its rest, then the drive from its address), `arrived` (already
    there); or why it cannot be computed: `no_position` (no fix yet, or none
    for ten minutes, when the projection needs one; so is every job queued
    behind one whose arrival is unknown); once such an order's window has
    begun, `overdue` (arriving now, a lower bound: at least this late)."""

    order_id: str
    basis: str
    arrival_ts: int | None = None

    def eta_s(self, now: int) -> int | None:
        return None if self.arrival_ts is None else max(0, round((self.arrival_ts - now) / 1000))

    def minutes_late(self, window_start: int | None) -> int | None:
        """Whole minutes past the window's start (negative: early), rounded up."""
        if self.arrival_ts is None or window_start is None:
            return None
        return math.ceil((self.arrival_ts - window_start) / 60_000)


def window_start(order: Mapping[str, Any]) -> int | None:
    w = order.get("window")
    return int(w["start_ts"]) if w else None


def _duration_ms(order: Mapping[str, Any]) -> int:
    w = order.get("window")
    return max(0, int(w["end_ts"]) - int(w["start_ts"])) if w else 0


def _order_key(order: Mapping[str, Any]) -> tuple[int, str]:
    start = window_start(order)
    return (start if start is not None else 2**62, str(order["order_id"]))


def split(jobs: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None,
                                                      list[Mapping[str, Any]]]:
    """The current job (the one under way, if any) and the queued ones
    (assigned), in window order."""
    current = None
    queued = []
    for job in jobs:
        if job["state"] in UNDER_WAY:
            current = job
        elif job["state"] == "assigned":
            queued.append(job)
    queued.sort(key=_order_key)
    return current, queued


def current_job(jobs: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The order the technician's positions belong to: the one under way.
    (With none under way, nobody's: a queued job's customer is told when
    the technician will come, never where they are, until they set off.)"""
    return split(jobs)[0]


def drive_ms(from_lat: float, from_lng: float, to_lat: float, to_lng: float,
             cfg: EtaConfig) -> int:
    """The ETA model's drive (straight line × road factor at the default pace)."""
    dist = haversine_m(from_lat, from_lng, to_lat, to_lng)
    return round(dist * cfg.road_factor / cfg.default_speed_mps * 1000)


def _fresh(pos: Position | None, now: int) -> bool:
    return pos is not None and now - pos.ts <= POSITION_FRESH_MS


def project(jobs: Iterable[Mapping[str, Any]], pos: Position | None, now: int,
            cfg: EtaConfig) -> dict[str, Projection]:
    """The projected arrival at each of the technician's jobs that is still
    ahead (`assigned`, `en_route`), plus `arrived` for an arrived current job.

    The technician does their jobs one at a time in window order: the rest
    of the current job (its live ETA when en route, then its planned
    duration, or what is left of it once in service), then for each queued
    job the drive from the previous job's address, and its planned duration
    from the later of arrival and its window's start."""
    current, queued = split(jobs)
    out: dict[str, Projection] = {}
    here, free_at, now_proj = _free(current, pos, now, cfg)
    if now_proj is not None:
        out[now_proj.order_id] = now_proj
    basis = "queued" if current is not None else "idle"
    for job in queued:
        jid = str(job["order_id"])
        if free_at is None or here is None:
            out[jid] = Projection(jid, "no_position")
            continue
        addr = job["address"]
        to = (float(addr["lat"]), float(addr["lng"]))
        arrival = free_at + drive_ms(here[0], here[1], to[0], to[1], cfg)
        out[jid] = Projection(jid, basis, arrival)
        start = window_start(job)
        free_at = max(arrival, start if start is not None else arrival) + _duration_ms(job)
        here, basis = to, "queued"
    for j in (current, *queued):
        if j is None or j["state"] not in AHEAD:
            continue
        jid = str(j["order_id"])
        start = window_start(j)
        if out[jid].arrival_ts is None and start is not None and now > start:
            # Unknown, but the window has begun without them: at least this late.
            out[jid] = Projection(jid, "overdue", now)
    return out


def overdue(order: Mapping[str, Any], now: int) -> Projection | None:
    """For an order whose technician is connected nowhere: once its window
    has begun without an arrival, `overdue` (a lower bound: arriving now)."""
    start = window_start(order)
    if order.get("state") not in AHEAD or start is None or now <= start:
        return None
    return Projection(str(order["order_id"]), "overdue", now)


def _free(current: Mapping[str, Any] | None, pos: Position | None, now: int,
          cfg: EtaConfig) -> tuple[tuple[float, float] | None, int | None, Projection | None]:
    """Where and when the technician is free for their next job (None, None:
    unknown), and the current job's own projection."""
    if current is None:  # idle: from the last position, leaving now
        if _fresh(pos, now) and pos is not None:
            return (pos.lat, pos.lng), now, None
        return None, None, None
    cid = str(current["order_id"])
    addr = current["address"]
    here = (float(addr["lat"]), float(addr["lng"]))
    times = current.get("times") or {}
    if current["state"] == "en_route":
        if not _fresh(pos, now) or pos is None:
            return here, None, Projection(cid, "no_position")
        if pos.order_id == cid and pos.eta_s is not None:
            arrival = pos.ts + pos.eta_s * 1000
        else:
            arrival = pos.ts + drive_ms(pos.lat, pos.lng, here[0], here[1], cfg)
        arrival = max(arrival, now)
        start = window_start(current)
        free_at = max(arrival, start if start is not None else arrival) + _duration_ms(current)
        return here, free_at, Projection(cid, "live", arrival)
    if current["state"] == "arrived":
        return (here, now + _duration_ms(current),
                Projection(cid, "arrived", int(times.get("arrived") or now)))
    # In service: what is left of its planned time (at least now).
    started = int(times.get("in_service") or now)
    return here, max(now, started + _duration_ms(current)), None


def reach(jobs: Iterable[Mapping[str, Any]], pos: Position | None, now: int, lat: float,
          lng: float, cfg: EtaConfig) -> int | None:
    """When the technician could reach (lat, lng) if it were their next job:
    the rest of the current job, then the drive (dispatch ranks by this)."""
    current, _ = split(jobs)
    here, free_at, _proj = _free(current, pos, now, cfg)
    if here is None or free_at is None:
        return None
    return free_at + drive_ms(here[0], here[1], lat, lng, cfg)


@dataclass(frozen=True, slots=True)
class Lateness:
    """What to record for an order whose projection moved (orders/service.py)."""

    event: str  # late_risk | on_time_again
    step: int
    minutes_late: int


def judge(proj: Projection, order: Mapping[str, Any], grace_min: int) -> Lateness | None:
    """late_risk when the projection passes the window's start by more than
    the grace, once per worsening step of `grace_min` minutes (12 and 15
    minutes late: one warning; 21: a second); on_time_again once it is back
    within half the grace (a margin, so a projection hovering at the line
    does not flap). None: nothing new to say."""
    if order.get("state") not in AHEAD or proj.arrival_ts is None:
        return None
    late = proj.minutes_late(window_start(order))
    if late is None:
        return None
    recorded = order.get("late") or None
    step_now = int(recorded["step"]) if recorded else 0
    grace = max(1, grace_min)
    if late > LATE_HORIZON_MIN:
        # A missed job for the ops team (or an order left behind long ago),
        # not news every few minutes.
        return None
    if late > grace:
        step = (late - 1) // grace  # 11..20 min: 1, 21..30: 2, ...
        if step > step_now:
            return Lateness("late_risk", step, late)
        return None
    if recorded and late <= grace // 2:
        return Lateness("on_time_again", 0, late)
    return None


# Days a day view may ask for (a far year's midnight overflows the clock).
FIRST_YEAR: Final = 2000
LAST_YEAR: Final = 2200


def check_date(text: str) -> date:
    """A "YYYY-MM-DD" a day view may ask for; ValueError otherwise."""
    on = date.fromisoformat(text)
    if not FIRST_YEAR <= on.year <= LAST_YEAR:
        raise ValueError(f"a date between {FIRST_YEAR} and {LAST_YEAR}")
    return on


def day_range(on: date | None, tz: str, now: int) -> tuple[date, int, int]:
    """A calendar day in `tz` (today when None) as [from_ts, to_ts) in ms."""
    zone = ZoneInfo(tz)
    if on is None:
        on = datetime.fromtimestamp(now / 1000, zone).date()
    start = datetime.combine(on, datetime.min.time(), zone)
    end = datetime.combine(on + timedelta(days=1), datetime.min.time(), zone)
    return on, int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def actual_minutes_late(order: Mapping[str, Any]) -> int | None:
    """How late the technician arrived (negative: early), once they have."""
    arrived = (order.get("times") or {}).get("arrived")
    start = window_start(order)
    if arrived is None or start is None:
        return None
    return math.ceil((int(arrived) - start) / 60_000)
