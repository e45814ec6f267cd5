"""Feedback as work (issue 19), over the wire against the real store: the
life cycle with the author's live reply and the replay after a reconnect,
the SLA's overdue push, statistics over a seeded month (counts, a term that
rose), the CSV export's formula escaping."""

from __future__ import annotations

import csv
import datetime as dt
import io
from zoneinfo import ZoneInfo

from feedback.service import created_rollup, first_event, new_item
from feedback.terms import terms
from kernel.actor import Actor
from realtime.api import SERVICES
from tests.conftest import Live, StartApp
from tests.feedback.helpers import api, post_feedback
from tests.harness import uid, until

TZ = ZoneInfo("Asia/Shanghai")


async def test_the_life_cycle_with_the_authors_live_reply_and_replay(start_app: StartApp) -> None:
    live = await start_app()
    customer, agent, other = uid("c-"), uid("a-"), uid("a-")
    atoken, otoken = live.token("agent", agent, name="小王"), live.token("agent", other)
    user = await live.client("customer", customer, namespace="/chat")
    console = await live.client("agent", agent, namespace="/chat", name="小王")

    item = await post_feedback(live, customer, "师傅迟到了半个小时，空调也没修好")
    fid = item["id"]
    assert item["status"] == "new" and item["seq"] == 1 and item["assignee"] is None
    assert item["sla_due_ts"] == item["ts"] + 240 * 60_000 and item["overdue"] is False
    pushed = await console.next("feedback_event")
    assert pushed["event"]["type"] == "created" and pushed["feedback"]["id"] == fid

    # The agent takes it, tags it, notes inside, replies.
    data = await api(live, "PATCH", f"/api/feedback/{fid}", atoken,
                     {"assignee": agent, "tags": ["迟到", "维修质量"], "priority": "high",
                      "status": "in_progress"})
    assert [e["type"] for e in data["events"]] == ["assigned", "tagged", "prioritized", "status"]
    assert [e["seq"] for e in data["events"]] == [2, 3, 4, 5]
    assert data["feedback"]["status"] == "in_progress" and data["feedback"]["tags"] == ["迟到", "维修质量"]
    await api(live, "POST", f"/api/feedback/{fid}/notes", atoken, {"body": "查一下派单记录"}, 201)
    # Another agent may not answer an item assigned to someone else.
    status, reply = await live.http.request("POST", f"/api/feedback/{fid}/replies", otoken,
                                            json={"body": "我来"})
    assert status == 403 and reply["error"]["code"] == "forbidden", reply
    data = await api(live, "POST", f"/api/feedback/{fid}/replies", atoken,
                     {"body": "非常抱歉，已安排师傅明天重新上门"}, 201)
    assert data["feedback"]["status"] == "replied" and data["feedback"]["first_response_ts"]
    assert data["feedback"]["sla_due_ts"] is None

    # The author hears their item, its status change and the reply live, on
    # their own seq (1 created, 2 in_progress, 3 the reply): the staff's steps
    # (assignment, tags, priority, the note) stay inside.
    got = [await user.next("feedback_event") for _ in range(3)]
    assert [(e["event"]["seq"], e["event"]["type"]) for e in got] == [
        (1, "created"), (2, "status"), (3, "replied")]
    assert got[2]["event"]["data"]["text"] == "非常抱歉，已安排师傅明天重新上门"
    assert got[2]["event"]["by"] == {"role": "agent", "name": "小王"}
    assert "assignee" not in got[2]["feedback"] and got[2]["feedback"]["seq"] == 3
    assert user.drain("feedback_event") == []

    # The author answers on the socket: the item goes back to in_progress.
    mine = await user.ok("feedback_mine", {})
    assert [f["id"] for f in mine["feedback"]] == [fid]
    answer = await user.ok("feedback_reply", {"feedback_id": fid, "body": "好的，明天上午可以"})
    assert answer["event"]["seq"] == 4 and answer["feedback"]["status"] == "in_progress"
    await user.close()

    # While the author is away, an admin (anyone's item) replies, the agent resolves.
    admin = live.token("admin", uid("ad-"), name="主管")
    await api(live, "POST", f"/api/feedback/{fid}/replies", admin, {"body": "已确认上午 10 点"}, 201)
    await api(live, "PATCH", f"/api/feedback/{fid}", atoken, {"status": "resolved"})
    # Back, the author replays what they missed after their seq 4: gap-free.
    again = await live.client("customer", customer, namespace="/chat")
    replay = await again.ok("feedback_replay", {"feedback_id": fid, "since_seq": 4})
    assert [(e["seq"], e["type"], e["status"]) for e in replay["events"]] == [
        (5, "replied", "replied"), (6, "status", "resolved")]
    assert replay["events"][0]["data"]["text"] == "已确认上午 10 点"
    assert replay["last_seq"] == 6 and replay["feedback"]["status"] == "resolved"
    # Staff see the whole log, gap-free, the note included.
    full = await api(live, "GET", f"/api/feedback/{fid}/events?since_seq=0", atoken)
    assert [e["seq"] for e in full["events"]] == list(range(1, 11))
    assert "noted" in [e["type"] for e in full["events"]]
    # Someone else's item is not found for a customer; a stranger's replay too.
    status, _ = await live.http.request("GET", f"/api/feedback/{fid}", live.token("customer"))
    assert status == 404
    stranger = await live.client("customer", uid("c-"), namespace="/chat")
    await stranger.error("feedback_replay", {"feedback_id": fid}, "not_found")
    # The table: resolved -> closed is refused with the allowed moves.
    status, reply = await live.http.request("PATCH", f"/api/feedback/{fid}", atoken,
                                            json={"status": "closed"})
    assert status == 409 and reply["error"]["code"] == "conflict", reply
    assert reply["error"]["details"]["allowed"] == ["in_progress"]
    # A PATCH is refused as a whole: the tags of a refused one are not set.
    status, reply = await live.http.request("PATCH", f"/api/feedback/{fid}", atoken,
                                            json={"tags": ["不该生效"], "status": "replied"})
    assert status == 409, reply
    now = await api(live, "GET", f"/api/feedback/{fid}", atoken)
    assert now["feedback"]["tags"] == ["迟到", "维修质量"]


async def test_an_item_past_its_sla_is_pushed_to_the_console_and_listed_first(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("fbo"), feedback_sla_min=0.02)  # 1.2 s; an inbox of its own
    console = await live.client("agent", uid("a-"), namespace="/chat")
    customer = uid("c-")
    late = await post_feedback(live, customer, "等了很久没人回复")
    answered = await post_feedback(live, customer, "发票怎么开")
    token = live.token("agent", uid("a-"))
    await api(live, "POST", f"/api/feedback/{answered['id']}/replies", token, {"body": "在订单页"}, 201)
    newest = await post_feedback(live, customer, "新的问题")

    pushed = await console.next("feedback_overdue", timeout=15)
    assert pushed["feedback"]["id"] in (late["id"], newest["id"])
    assert pushed["feedback"]["overdue"] is True
    listed = await api(live, "GET", "/api/feedback?open=true&limit=3", token)
    ids = [f["id"] for f in listed["feedback"]]
    # Overdue first (newest of them first), the answered one last.
    assert ids[-1] == answered["id"] and listed["feedback"][0]["overdue"] is True, listed
    events = await api(live, "GET", f"/api/feedback/{pushed['feedback']['id']}/events", token)
    assert [e["type"] for e in events["events"]].count("overdue") == 1


async def seed(live: Live, day: dt.date, body: str, category: str = "service",
               resolved_after_min: float | None = None) -> None:
    """An item created at noon of `day` (Shanghai) through the service's own
    builders and the real store: the statistics read what every item writes."""
    svc = live.app[SERVICES].feedback
    ts = int(dt.datetime.combine(day, dt.time(12), TZ).timestamp() * 1000)
    actor = Actor(uid("c-"), "customer")
    item = new_item(actor, None, category=category, body=body, order_id=None, technician_id=None,
                    priority="normal", source="user", ts=ts, sla_ms=svc.sla_ms,
                    day=day.isoformat(), terms=terms(body))
    await svc.store.insert(item, first_event(item, actor, None), created_rollup(item))


async def test_stats_over_a_seeded_month_give_the_counts_and_a_term_that_rose(
        start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("fbs"))  # a month of its own
    today = dt.datetime.now(TZ).date()
    month = [today - dt.timedelta(days=i) for i in range(30)]
    before = [today - dt.timedelta(days=30 + i) for i in range(30)]
    for i, day in enumerate(month):
        if i % 2:
            await seed(live, day, "App 定位不准", category="app")
        else:
            await seed(live, day, "师傅服务态度很好", category="service")
    for day in month[:6]:
        await seed(live, day, "退款一直没有到账", category="payment")
    await seed(live, before[0], "退款很快")
    for day in before[:10]:
        await seed(live, day, "师傅服务态度很好")
    # Today's items through the wire, one answered and resolved.
    customer = uid("c-")
    item = await post_feedback(live, customer, "退款申请提交不了", category="payment")
    token = live.token("admin", uid("ad-"))
    await api(live, "POST", f"/api/feedback/{item['id']}/replies", token, {"body": "已处理"}, 201)
    await api(live, "PATCH", f"/api/feedback/{item['id']}", token,
              {"status": "resolved", "tags": ["退款"]})

    q = f"from={month[-1]}&to={today}"
    stats = await api(live, "GET", f"/api/feedback/stats?{q}&group_by=day", token)
    assert stats["total"] == 30 + 6 + 1 and stats["previous_total"] == 11
    assert stats["by_category"] == {"payment": 7, "service": 15, "app": 15}
    assert stats["by_status"] == {"new": 36, "resolved": 1}
    assert stats["by_tag"] == {"退款": 1}
    assert stats["first_response"]["count"] == 1 and stats["resolution"]["count"] == 1
    assert stats["first_response"]["median_min"] is not None
    assert len(stats["series"]) == 30 and sum(s["count"] for s in stats["series"]) == 37
    top = {t["term"]: t["count"] for t in stats["top_terms"]}
    assert top["退款"] == 7 and top["定位"] == 15 and "没有" not in top  # a stop word
    rising = {r["term"]: r for r in stats["rising_terms"]}
    assert rising["退款"] == {"term": "退款", "count": 7, "previous": 1}
    assert top["服务态度"] == 15 and "服务态度" not in rising  # 15 against 10: not twice
    weekly = await api(live, "GET", f"/api/feedback/stats?{q}&group_by=week", token)
    assert sum(s["count"] for s in weekly["series"]) == 37 and weekly["series"][0]["period"][4:6] == "-W"
    # Staff only; a bad period is refused.
    status, reply = await live.http.request("GET", "/api/feedback/stats", live.token("customer"))
    assert status == 403
    for bad in ("from=2026-13-01", "from=2026-12-06&to=2026-11-01", "group_by=month",
                "from=2020-01-01&to=2026-01-01", "frm=2026-01-01"):
        status, reply = await live.http.request("GET", f"/api/feedback/stats?{bad}", token)
        assert status == 400 and reply["error"]["code"] == "invalid", (bad, reply)


async def test_the_csv_export_escapes_formula_cells(start_app: StartApp) -> None:
    live = await start_app()
    customer = uid("c-")
    evil = await post_feedback(live, customer, '=HYPERLINK("http://evil.example","点我")')
    await post_feedback(live, customer, "+1 一切正常", category="@cmd")
    await post_feedback(live, customer, "普通的反馈, 有逗号")
    token = live.token("agent", uid("a-"))
    await api(live, "PATCH", f"/api/feedback/{evil['id']}", token, {"tags": ["-2+3", "ok"]})
    today = dt.datetime.now(TZ).date()
    async with live.http.session.get(f"{live.url}/api/feedback/export.csv?from={today}&to={today}",
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
        text = (await resp.read()).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    mine = [r for r in rows if r["user_id"] == customer]
    by_body = {r["body"]: r for r in mine}
    assert set(by_body) == {"'=HYPERLINK(\"http://evil.example\",\"点我\")", "'+1 一切正常",
                            "普通的反馈, 有逗号"}
    assert by_body["'+1 一切正常"]["category"] == "'@cmd"
    assert by_body["'=HYPERLINK(\"http://evil.example\",\"点我\")"]["tags"] == "'-2+3;ok"
    # No cell of the whole file starts a formula.
    for row in csv.reader(io.StringIO(text)):
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@")), cell
    status, _ = await live.http.request("GET", "/api/feedback/export.csv", live.token("customer"))
    assert status == 403


async def test_two_nodes_flag_each_overdue_item_once(start_app: StartApp) -> None:
    db = uid("fb2")
    one = await start_app(mongo_db=db, feedback_sla_min=0.01)
    two = await start_app(mongo_db=db, feedback_sla_min=0.01)
    customer = uid("c-")
    ids = [(await post_feedback(one if i % 2 else two, customer, f"第{i}个问题"))["id"]
           for i in range(6)]
    token = one.token("admin", uid("ad-"))

    async def all_flagged() -> bool:
        data = await api(two, "GET", "/api/feedback?overdue=true&limit=50", token)
        return {f["id"] for f in data["feedback"]} >= set(ids)

    await until(all_flagged, 20, what="every item flagged")
    for fid in ids:
        events = (await api(one, "GET", f"/api/feedback/{fid}/events", token))["events"]
        assert [e["type"] for e in events] == ["created", "overdue"], events
