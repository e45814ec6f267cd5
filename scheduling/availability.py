"""When a technician can take a job: working hours, minus what is booked or
held, minus the drive from the job before and to the job after
(docs/scheduling.md).

The drive is the ETA model's (docs/tracking.md): straight-line distance
times the road factor, at the default pace. The first job of a working
interval is reached from the home base (when the calendar has one): working
hours are hours on duty, and the drive to the first home is part of them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date

from scheduling.calendar import Calendar, Interval
from tracking.eta import EtaConfig
from tracking.geo import haversine_m


@dataclass(frozen=True, slots=True)
class Busy:
    """Time a technician is taken at a place: a booked order or a live hold."""

    start_ms: int
    end_ms: int
    lat: float
    lng: float
    ref: str  # the order or hold


@dataclass(frozen=True, slots=True)
class Request:
    lat: float
    lng: float
    duration_ms: int
    granularity_ms: int
    not_before_ms: int  # nothing starts earlier (now: no slot in the past)


def drive_ms(a: tuple[float, float], b: tuple[float, float], cfg: EtaConfig) -> int:
    """The drive between two places, rounded up to the minute (a
    technician's day is planned in minutes, not seconds)."""
    seconds = haversine_m(a[0], a[1], b[0], b[1]) * cfg.road_factor / cfg.default_speed_mps
    return math.ceil(seconds / 60) * 60_000


class Day:
    """One technician's booked and held time, in start order, for queries."""

    def __init__(self, busy: Iterable[Busy]) -> None:
        self.items = sorted(busy, key=lambda b: b.start_ms)
        self._starts = [b.start_ms for b in self.items]

    def before(self, t: int) -> Busy | None:
        """The item that ends last among those starting before `t`."""
        i = bisect.bisect_left(self._starts, t)
        best = None
        for b in self.items[:i]:
            if best is None or b.end_ms > best.end_ms:
                best = b
        return best

    def meets(self, span: tuple[int, int]) -> bool:
        """Whether anything here overlaps [span)."""
        i = bisect.bisect_left(self._starts, span[1])
        return any(b.end_ms > span[0] for b in self.items[:i])

    def at_or_after(self, t: int) -> Busy | None:
        i = bisect.bisect_left(self._starts, t)
        return self.items[i] if i < len(self.items) else None


class Drives:
    """The drive between the job's place and others, each computed once per
    query (a week of starts asks for the same few places thousands of times)."""

    __slots__ = ("_at", "_cfg", "_known")

    def __init__(self, at: tuple[float, float], cfg: EtaConfig) -> None:
        self._at, self._cfg = at, cfg
        self._known: dict[tuple[float, float], int] = {}

    def __call__(self, other: tuple[float, float]) -> int:
        ms = self._known.get(other)
        if ms is None:  # the distance is the same both ways
            ms = self._known[other] = drive_ms(other, self._at, self._cfg)
        return ms


def fits(job: Interval, at: tuple[float, float], day: Day, shift: Interval,
         home: tuple[float, float] | None, cfg: EtaConfig,
         drives: Drives | None = None) -> str | None:
    """Why the job cannot be done then (None: it can)."""
    drive = drives if drives is not None else Drives(at, cfg)
    start, end = job
    if start < shift[0] or end > shift[1]:
        return "outside_hours"
    prev = day.before(end)
    if prev is not None and prev.end_ms > start:
        return f"taken:{prev.ref}"
    if prev is not None and prev.end_ms > shift[0]:
        if prev.end_ms + drive((prev.lat, prev.lng)) > start:
            return f"travel_from:{prev.ref}"
    elif home is not None and shift[0] + drive(home) > start:
        return "travel_from:home"
    nxt = day.at_or_after(end)
    if nxt is not None and nxt.start_ms < shift[1]:
        if end + drive((nxt.lat, nxt.lng)) > nxt.start_ms:
            return f"travel_to:{nxt.ref}"
    return None


def free_starts(cal: Calendar, working: Sequence[Interval], day: Day, req: Request,
                cfg: EtaConfig, drives: Drives | None = None) -> list[int]:
    """The start times on the grid (multiples of the granularity since the
    epoch, so every technician's grid lines up) at which this technician can
    do the job."""
    at = (req.lat, req.lng)
    drives = drives if drives is not None else Drives(at, cfg)
    out: list[int] = []
    step = req.granularity_ms
    for shift in working:
        first = max(shift[0], req.not_before_ms)
        if not day.meets(shift):
            # Nothing booked in this shift: every start on the grid from the
            # drive from home on is free (what fits() says, without asking
            # it for each one: most of a week is such shifts).
            if cal.home is not None:
                first = max(first, shift[0] + drives(cal.home))
            t = -(-first // step) * step
            last = shift[1] - req.duration_ms
            if t <= last:
                out.extend(range(t, last + 1, step))
            continue
        t = -(-first // step) * step  # the grid, rounded up
        while t + req.duration_ms <= shift[1]:
            if fits((t, t + req.duration_ms), at, day, shift, cal.home, cfg, drives) is None:
                out.append(t)
            t += step
    return out


def availability(calendars: Iterable[Calendar], busy: dict[str, list[Busy]], req: Request,
                 skill: str | None, from_day: date, days: int,
                 cfg: EtaConfig) -> dict[int, list[str]]:
    """start time -> the technicians who can take the job then (sorted ids),
    over the technicians with the skill whose area holds the place, for
    `days` days from `from_day` (each in the technician's own timezone)."""
    out: dict[int, list[str]] = {}
    drives = Drives((req.lat, req.lng), cfg)  # one place: each drive computed once
    for cal in calendars:
        if not cal.serves(req.lat, req.lng, skill):
            continue
        day = Day(busy.get(cal.technician_id, ()))
        for t in free_starts(cal, cal.working(from_day, days), day, req, cfg, drives):
            out.setdefault(t, []).append(cal.technician_id)
    for ids in out.values():
        ids.sort()
    return dict(sorted(out.items()))
