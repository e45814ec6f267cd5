"""A technician's calendar: when they work, where they start from, what they
can do and where they go (docs/scheduling.md).

Working hours are weekly rules in the technician's own timezone (default
Asia/Shanghai) plus dated exceptions: a day or part of a day off, or an extra
shift. Times are wall-clock in that timezone, so a shift stays 09:00-18:00
across a DST change where there is one; intervals come out as UTC epoch
milliseconds, the only time unit of the domain.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kernel.errors import Invalid
from tracking.geo import haversine_m

DEFAULT_TZ: Final = "Asia/Shanghai"
# An interval in UTC epoch milliseconds, [start, end).
Interval = tuple[int, int]


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


@dataclass(frozen=True, slots=True)
class Shift:
    """From `start` to `end`, wall-clock; `end` 00:00 means midnight at the
    end of the day (a shift does not cross midnight: split it in two)."""

    start: time
    end: time

    def end_minutes(self) -> int:
        return 24 * 60 if self.end == time(0, 0) else _minutes(self.end)

    def overlaps(self, other: Shift) -> bool:
        return (_minutes(self.start) < other.end_minutes()
                and _minutes(other.start) < self.end_minutes())


@dataclass(frozen=True, slots=True)
class WeeklyRule:
    weekday: int  # 0 Monday .. 6 Sunday
    shift: Shift


@dataclass(frozen=True, slots=True)
class DatedException:
    """`off`: not working then (the whole day when `shift` is None); `extra`:
    working then, whatever the weekly rules say."""

    day: date
    kind: Literal["off", "extra"]
    shift: Shift | None = None


@dataclass(frozen=True, slots=True)
class Circle:
    lat: float
    lng: float
    radius_m: float

    def contains(self, lat: float, lng: float) -> bool:
        return haversine_m(self.lat, self.lng, lat, lng) <= self.radius_m


@dataclass(frozen=True, slots=True)
class Polygon:
    """A simple polygon of (lat, lng) corners, not closed (the last corner
    joins the first). A district is small: planar geometry on the
    coordinates is exact enough, and no polygon may cross the antimeridian."""

    corners: tuple[tuple[float, float], ...]

    def contains(self, lat: float, lng: float) -> bool:
        inside = False
        pts = self.corners
        for i, (y1, x1) in enumerate(pts):
            y2, x2 = pts[(i + 1) % len(pts)]
            if (y1 > lat) != (y2 > lat) and lng < (x2 - x1) * (lat - y1) / (y2 - y1) + x1:
                inside = not inside
        return inside


Area = Circle | Polygon


@dataclass(frozen=True, slots=True)
class Calendar:
    technician_id: str
    weekly: tuple[WeeklyRule, ...]
    exceptions: tuple[DatedException, ...] = ()
    timezone: str = DEFAULT_TZ
    home: tuple[float, float] | None = None  # where the working day starts
    skills: frozenset[str] = field(default_factory=frozenset)
    area: Area | None = None  # None: goes anywhere

    def serves(self, lat: float, lng: float, skill: str | None) -> bool:
        if skill is not None and skill not in self.skills:
            return False
        return self.area is None or self.area.contains(lat, lng)

    def working(self, from_day: date, days: int) -> list[Interval]:
        """The working intervals of these days (in the calendar's timezone),
        in time order. Remembered per calendar and days: every query, hold
        and view change asks it of every technician around."""
        return list(_working(self, from_day, days))

    def _working(self, from_day: date, days: int) -> list[Interval]:
        tz = ZoneInfo(self.timezone)
        out: list[Interval] = []
        for n in range(days):
            day = from_day + timedelta(days=n)
            for shift in self._shifts_of(day):
                start = datetime.combine(day, shift.start, tz)
                end_day = day + timedelta(days=1) if shift.end == time(0, 0) else day
                end = datetime.combine(end_day, shift.end, tz)
                out.append((_ms(start), _ms(end)))
        return out

    def _shifts_of(self, day: date) -> list[Shift]:
        shifts = [r.shift for r in self.weekly if r.weekday == day.weekday()]
        for ex in self.exceptions:
            if ex.day != day:
                continue
            if ex.kind == "extra" and ex.shift is not None:
                shifts.append(ex.shift)
            elif ex.kind == "off":
                shifts = [] if ex.shift is None else list(_minus(shifts, ex.shift))
        return sorted(_merged(shifts), key=lambda s: _minutes(s.start))


@functools.lru_cache(maxsize=16_384)
def _working(cal: Calendar, from_day: date, days: int) -> tuple[Interval, ...]:
    """Calendar.working, remembered: a Calendar is frozen (hashable, equal
    by value), so a calendar set again is a new key and never a stale one."""
    return tuple(cal._working(from_day, days))


def _minus(shifts: Sequence[Shift], off: Shift) -> Iterator[Shift]:
    """What is left of the shifts outside `off`."""
    for s in shifts:
        if not s.overlaps(off):
            yield s
            continue
        if _minutes(s.start) < _minutes(off.start):
            yield Shift(s.start, off.start)
        if off.end_minutes() < s.end_minutes():
            yield Shift(off.end, s.end)


def _merged(shifts: Sequence[Shift]) -> list[Shift]:
    """An extra shift may touch or overlap a weekly one: one interval then."""
    out: list[Shift] = []
    for s in sorted(shifts, key=lambda s: _minutes(s.start)):
        if out and _minutes(s.start) <= out[-1].end_minutes():
            last = out[-1]
            if s.end_minutes() > last.end_minutes():
                out[-1] = Shift(last.start, s.end)
        else:
            out.append(s)
    return out


# -- checks: a calendar the backend sends is refused with the field at fault ----------

def check_calendar(cal: Calendar) -> None:
    """`Invalid` with `[{field, error}]` for what makes no sense."""
    problems: list[dict[str, str]] = []
    try:
        ZoneInfo(cal.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append({"field": "timezone", "error": f"unknown timezone {cal.timezone!r}"})
    for i, rule in enumerate(cal.weekly):
        if not 0 <= rule.weekday <= 6:
            problems.append({"field": f"weekly.{i}.weekday", "error": "must be 0 (Monday) to 6"})
        problems += _shift_problems(rule.shift, f"weekly.{i}")
        for j in range(i):
            other = cal.weekly[j]
            if other.weekday == rule.weekday and other.shift.overlaps(rule.shift):
                problems.append({"field": f"weekly.{i}",
                                 "error": f"overlaps weekly.{j} on the same weekday"})
    for i, ex in enumerate(cal.exceptions):
        if ex.shift is not None:
            problems += _shift_problems(ex.shift, f"exceptions.{i}")
        elif ex.kind == "extra":
            problems.append({"field": f"exceptions.{i}.shift", "error": "an extra shift needs its hours"})
        for j in range(i):
            earlier = cal.exceptions[j]
            if earlier.day == ex.day and (earlier.shift is None or ex.shift is None
                                          or earlier.shift.overlaps(ex.shift)):
                problems.append({"field": f"exceptions.{i}",
                                 "error": f"overlaps exceptions.{j} on the same day"})
    if isinstance(cal.area, Polygon):
        problems += _polygon_problems(cal.area)
    elif isinstance(cal.area, Circle) and not cal.area.radius_m > 0:
        problems.append({"field": "area.radius_m", "error": "must be above 0"})
    if problems:
        raise Invalid("the calendar is not valid", problems)


def _shift_problems(shift: Shift, where: str) -> list[dict[str, str]]:
    if _minutes(shift.start) >= shift.end_minutes():
        return [{"field": f"{where}.shift", "error": "must end after it starts (split a shift "
                 "that crosses midnight in two)"}]
    return []


def _polygon_problems(poly: Polygon) -> list[dict[str, str]]:
    pts = poly.corners
    if len(pts) < 3:
        return [{"field": "area.corners", "error": "a polygon needs at least 3 corners"}]
    if any(not (math.isfinite(a) and math.isfinite(b)) for a, b in pts):
        return [{"field": "area.corners", "error": "corners must be finite numbers"}]
    edges = [(pts[i], pts[(i + 1) % len(pts)]) for i in range(len(pts))]
    n = len(edges)
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # neighbours share a corner
            if _segments_cross(*edges[i], *edges[j]):
                return [{"field": "area.corners",
                         "error": f"the polygon intersects itself (edges {i} and {j})"}]
    return []


def _orient(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _on_segment(a: tuple[float, float], b: tuple[float, float], p: tuple[float, float]) -> bool:
    return (min(a[0], b[0]) <= p[0] <= max(a[0], b[0])
            and min(a[1], b[1]) <= p[1] <= max(a[1], b[1]))


def _segments_cross(a: tuple[float, float], b: tuple[float, float],
                    c: tuple[float, float], d: tuple[float, float]) -> bool:
    """Whether segments ab and cd share a point (touching counts)."""
    d1, d2 = _orient(c, d, a), _orient(c, d, b)
    d3, d4 = _orient(a, b, c), _orient(a, b, d)
    if ((d1 > 0) != (d2 > 0) and d1 != 0 and d2 != 0
            and (d3 > 0) != (d4 > 0) and d3 != 0 and d4 != 0):
        return True
    return ((d1 == 0 and _on_segment(c, d, a)) or (d2 == 0 and _on_segment(c, d, b))
            or (d3 == 0 and _on_segment(a, b, c)) or (d4 == 0 and _on_segment(a, b, d)))


# -- as stored and sent: plain JSON ------------------------------------------------------

def _hhmm(t: time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}"


def _shift_dict(s: Shift) -> dict[str, str]:
    return {"start": _hhmm(s.start), "end": _hhmm(s.end)}


def _shift_of(d: dict[str, Any]) -> Shift:
    return Shift(time.fromisoformat(d["start"]), time.fromisoformat(d["end"]))


def calendar_dict(cal: Calendar) -> dict[str, Any]:
    """The calendar as JSON (docs/protocol.md, Calendars): what is stored and
    what `GET /api/technicians/{id}/calendar` answers."""
    area: dict[str, Any] | None = None
    if isinstance(cal.area, Circle):
        area = {"circle": {"lat": cal.area.lat, "lng": cal.area.lng, "radius_m": cal.area.radius_m}}
    elif isinstance(cal.area, Polygon):
        area = {"polygon": [list(c) for c in cal.area.corners]}
    return {
        "technician_id": cal.technician_id,
        "timezone": cal.timezone,
        "weekly": [{"weekday": r.weekday, **_shift_dict(r.shift)} for r in cal.weekly],
        "exceptions": [{"date": e.day.isoformat(), "kind": e.kind,
                        **(_shift_dict(e.shift) if e.shift is not None else {})}
                       for e in cal.exceptions],
        "home": {"lat": cal.home[0], "lng": cal.home[1]} if cal.home is not None else None,
        "skills": sorted(cal.skills),
        "area": area,
    }


def calendar_of(d: dict[str, Any]) -> Calendar:
    """The inverse of calendar_dict (for what the store gives back)."""
    area: Area | None = None
    raw_area = d.get("area")
    if raw_area and "circle" in raw_area:
        c = raw_area["circle"]
        area = Circle(float(c["lat"]), float(c["lng"]), float(c["radius_m"]))
    elif raw_area and "polygon" in raw_area:
        area = Polygon(tuple((float(a), float(b)) for a, b in raw_area["polygon"]))
    home = d.get("home")
    return Calendar(
        technician_id=d["technician_id"],
        timezone=d.get("timezone", DEFAULT_TZ),
        weekly=tuple(WeeklyRule(int(r["weekday"]), _shift_of(r)) for r in d.get("weekly", [])),
        exceptions=tuple(DatedException(date.fromisoformat(e["date"]), e["kind"],
                                        _shift_of(e) if "start" in e else None)
                         for e in d.get("exceptions", [])),
        home=(float(home["lat"]), float(home["lng"])) if home else None,
        skills=frozenset(d.get("skills", [])),
        area=area,
    )
