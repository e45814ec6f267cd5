"""Technicians' calendars in MongoDB: one document per technician (`_id` =
the technician id), replaced whole by the backend's PUT."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from scheduling.calendar import Calendar, calendar_dict, calendar_of
from storage.gate import GatedStore, StoreGate


class MongoCalendarStore(GatedStore):
    def __init__(self, db: AsyncDatabase[dict[str, Any]], gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._c = db["calendars"]

    async def put(self, cal: Calendar, ts: int) -> None:
        doc = calendar_dict(cal)
        doc["_id"] = doc.pop("technician_id")
        doc["updated_ts"] = ts
        await self._c.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    async def serving(self, skill: str | None, limit: int) -> list[Calendar]:
        """The calendars of technicians with this skill (any, for None)."""
        cursor = self._c.find({"skills": skill} if skill is not None else {}).limit(limit)
        return [_calendar(doc) async for doc in cursor]

    async def of(self, technician_ids: list[str]) -> dict[str, Calendar]:
        """These technicians' calendars (those who have one)."""
        cursor = self._c.find({"_id": {"$in": technician_ids}})
        return {doc["_id"]: _calendar(doc) async for doc in cursor}

    async def ensure_indexes(self) -> None:
        await self._c.create_index("skills")

    async def get(self, technician_id: str) -> tuple[Calendar, int] | None:
        """The calendar and when it was last set."""
        doc = await self._c.find_one({"_id": technician_id})
        if doc is None:
            return None
        return _calendar(doc), int(doc.get("updated_ts", 0))


def _calendar(doc: dict[str, Any]) -> Calendar:
    return calendar_of({**doc, "technician_id": doc["_id"]})
