"""Ratings that accumulate (issue 19), over the wire against the real store:
three ratings give the documented aggregate and the technician hears each
as `rating_received`; a 1-star rating (or a low dimension) opens a
follow-up routed to an available agent; dispatch ranks by arrival with the
rating's credit within the margin, and not beyond it."""

from __future__ import annotations

from typing import Any

from feedback.ratings import PRIOR_WEIGHT
from tests.conftest import StartApp
from tests.feedback.helpers import api, completed_order, rate
from tests.harness import uid
from tests.tracking.test_dispatch import at, now_ms, started


def expected_bayes(agg: dict[str, Any], total: int) -> float:
    return round((PRIOR_WEIGHT * float(agg["fleet_mean"]) + total) / (PRIOR_WEIGHT + int(agg["count"])), 2)


async def test_three_ratings_give_the_documented_aggregate_and_reach_the_technician(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("rt"))  # a fleet of its own
    tech = uid("t-")
    app = await live.client("technician", tech)
    # Another technician's two ratings make the fleet's mean 4.0 with ours.
    other = uid("t-")
    for stars in (5, 5):
        c = uid("c-")
        await rate(live, c, await completed_order(live, c, other), stars=stars)
    ratings: list[dict[str, Any]] = [
        {"stars": 5, "quality": 5, "attitude": 5, "efficiency": 4, "comment": "很专业"},
        {"stars": 4, "quality": 4, "attitude": 5},
        {"stars": 3, "efficiency": 3}]
    got = []
    for r in ratings:
        customer = uid("c-")
        oid = await completed_order(live, customer, tech)
        await rate(live, customer, oid, **r)
        while True:
            ev = await app.next("rating_received")
            if ev["order_id"] == oid:
                break
        assert {k: ev[k] for k in r} == r and isinstance(ev["ts"], int), ev
        got.append(ev["aggregate"])
    agg = got[-1]
    assert agg["count"] == 3 and agg["mean"] == 4.0
    assert agg["dimensions"] == {"quality": 4.5, "attitude": 5.0, "efficiency": 3.5}
    assert agg["last_30d"] == {"count": 3, "mean": 4.0}
    assert agg["fleet_mean"] == round((5 + 5 + 5 + 4 + 3) / 5, 4)
    assert agg["bayes"] == expected_bayes(agg, 12) and agg["prior_weight"] == PRIOR_WEIGHT
    assert [a["count"] for a in got] == [1, 2, 3]
    # The API serves the same, with the recent comments, to staff and to the technician.
    for token in (live.token("agent"), live.token("technician", tech)):
        data = await api(live, "GET", f"/api/technicians/{tech}/ratings", token)
        assert data["aggregate"] == agg
        assert [r["stars"] for r in data["recent"]] == [3, 4, 5]
        assert data["recent"][-1]["comment"] == "很专业"
    status, reply = await live.http.request("GET", f"/api/technicians/{tech}/ratings",
                                            live.token("technician", other))
    assert status == 403 and reply["error"]["code"] == "forbidden"


async def test_a_one_star_rating_opens_a_linked_follow_up_routed_to_an_agent(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("fu"))
    agent = uid("a-")
    console = await live.client("agent", agent, namespace="/chat")
    await console.ok("set_status", {"status": "available"})
    customer, tech = uid("c-"), uid("t-")
    oid = await completed_order(live, customer, tech)
    await rate(live, customer, oid, stars=1, attitude=1, comment="迟到一小时还很不耐烦")
    seen: dict[str, Any] = {}
    while "assigned" not in seen:
        ev = await console.next("feedback_event")
        if ev["feedback"]["order_id"] == oid:
            seen[ev["event"]["type"]] = ev
    item = seen["assigned"]["feedback"]
    assert item["id"] == f"fu-{oid}" and item["source"] == "rating" and item["category"] == "rating"
    assert item["technician_id"] == tech and item["user"]["id"] == customer
    assert item["priority"] == "urgent" and item["assignee"] == agent and item["status"] == "new"
    assert "迟到一小时还很不耐烦" in item["body"] and "1星" in item["body"]
    assert seen["assigned"]["event"]["data"]["routed"] is True
    assert seen["created"]["event"]["seq"] == 1 and seen["assigned"]["event"]["seq"] == 2
    # A good rating with one low dimension opens one too (high priority); a good one none.
    c2, c3 = uid("c-"), uid("c-")
    low_dim = await completed_order(live, c2, tech)
    await rate(live, c2, low_dim, stars=4, efficiency=2)
    good = await completed_order(live, c3, tech)
    await rate(live, c3, good, stars=5, quality=5)
    token = live.token("admin")
    data = await api(live, "GET", f"/api/feedback?technician_id={tech}", token)
    assert {f["order_id"]: f["priority"] for f in data["feedback"]} == {oid: "urgent", low_dim: "high"}
    # The customer's reply thread: the follow-up is theirs, and support answers it.
    data = await api(live, "POST", f"/api/feedback/fu-{oid}/replies", live.token("agent", agent),
                     {"body": "非常抱歉，我们会回访并处理"}, 201)
    assert data["feedback"]["status"] == "replied"


async def test_dispatch_ranks_by_rating_within_the_margin_and_not_beyond_it(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("dr"), stale_position_s=600, dispatch_rating_margin_s=600)
    low, high = uid("t-"), uid("t-")
    for tech, stars in ((low, 1), (high, 5)):
        for _ in range(3):
            c = uid("c-")
            await rate(live, c, await completed_order(live, c, tech), stars=stars)
    # Fleet 3.0; low (33/13 = 2.54) and high (45/13 = 3.46): the credit differs
    # by 600 * 0.92 / 4 = 138 s. `high` is 300 m (about 58 s) farther away.
    tracking: dict[str, Any] = {}
    for tech, north in ((low, 500.0), (high, 800.0)):
        trk = await live.client("technician", tech, namespace="/tracking", skills=["aircon"])
        lat, lng = at(north)
        reply = await trk.ok("location", {"lat": lat, "lng": lng, "ts": now_ms() - 120_000})
        assert reply["status"] == "accepted", reply
        await live.client("technician", tech, skills=["aircon"])
        tracking[tech] = trk

    def ranked(round_: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted((c for c in round_["candidates"] if c.get("rank")), key=lambda c: c["rank"])

    first = ranked(await started(live, (await live.create_order(skills=["aircon"]))["order_id"],
                                 {"strategy": "broadcast"}))
    assert [c["technician_id"] for c in first] == [high, low], first
    lo, hi = first[1]["score"], first[0]["score"]
    assert lo["arrival_s"] < hi["arrival_s"] < lo["arrival_s"] + 138
    assert hi["rating"] > lo["rating"] and hi["rating_credit_s"] - lo["rating_credit_s"] > 130
    assert hi["score_s"] == round(hi["arrival_s"] - hi["rating_credit_s"], 1)
    assert hi["skills_matched"] == "1/1" and hi["rating_count"] == 3
    # `high` moves 4 km away: about 680 s later than `low`, beyond even the
    # whole margin; arrival decides.
    lat, lng = at(4000.0)
    reply = await tracking[high].ok("location", {"lat": lat, "lng": lng, "ts": now_ms()})
    assert reply["status"] == "accepted", reply
    second = ranked(await started(live, (await live.create_order(skills=["aircon"]))["order_id"],
                                  {"strategy": "broadcast", "radius_m": 10_000}))
    assert [c["technician_id"] for c in second] == [low, high], second
    assert second[1]["score"]["arrival_s"] - second[0]["score"]["arrival_s"] > 600
