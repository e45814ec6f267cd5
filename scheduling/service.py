"""Availability as a service: the calendars of the technicians who could
come, their booked orders, and `availability()` over them
(docs/scheduling.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, Protocol

from kernel.clock import now_ms
from orders.model import Order
from scheduling.availability import Busy, Request, availability
from scheduling.calendar import Calendar
from tracking.eta import EtaConfig

# How many technicians one query considers: a district's worth and more.
MAX_TECHNICIANS: Final = 2000
MAX_DAYS: Final = 14
DAY_MS: Final = 24 * 3600 * 1000


class Calendars(Protocol):
    async def serving(self, skill: str | None, limit: int) -> list[Calendar]: ...


class Bookings(Protocol):
    async def booked_between(self, technician_ids: list[str], from_ms: int,
                             until_ms: int) -> list[Order]: ...


@dataclass(frozen=True, slots=True)
class Query:
    lat: float
    lng: float
    skill: str | None
    from_day: date
    days: int
    duration_min: int
    granularity_min: int = 30


def busy_of(order: Order) -> Busy:
    window, address = order["window"], order["address"]
    return Busy(window["start_ts"], window["end_ts"], address["lat"], address["lng"],
                order["order_id"])


class SchedulingService:
    def __init__(self, calendars: Calendars, bookings: Bookings, eta: EtaConfig) -> None:
        self.calendars = calendars
        self.bookings = bookings
        self.eta = eta

    async def availability(self, q: Query) -> dict[int, list[str]]:
        """start time -> ids of the technicians who can take the job then."""
        cals = await self.calendars.serving(q.skill, MAX_TECHNICIANS)
        cals = [c for c in cals if c.serves(q.lat, q.lng, q.skill)]
        # Every timezone's days: from a day before to a day after, in UTC.
        start = _day_ms(q.from_day) - DAY_MS
        end = _day_ms(q.from_day + timedelta(days=q.days)) + DAY_MS
        orders = await self.bookings.booked_between([c.technician_id for c in cals], start, end)
        busy: dict[str, list[Busy]] = {}
        for order in orders:
            tech = order["technician_id"]
            if tech is not None and order.get("window") and order.get("address"):
                busy.setdefault(tech, []).append(busy_of(order))
        req = Request(q.lat, q.lng, q.duration_min * 60_000, q.granularity_min * 60_000, now_ms())
        return availability(cals, busy, req, q.skill, q.from_day, q.days, self.eta)


def _day_ms(d: date) -> int:
    return (d - date(1970, 1, 1)).days * DAY_MS
