"""Dispatch (人员调度): offer an order to the nearest suitable technicians.

Candidates come from the latest positions around the address. Every
technician considered gets a reason in the round's record, so a dispatcher
can see why someone was or was not offered the job (skill_mismatch,
out_of_radius, stale_position, busy, schedule_conflict, offline,
current_technician, declined, timed_out). An order's window is judged
against each technician's schedule (docs/scheduling.md): `schedule_conflict`
(with what it collides with) says the window does not fit their day; `busy`
(on any job) is left for an order without a window. Eligible technicians are
offered in the order they could arrive (the rest of the job they are on, then
the drive), each with that `arrival_ts`.

Ranking (docs/dispatch.md): the score of an eligible candidate is their
arrival time in seconds less a rating credit, `margin * (bayes - 1) / 4`,
where `bayes` is their Bayesian rating (1..5 stars; the fleet's mean when
never rated) and `margin` is REALTIME_DISPATCH_RATING_MARGIN_S (300 s). A
5-star technician earns the whole margin over a 1-star one, 4.8 against
4.2 earns 0.15 of it: arrival decides, the rating breaks near-ties, and a
candidate arriving more than the margin later is never ranked first for
their rating. Skills are a gate, not a weight: a technician without every
skill the order asks cannot do the job (`skill_mismatch`); the score's
parts show the match. Lowest score first; ties by distance.

Strategies: `sequential` offers to one candidate at a time (the next after a
decline or `timeout_s`); `broadcast` offers to the top `count` at once, and
the first accept wins. Exactly one accept ever succeeds: the round's status
flips from `running` to `assigned` in one conditional write in the store,
and the order's own state machine refuses a second assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kernel.actor import Actor
from kernel.clock import now_ms
from kernel.errors import Conflict, Forbidden
from kernel.tasks import BackgroundTasks
from orders.lifecycle import TECHNICIAN_PHASE
from orders.model import Order
from orders.service import OrderService
from tracking import day
from tracking.eta import EtaConfig
from tracking.geo import haversine_m
from tracking.positions import Position, PositionStore

log = logging.getLogger(__name__)

DISPATCH_ACTOR: Final = Actor("dispatch", "system")
MAX_CONSIDERED: Final = 200
# A running round past its longest possible end by this much lost its driver.
DRIVER_SLACK_MS: Final = 10_000


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    strategy: str = "sequential"
    radius_m: float = 5000.0
    count: int = 5  # broadcast: offers at once; sequential: at most this many in turn
    timeout_s: float = 20.0
    stale_after_s: float = 300.0  # Fleet Engine's cut: a fix older than 5 min says nothing
    # What a top rating is worth in arrival time (Ranking, below).
    rating_margin_s: float = 300.0


class DispatchStore(Protocol):
    async def insert(self, doc: dict[str, Any]) -> None: ...
    async def get(self, dispatch_id: str) -> dict[str, Any] | None: ...
    async def for_order(self, order_id: str) -> list[dict[str, Any]]: ...
    async def running_for(self, order_id: str) -> dict[str, Any] | None: ...
    async def set_candidate(self, dispatch_id: str, technician_id: str, expect: str,
                            changes: dict[str, Any], offer: dict[str, Any] | None = None) -> bool:
        """Update one candidate's entry if its status is still `expect`; with
        `offer`, announce the offer (webhooks, a notification) in the same
        commit."""
    async def claim(self, dispatch_id: str, technician_id: str, now: int) -> bool: ...
    async def finish(self, dispatch_id: str, status: str, changes: dict[str, Any],
                     expect: str = "running") -> None: ...


class Online(Protocol):
    async def online(self, user_ids: list[str]) -> set[str]: ...


class Ratings(Protocol):
    """Technicians' rating aggregates (storage/feedback.py): `bayes` and
    `count` of each (the fleet's mean for one never rated)."""

    async def aggregates(self, technician_ids: list[str], now: int) -> dict[str, dict[str, Any]]: ...


class Busy(Protocol):
    async def busy_among(self, technician_ids: list[str],
                         states: frozenset[str] = ...) -> set[str]: ...

    async def jobs_among(self, technician_ids: list[str]) -> dict[str, list[Order]]: ...


# Which of these technicians' schedules the order's window would collide
# with: technician id -> what it collides with (scheduling/service.py).
ScheduleCheck = Callable[[list[str], Order], Awaitable[dict[str, dict[str, Any]]]]
SCHEDULE_REASONS = frozenset({"taken", "travel_from", "travel_to", "outside_hours"})
SendOffer = Callable[[str, dict[str, Any]], Awaitable[None]]
Withdraw = Callable[[str, dict[str, Any]], Awaitable[None]]


def judge(pos: Position, *, lat: float, lng: float, radius_m: float, skills: list[str],
          online: set[str], busy: set[str], now: int,
          stale_after_s: float) -> tuple[float, str | None]:
    """Distance and why this technician is not eligible (None when eligible)."""
    dist = haversine_m(lat, lng, pos.lat, pos.lng)
    if pos.technician_id not in online:
        return dist, "offline"
    if now - pos.ts > stale_after_s * 1000:
        return dist, "stale_position"
    if pos.technician_id in busy:
        return dist, "busy"
    if any(s not in pos.skills for s in skills):
        return dist, "skill_mismatch"
    if dist > radius_m:
        return dist, "out_of_radius"
    return dist, None


def score(arrival_s: int | None, rating: dict[str, Any] | None, margin_s: float,
          required: list[str], skills: Any) -> dict[str, Any]:
    """A candidate's score and its parts (module doc, Ranking): arrival
    first, the rating worth at most `margin_s` of it, skills a gate."""
    bayes = float(rating["bayes"]) if rating and rating.get("bayes") is not None else None
    credit = 0.0 if bayes is None else margin_s * min(max((bayes - 1.0) / 4.0, 0.0), 1.0)
    have = set(skills or ())
    return {
        "arrival_s": arrival_s,
        "rating": bayes,
        "rating_count": int(rating.get("count", 0)) if rating else 0,
        "rating_credit_s": round(credit, 1),
        "skills_matched": f"{sum(1 for s in required if s in have)}/{len(required)}",
        "score_s": None if arrival_s is None else round(arrival_s - credit, 1),
    }


NO_OFFER = "you have no open offer of this order (taken, expired or never made)"


class DispatchService:
    def __init__(self, *, orders: OrderService, positions: PositionStore, presence: Online,
                 busy: Busy, store: DispatchStore, send_offer: SendOffer, withdraw: Withdraw,
                 config: DispatchConfig | None = None,
                 schedule_check: ScheduleCheck | None = None,
                 eta: EtaConfig | None = None, ratings: Ratings | None = None) -> None:
        self.orders = orders
        self.ratings = ratings
        self.eta = eta or EtaConfig()
        self.schedule_check = schedule_check
        self.busy = busy
        self.positions = positions
        self.presence = presence
        self.store = store
        self._send_offer = send_offer
        self._withdraw = withdraw
        self.cfg = config or DispatchConfig()
        self._wakeups: dict[str, asyncio.Event] = {}
        self._background = BackgroundTasks("dispatch")

    async def nearby(self, lat: float, lng: float, radius_m: float, skill: str | None,
                     limit: int) -> list[dict[str, Any]]:
        """Available technicians with the skill, nearest first, fresh positions only."""
        found = await self.positions.near(lat, lng, radius_m, MAX_CONSIDERED)
        online = await self.presence.online([p.technician_id for p in found])
        busy = await self.busy.busy_among([p.technician_id for p in found])
        now = now_ms()
        out = []
        for p in found:
            dist, reason = judge(p, lat=lat, lng=lng, radius_m=radius_m,
                                 skills=[skill] if skill else [], online=online, busy=busy, now=now,
                                 stale_after_s=self.cfg.stale_after_s)
            if reason is None:
                out.append({"id": p.technician_id, "name": p.name, "lat": p.lat, "lng": p.lng,
                            "ts": p.ts, "distance_m": round(dist), "skills": list(p.skills),
                            "status": p.status})
            if len(out) >= limit:
                break
        return out

    async def start(self, actor: Actor, order_id: str, *, strategy: str | None = None,
                    radius_m: float | None = None, count: int | None = None,
                    timeout_s: float | None = None) -> dict[str, Any]:
        if actor.role not in ("service", "admin", "agent"):
            raise Forbidden("dispatch is started by the backend, an agent or an admin")
        order = await self.orders.get(order_id)
        if order["state"] not in ("created", "assigned"):
            raise Conflict(f"only a `created` or `assigned` order is dispatched "
                           f"(it is {order['state']})", {"state": order["state"]})
        # Re-dispatch of an assigned order: to someone else than who has it.
        current_tech = order.get("technician_id") if order["state"] == "assigned" else None
        running = await self.store.running_for(order_id)
        if running is not None:
            rounds = running["count"] if running["strategy"] == "sequential" else 1
            ends = running["created_ts"] + int(rounds * running["timeout_s"] * 1000) + DRIVER_SLACK_MS
            if now_ms() < ends:
                raise Conflict("a dispatch round for this order is already running",
                               {"dispatch_id": running["dispatch_id"]})
            # Its driving node died: the round can never finish by itself.
            await self.store.finish(running["dispatch_id"], "failed",
                                    {"finished_ts": now_ms(), "error": "driver_lost"})
        strategy = strategy or self.cfg.strategy
        radius = radius_m or self.cfg.radius_m
        count = count or self.cfg.count
        timeout = timeout_s or self.cfg.timeout_s
        addr = order["address"]
        # Look a little past the radius, so "out of radius" is a visible reason.
        found = await self.positions.near(addr["lat"], addr["lng"], radius * 2, MAX_CONSIDERED)
        online = await self.presence.online([p.technician_id for p in found])
        # With its window judged against each schedule (below), no one is
        # simply `busy`: a technician on a job may still fit the window (it
        # is a question of their schedule), and is ranked by when they could
        # arrive, after the rest of that job.
        timed = bool(order.get("window")) and self.schedule_check is not None
        busy = (set() if timed else
                await self.busy.busy_among([p.technician_id for p in found], TECHNICIAN_PHASE))
        now = now_ms()
        candidates, eligible = [], []
        for p in found:
            dist, reason = judge(p, lat=addr["lat"], lng=addr["lng"], radius_m=radius,
                                 skills=list(order.get("skills") or []), online=online,
                                 busy=busy, now=now,
                                 stale_after_s=self.cfg.stale_after_s)
            if p.technician_id == current_tech:
                reason = "current_technician"
            entry = {"technician_id": p.technician_id, "distance_m": round(dist),
                     "status": "skipped" if reason else "eligible", "reason": reason}
            candidates.append(entry)
            if reason is None:
                eligible.append(entry)
        if eligible and timed and self.schedule_check is not None:
            # A booked window: who could not take it without breaking their
            # day (hours, another order, the drive between) is skipped.
            clash = await self.schedule_check([str(e["technician_id"]) for e in eligible], order)
            for entry in eligible:
                why = clash.get(str(entry["technician_id"]))
                if why is not None:
                    entry.update(status="skipped", reason="schedule_conflict", conflict=why)
            eligible = [e for e in eligible if e["status"] == "eligible"]
        if eligible:
            eligible = await self._by_arrival(eligible, found, addr["lat"], addr["lng"], now,
                                              list(order.get("skills") or []))
        for extra in eligible[count:]:
            extra["status"], extra["reason"] = "not_offered", "beyond_count"
        doc = {
            "dispatch_id": "d-" + uuid.uuid4().hex, "order_id": order_id, "strategy": strategy,
            "from_state": order["state"], "from_technician_id": current_tech,
            "radius_m": radius, "count": count, "timeout_s": timeout, "status": "running",
            "created_ts": now, "finished_ts": None, "assigned_to": None,
            "started_by": actor.as_dict(), "candidates": candidates,
        }
        await self.store.insert(doc)
        self._background.spawn(self._drive(doc, order, eligible[:count]))
        return doc

    async def _by_arrival(self, eligible: list[dict[str, Any]], found: list[Position],
                          lat: float, lng: float, now: int,
                          required: list[str]) -> list[dict[str, Any]]:
        """Eligible candidates ranked by their score (module doc, Ranking):
        when they could arrive (the rest of the job they are on, then the
        drive: tracking/day.py `reach`), less the credit of their rating.
        Each entry records `arrival_ts`, `arrival_s` and the parts of its
        `score`."""
        ids = [str(e["technician_id"]) for e in eligible]
        jobs = await self.busy.jobs_among(ids)
        aggs = await self.ratings.aggregates(ids, now) if self.ratings is not None else {}
        pos_of = {p.technician_id: p for p in found}
        for e in eligible:
            tid = str(e["technician_id"])
            arrival = day.reach(jobs.get(tid, []), pos_of.get(tid), now, lat, lng, self.eta)
            e["arrival_ts"] = arrival
            e["arrival_s"] = None if arrival is None else max(0, round((arrival - now) / 1000))
            e["score"] = score(e["arrival_s"], aggs.get(tid), self.cfg.rating_margin_s,
                               required, pos_of[tid].skills if tid in pos_of else ())
        ranked = sorted(eligible, key=lambda e: (e["score"]["score_s"] is None,
                                                 e["score"]["score_s"] or 0, e["distance_m"]))
        for rank, e in enumerate(ranked, start=1):
            e["rank"] = rank
        return ranked

    def _offer_payload(self, order: Order, dispatch_id: str, expires: int) -> dict[str, Any]:
        return {"order_id": order["order_id"], "dispatch_id": dispatch_id,
                "service": order["service"], "address": order["address"],
                "window": order["window"], "expires_ts": expires}

    async def _drive(self, doc: dict[str, Any], order: Order,
                     offers: list[dict[str, Any]]) -> None:
        did = doc["dispatch_id"]
        wake = self._wakeups.setdefault(did, asyncio.Event())
        timeout = float(doc["timeout_s"])
        try:
            groups = [offers] if doc["strategy"] == "broadcast" else [[c] for c in offers]
            for group in groups:
                expires = now_ms() + int(timeout * 1000)
                for c in group:
                    payload = self._offer_payload(order, did, expires)
                    await self.store.set_candidate(did, c["technician_id"], "eligible",
                                                   {"status": "offered", "offered_ts": now_ms(),
                                                    "expires_ts": expires}, offer=payload)
                    await self._send_offer(c["technician_id"], payload)
                deadline = time.monotonic() + timeout
                while True:
                    # Clear before reading: an answer that lands between the
                    # read and the wait must still wake us.
                    wake.clear()
                    current = await self.store.get(did)
                    if current is None or current["status"] != "running":
                        await self._withdraw_others(current, group)
                        return
                    pending = [c for c in current["candidates"]
                               if c["status"] == "offered"
                               and c["technician_id"] in {g["technician_id"] for g in group}]
                    left = deadline - time.monotonic()
                    if not pending or left <= 0:
                        break
                    try:
                        await asyncio.wait_for(wake.wait(), left)
                    except TimeoutError:
                        pass
                for c in group:
                    if await self.store.set_candidate(did, c["technician_id"], "offered",
                                                      {"status": "timed_out",
                                                       "reason": "timed_out",
                                                       "answered_ts": now_ms()}):
                        await self._withdraw(c["technician_id"],
                                             {"order_id": order["order_id"], "dispatch_id": did,
                                              "reason": "timed_out"})
            await self._fail(did, order["order_id"])
        except Exception as exc:  # the round ends as failed rather than hanging
            log.warning("dispatch %s failed: %s", did, type(exc).__name__)
            await self.store.finish(did, "failed", {"finished_ts": now_ms(),
                                                    "error": type(exc).__name__})
        finally:
            self._wakeups.pop(did, None)

    async def _withdraw_others(self, current: dict[str, Any] | None,
                               group: list[dict[str, Any]]) -> None:
        if current is None:
            return
        for c in current["candidates"]:
            if c["status"] == "offered":
                await self.store.set_candidate(current["dispatch_id"], c["technician_id"], "offered",
                                               {"status": "withdrawn", "answered_ts": now_ms()})
                await self._withdraw(c["technician_id"], {
                    "order_id": current["order_id"], "dispatch_id": current["dispatch_id"],
                    "reason": "taken"})

    async def _fail(self, dispatch_id: str, order_id: str) -> None:
        current = await self.store.get(dispatch_id)
        if current is None or current["status"] != "running":
            return
        await self.store.finish(dispatch_id, "failed", {"finished_ts": now_ms()})
        reasons: dict[str, int] = {}
        for c in current["candidates"]:
            r = c.get("reason") or c["status"]
            reasons[r] = reasons.get(r, 0) + 1
        await self.orders.note(DISPATCH_ACTOR, order_id, "dispatch_failed",
                               {"dispatch_id": dispatch_id, "reasons": reasons,
                                "considered": len(current["candidates"])})

    async def answer(self, tech: Actor, order_id: str, accept: bool) -> dict[str, Any]:
        """A technician's accept or decline of their live offer for the order."""
        if tech.role != "technician":
            raise Forbidden("only technicians answer offers")
        round_ = await self.store.running_for(order_id)
        mine = None if round_ is None else next(
            (c for c in round_["candidates"] if c["technician_id"] == tech.id), None)
        if round_ is None or mine is None:
            # One answer whether or not a round runs (or the order exists): a
            # technician who was never offered the order learns nothing of it.
            raise Conflict(NO_OFFER)
        if mine["status"] != "offered":
            raise Conflict(f"your offer is {mine['status']}")
        did = round_["dispatch_id"]
        if mine.get("expires_ts") and now_ms() > mine["expires_ts"]:
            raise Conflict("the offer expired")
        if not accept:
            await self.store.set_candidate(did, tech.id, "offered",
                                           {"status": "declined", "reason": "declined",
                                            "answered_ts": now_ms()})
            return {"order_id": order_id, "dispatch_id": did, "status": "declined"}
        if not await self.store.claim(did, tech.id, now_ms()):
            raise Conflict("the order was taken by another technician")
        try:
            # Only from where the round started (`created`, or `assigned` to
            # the same technician): the backend may have assigned, moved or
            # cancelled the order by hand while the offer was out.
            order, _ = await self.orders.transition(
                DISPATCH_ACTOR, order_id, "assigned",
                {"technician_id": tech.id, "dispatch_id": did},
                expect_state=round_.get("from_state", "created"),
                expect_technician=round_.get("from_technician_id"))
        except Conflict as exc:
            # The order moved meanwhile, or the technician's day filled up.
            details = exc.details if isinstance(exc.details, dict) else {}
            why = ("schedule_conflict" if details.get("reason") in SCHEDULE_REASONS
                   else "order_changed")
            await self.store.set_candidate(did, tech.id, "accepted",
                                           {"status": "too_late", "reason": why})
            await self.store.finish(did, "failed", {"finished_ts": now_ms(), "assigned_to": None,
                                                    "error": why}, expect="assigned")
            raise
        return {"order_id": order_id, "dispatch_id": did, "status": "accepted", "order": order}

    def wake(self, dispatch_id: str) -> None:
        ev = self._wakeups.get(dispatch_id)
        if ev is not None:
            ev.set()

    async def close(self) -> None:
        await self._background.close()
