"""The garbage-collection policy (realtime/gcpolicy.py): no automatic full
collections, survivors frozen, a full collection that reclaims cyclic
garbage frozen meanwhile, and the schedule that runs them."""

from __future__ import annotations

import asyncio
import gc
import weakref

from realtime.gcpolicy import (
    NO_AUTO_FULL,
    YOUNG1,
    freeze_survivors,
    full_collection,
    run_policy,
    run_young,
    start_policy,
    young_collection,
)


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_frozen_cycles_wait_for_the_full_collection() -> None:
    saved = gc.get_threshold()
    try:
        start_policy()
        assert gc.get_threshold()[1:] == (YOUNG1, NO_AUTO_FULL)
        assert gc.get_freeze_count() > 0

        garbage = Node()
        ref = weakref.ref(garbage)
        freeze_survivors()
        # Frozen with the rest, so even an explicit collection leaves it alone.
        del garbage
        gc.collect()
        assert ref() is not None, "a frozen cycle is not collected until the full collection"
        assert full_collection() > 0
        assert ref() is None, "the full collection reclaims it"
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


async def test_the_schedule_runs_the_full_collection() -> None:
    try:
        gc.freeze()
        garbage = Node()
        freed = asyncio.Event()
        ref = weakref.ref(garbage, lambda _: freed.set())
        gc.freeze()
        del garbage
        task = asyncio.get_running_loop().create_task(run_policy(0.01, 0.01))
        try:
            await asyncio.wait_for(freed.wait(), 5)  # the collection itself
        finally:
            task.cancel()
        assert ref() is None
    finally:
        gc.unfreeze()


async def test_young_garbage_is_collected_on_the_clock() -> None:
    # CPython's own trigger off: only the clock can collect the cycle.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        garbage = Node()
        freed = asyncio.Event()
        ref = weakref.ref(garbage, lambda _: freed.set())
        del garbage
        assert ref() is not None
        task = asyncio.get_running_loop().create_task(run_young(0.01))
        try:
            await asyncio.wait_for(freed.wait(), 5)
        finally:
            task.cancel()
    finally:
        if was_enabled:
            gc.enable()


def test_generation_one_is_collected_when_due() -> None:
    generations: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection may move the counts meanwhile
    gc.callbacks.append(seen)
    try:
        gc.collect(1)  # generation 1's count starts at zero
        generations.clear()
        for _ in range(gc.get_threshold()[1]):
            young_collection()
        assert set(generations) == {0}, "generation 0 alone until generation 1 is due"
        young_collection()
        assert generations[-1] == 1
        assert gc.get_count()[1] == 0
    finally:
        gc.callbacks.remove(seen)
        if was_enabled:
            gc.enable()
