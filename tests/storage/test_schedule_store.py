"""The schedule store's transactions on the real store: a write that fails
part-way leaves nothing behind (docs/scheduling.md, Exclusivity)."""

from __future__ import annotations

import pytest

from kernel.errors import Unavailable
from scheduling.schedule import Hold
from storage.schedules import MongoScheduleStore, ScheduleBook
from tests.harness import MongoServer, uid
from tests.stores import own_database
from tracking.eta import EtaConfig

HOUR = 3_600_000
BASE = 1_900_000_000_000  # far ahead: nothing has expired


def a_hold(hold_id: str, tech: str, customer: str, start: int) -> Hold:
    return Hold(hold_id, tech, customer, start, start + HOUR, 31.23, 121.47, BASE + 10 * HOUR)


async def test_a_hold_that_fails_after_writing_the_schedule_leaves_nothing(
        mongo_server: MongoServer) -> None:
    async with own_database(mongo_server, "sched_") as own:
        store = MongoScheduleStore(own.client, own.db, ScheduleBook(own.db, EtaConfig()), own.gate)
        await store.ensure_indexes()
        first, second = uid("t-"), uid("t-")
        made = await store.hold(a_hold("h-same", first, "c-1", BASE + HOUR), 2, BASE)
        assert made.hold_id == "h-same"
        # Same hold id for another technician: its schedule is written first in
        # the transaction, then the hold record collides; the whole of it goes.
        with pytest.raises(Unavailable):
            await store.hold(a_hold("h-same", second, "c-2", BASE + 3 * HOUR), 2, BASE)
        found = await store.items_of([first, second])
        assert [i.ref for i in found[first][1]] == ["h-same"]
        assert found[second] == (0, [])
        assert await own.db["hold_owners"].find_one({"_id": "c-2"}) is None
        owner = await own.db["hold_owners"].find_one({"_id": "c-1"})
        assert owner is not None and [h["id"] for h in owner["holds"]] == ["h-same"]
        record = await store.get_hold("h-same")
        assert record is not None and record.technician_id == first
