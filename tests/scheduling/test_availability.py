"""Calendars and availability (scheduling/): working hours in the
technician's timezone, exceptions, the drive before and after a job, skill
and area, and the calendar checks that refuse nonsense with the field."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.errors import Invalid
from scheduling.availability import Busy, Day, Request, availability, drive_ms, fits, free_starts
from scheduling.calendar import (
    Calendar,
    Circle,
    DatedException,
    Polygon,
    Shift,
    WeeklyRule,
    check_calendar,
)
from tracking.eta import EtaConfig

CFG = EtaConfig()  # road factor 1.35, 25 km/h
SH = ZoneInfo("Asia/Shanghai")
MONDAY = date(2026, 12, 7)
HOME = (31.2304, 121.4737)  # People's Square
NEAR = (31.2314, 121.4747)  # ~150 m away
FAR = (31.3504, 121.4737)  # ~13 km north
MIN = 60_000
HOUR = 60 * MIN


def at(day: date, hh: int, mm: int = 0, tz: ZoneInfo = SH) -> int:
    return int(datetime.combine(day, time(hh, mm), tz).timestamp() * 1000)


def weekdays(start: time = time(9), end: time = time(18)) -> tuple[WeeklyRule, ...]:
    return tuple(WeeklyRule(d, Shift(start, end)) for d in range(5))


def cal(tid: str = "t1", **kw: object) -> Calendar:
    base: dict[str, object] = {"technician_id": tid, "weekly": weekdays(), "home": None,
                               "skills": frozenset({"plumbing"})}
    base.update(kw)
    return Calendar(**base)  # type: ignore[arg-type]


def request(where: tuple[float, float] = NEAR, minutes: int = 60, granularity: int = 30,
            not_before: int = 0) -> Request:
    return Request(where[0], where[1], minutes * MIN, granularity * MIN, not_before)


def test_working_hours_are_wall_clock_in_the_technicians_timezone() -> None:
    c = cal()
    assert c.working(MONDAY, 1) == [(at(MONDAY, 9), at(MONDAY, 18))]
    # 09:00 in Shanghai is 01:00 UTC
    assert datetime.fromtimestamp(c.working(MONDAY, 1)[0][0] / 1000, ZoneInfo("UTC")).hour == 1
    saturday = MONDAY + timedelta(days=5)
    assert c.working(saturday, 2) == []


def test_a_shift_stays_nine_to_six_across_a_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    sunday_of_change = date(2027, 3, 28)  # clocks go forward at 02:00
    c = cal(weekly=(WeeklyRule(6, Shift(time(9), time(18))),), timezone="Europe/Berlin")
    [(start, end)] = c.working(sunday_of_change, 1)
    assert (start, end) == (at(sunday_of_change, 9, tz=berlin), at(sunday_of_change, 18, tz=berlin))
    assert end - start == 9 * HOUR


def test_exceptions_take_time_off_and_add_shifts() -> None:
    tuesday = MONDAY + timedelta(days=1)
    saturday = MONDAY + timedelta(days=5)
    c = cal(exceptions=(
        DatedException(MONDAY, "off"),
        DatedException(tuesday, "off", Shift(time(12), time(14))),
        DatedException(saturday, "extra", Shift(time(10), time(16))),
    ))
    assert c.working(MONDAY, 1) == []
    assert c.working(tuesday, 1) == [(at(tuesday, 9), at(tuesday, 12)), (at(tuesday, 14), at(tuesday, 18))]
    assert c.working(saturday, 1) == [(at(saturday, 10), at(saturday, 16))]
    # an extra shift that runs on from the weekly one is one interval
    c2 = cal(exceptions=(DatedException(MONDAY, "extra", Shift(time(18), time(21))),))
    assert c2.working(MONDAY, 1) == [(at(MONDAY, 9), at(MONDAY, 21))]


def test_free_starts_follow_the_grid_inside_working_hours() -> None:
    c = cal()
    starts = free_starts(c, c.working(MONDAY, 1), Day([]), request(minutes=120, granularity=60), CFG)
    assert starts == [at(MONDAY, h) for h in range(9, 17)]  # the last ends at 18:00


def test_nothing_starts_before_now() -> None:
    c = cal()
    now = at(MONDAY, 13, 10)
    starts = free_starts(c, c.working(MONDAY, 1), Day([]), request(not_before=now), CFG)
    assert starts[0] == at(MONDAY, 13, 30)


def test_a_booked_job_and_the_drive_around_it_are_not_free() -> None:
    c = cal()
    booked = Busy(at(MONDAY, 12), at(MONDAY, 13), NEAR[0], NEAR[1], "o-1")
    starts = set(free_starts(c, c.working(MONDAY, 1), Day([booked]), request(NEAR), CFG))
    # next door: back to back on both sides (the drive is a minute)
    assert drive_ms(NEAR, NEAR, CFG) == 0
    assert at(MONDAY, 11) in starts and at(MONDAY, 13) in starts
    assert at(MONDAY, 11, 30) not in starts and at(MONDAY, 12) not in starts
    assert at(MONDAY, 12, 30) not in starts


def test_the_drive_across_the_city_makes_a_back_to_back_slot_unavailable() -> None:
    c = cal()
    booked = Busy(at(MONDAY, 12), at(MONDAY, 13), FAR[0], FAR[1], "o-far")
    drive = drive_ms(FAR, NEAR, CFG)
    assert 30 * MIN < drive < 60 * MIN  # ~13 km x 1.35 at 25 km/h: ~43 min
    day = Day([booked])
    shift = c.working(MONDAY, 1)[0]
    assert fits((at(MONDAY, 13), at(MONDAY, 14)), NEAR, day, shift, None, CFG) == "travel_from:o-far"
    assert fits((at(MONDAY, 11), at(MONDAY, 12)), NEAR, day, shift, None, CFG) == "travel_to:o-far"
    assert fits((at(MONDAY, 14), at(MONDAY, 15)), NEAR, day, shift, None, CFG) is None
    starts = set(free_starts(c, [shift], day, request(NEAR), CFG))
    assert at(MONDAY, 13) not in starts and at(MONDAY, 13, 30) not in starts
    assert at(MONDAY, 14) in starts


def test_the_first_job_of_the_day_is_reached_from_home() -> None:
    c = cal(home=FAR)
    starts = free_starts(c, c.working(MONDAY, 1), Day([]), request(NEAR), CFG)
    assert starts[0] == at(MONDAY, 10)  # 09:00 + ~43 min drive, on the 30-min grid
    assert free_starts(cal(home=NEAR), c.working(MONDAY, 1), Day([]), request(NEAR), CFG)[0] \
        == at(MONDAY, 9)


def test_availability_counts_technicians_by_start_with_skill_and_area() -> None:
    district = Circle(HOME[0], HOME[1], 5_000)
    techs = [
        cal("a", area=district),
        cal("b", area=district),
        cal("c", area=district, skills=frozenset({"beauty"})),  # no plumbing
        cal("d", area=Circle(FAR[0], FAR[1], 2_000)),  # does not come here
    ]
    busy = {"b": [Busy(at(MONDAY, 9), at(MONDAY, 12), NEAR[0], NEAR[1], "o-b")]}
    got = availability(techs, busy, request(NEAR, minutes=60, granularity=60), "plumbing",
                       MONDAY, 1, CFG)
    assert got[at(MONDAY, 9)] == ["a"]
    assert got[at(MONDAY, 12)] == ["a", "b"]
    assert set(got) == {at(MONDAY, h) for h in range(9, 18)}


def test_a_polygon_area_holds_what_is_inside() -> None:
    square = Polygon(((31.0, 121.0), (31.0, 122.0), (32.0, 122.0), (32.0, 121.0)))
    assert square.contains(31.5, 121.5)
    assert not square.contains(30.9, 121.5)
    assert cal(area=square).serves(31.5, 121.5, "plumbing")
    assert not cal(area=square).serves(33.0, 121.5, "plumbing")


@pytest.mark.parametrize(("calendar", "field"), [
    (cal(weekly=(WeeklyRule(0, Shift(time(9), time(12))), WeeklyRule(0, Shift(time(11), time(15))))),
     "weekly.1"),
    (cal(weekly=(WeeklyRule(0, Shift(time(18), time(9))),)), "weekly.0.shift"),
    (cal(weekly=(WeeklyRule(7, Shift(time(9), time(12))),)), "weekly.0.weekday"),
    (cal(timezone="Mars/Olympus_Mons"), "timezone"),
    (cal(exceptions=(DatedException(MONDAY, "off"),
                     DatedException(MONDAY, "extra", Shift(time(10), time(12))))), "exceptions.1"),
    (cal(exceptions=(DatedException(MONDAY, "extra"),)), "exceptions.0.shift"),
    (cal(area=Polygon(((31.0, 121.0), (32.0, 122.0), (31.0, 122.0), (32.0, 121.0)))), "area.corners"),
    (cal(area=Polygon(((31.0, 121.0), (32.0, 122.0)))), "area.corners"),
    (cal(area=Circle(31.0, 121.0, 0)), "area.radius_m"),
])
def test_nonsense_is_refused_with_the_field(calendar: Calendar, field: str) -> None:
    with pytest.raises(Invalid) as info:
        check_calendar(calendar)
    assert field in {p["field"] for p in info.value.details}, info.value.details


def test_a_sensible_calendar_passes() -> None:
    check_calendar(cal(
        weekly=(*weekdays(time(8), time(12)), *weekdays(time(13), time(17))),
        exceptions=(DatedException(MONDAY, "off", Shift(time(8), time(10))),
                    DatedException(MONDAY, "extra", Shift(time(18), time(20)))),
        area=Polygon(((31.0, 121.0), (31.0, 122.0), (32.0, 122.0), (32.0, 121.0))),
        timezone="Asia/Urumqi"))


@settings(max_examples=200, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.integers(0, 30 * 24), st.integers(1, 16), st.booleans()),
                  max_size=6),
    home=st.sampled_from([None, NEAR, FAR]),
    minutes=st.sampled_from([30, 60, 90, 150]),
    granularity=st.sampled_from([15, 30, 60]),
    not_before_min=st.integers(0, 36 * 60),
)
def test_free_starts_are_exactly_the_starts_that_fit(
        jobs: list[tuple[int, int, bool]], home: tuple[float, float] | None, minutes: int,
        granularity: int, not_before_min: int) -> None:
    """The fast path for shifts with nothing booked and the per-start path
    agree with fits() asked for every start on the grid."""
    c = cal(home=home)
    base = at(MONDAY, 0)
    busy = [Busy(base + s * 10 * MIN, base + (s + d) * 10 * MIN, *(FAR if far else NEAR), f"o-{i}")
            for i, (s, d, far) in enumerate(jobs)]
    working = c.working(MONDAY, 2)
    req = request(NEAR, minutes, granularity, base + not_before_min * MIN)
    day = Day(busy)
    got = free_starts(c, working, day, req, CFG)
    want = []
    step = granularity * MIN
    for shift in working:
        t = -(-max(shift[0], req.not_before_ms) // step) * step
        while t + req.duration_ms <= shift[1]:
            if fits((t, t + req.duration_ms), NEAR, day, shift, c.home, CFG) is None:
                want.append(t)
            t += step
    assert got == want
