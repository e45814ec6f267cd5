"""Technicians' schedules, holds and bookings in MongoDB (docs/scheduling.md,
Exclusivity).

- `schedules`: one document per technician (`_id` = technician id) with a
  `version` and the `items` (live holds, booked orders) ahead. Every write
  reads it, decides with `scheduling.schedule.place` (the drive included),
  and writes conditioned on the version it read: of two writers that read
  the same version one wins, the other re-reads and decides again.
- `holds`: one record per hold, kept after it ends (released, expired,
  confirmed with its order id) so a late confirm gets a clear answer and a
  repeated one the same order.
- `hold_owners`: per customer, their live holds: the limit of live holds per
  customer is decided in the same transaction as the hold, so two holds of
  one customer racing on two nodes cannot both pass it.

Each change is one transaction over these (and, for a confirm, the order and
its events): nothing half-written stays behind when the store fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

from pymongo import ASCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from kernel.errors import Conflict, Forbidden, NotFound, Unavailable
from kernel.locks import KeyedLocks
from orders.model import Event, Order
from orders.service import StaleWrite
from outbox.records import order_record
from scheduling.calendar import Calendar, calendar_of
from scheduling.schedule import Hold, HoldEnd, Item, current, item_dict, item_of, place
from storage.gate import GatedStore, StoreGate
from storage.mongo import order_out, run_txn, stage
from tracking.eta import EtaConfig

T = TypeVar("T")
# Version races re-decide this many times before `unavailable` (retry safe).
ATTEMPTS: Final = 16


def hold_dict(h: Hold) -> dict[str, Any]:
    return {"_id": h.hold_id, "technician_id": h.technician_id, "customer_id": h.customer_id,
            "start_ms": h.start_ms, "end_ms": h.end_ms, "lat": h.lat, "lng": h.lng,
            "expires_ms": h.expires_ms, "skill": h.skill, "state": h.state,
            "order_id": h.order_id}


def hold_of(d: dict[str, Any]) -> Hold:
    return Hold(hold_id=d["_id"], technician_id=d["technician_id"], customer_id=d["customer_id"],
                start_ms=d["start_ms"], end_ms=d["end_ms"], lat=d["lat"], lng=d["lng"],
                expires_ms=d["expires_ms"], skill=d.get("skill"), state=d["state"],
                order_id=d.get("order_id"))


class HoldLimit(Conflict):
    def __init__(self, limit: int, live: list[str]) -> None:
        super().__init__(f"at most {limit} live holds per customer; release one or let it expire",
                         {"reason": "hold_limit", "limit": limit, "hold_ids": live})


class ScheduleBook:
    """The schedule rule applied inside a transaction: shared by the hold
    store below and by the order store's commit (an assignment, a
    cancellation), which runs it in its own transaction."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], cfg: EtaConfig) -> None:
        self.cfg = cfg
        self._locks = KeyedLocks()
        self.schedules = db["schedules"]
        self.calendars = db["calendars"]

    @contextlib.asynccontextmanager
    async def turns(self, techs: list[str]) -> AsyncIterator[None]:
        """This node's turn on these technicians' schedules (in a fixed order:
        two commits wanting the same two cannot wait on each other), waited
        for within the request's deadline."""
        async with contextlib.AsyncExitStack() as stack:
            for tech in sorted(set(techs)):
                await stack.enter_async_context(
                    self._locks.hold(tech, None, "this technician's schedule is busy; retry"))
            yield

    async def read(self, tech: str, s: AsyncClientSession | None = None) -> tuple[int, list[Item]]:
        doc = await self.schedules.find_one({"_id": tech}, session=s)
        if doc is None:
            return 0, []
        return int(doc["version"]), [item_of(i) for i in doc.get("items", [])]

    async def calendar(self, tech: str, s: AsyncClientSession) -> Calendar | None:
        doc = await self.calendars.find_one({"_id": tech}, session=s)
        return None if doc is None else calendar_of({**doc, "technician_id": doc["_id"]})

    async def write(self, tech: str, version: int, items: list[Item],
                    s: AsyncClientSession) -> None:
        """Conditioned on `version` (0: no document yet); StaleWrite when it
        moved (inside an order's commit, the order service then re-reads and
        decides again, as for a moved order)."""
        body = [item_dict(i) for i in items]
        if version == 0:
            try:
                await self.schedules.insert_one({"_id": tech, "version": 1, "items": body}, session=s)
            except DuplicateKeyError:
                raise StaleWrite(tech) from None
            return
        res = await self.schedules.update_one({"_id": tech, "version": version},
                                              {"$set": {"items": body, "version": version + 1}},
                                              session=s)
        if res.matched_count == 0:
            raise StaleWrite(tech)

    async def add(self, tech: str, item: Item, now: int, s: AsyncClientSession) -> None:
        """Put `item` in the technician's schedule, or raise Taken."""
        version, items = await self.read(tech, s)
        placed = place(items, item, await self.calendar(tech, s), self.cfg, now)
        await self.write(tech, version, placed, s)

    async def remove(self, tech: str, ref: str, now: int, s: AsyncClientSession) -> bool:
        version, items = await self.read(tech, s)
        if not any(i.ref == ref for i in items):
            return False
        await self.write(tech, version, [i for i in current(items, now) if i.ref != ref], s)
        return True

    async def order_committed(self, order: dict[str, Any], event: Event, now: int,
                              s: AsyncClientSession) -> None:
        """Keep the schedules true to an order change, in its transaction:
        an assignment takes the technician's time (or raises Taken: the
        assignment is refused), a re-assignment moves it, a cancellation or
        completion gives it back. Orders without a window take no time."""
        window, address = order.get("window"), order.get("address")
        if not window or not address:
            return
        order_id, tech = order["_id"], order.get("technician_id")
        state, kind = order["state"], event["type"]
        if kind == "reassigned":
            previous = event["data"].get("previous_technician_id")
            if previous:
                await self.remove(previous, order_id, now, s)
        if state == "assigned" and kind in ("state_changed", "reassigned") and tech:
            await self.add(tech, Item(order_id, "order", window["start_ts"], window["end_ts"],
                                      address["lat"], address["lng"],
                                      customer_id=order.get("customer_id"),
                                      hold_id=order.get("hold_id")), now, s)
        elif state in ("cancelled", "completed") and tech:
            await self.remove(tech, order_id, now, s)


def schedule_touched(order: Order, event: Event) -> list[str]:
    """The technicians whose schedule an order event changed."""
    if not order.get("window"):
        return []
    out: list[str] = []
    if event["type"] == "reassigned":
        prev = event["data"].get("previous_technician_id")
        if prev:
            out.append(str(prev))
    tech = order.get("technician_id")
    if tech and (event["type"] == "reassigned" or order["state"] in ("assigned", "cancelled",
                                                                       "completed")):
        out.append(tech)
    return out


class MongoScheduleStore(GatedStore):
    def __init__(self, client: AsyncMongoClient[dict[str, Any]],
                 db: AsyncDatabase[dict[str, Any]], book: ScheduleBook,
                 gate: StoreGate | None = None) -> None:
        self._gate = gate
        self._client = client
        self._book = book
        self._holds = db["holds"]
        self._owners = db["hold_owners"]
        self._orders = db["orders"]
        self._events = db["order_events"]

    async def ensure_indexes(self) -> None:
        await self._holds.create_indexes([
            IndexModel([("state", ASCENDING), ("expires_ms", ASCENDING)]),
        ])

    async def items_of(self, technician_ids: list[str]) -> dict[str, tuple[int, list[Item]]]:
        """Each technician's schedule version and items (none: version 0)."""
        out: dict[str, tuple[int, list[Item]]] = {t: (0, []) for t in technician_ids}
        if technician_ids:
            cursor = self._book.schedules.find({"_id": {"$in": technician_ids}})
            async for doc in cursor:
                out[doc["_id"]] = (int(doc["version"]),
                                   [item_of(i) for i in doc.get("items", [])])
        return out

    async def get_hold(self, hold_id: str) -> Hold | None:
        doc = await self._holds.find_one({"_id": hold_id})
        return None if doc is None else hold_of(doc)

    async def hold(self, hold: Hold, limit: int, now: int) -> Hold:
        """Take the time for the customer, or raise Taken / HoldLimit."""

        async def txn(s: AsyncClientSession) -> Hold:
            owner = await self._owners.find_one({"_id": hold.customer_id}, session=s)
            live = [h for h in (owner or {}).get("holds", []) if h["expires_ms"] > now]
            if len(live) >= limit:
                raise HoldLimit(limit, [h["id"] for h in live])
            await self._book.add(hold.technician_id, hold.item(), now, s)
            await self._holds.insert_one(hold_dict(hold), session=s)
            live.append({"id": hold.hold_id, "expires_ms": hold.expires_ms})
            await self._owners.update_one({"_id": hold.customer_id}, {"$set": {"holds": live}},
                                          upsert=True, session=s)
            return hold

        return await self._run(txn)

    async def end_hold(self, hold_id: str, customer_id: str | None, end: HoldEnd,
                       now: int) -> tuple[Hold, bool]:
        """Release (by its customer; None: by staff) or expire a hold: its time
        is free again. Returns the hold and whether this call ended it (a
        hold already over is returned as it is)."""

        async def txn(s: AsyncClientSession) -> tuple[Hold, bool]:
            doc = await self._holds.find_one({"_id": hold_id}, session=s)
            if doc is None:
                raise NotFound(f"no hold {hold_id!r}")
            hold = hold_of(doc)
            if customer_id is not None and hold.customer_id != customer_id:
                raise Forbidden("this hold is someone else's")
            if hold.state != "live":
                return hold, False
            if end == "expired" and hold.expires_ms > now:
                return hold, False  # extended or not due yet
            await self._book.remove(hold.technician_id, hold_id, now, s)
            await self._holds.update_one({"_id": hold_id},
                                         {"$set": {"state": end, "ended_ms": now}}, session=s)
            await self._owners.update_one({"_id": hold.customer_id},
                                          {"$pull": {"holds": {"id": hold_id}}}, session=s)
            return dataclasses.replace(hold, state=end), True

        return await self._run(txn)

    async def due(self, now: int, limit: int) -> list[str]:
        """Live holds whose time is up (the expiry sweep's work)."""
        cursor = self._holds.find({"state": "live", "expires_ms": {"$lte": now}},
                                  {"_id": 1}).limit(limit)
        return [d["_id"] async for d in cursor]

    async def confirm(self, hold_id: str, order: Order, events: list[Event],
                      now: int) -> tuple[Order, bool]:
        """Turn a live hold into its order (assigned, with its events) in one
        transaction. The same confirm again returns the same order."""

        async def txn(s: AsyncClientSession) -> tuple[Order, bool]:
            doc = await self._holds.find_one({"_id": hold_id}, session=s)
            if doc is None:
                raise NotFound(f"no hold {hold_id!r}")
            hold = hold_of(doc)
            if hold.customer_id != order["customer_id"]:
                raise Forbidden("this hold is another customer's")
            existing = await self._orders.find_one({"_id": order["order_id"]}, session=s)
            if existing is not None:
                if existing.get("hold_id") == hold_id:
                    return order_out(existing), False
                raise Conflict(f"order {order['order_id']!r} exists (not from this hold)")
            if hold.state == "confirmed":
                raise Conflict(f"the hold was confirmed as order {hold.order_id!r}",
                               {"reason": "confirmed", "order_id": hold.order_id})
            if not hold.live(now):
                state = "expired" if hold.state == "live" else hold.state
                raise Conflict(f"the hold has {state}", {"reason": state})
            version, items = await self._book.read(hold.technician_id, s)
            booked = Item(order["order_id"], "order", hold.start_ms, hold.end_ms, hold.lat,
                          hold.lng, customer_id=hold.customer_id, hold_id=hold_id)
            kept = [booked if i.ref == hold_id else i for i in current(items, now)]
            await self._book.write(hold.technician_id, version, kept, s)
            stored = dict(order)
            stored["_id"] = stored.pop("order_id")
            await self._orders.insert_one(stored, session=s)
            await self._events.insert_many([dict(e) for e in events], session=s)
            await stage(self._events.database, s, [order_record(order, e) for e in events])
            await self._holds.update_one({"_id": hold_id}, {"$set": {
                "state": "confirmed", "order_id": order["order_id"], "ended_ms": now}}, session=s)
            await self._owners.update_one({"_id": hold.customer_id},
                                          {"$pull": {"holds": {"id": hold_id}}}, session=s)
            return order, True

        return await self._run(txn)

    async def _run(self, fn: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        for attempt in range(ATTEMPTS):
            try:
                return await run_txn(self._client, fn)
            except (StaleWrite, DuplicateKeyError):
                await asyncio.sleep(0.001 * attempt)
        raise Unavailable("the schedule is changing too fast; retry", {"reason": "contended"})


