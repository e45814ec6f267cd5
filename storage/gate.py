"""The store gate: a per-node bound on MongoDB work, and a deadline on each operation.

Every method of the MongoDB stores (orders, chat, dispatch: `GatedStore`) is one
operation through the node's `StoreGate`:

- At most `max_inflight` operations run at once and at most `max_waiting` wait
  for a turn, first come first served. A call beyond both is refused at once
  with `unavailable` and `retry_after_ms`: a stalled store holds a bounded
  number of calls on this node, and once it answers again the node serves the
  calls of now, not a backlog of calls whose clients have given up.
- Each operation, its wait for a turn included, ends within `timeout_s`
  (REALTIME_MONGO_TIMEOUT_MS). It runs under PyMongo's client-side operation
  timeout (CSOT, `pymongo.timeout`), which bounds server selection, connection
  checkout, every round trip, and a whole transaction with its write-conflict
  retries and its commit. (Under CSOT the client's socketTimeoutMS and
  waitQueueTimeoutMS no longer apply; they still bound what runs outside the
  gate: the trail writer, start-up, health checks.)
- A transaction cut off by the deadline may still be open on the server (the
  driver could not deliver its abort), and then holds its writes' locks until
  the server's transaction lifetime (60 s by default): every later write to
  that order or conversation would fail with a write conflict for a minute.
  The gate fences such a session as soon as the store answers: it starts a
  newer transaction on it (the server aborts the older one) and aborts that.
  A statement or commit of the old transaction still on its way is then
  refused (TransactionTooOld), so nothing of it can start or lock again; a
  kill (`killSessions`) would not stop a first statement that arrives later.

A store method that calls another runs inside the caller's operation (one turn,
one deadline): operations nest, they never wait on each other for a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Final

import pymongo
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from kernel import deadline as request_deadline
from kernel.errors import Unavailable

log = logging.getLogger(__name__)

# How long a user's call waits for one of their places before it is refused:
# long enough that a user's blast of requests sleeps rather than spins
# (each of its sockets' 64 slots then turns over at most 4 times a second),
# short enough that a user's calls answer within the bound during a stall.
OWNER_WAIT_S: Final = 0.25
# Interrupted transactions one node remembers to fence. Past this many (a
# long outage under heavy writes) the oldest are left to the server's own
# transaction lifetime.
MAX_ORPHANS: Final = 10_000
# Sessions fenced at once (two round trips each).
FENCE_BATCH: Final = 32
# The fence only reads (nothing is locked or written): any collection will do.
FENCE_COLLECTION: Final = "orders"
# A fence that failed is tried again this soon, or at once when an operation
# succeeds (the store is back): its orphans block writes until it is done.
FENCE_RETRY_S: Final = 0.25

# The gate whose operation this task is running now (None outside any).
_CURRENT: ContextVar[StoreGate | None] = ContextVar("store_gate", default=None)
# Whose request this task serves (a user id; None: the server's own work or
# the backend), set by the edge for each request: one user holds at most
# `max_per_owner` of the gate's places, running or waiting; more of theirs
# wait up to OWNER_WAIT_S for one of those before they queue here.
OWNER: ContextVar[str | None] = ContextVar("store_owner", default=None)


class StoreGate:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], *, timeout_s: float,
                 max_inflight: int, max_waiting: int, max_per_owner: int | None = None,
                 on_shed: Callable[[], None] | None = None) -> None:
        if max_inflight < 1 or max_waiting < 0 or timeout_s <= 0:
            raise ValueError("the gate needs max_inflight >= 1, max_waiting >= 0, timeout_s > 0")
        self._fence_in = db[FENCE_COLLECTION]
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.max_waiting = max_waiting
        self.max_per_owner = max_per_owner
        self._held: dict[str, int] = {}  # places held (running or waiting) by owner
        self._owner_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._on_shed = on_shed or (lambda: None)
        self._free = max_inflight
        # Deadlines of the operations running now (for retry_after_ms), by turn.
        self._running: dict[int, float] = {}
        self._turns = 0
        # Waiting for a turn, oldest first: (deadline, woken with the turn).
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()
        # Sessions whose transaction may still be open on the server, oldest first.
        self._orphans: deque[AsyncClientSession] = deque(maxlen=MAX_ORPHANS)
        self._reaper: asyncio.Task[None] | None = None
        self._store_answered = asyncio.Event()
        self._closed = False

    @property
    def inflight(self) -> int:
        return self.max_inflight - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def op(self) -> AsyncIterator[None]:
        """Run the body as one store operation: a turn, then the deadline."""
        if _CURRENT.get() is self:
            yield  # nested in an operation of this gate: its turn, its deadline
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        answer_by = request_deadline.at()  # the request's own, when it set one
        if answer_by is not None:
            if answer_by <= loop.time():
                raise Unavailable("the store did not answer in time; retry",
                                  {"retry_after_ms": self.retry_after_ms(loop.time())})
            deadline = min(deadline, answer_by)
        owner = OWNER.get() if self.max_per_owner is not None else None
        if owner is not None:
            await self._owner_place(owner, loop, deadline)
        try:
            turn = await self._take_turn(loop, deadline)
            token = _CURRENT.set(self)
            try:
                # Never 0: pymongo.timeout(0) means no deadline at all.
                with pymongo.timeout(max(deadline - loop.time(), 0.001)):
                    yield
                if self._orphans:
                    self._store_answered.set()
            finally:
                _CURRENT.reset(token)
                self._give_back(turn)
        finally:
            if owner is not None:
                self._owner_done(owner)

    async def _owner_place(self, owner: str, loop: asyncio.AbstractEventLoop,
                           deadline: float) -> None:
        """One of the owner's `max_per_owner` places, waited for (in order)
        for at most OWNER_WAIT_S. Waiting before refusing: a user pipelining
        requests runs at most that many store operations, and the rest of
        theirs sleep rather than spin through refusals, which would take the
        event loop from everyone else (measured: a normal client's request
        waited 2.5-3.7 s behind a blast that was refused at once)."""
        held = self._held.get(owner, 0)
        if held < self.max_per_owner:  # type: ignore[operator]
            self._held[owner] = held + 1
            return
        queue = self._owner_waiters.setdefault(owner, deque())
        woken: asyncio.Future[None] = loop.create_future()
        queue.append(woken)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + OWNER_WAIT_S)):
                await woken  # the place is handed over: _held is unchanged
        except BaseException as exc:
            if woken.done() and not woken.cancelled():
                self._owner_done(owner)  # handed over just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(woken)
                if not queue:
                    self._owner_waiters.pop(owner, None)
            if isinstance(exc, TimeoutError):
                self._on_shed()
                raise Unavailable("you have too much store work under way; retry",
                                  {"retry_after_ms": self.retry_after_ms(loop.time())}) from None
            raise

    def _owner_done(self, owner: str) -> None:
        """A place of the owner's is free: to its oldest waiter, else given up."""
        queue = self._owner_waiters.get(owner)
        while queue:
            woken = queue.popleft()
            if not woken.done():
                if not queue:
                    del self._owner_waiters[owner]
                woken.set_result(None)
                return
        self._owner_waiters.pop(owner, None)
        left = self._held[owner] - 1
        if left:
            self._held[owner] = left
        else:
            del self._held[owner]

    async def _take_turn(self, loop: asyncio.AbstractEventLoop, deadline: float) -> int:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return self._run(deadline)
        if len(self._waiters) >= self.max_waiting:
            self._on_shed()
            raise Unavailable("this server has too much store work waiting; retry",
                              {"retry_after_ms": self.retry_after_ms(loop.time())})
        woken: asyncio.Future[None] = loop.create_future()
        entry = (deadline, woken)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                await woken
        except BaseException as exc:
            if woken.done() and not woken.cancelled():
                self._pass_on()  # the turn came just as we gave up: the next one's
            else:
                # Still queued, unless a turn passing by already dropped it
                # (it skips the cancelled).
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            if isinstance(exc, TimeoutError):
                raise Unavailable("the store did not answer in time; retry",
                                  {"retry_after_ms": self.retry_after_ms(loop.time())}) from None
            raise
        return self._run(deadline)

    def _run(self, deadline: float) -> int:
        self._turns += 1
        self._running[self._turns] = deadline
        return self._turns

    def _give_back(self, turn: int) -> None:
        del self._running[turn]
        self._pass_on()

    def _pass_on(self) -> None:
        """A turn is free: to the oldest waiter, else back to the pool."""
        while self._waiters:
            _, woken = self._waiters.popleft()
            if not woken.done():
                woken.set_result(None)
                return
        self._free += 1

    def retry_after_ms(self, now: float) -> int:
        """When a place is sure to be free: the oldest waiter has its turn or
        gives up by its deadline; with no one waiting, the first running
        operation ends by its own."""
        if self._waiters:
            at = self._waiters[0][0]
        elif self._running:
            at = min(self._running.values())
        else:
            at = now
        return max(1, min(math.ceil((at - now) * 1000), math.ceil(self.timeout_s * 1000)))

    # -- transactions the store may still hold open ----------------------------------------
    def orphaned(self, session: AsyncClientSession) -> bool:
        """Take over `session` (the gate ends it); False once closed."""
        if self._closed:
            return False
        self._orphans.append(session)
        if self._reaper is None or self._reaper.done():
            # A context of its own: not the deadline of the operation that failed.
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), context=contextvars.Context())
        return True

    @property
    def orphans(self) -> int:
        return len(self._orphans)

    async def _reap(self) -> None:
        behind = False
        while self._orphans:
            batch = [self._orphans.popleft() for _ in range(min(FENCE_BATCH, len(self._orphans)))]
            fenced = await asyncio.gather(*(self._fence(s) for s in batch))
            left = [s for s, done in zip(batch, fenced, strict=True) if not done]
            self._orphans.extendleft(reversed(left))
            if left:
                if not behind:
                    log.warning("%d interrupted store transactions wait for the store", len(self._orphans))
                    behind = True
                self._store_answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._store_answered.wait(), FENCE_RETRY_S)
            elif behind and not self._orphans:
                log.info("interrupted store transactions ended")
                behind = False

    async def _fence(self, session: AsyncClientSession) -> bool:
        """End the session's last transaction for good: a newer one started on
        the session (one read) aborts it on the server, which from then on
        refuses its stragglers; then the newer one is aborted too."""
        try:
            with pymongo.timeout(self.timeout_s):
                if session.in_transaction:
                    await session.abort_transaction()
                await session.start_transaction()
                await self._fence_in.find_one({"_id": None}, session=session)
        except PyMongoError:
            return False
        with contextlib.suppress(PyMongoError), pymongo.timeout(self.timeout_s):
            await session.abort_transaction()  # best effort: it holds no locks
            await session.end_session()
        return True

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        self._orphans.clear()


def transaction_interrupted(session: AsyncClientSession) -> bool:
    """A transaction of `session` failed on a timeout or a lost connection: the
    store may still hold it open. The gate of the running operation takes the
    session over to fence it (True: do not end it). The driver must not reuse
    it either way (a client-side timeout leaves it clean): its next
    transaction would abort the one still open only by chance."""
    server_session = getattr(session, "_server_session", None)
    if server_session is None:
        return False
    server_session.mark_dirty()
    gate = _CURRENT.get()
    return gate is not None and gate.orphaned(session)


@contextmanager
def store_deadline(seconds: float) -> Iterator[None]:
    """A store call outside the gate, bounded all the same (CSOT)."""
    with pymongo.timeout(max(seconds, 0.001)):
        yield


class GatedStore:
    """Base of the MongoDB stores: each public coroutine method is one operation
    through the node's gate (`_gate`; none: ungated, as in unit tests). New
    methods are covered without anyone remembering to: the gate is the one
    chokepoint for store work."""

    _gate: StoreGate | None = None
    # Run at start-up, before the node serves, under the start-up timeout.
    ungated: ClassVar[frozenset[str]] = frozenset({"ensure_indexes"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, attr in list(vars(cls).items()):
            if name.startswith("_") or name in cls.ungated or not inspect.iscoroutinefunction(attr):
                continue
            setattr(cls, name, _through_gate(attr))


def _through_gate(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def gated(self: GatedStore, *args: Any, **kwargs: Any) -> Any:
        gate = self._gate
        if gate is None:
            return await method(self, *args, **kwargs)
        async with gate.op():
            return await method(self, *args, **kwargs)

    return gated
