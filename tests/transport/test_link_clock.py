"""The one timer behind every websocket session's liveness check and next
ping (realtime/transport/wsdirect.py LinkClock): duties fire in time order, within a
slot of when they are due, a dropped session never fires, and the clock
sleeps when nothing waits."""

from __future__ import annotations

import asyncio
import time

from realtime.transport.wsdirect import CLOCK_SLOT_S, LinkClock


class Duty:
    """What the clock needs of a session (wsdirect.Timed): its loop, its slot
    and _tick()."""

    def __init__(self, name: str, fired: list[tuple[str, float]],
                 clock: LinkClock | None = None, then: float = 0.0) -> None:
        self.name, self.fired = name, fired
        self.loop = asyncio.get_running_loop()
        self._slot = 0
        self.done = asyncio.Event()
        self.clock, self.then = clock, then  # as a session does: its next duty, set when it ticks

    def _tick(self) -> None:
        self.fired.append((self.name, time.monotonic()))
        self.done.set()
        if self.clock is not None and self.then:
            self.clock.at(self, time.monotonic() + self.then)


async def test_duties_fire_in_order_within_a_slot_and_dropped_ones_never() -> None:
    clock = LinkClock()
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    late, early, gone = Duty("late", fired), Duty("early", fired), Duty("gone", fired)
    clock.at(late, start + 0.6)
    clock.at(early, start + 0.1)
    clock.at(gone, start + 0.3)
    clock.drop(gone)
    async with asyncio.timeout(5):
        await late.done.wait()
    assert [n for n, _ in fired] == ["early", "late"]
    for (_, at), due in zip(fired, (0.1, 0.6), strict=True):
        assert due <= at - start <= due + CLOCK_SLOT_S + 0.2, (at - start, due)
    sentinel = Duty("sentinel", fired)  # due well after "gone" was
    clock.at(sentinel, time.monotonic() + 0.3)
    async with asyncio.timeout(5):
        await sentinel.done.wait()
    assert [n for n, _ in fired] == ["early", "late", "sentinel"]  # "gone" never fired
    assert clock._slots == {} and clock._handle is None  # asleep: nothing waits


async def test_a_duty_moved_earlier_fires_at_the_new_time() -> None:
    clock = LinkClock()
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    d = Duty("d", fired)
    clock.at(d, start + 30)
    clock.at(d, start + 0.1)
    async with asyncio.timeout(5):
        await d.done.wait()
    assert fired[0][1] - start < 1.0
    assert clock._slots == {}


async def test_a_tick_that_sets_its_next_duty_later_does_not_hold_up_the_others() -> None:
    """Sessions connected a moment apart: the first one's tick books its next
    duty far ahead; the others, due sooner, still fire on time."""
    clock = LinkClock()
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    first = Duty("first", fired, clock, then=60)
    others = [Duty(f"d{i}", fired, clock, then=60) for i in range(3)]
    clock.at(first, start + 0.1)
    for i, d in enumerate(others):
        clock.at(d, start + 0.4 + 0.3 * i)
    async with asyncio.timeout(5):
        await others[-1].done.wait()
    assert [n for n, _ in fired] == ["first", "d0", "d1", "d2"]
    for (_, at), due in zip(fired, (0.1, 0.4, 0.7, 1.0), strict=True):
        assert due <= at - start <= due + CLOCK_SLOT_S + 0.2, (at - start, due)
