"""The shared kernel on its own: actors, domain errors, the clock, keyed locks,
the request deadline, background tasks and token buckets. No store, no socket."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kernel import deadline
from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from kernel.locks import KeyedLocks
from kernel.rate import TokenBucket
from kernel.tasks import BackgroundTasks

T = TypeVar("T")


async def in_own_task(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `fn` in a task of its own (a copy of the context), as each request is:
    a deadline it sets does not leak into the test's (session-wide) context."""
    return await asyncio.get_running_loop().create_task(fn())


# -- actor, errors, clock ---------------------------------------------------------------------------

def test_actor_is_a_frozen_value_with_a_wire_form() -> None:
    a = Actor("c-1", "customer")
    assert a.as_dict() == {"id": "c-1", "role": "customer"}
    assert a == Actor("c-1", "customer") and hash(a) == hash(Actor("c-1", "customer"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.id = "c-2"  # type: ignore[misc]  # assigning to a frozen field is what is checked


def test_each_domain_error_carries_its_wire_code() -> None:
    codes = {cls: cls("x").code for cls in (Invalid, Unauthorized, Forbidden, NotFound, Conflict,
                                            Unavailable)}
    assert codes == {Invalid: "invalid", Unauthorized: "unauthorized", Forbidden: "forbidden",
                     NotFound: "not_found", Conflict: "conflict", Unavailable: "unavailable"}
    assert DomainError("boom").code == "internal"
    err = Conflict("cannot", {"state": "created"})
    assert (err.message, err.details, str(err)) == ("cannot", {"state": "created"}, "cannot")
    limited = RateLimited("slow down", 250)  # says when to retry
    assert (limited.code, limited.retry_after_ms, limited.details) == (
        "rate_limited", 250, {"retry_after_ms": 250})


def test_now_ms_is_integer_epoch_milliseconds() -> None:
    before = time.time() * 1000
    got = now_ms()
    after = time.time() * 1000
    assert isinstance(got, int)
    assert before - 1 <= got <= after + 1


# -- keyed locks ------------------------------------------------------------------------------------

async def test_hold_times_out_as_unavailable_with_the_busy_message() -> None:
    locks = KeyedLocks()
    async with locks.hold("order-1", 1.0, "busy"):
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            async with locks.hold("order-1", 0.05, "the order is busy; retry"):
                pytest.fail("a held key was entered twice")
        waited = time.monotonic() - t0
    assert info.value.message == "the order is busy; retry"
    assert 0.04 <= waited < 1.0
    # Released: the key is free again, at once.
    async with locks.hold("order-1", 0.0, "busy"):
        assert locks("order-1").locked()


async def test_hold_keys_are_independent_and_waiters_go_in_turn() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    gate = asyncio.Event()
    holding = {name: asyncio.Event() for name in "abc"}

    async def worker(name: str, key: str) -> None:
        async with locks.hold(key, None, "busy"):
            order.append(f"{name}+")
            holding[name].set()
            await gate.wait()
            order.append(f"{name}-")

    first = asyncio.create_task(worker("a", "k1"))
    await holding["a"].wait()
    second = asyncio.create_task(worker("b", "k1"))  # waits behind a (wait_s None: no bound)
    other = asyncio.create_task(worker("c", "k2"))  # another key: not blocked
    await holding["c"].wait()  # b started before c, and is still waiting
    assert order == ["a+", "c+"]
    gate.set()
    await asyncio.gather(first, second, other)
    assert order.index("a-") < order.index("b+")
    assert sorted(order) == ["a+", "a-", "b+", "b-", "c+", "c-"]


async def test_hold_is_bounded_by_the_request_deadline() -> None:
    """A generous wait_s is cut to what is left of the request's time."""
    locks = KeyedLocks()

    async def request() -> float:
        deadline.start(0.05)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            async with locks.hold("k", 10.0, "busy"):
                pass
        return time.monotonic() - t0

    async with locks.hold("k", None, "busy"):
        waited = await in_own_task(request)
    assert waited < 1.0


async def test_a_released_lock_is_not_kept() -> None:
    """One lock per key only while someone holds or waits for it: a key used
    once does not stay in memory."""
    locks = KeyedLocks()
    async with locks.hold("k", None, "busy"):
        held = locks("k")
        assert locks("k") is held and held.locked()
        gone = weakref.ref(held)
    del held
    assert gone() is None


# -- deadline -------------------------------------------------------------------------------------

async def test_remaining_without_a_request_deadline_is_the_bound() -> None:
    """Outside a request (or in another request than the one that set a
    deadline) every wait has just its own bound."""
    async def sets() -> None:
        deadline.start(0.01)

    async def outside_a_request() -> tuple[float | None, float | None, float | None]:
        return deadline.at(), deadline.remaining(1.5), deadline.remaining(None)

    await in_own_task(sets)
    assert await in_own_task(outside_a_request) == (None, 1.5, None)


async def test_remaining_is_the_shorter_of_the_bound_and_what_is_left() -> None:
    async def request() -> tuple[float | None, float | None, float | None, float | None]:
        loop = asyncio.get_running_loop()
        deadline.start(0.3)
        at = deadline.at()
        assert at is not None and 0.25 <= at - loop.time() <= 0.3
        short = deadline.remaining(0.1)
        unbounded = deadline.remaining(None)
        long = deadline.remaining(30.0)
        await asyncio.sleep(0.35)
        return short, unbounded, long, deadline.remaining(30.0)

    short, unbounded, long, after = await in_own_task(request)
    assert short == 0.1
    assert unbounded is not None and 0.2 < unbounded <= 0.3
    assert long is not None and 0.2 < long <= 0.3
    assert after == 0.0  # past the deadline: never negative


# -- background tasks ------------------------------------------------------------------------------

async def test_background_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("unit")
    done = asyncio.Event()

    async def fails() -> None:
        done.set()
        raise ValueError("boom")

    with caplog.at_level(logging.WARNING, logger="kernel.tasks"):
        tasks.spawn(fails())
        await done.wait()
        await tasks.settled()
    assert [r.getMessage() for r in caplog.records if r.name == "kernel.tasks"] == [
        "unit background task failed: ValueError"]
    await tasks.close()


async def test_close_cancels_what_still_runs_and_waits_for_it() -> None:
    tasks = BackgroundTasks("unit")
    started, cleaned = asyncio.Event(), []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("cleaned up")

    async def quick() -> None:
        cleaned.append("finished")

    tasks.spawn(forever())
    tasks.spawn(quick())
    await started.wait()
    await tasks.close()
    assert sorted(cleaned) == ["cleaned up", "finished"]
    await tasks.close()  # nothing left: closing twice is fine


async def test_close_also_closes_work_that_never_started() -> None:
    """A close right after a spawn cancels the task before it runs; the work
    it wraps is closed too (no 'coroutine ... was never awaited' at shutdown,
    seen from TrackingService._refresh)."""
    tasks = BackgroundTasks("unit")

    async def work() -> None:
        return None

    coro = work()
    tasks.spawn(coro)
    await tasks.close()  # before the loop ever ran the task
    state = inspect.getcoroutinestate(coro)
    if state == inspect.CORO_CREATED:
        coro.close()  # our own cleanup: no warning from this test either way
    assert state == inspect.CORO_CLOSED


async def test_background_work_runs_outside_the_request_deadline() -> None:
    tasks = BackgroundTasks("unit")
    seen: list[float | None] = []

    async def work() -> None:
        seen.append(deadline.at())

    async def request() -> None:
        deadline.start(5.0)
        tasks.spawn(work())

    await in_own_task(request)
    await tasks.settled()
    await tasks.close()
    assert seen == [None]


# -- token buckets --------------------------------------------------------------------------------

def test_token_bucket_refills_at_its_rate() -> None:
    b = TokenBucket(rate=2.0, burst=4.0)
    t0 = b.stamp
    assert [b.take(t0) for _ in range(4)] == [0, 0, 0, 0]
    assert b.take(t0) == 500  # empty: one token in half a second
    # One second later exactly two tokens came back, not more.
    assert [b.take(t0 + 1.0) for _ in range(2)] == [0, 0]
    assert b.take(t0 + 1.0) == 500
    # A quarter second gives half a token: the wait halves.
    assert b.take(t0 + 1.25) == 250
