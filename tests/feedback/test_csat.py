"""CSAT of support chats per agent, over the wire (GET /api/chat/csat): two
agents each close support conversations that customers then rate on /chat;
an agent sees their own rows, an admin and the backend every agent's, per
agent and per ISO week (in Asia/Shanghai); a period without today shows
nothing. The app has a database of its own: other tests' chats do not count."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import Live, StartApp
from tests.feedback.helpers import api
from tests.harness import Client, uid
from tests.wire import assert_error, assert_no_server_errors

TZ = ZoneInfo("Asia/Shanghai")
NS = "/chat"


async def open_support(live: Live, agent_id: str | None) -> tuple[Client, str]:
    """A customer opens support; it goes at once to `agent_id` (the only one
    available), or stays queued when nobody is (None)."""
    cust = await live.client("customer", uid("c-"), namespace=NS)
    conv = (await cust.ok("open", {"kind": "support", "topic": "空调不制冷"}))["conversation"]
    if agent_id is None:
        assert conv["status"] == "queued" and conv["assignee"] is None, conv
    else:
        assert conv["status"] == "assigned" and conv["assignee"] == agent_id, conv
    return cust, str(conv["conversation_id"])


async def rated(cust: Client, cid: str, stars: int, comment: str | None = None) -> dict[str, Any]:
    conv = (await cust.ok("rate", {"conversation_id": cid, "stars": stars, "comment": comment}))[
        "conversation"]
    assert conv["status"] == "closed" and conv["csat"]["stars"] == stars, conv
    return dict(conv)


def week(ts_ms: int) -> str:
    year, wk, _ = dt.datetime.fromtimestamp(ts_ms / 1000, TZ).date().isocalendar()
    return f"{year}-W{wk:02d}"


def summary(stars: list[int]) -> dict[str, Any]:
    return {"count": len(stars), "mean": round(sum(stars) / len(stars), 2),
            "satisfied": round(sum(s >= 4 for s in stars) / len(stars), 3)}


async def test_csat_per_agent_and_iso_week_for_agents_admins_and_the_backend(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app(mongo_db=uid("csat"))
    one, two = uid("a-"), uid("b-")
    agent_one = await live.client("agent", one, namespace=NS, name="小王")
    agent_two = await live.client("agent", two, namespace=NS, name="小李")

    # Nobody available: a conversation nobody took, closed and rated by its
    # customer, is nobody's CSAT.
    lone, lone_cid = await open_support(live, None)
    await lone.ok("close", {"conversation_id": lone_cid})
    unassigned = await rated(lone, lone_cid, 1, "没人理")
    assert unassigned["assignee"] is None

    # The first agent alone is available: the next four are theirs.
    await agent_one.ok("set_status", {"status": "available"})
    ones = [await open_support(live, one) for _ in range(4)]
    await agent_one.ok("set_status", {"status": "away"})
    # Then the second alone: three are theirs.
    await agent_two.ok("set_status", {"status": "available"})
    twos = [await open_support(live, two) for _ in range(3)]

    # The agents close theirs (one of the first's by its customer), except
    # the second's last, which stays open; the customers rate, but for one.
    await asyncio.gather(*(agent_one.ok("close", {"conversation_id": cid}) for _, cid in ones[:3]))
    await ones[3][0].ok("close", {"conversation_id": ones[3][1]})
    await asyncio.gather(*(agent_two.ok("close", {"conversation_id": cid}) for _, cid in twos[:2]))
    got: dict[str, list[dict[str, Any]]] = {one: [], two: []}
    for (cust, cid), stars in zip(ones[:3], (5, 4, 2), strict=True):
        got[one].append(await rated(cust, cid, stars, "好" if stars >= 4 else None))
    # ones[3]: closed, never rated. twos[2]: still open, cannot be rated.
    await twos[2][0].error("rate", {"conversation_id": twos[2][1], "stars": 5}, "conflict")
    for (cust, cid), stars in zip(twos[:2], (3, 5), strict=True):
        got[two].append(await rated(cust, cid, stars))
    for agent, convs in got.items():
        assert {c["assignee"] for c in convs} == {agent}, convs

    # What each agent's rows should be, from the ratings' own times.
    expected_agents: dict[str, dict[str, Any]] = {}
    expected_weeks: dict[tuple[str, str], list[int]] = {}
    for agent, convs in got.items():
        expected_agents[agent] = {"agent_id": agent, **summary([c["csat"]["stars"] for c in convs])}
        for c in convs:
            expected_weeks.setdefault((agent, week(c["csat"]["ts"])), []).append(c["csat"]["stars"])
    assert expected_agents[one] == {"agent_id": one, "count": 3, "mean": 3.67, "satisfied": 0.667}
    assert expected_agents[two] == {"agent_id": two, "count": 2, "mean": 4.0, "satisfied": 0.5}

    def weeks_of(*agents: str) -> list[dict[str, Any]]:
        return [{"agent_id": a, "week": w, **summary(s)}
                for (a, w), s in sorted(expected_weeks.items()) if a in agents]

    times = [c["csat"]["ts"] for convs in got.values() for c in convs] + [unassigned["csat"]["ts"]]
    days = {dt.datetime.fromtimestamp(t / 1000, TZ).date() for t in times}
    first, last = min(days), max(days)  # today in Shanghai (two days only at midnight)
    tokens = {one: live.token("agent", one), two: live.token("agent", two)}
    admin, service = live.token("admin", uid("ad-")), live.token("service")

    for query in ("", f"?from={first}&to={last}", f"?to={last}",
                  f"?from={last - dt.timedelta(days=365)}&to={last}"):
        # Each agent: their own rows only.
        for agent in (one, two):
            data = await api(live, "GET", f"/api/chat/csat{query}", tokens[agent])
            assert data["agents"] == [expected_agents[agent]], (query, data)
            assert data["weeks"] == weeks_of(agent), (query, data)
        # Admins and the backend: both agents, by agent id; the unassigned
        # conversation's rating in neither.
        for token in (admin, service):
            data = await api(live, "GET", f"/api/chat/csat{query}", token)
            assert data["agents"] == [expected_agents[a] for a in sorted((one, two))], (query, data)
            assert data["weeks"] == weeks_of(one, two), (query, data)
        # An agent who closed nothing: nothing.
        data = await api(live, "GET", f"/api/chat/csat{query}", live.token("agent", uid("a-")))
        assert data["agents"] == [] and data["weeks"] == [], data
    for row in weeks_of(one, two):
        assert re.fullmatch(r"\d{4}-W\d{2}", row["week"]), row
    data = await api(live, "GET", f"/api/chat/csat?from={first}&to={last}", admin)
    assert (data["from"], data["to"]) == (first.isoformat(), last.isoformat())

    # Periods without the day of the ratings show nothing.
    before, after = first - dt.timedelta(days=1), last + dt.timedelta(days=1)
    for query in (f"from={before}&to={before}", f"from={after}&to={after}",
                  f"from={first - dt.timedelta(days=30)}&to={before}"):
        for token in (admin, service, tokens[one], tokens[two]):
            data = await api(live, "GET", f"/api/chat/csat?{query}", token)
            assert data["agents"] == [] and data["weeks"] == [], (query, data)

    # Not for customers or technicians.
    for role in ("customer", "technician"):
        status, reply = await live.http.request("GET", "/api/chat/csat", live.token(role))
        assert status == 403, reply
        assert_error(reply, "forbidden")
    assert_no_server_errors(caplog)
