"""Order service: creation, transitions, rating, replay.

Every change is one order event with the next per-order ``seq`` (1, 2, 3, …
no gaps). The store commits the order update and the event together,
conditioned on the ``seq`` the decision was made on (optimistic concurrency);
a lost race re-reads and decides again, so two concurrent transitions from
the same state give one winner and one ``conflict``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden, NotFound, Unavailable
from kernel.locks import KeyedLocks
from kernel.shared import SharedReads
from orders.lifecycle import SYSTEM, UNDER_WAY, check_transition
from orders.model import Event, Order

# Optimistic retries before a hot order answers `unavailable`. Each retry
# re-reads, so even heavy contention converges within a few rounds.
MAX_COMMIT_ATTEMPTS: Final = 20
# Most events one replay returns; a longer history pages by since_seq.
MAX_REPLAY: Final = 1000
VIEW_ANY: Final = frozenset({"agent", "admin", "service"})


class StaleWrite(Exception):
    """The order's seq moved between read and write."""


class JobInProgress(Exception):
    """The technician already has another order under way (the store's
    one-job-per-technician index refused the write)."""

    def __init__(self, technician_id: str, order_id: str | None, state: str | None) -> None:
        super().__init__(technician_id)
        self.technician_id, self.order_id, self.state = technician_id, order_id, state


class NoChange(Exception):
    """A decision that nothing is to be recorded (see OrderService.note_when)."""


class OrderExists(Exception):
    def __init__(self, existing: Order) -> None:
        super().__init__(existing["order_id"])
        self.existing = existing


class OrderStore(Protocol):
    async def get(self, order_id: str) -> Order | None: ...

    async def insert(self, order: Order, event: Event) -> None:
        """Store a new order and its first event together; raise OrderExists."""

    async def commit(self, order_id: str, expected_seq: int, changes: dict[str, Any],
                     event: Event) -> Order:
        """Apply ``changes`` and store ``event`` (whose seq is expected_seq + 1)
        atomically, only if the order's seq is still ``expected_seq``; raise
        StaleWrite otherwise. Returns the updated order."""

    async def events(self, order_id: str, since_seq: int, limit: int) -> list[Event]: ...


Notify = Callable[[Order, Event], Awaitable[None]]

CREATE_FIELDS: Final = ("customer_id", "service", "address", "window", "skills")


class OrderService:
    def __init__(self, store: OrderStore, notify: Notify, *,
                 busy_wait_s: float | None = None) -> None:
        self._store = store
        self._notify = notify
        # One lock per hot order on this node: events leave this node in seq
        # order, and local writers do not fight each other's optimistic retries.
        self._lock = KeyedLocks()
        # How long a change waits behind another change of the same order (the
        # store's bound: the one ahead ends within it) before `unavailable`;
        # None: as long as it takes.
        self._busy_wait_s = busy_wait_s
        self._reads: SharedReads[Order] = SharedReads()

    async def get(self, order_id: str) -> Order:
        """The order, for callers who may see any order (staff, the server)."""
        order = await self._store.get(order_id)
        if order is None:
            raise not_found(order_id)
        return order

    async def visible(self, actor: Actor, order_id: str) -> Order:
        """The order, if `actor` may know of it; else the same `not_found` as
        for an order that does not exist (docs/protocol.md, Orders)."""
        order = await self.get(order_id)
        if not may_know(actor, order):
            raise not_found(order_id)
        return order

    async def read_shared(self, order_id: str) -> Order:
        """As `get`, but reads of one order that overlap share one store round
        trip: after a deploy or a network blip every device watching an order
        asks for it at once. The order returned is shared: read it, never
        change it."""
        return await self._reads.get(order_id, lambda: self.get(order_id))

    async def create(self, actor: Actor, spec: dict[str, Any]) -> tuple[Order, bool]:
        """Create an order; idempotent on order_id. Returns (order, created).

        The same order_id with different content is a `conflict`: a retry must
        not silently turn into a different order.
        """
        ts = now_ms()
        order: Order = {
            "customer_id": spec["customer_id"],
            "service": spec["service"],
            "address": spec["address"],
            "window": spec["window"],
            "skills": [],
            "order_id": spec["order_id"],
            "technician_id": None,
            "state": "created",
            "seq": 1,
            "created_ts": ts,
            "updated_ts": ts,
            "rating": None,
        }
        order["skills"] = list(spec.get("skills") or [])
        event = self._event(order, 1, "state_changed", actor, {}, ts)
        try:
            await self._store.insert(order, event)
        except OrderExists as exc:
            existing = exc.existing
            if any(existing.get(k) != order.get(k) for k in CREATE_FIELDS):
                raise Conflict(
                    f"order {order['order_id']!r} exists with different content"
                ) from None
            return existing, False
        await self._notify(order, event)
        return order, True

    async def transition(
        self, actor: Actor, order_id: str, target: str, data: dict[str, Any] | None = None,
        expect_state: str | None = None, expect_technician: str | None = None,
    ) -> tuple[Order, Event]:
        """Move an order; with `expect_state` (and `expect_technician`), only
        from that state (and technician), decided atomically with the write,
        so a concurrent change gives `conflict`."""
        data = dict(data or {})

        def decide(order: Order) -> tuple[dict[str, Any], str, dict[str, Any]]:
            if expect_state is not None and order["state"] != expect_state:
                raise Conflict(f"the order is {order['state']}, no longer {expect_state}",
                               {"state": order["state"]})
            if expect_technician is not None and order.get("technician_id") != expect_technician:
                raise Conflict("the order was moved to another technician meanwhile",
                               {"state": order["state"]})
            check_transition(
                actor,
                state=order["state"],
                target=target,
                customer_id=order["customer_id"],
                technician_id=order.get("technician_id"),
            )
            changes: dict[str, Any] = {"state": target}
            ev_type = "state_changed"
            if target == "assigned":
                tech = data.get("technician_id")
                if not isinstance(tech, str) or not tech:
                    raise Conflict("assigning needs a technician_id")
                if order["state"] == "assigned":
                    if tech == order.get("technician_id"):
                        raise Conflict(f"order is already assigned to {tech!r}")
                    ev_type = "reassigned"
                    data["previous_technician_id"] = order.get("technician_id")
                    # The new technician's day decides anew whether it is late.
                    changes["late"] = None
                changes["technician_id"] = tech
            if target == "completed":
                changes["completed_ts"] = now_ms()
            if target != order["state"]:
                # When each step happened (the day view's actual start and end).
                changes[f"times.{target}"] = now_ms()
            # One job at a time: the store keeps at most one order per
            # technician with `job_of` set (a unique partial index).
            changes["job_of"] = order.get("technician_id") if target in UNDER_WAY else None
            return changes, ev_type, data

        return await self._apply(actor, order_id, decide)

    async def rate(self, actor: Actor, order_id: str, rating: dict[str, Any]) -> tuple[Order, Event]:
        def decide(order: Order) -> tuple[dict[str, Any], str, dict[str, Any]]:
            if actor.role != "customer" or actor.id != order["customer_id"]:
                raise Forbidden("only the order's customer may rate it")
            if not order.get("completed_ts"):
                raise Conflict("an order can be rated once it is completed", {"state": order["state"]})
            if order.get("rating"):
                raise Conflict("this order has already been rated")
            stored = {k: v for k, v in rating.items() if v is not None}
            return {"rating": {**stored, "ts": now_ms()}}, "rated", stored

        return await self._apply(actor, order_id, decide)

    async def note(self, actor: Actor, order_id: str, ev_type: str,
                   data: dict[str, Any]) -> tuple[Order, Event]:
        """An event that records something without changing the state
        (e.g. `dispatch_failed`); it still takes the next seq."""

        def decide(order: Order) -> tuple[dict[str, Any], str, dict[str, Any]]:
            return {}, ev_type, data

        return await self._apply(actor, order_id, decide)

    async def note_when(
        self, actor: Actor, order_id: str,
        decide: Callable[[Order], tuple[dict[str, Any], str, dict[str, Any]] | None],
    ) -> tuple[Order, Event] | None:
        """An event decided on the order as it is now (`decide` returns the
        changes, the event's type and its data, or None for nothing to
        record), committed only if the order did not move meanwhile."""

        def decided(order: Order) -> tuple[dict[str, Any], str, dict[str, Any]]:
            out = decide(order)
            if out is None:
                raise NoChange
            return out

        try:
            return await self._apply(actor, order_id, decided)
        except NoChange:
            return None

    async def _apply(
        self,
        actor: Actor,
        order_id: str,
        decide: Callable[[Order], tuple[dict[str, Any], str, dict[str, Any]]],
    ) -> tuple[Order, Event]:
        async with self._exclusive(order_id):
            for _ in range(MAX_COMMIT_ATTEMPTS):
                # Existence and relation first, then the decision (permission,
                # then the state): a stranger learns nothing of the order.
                order = await self.visible(actor, order_id)
                changes, ev_type, data = decide(order)
                ts = now_ms()
                changes["updated_ts"] = ts
                seq = order["seq"] + 1
                state = changes.get("state", order["state"])
                event = self._event({**order, "state": state}, seq, ev_type, actor, data, ts)
                try:
                    updated = await self._store.commit(order_id, order["seq"], changes, event)
                except StaleWrite:
                    continue
                except JobInProgress as exc:
                    raise Conflict(
                        f"technician {exc.technician_id!r} is on another job "
                        f"({exc.order_id}, {exc.state}): one job at a time",
                        {"reason": "job_in_progress", "order_id": exc.order_id,
                         "state": exc.state}) from None
                await self._notify(updated, event)
                return updated, event
        raise Unavailable("the order is changing too fast; retry")

    def _exclusive(self, order_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """This node's lock of the order, waited for at most busy_wait_s."""
        return self._lock.hold(order_id, self._busy_wait_s, "the order is busy; retry")

    async def events_since(self, order_id: str, since_seq: int = 0,
                           limit: int = MAX_REPLAY) -> list[Event]:
        return await self._store.events(order_id, since_seq, min(limit, MAX_REPLAY))

    @staticmethod
    def _event(order: Order, seq: int, ev_type: str, actor: Actor,
               data: dict[str, Any], ts: int) -> Event:
        return {
            "order_id": order["order_id"],
            "seq": seq,
            "type": ev_type,
            "state": order["state"],
            "ts": ts,
            "actor": actor.as_dict(),
            "data": data,
        }


def not_found(order_id: str) -> NotFound:
    return NotFound(f"order {order_id!r} not found")


def may_know(actor: Actor, order: Order) -> bool:
    """Whether the actor may learn that the order exists at all: whoever may
    view it, and the server itself. To anyone else an existing order looks
    exactly like a missing one."""
    return actor.role == SYSTEM or can_view(actor, order)


def can_view(actor: Actor, order: Order) -> bool:
    """Customers see their own orders; technicians the orders assigned to them
    (not after a re-assignment to someone else); agents, admins and the
    backend see every order."""
    if actor.role in VIEW_ANY:
        return True
    if actor.role == "customer":
        return bool(order["customer_id"] == actor.id)
    if actor.role == "technician":
        return bool(order.get("technician_id") == actor.id)
    return False
