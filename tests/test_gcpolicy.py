"""The garbage-collection policy (realtime/gcpolicy.py): no automatic full
collections, survivors frozen on a schedule, a full collection on its own
schedule that reclaims cyclic garbage frozen meanwhile."""

from __future__ import annotations

import asyncio
import gc
import weakref

from realtime.gcpolicy import NO_AUTO_FULL, run_policy, start_policy


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


async def test_policy_freezes_and_collects_on_schedule() -> None:
    saved = gc.get_threshold()
    try:
        start_policy()
        assert gc.get_threshold()[2] == NO_AUTO_FULL
        assert gc.get_freeze_count() > 0

        garbage = Node()
        ref = weakref.ref(garbage)
        task = asyncio.get_running_loop().create_task(run_policy(0.05, 1000.0))
        await asyncio.sleep(0.12)
        task.cancel()
        # The cycle survived a young collection and was frozen with the rest,
        # so even an explicit collection leaves it alone.
        del garbage
        gc.collect()
        assert ref() is not None, "a frozen cycle is not collected until the full collection"

        task = asyncio.get_running_loop().create_task(run_policy(0.05, 0.01))
        await asyncio.sleep(0.12)
        task.cancel()
        assert ref() is None, "the scheduled full collection reclaims it"
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
