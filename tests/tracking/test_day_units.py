"""tracking/day.py on its own: which job is current, the projection chain,
and when lateness is worth an event."""

from __future__ import annotations

from datetime import date
from typing import Any

from tracking import day
from tracking.eta import EtaConfig
from tracking.positions import Position

CFG = EtaConfig()
MIN = 60_000
NOW = 1_900_000_000_000
HOME = (31.2304, 121.4737)
NORTH_3KM = (31.2304 + 3000 / 111_195, 121.4737)


def job(oid: str, state: str, start: int, minutes: int = 60, where: tuple[float, float] = HOME,
        **extra: Any) -> dict[str, Any]:
    return {"order_id": oid, "state": state, "address": {"lat": where[0], "lng": where[1]},
            "window": {"start_ts": start, "end_ts": start + minutes * MIN}, **extra}


def at_home(ts: int = NOW, **kw: Any) -> Position:
    return Position("t", HOME[0], HOME[1], ts, **kw)


def test_the_current_job_is_the_one_under_way_and_queued_jobs_go_by_window() -> None:
    a, b = job("a", "assigned", NOW + 60 * MIN), job("b", "assigned", NOW + 30 * MIN)
    assert day.current_job([a, b]) is None  # not set off: nobody's positions
    a_going = {**a, "state": "en_route"}
    assert day.current_job([a_going, b]) is a_going
    current, queued = day.split([a_going, job("c", "assigned", NOW + 90 * MIN), b,
                                 job("d", "completed", NOW)])
    assert current is a_going and [j["order_id"] for j in queued] == ["b", "c"]


def test_queued_jobs_chain_behind_the_current_one() -> None:
    current = job("a", "in_service", NOW - 30 * MIN, 60, times={"in_service": NOW - 20 * MIN})
    b = job("b", "assigned", NOW, 30, where=NORTH_3KM)
    c = job("c", "assigned", NOW + 5 * 60 * MIN, 30)
    out = day.project([c, b, current], at_home(), NOW, CFG)
    drive = day.drive_ms(*HOME, *NORTH_3KM, CFG)
    # 40 minutes of A left, then the drive to B; B's half hour, then the drive back to C,
    # which cannot start before its window.
    assert out["b"] == day.Projection("b", "queued", NOW + 40 * MIN + drive)
    assert out["c"] == day.Projection("c", "queued", NOW + 40 * MIN + drive + 30 * MIN + drive)
    assert "a" not in out  # in service: no arrival ahead
    assert out["b"].minutes_late(NOW) == 40 + -(-drive // MIN)


def test_without_a_fresh_position_the_projection_says_so() -> None:
    a = job("a", "en_route", NOW)
    b = job("b", "assigned", NOW + 120 * MIN)
    old = at_home(NOW - day.POSITION_FRESH_MS - 1)
    assert {p.basis for p in day.project([a, b], old, NOW, CFG).values()} == {"no_position"}
    assert day.project([b], None, NOW, CFG)["b"].basis == "no_position"
    # En route with a live ETA: that ETA, counted from its fix.
    live = at_home(NOW - 10_000, order_id="a", eta_s=600)
    assert day.project([a, b], live, NOW, CFG)["a"] == day.Projection("a", "live", NOW + 590_000)


def test_lateness_is_said_once_per_worsening_step_and_recovery_once() -> None:
    order = job("a", "assigned", NOW)

    def verdict(minutes: int, late: dict[str, Any] | None = None) -> day.Lateness | None:
        proj = day.Projection("a", "idle", NOW + minutes * MIN)
        return day.judge(proj, {**order, "late": late}, 10)

    assert verdict(10) is None  # within the grace
    first = verdict(11)
    assert first == day.Lateness("late_risk", 1, 11)
    said = {"step": 1, "minutes_late": 11}
    assert verdict(15, said) is None and verdict(20, said) is None
    assert verdict(21, said) == day.Lateness("late_risk", 2, 21)
    assert verdict(8, said) is None  # better, still not on time: nothing new
    assert verdict(5, said) == day.Lateness("on_time_again", 0, 5)
    assert verdict(-3) is None  # never late: nothing to take back
    # Only while the arrival is ahead.
    assert day.judge(day.Projection("a", "idle", NOW + 60 * MIN), {**order, "state": "arrived"},
                     10) is None


def test_a_day_is_the_calendar_day_in_the_technicians_timezone() -> None:
    on, start, end = day.day_range(date(2030, 3, 4), "Asia/Shanghai", NOW)
    assert on == date(2030, 3, 4) and end - start == 24 * 60 * MIN
    assert start == 1_898_784_000_000  # 2030-03-03T16:00:00Z
    today, _, _ = day.day_range(None, "Asia/Shanghai", 1_898_784_000_000)
    assert today == date(2030, 3, 4)


def test_arrived_overdue_and_reach() -> None:
    arrived = job("a", "arrived", NOW - 10 * MIN, 60, times={"arrived": NOW - 5 * MIN})
    b = job("b", "assigned", NOW + 30 * MIN, 30, where=NORTH_3KM)
    out = day.project([arrived, b], None, NOW, CFG)
    drive = day.drive_ms(*HOME, *NORTH_3KM, CFG)
    # Arrived: its whole planned hour is still ahead (service not begun), then the drive.
    assert out["a"] == day.Projection("a", "arrived", NOW - 5 * MIN)
    assert out["b"] == day.Projection("b", "queued", NOW + 60 * MIN + drive)
    # Nothing known and the window has begun: overdue, at least this late.
    started = job("c", "assigned", NOW - 25 * MIN)
    assert day.project([started], None, NOW, CFG)["c"] == day.Projection("c", "overdue", NOW)
    assert day.overdue(started, NOW) == day.Projection("c", "overdue", NOW)
    assert day.overdue(job("d", "assigned", NOW + MIN), NOW) is None
    assert day.overdue({**started, "state": "arrived"}, NOW) is None
    # Reach: idle from the position; after the rest of a job under way.
    assert day.reach([], at_home(), NOW, *NORTH_3KM, CFG) == NOW + drive
    busy = job("e", "in_service", NOW - 30 * MIN, 60, times={"in_service": NOW - 30 * MIN})
    assert day.reach([busy], at_home(), NOW, *NORTH_3KM, CFG) == NOW + 30 * MIN + drive
    assert day.reach([], None, NOW, *NORTH_3KM, CFG) is None


def test_only_days_a_view_may_ask_for() -> None:
    assert day.check_date("2030-03-04") == date(2030, 3, 4)
    for bad in ("9999-12-31", "1970-01-01", "2030-02-30", "tomorrow"):
        try:
            day.check_date(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
