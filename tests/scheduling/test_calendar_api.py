"""Technicians' calendars over HTTP (realtime/scheduling_api.py): the backend
sets one, staff and the technician read it back from the store, and
nonsense is refused with the field."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Live
from tests.harness import uid


def calendar(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timezone": "Asia/Shanghai",
        "weekly": [{"weekday": d, "start": "09:00", "end": "18:00"} for d in range(5)],
        "exceptions": [{"date": "2026-12-25", "kind": "off"},
                       {"date": "2026-12-26", "kind": "extra", "start": "10:00", "end": "14:00"}],
        "home": {"lat": 31.2304, "lng": 121.4737},
        "skills": ["plumbing", "appliance"],
        "area": {"polygon": [[31.0, 121.0], [31.0, 122.0], [32.0, 122.0], [32.0, 121.0]]},
    }
    body.update(over)
    return body


async def test_the_backend_sets_a_calendar_and_everyone_allowed_reads_it(live: Live) -> None:
    tech = uid("tech-")
    path = f"/api/technicians/{tech}/calendar"
    status, body = await live.http.request("PUT", path, live.token("service"), json=calendar())
    assert status == 200, body
    sent = body["data"]["calendar"]
    assert sent["technician_id"] == tech and sent["skills"] == ["appliance", "plumbing"]
    for role, sub in (("service", None), ("admin", None), ("agent", None), ("technician", tech)):
        status, body = await live.http.request("GET", path, live.token(role, sub))
        assert status == 200, (role, body)
        got = body["data"]["calendar"]
        assert got == sent, (role, got)
    assert got["weekly"][0] == {"weekday": 0, "start": "09:00", "end": "18:00"}
    assert got["exceptions"] == [{"date": "2026-12-25", "kind": "off"},
                                 {"date": "2026-12-26", "kind": "extra", "start": "10:00",
                                  "end": "14:00"}]
    # a PUT replaces the whole calendar
    status, body = await live.http.request(
        "PUT", path, live.token("service"),
        json=calendar(exceptions=[], area={"circle": {"lat": 31.2, "lng": 121.4, "radius_m": 8000}}))
    assert status == 200, body
    status, body = await live.http.request("GET", path, live.token("agent"))
    assert body["data"]["calendar"]["exceptions"] == []
    assert body["data"]["calendar"]["area"] == {"circle": {"lat": 31.2, "lng": 121.4, "radius_m": 8000}}


async def test_who_may_not_gets_forbidden_and_a_missing_calendar_not_found(live: Live) -> None:
    tech = uid("tech-")
    path = f"/api/technicians/{tech}/calendar"
    for role in ("customer", "technician", "agent"):
        status, body = await live.http.request("PUT", path, live.token(role, tech), json=calendar())
        assert status == 403 and body["error"]["code"] == "forbidden", (role, body)
    status, body = await live.http.request("GET", path, live.token("agent"))
    assert status == 404 and body["error"]["code"] == "not_found", body
    await live.http.request("PUT", path, live.token("service"), json=calendar())
    for role, sub in (("customer", None), ("technician", uid("other-"))):
        status, body = await live.http.request("GET", path, live.token(role, sub))
        assert status == 403 and body["error"]["code"] == "forbidden", (role, body)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown timezone", calendar(timezone="Mars/Olympus_Mons"), "timezone"),
    ("not a timezone name", calendar(timezone="../etc/passwd"), "timezone"),
    ("overlapping weekly rules",
     calendar(weekly=[{"weekday": 0, "start": "09:00", "end": "13:00"},
                      {"weekday": 0, "start": "12:00", "end": "18:00"}]), "weekly.1"),
    ("a shift ending before it starts",
     calendar(weekly=[{"weekday": 0, "start": "18:00", "end": "09:00"}]), "weekly.0.shift"),
    ("no such hour", calendar(weekly=[{"weekday": 0, "start": "25:00", "end": "26:00"}]), "weekly"),
    ("no such weekday", calendar(weekly=[{"weekday": 7, "start": "09:00", "end": "18:00"}]), "weekly"),
    ("no such date", calendar(exceptions=[{"date": "2026-02-30", "kind": "off"}]), "exceptions"),
    ("an extra shift without hours", calendar(exceptions=[{"date": "2026-12-26", "kind": "extra"}]),
     "exceptions.0.shift"),
    ("half an exception's hours",
     calendar(exceptions=[{"date": "2026-12-26", "kind": "off", "start": "10:00"}]), "exceptions"),
    ("overlapping exceptions",
     calendar(exceptions=[{"date": "2026-12-25", "kind": "off"},
                          {"date": "2026-12-25", "kind": "extra", "start": "10:00", "end": "12:00"}]),
     "exceptions.1"),
    ("a polygon that intersects itself",
     calendar(area={"polygon": [[31.0, 121.0], [32.0, 122.0], [31.0, 122.0], [32.0, 121.0]]}),
     "area.corners"),
    ("a polygon of two corners", calendar(area={"polygon": [[31.0, 121.0], [32.0, 122.0]]}), "area"),
    ("a corner off the globe",
     calendar(area={"polygon": [[31.0, 121.0], [91.0, 122.0], [32.0, 122.0]]}), "area"),
    ("a circle and a polygon",
     calendar(area={"circle": {"lat": 31.0, "lng": 121.0, "radius_m": 5},
                    "polygon": [[31.0, 121.0], [31.0, 122.0], [32.0, 122.0]]}), "area"),
    ("a circle of no size", calendar(area={"circle": {"lat": 31.0, "lng": 121.0, "radius_m": 0}}),
     "area"),
    ("an unknown field", calendar(holidays=[]), "holidays"),
    ("weekly missing", {k: v for k, v in calendar().items() if k != "weekly"}, "weekly"),
    ("a skill id with spaces", calendar(skills=["pipe work"]), "skills"),
]


@pytest.mark.parametrize(("why", "body", "field"), BAD, ids=[b[0] for b in BAD])
async def test_nonsense_is_refused_with_the_field(live: Live, why: str, body: dict[str, Any],
                                                  field: str) -> None:
    path = f"/api/technicians/{uid('tech-')}/calendar"
    status, reply = await live.http.request("PUT", path, live.token("service"), json=body)
    assert status == 400 and reply["error"]["code"] == "invalid", (why, reply)
    fields = [d["field"] for d in reply["error"].get("details") or []]
    assert any(f == field or f.startswith(field + ".") for f in fields), (why, fields)
    status, _ = await live.http.request("GET", path, live.token("service"))
    assert status == 404, why  # nothing half-written


async def test_a_body_that_is_not_an_object_is_refused(live: Live) -> None:
    path = f"/api/technicians/{uid('tech-')}/calendar"
    for raw in ("[]", "null", "{", '{"weekly": [] , "timezone": 1e999}'):
        status, reply = await live.http.request(
            "PUT", path, live.token("service"), data=raw,
            headers={"Content-Type": "application/json"})
        assert status == 400 and reply["error"]["code"] == "invalid", (raw, reply)
