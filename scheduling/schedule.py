"""A technician's schedule: their live holds and booked orders, and the one
rule that decides whether a new one fits (docs/scheduling.md, Exclusivity).

Pure: the store (storage/schedules.py) reads the schedule document, asks
`place` here, and writes the result conditioned on the version it read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from kernel.errors import Conflict
from scheduling.availability import Busy, Day, fits
from scheduling.calendar import Calendar, Interval
from tracking.eta import EtaConfig

# Items that ended longer ago than this are pruned on every write: the
# document keeps what is ahead and what is under way.
KEEP_PAST_MS: Final = 24 * 3600 * 1000
# An order without a calendar (or a technician without one) is not bound by
# working hours: its shift is all time.
ALL_TIME: Final[Interval] = (0, 2**62)

Kind = Literal["hold", "order"]
HoldEnd = Literal["released", "expired"]


@dataclass(frozen=True, slots=True)
class Item:
    """Time a technician is taken: a hold (until it expires) or an order."""

    ref: str  # the hold id or the order id
    kind: Kind
    start_ms: int
    end_ms: int
    lat: float
    lng: float
    customer_id: str | None = None
    expires_ms: int | None = None  # holds only
    hold_id: str | None = None  # an order that was a hold

    def live(self, now: int) -> bool:
        return self.kind == "order" or (self.expires_ms or 0) > now

    def busy(self) -> Busy:
        return Busy(self.start_ms, self.end_ms, self.lat, self.lng, self.ref)


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    technician_id: str
    customer_id: str
    start_ms: int
    end_ms: int
    lat: float
    lng: float
    expires_ms: int
    skill: str | None = None
    state: str = "live"  # live | released | expired | confirmed
    order_id: str | None = None

    def item(self) -> Item:
        return Item(self.hold_id, "hold", self.start_ms, self.end_ms, self.lat, self.lng,
                    customer_id=self.customer_id, expires_ms=self.expires_ms)

    def live(self, now: int) -> bool:
        return self.state == "live" and self.expires_ms > now


def item_dict(item: Item) -> dict[str, Any]:
    d: dict[str, Any] = {"ref": item.ref, "kind": item.kind, "start_ms": item.start_ms,
                         "end_ms": item.end_ms, "lat": item.lat, "lng": item.lng}
    for key in ("customer_id", "expires_ms", "hold_id"):
        value = getattr(item, key)
        if value is not None:
            d[key] = value
    return d


def item_of(d: dict[str, Any]) -> Item:
    return Item(ref=str(d["ref"]), kind=d["kind"], start_ms=int(d["start_ms"]),
                end_ms=int(d["end_ms"]), lat=float(d["lat"]), lng=float(d["lng"]),
                customer_id=d.get("customer_id"), expires_ms=d.get("expires_ms"),
                hold_id=d.get("hold_id"))


def current(items: Iterable[Item], now: int) -> list[Item]:
    """What still takes time: live holds and orders not long over."""
    return [i for i in items if i.live(now) and i.end_ms > now - KEEP_PAST_MS]


def shown(items: Iterable[Item], now: int) -> list[Busy]:
    """What availability shows as taken: every hold until the expiry sweep
    ends it (and signals the slot free), so a view and the changes pushed
    to it agree on when a slot came back. The exclusivity decision (`place`)
    looks at the expiry itself: a hold past it yields at once."""
    return [i.busy() for i in items if i.end_ms > now - KEEP_PAST_MS]


def shift_of(cal: Calendar | None, job: Interval) -> Interval | None:
    """The working interval that holds the whole job (None: none does)."""
    if cal is None:
        return ALL_TIME
    first = datetime.fromtimestamp(job[0] / 1000, UTC).date() - timedelta(days=1)
    for shift in cal.working(first, 3):
        if shift[0] <= job[0] and job[1] <= shift[1]:
            return shift
    return None


class Taken(Conflict):
    """The job does not fit: why, and what it collides with."""

    def __init__(self, reason: str, job: Interval, other: Item | None = None) -> None:
        details: dict[str, Any] = {"reason": reason, "start_ts": job[0], "end_ts": job[1]}
        if other is not None:
            details["conflict"] = {"kind": other.kind, "id": other.ref,
                                   "start_ts": other.start_ms, "end_ts": other.end_ms}
            if other.kind == "order":
                details["order_id"] = other.ref
        super().__init__(_MESSAGES.get(reason, reason), details)
        self.reason = reason
        self.other = other


_MESSAGES: Final = {
    "outside_hours": "the technician does not work then",
    "taken": "the technician is taken then",
    "travel_from": "the technician cannot get there in time from the job before",
    "travel_to": "the technician cannot get to the next job in time after this one",
}


def place(items: Sequence[Item], new: Item, cal: Calendar | None, cfg: EtaConfig,
          now: int) -> list[Item]:
    """The schedule with `new` added, pruned; raises Taken when it does not
    fit (working hours, overlap, or the drive from the job before or to the
    job after, the same rule as availability: scheduling/availability.py)."""
    kept = [i for i in current(items, now) if i.ref != new.ref]
    job = (new.start_ms, new.end_ms)
    shift = shift_of(cal, job)
    if shift is None:
        raise Taken("outside_hours", job)
    home = cal.home if cal is not None else None
    why = fits(job, (new.lat, new.lng), Day(i.busy() for i in kept), shift, home, cfg)
    if why is not None:
        reason, _, ref = why.partition(":")
        other = next((i for i in kept if i.ref == ref), None)
        raise Taken(reason, job, other)
    return sorted([*kept, new], key=lambda i: i.start_ms)
