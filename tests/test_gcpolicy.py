"""The garbage-collection policy (realtime/gcpolicy.py): no automatic full
collections, survivors frozen, a full collection that reclaims cyclic
garbage frozen meanwhile, and the schedule that runs them."""

from __future__ import annotations

import asyncio
import gc
import weakref

from realtime.gcpolicy import NO_AUTO_FULL, freeze_survivors, full_collection, run_policy, start_policy


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_frozen_cycles_wait_for_the_full_collection() -> None:
    saved = gc.get_threshold()
    try:
        start_policy()
        assert gc.get_threshold()[2] == NO_AUTO_FULL
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
