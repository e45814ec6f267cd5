"""`POST /api/availability` over the wire: calendars set through the API, an
order booked through the API, and the free start times that remain (the
booked window and the drive around it taken out); customers see counts,
staff see who; nonsense refused with the field."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import Live
from tests.harness import uid

SH = ZoneInfo("Asia/Shanghai")
HERE = (31.2304, 121.4737)
NEAR = {"lat": 31.2314, "lng": 121.4747, "text": "上海市黄浦区 2 号"}
FAR = {"lat": 31.3504, "lng": 121.4737, "text": "上海市宝山区 3 号"}  # ~13 km north


def some_day() -> date:
    """A day well ahead (the query refuses the past), the same weekday rules
    apply to any day: the calendars work every day."""
    return datetime.now(UTC).date() + timedelta(days=3)


def at(day: date, hh: int, mm: int = 0) -> int:
    return int(datetime.combine(day, time(hh, mm), SH).timestamp() * 1000)


def every_day(start: str = "09:00", end: str = "18:00") -> list[dict[str, Any]]:
    return [{"weekday": d, "start": start, "end": end} for d in range(7)]


async def set_calendar(live: Live, tech: str, **over: Any) -> None:
    body: dict[str, Any] = {"weekly": every_day(), "skills": ["plumbing"],
                            "area": {"circle": {"lat": HERE[0], "lng": HERE[1], "radius_m": 30_000}}}
    body.update(over)
    status, reply = await live.http.request("PUT", f"/api/technicians/{tech}/calendar",
                                            live.token("service"), json=body)
    assert status == 200, reply


async def slots(live: Live, role: str, day: date, **over: Any) -> dict[int, dict[str, Any]]:
    body: dict[str, Any] = {"lat": NEAR["lat"], "lng": NEAR["lng"], "skill": over.pop("skill", None),
                            "from_date": day.isoformat(), "days": 1, "duration_min": 60}
    body.update(over)
    status, reply = await live.http.request("POST", "/api/availability", live.token(role), json=body)
    assert status == 200, reply
    return {s["start_ts"]: s for s in reply["data"]["slots"]}


async def test_free_start_times_leave_out_a_booked_window_and_the_drive_around_it(live: Live) -> None:
    day = some_day()
    skill = uid("skill-")  # this test's technicians only
    a, b = uid("tech-a-"), uid("tech-b-")
    await set_calendar(live, a, skills=[skill])
    await set_calendar(live, b, skills=[skill])
    # b has a job across the city from 12:00 to 13:00
    order = await live.create_order(address=FAR, window={"start_ts": at(day, 12),
                                                          "end_ts": at(day, 13)})
    await live.assign(order["order_id"], b)
    staff = await slots(live, "agent", day, skill=skill)
    assert staff[at(day, 9)]["technicians"] == sorted([a, b])
    assert staff[at(day, 9)]["count"] == 2
    # b is out from before 12:00 (the drive there) to after 13:00 (the drive back)
    for hh, mm in ((11, 0), (11, 30), (12, 0), (12, 30), (13, 0), (13, 30)):
        assert staff[at(day, hh, mm)]["technicians"] == [a], (hh, mm)
    assert staff[at(day, 14)]["technicians"] == sorted([a, b])
    assert at(day, 17, 30) not in staff  # a 60-minute job must end by 18:00
    assert staff[at(day, 17)]["end_ts"] == at(day, 18)
    # a customer sees how many, never who
    customer = await slots(live, "customer", day, skill=skill)
    assert customer[at(day, 12)] == {"start_ts": at(day, 12), "end_ts": at(day, 13), "count": 1}
    assert all("technicians" not in s for s in customer.values())


async def test_skill_and_area_decide_who_counts(live: Live) -> None:
    day = some_day()
    skill = uid("skill-")
    near, far_away = uid("tech-"), uid("tech-")
    await set_calendar(live, near, skills=[skill])
    await set_calendar(live, far_away, skills=[skill],
                       area={"circle": {"lat": 39.9042, "lng": 116.4074, "radius_m": 20_000}})
    got = await slots(live, "admin", day, skill=skill)
    assert {tuple(s["technicians"]) for s in got.values()} == {(near,)}
    assert await slots(live, "admin", day, skill=uid("nobody-has-")) == {}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("more than 14 days", {"days": 15}, "days"),
    ("no days", {"days": 0}, "days"),
    ("a zero duration", {"duration_min": 0}, "duration_min"),
    ("a negative duration", {"duration_min": -30}, "duration_min"),
    ("a window in the past", {"from_date": "2020-01-01"}, "from_date"),
    ("no such date", {"from_date": "2030-02-30"}, "from_date"),
    ("a latitude off the globe", {"lat": 91}, "lat"),
    ("a granularity too fine", {"granularity_min": 1}, "granularity_min"),
    ("an unknown field", {"budget": 100}, "budget"),
]


@pytest.mark.parametrize(("why", "over", "field"), BAD, ids=[b[0] for b in BAD])
async def test_nonsense_is_refused_with_the_field(live: Live, why: str, over: dict[str, Any],
                                                  field: str) -> None:
    body: dict[str, Any] = {"lat": HERE[0], "lng": HERE[1], "from_date": some_day().isoformat(),
                            "days": 1, "duration_min": 60, **over}
    status, reply = await live.http.request("POST", "/api/availability", live.token("customer"),
                                            json=body)
    assert status == 400 and reply["error"]["code"] == "invalid", (why, reply)
    assert field in [d["field"] for d in reply["error"]["details"]], (why, reply)


async def test_a_query_needs_a_token(live: Live) -> None:
    status, reply = await live.http.request("POST", "/api/availability", None,
                                            json={"lat": 0, "lng": 0})
    assert status == 401 and reply["error"]["code"] == "unauthorized", reply
