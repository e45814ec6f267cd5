"""What an order and its events are, as stored and as sent (docs/protocol.md,
Orders): TypedDicts, so mypy sees a misspelt key. They stay plain dicts at
run time: the store reads and writes them, and the wire encodes them,
without a conversion on the way."""

from __future__ import annotations

from typing import Any, NotRequired, Required, TypedDict

from kernel.actor import ActorRef


class Address(TypedDict):
    lat: float
    lng: float
    text: str


class Window(TypedDict):
    start_ts: int
    end_ts: int


class Rating(TypedDict, total=False):
    stars: Required[int]
    quality: int
    attitude: int
    efficiency: int
    comment: str
    ts: int


class Service(TypedDict):
    code: str
    name: str


class Order(TypedDict):
    order_id: str
    state: str
    seq: int  # of the order's last event: 1, 2, 3, ... with no gaps
    customer_id: str
    technician_id: str | None
    service: Service
    address: Address
    window: Window
    skills: list[str]
    created_ts: int
    updated_ts: int
    rating: Rating | None
    completed_ts: NotRequired[int]
    hold_id: NotRequired[str]  # booked from this hold (docs/scheduling.md)
    times: NotRequired[dict[str, int]]  # when it reached each state
    late: NotRequired[dict[str, Any] | None]  # set by late_risk, cleared by on_time_again


class Event(TypedDict):
    order_id: str
    seq: int
    type: str  # state_changed | reassigned | rated | dispatch_failed | ...
    state: str  # the order's state after the event
    ts: int
    actor: ActorRef
    data: dict[str, Any]
