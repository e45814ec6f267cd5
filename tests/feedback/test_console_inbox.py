"""The console's feedback desk (issue 19) in Chromium: the inbox's filters,
taking an item, a reply and a note, a reply too long for the server, live
items; the SLA's overdue alarm, a period's statistics, the CSV export and
the agent's CSAT; a technician's rating on the order card and the ops map.

Each test has its own database (its own inbox). The browser is the page
tests' (tests/realtime/conftest.py): Debian's Chromium, no download.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, expect

from feedback.terms import warm
from tests.conftest import Live, StartApp
from tests.feedback.helpers import api, completed_order, post_feedback, rate
from tests.harness import Client, uid
from tests.realtime import conftest as page_fixtures
from tests.realtime.test_pages import ADDR, no_page_errors, now_ms, open_page, point

LATE = "师傅迟到了一个小时，空调也没有修好"
SLOW = "页面加载很慢，支付按钮点不动"
BILL = "发票什么时候开"
FRESH = "师傅很专业，点赞"

# The page tests' fixtures, here too: one Chromium, a fresh context per test.
browser = page_fixtures.browser
contexts = page_fixtures.contexts


async def started(start_app: StartApp, **settings: Any) -> Live:
    live = await start_app(mongo_db=uid("inbox_"), **settings)  # its own inbox
    # jieba's dictionary loads once per process (~2 s): not inside the first
    # POST's deadline, where a slow machine would turn it into a 503.
    await asyncio.to_thread(warm)
    return live


async def open_inbox(browser: Browser, contexts: list[BrowserContext], live: Live, agent: str,
                     role: str = "agent") -> Page:
    token = live.token(role, agent, name="小美")
    page = await open_page(browser, contexts, f"{live.url}/console#token={token}")
    await page.locator("#side-tabs [data-tab=feedback]").click()
    return page


async def test_inbox_filters_take_reply_note_and_live_items(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await started(start_app)
    c1, c2, agent, other = uid("c-"), uid("c-"), uid("a-"), uid("a-")
    late = await post_feedback(live, c1, LATE, category="service")
    slow = await post_feedback(live, c2, SLOW, category="app")
    bill = await post_feedback(live, c2, BILL, category="billing")
    await api(live, "PATCH", f"/api/feedback/{bill['id']}", live.token("agent", other),
              {"assignee": other})

    console = await open_inbox(browser, contexts, live, agent)
    bodies = console.locator("#feedback .fb-body")
    await expect(bodies).to_have_text([BILL, SLOW, LATE])  # newest first
    row = console.locator(f"#feedback .fb-item[data-id='{bill['id']}']")
    await expect(row.locator(".fb-assignee")).to_contain_text(other)

    # Filters: nobody's items; then a term of theirs (the server's word split).
    await console.locator("#fb-assignee").select_option("none")
    await expect(bodies).to_have_text([SLOW, LATE])
    await console.locator("#fb-q").fill("空调")
    await console.locator("#fb-q").press("Enter")
    await expect(bodies).to_have_text([LATE])

    # The item's thread; take it.
    await console.locator(f"#feedback .fb-item[data-id='{late['id']}']").click()
    detail = console.locator("#fb-detail")
    await expect(detail.locator(".fb-text")).to_have_text(LATE)
    await expect(console.locator("#fb-thread .ev-created .ev-text")).to_have_text([LATE])
    await expect(console.locator("#fb-assignee-name")).to_have_text("未分配")
    await console.locator("#fb-take").click()
    await expect(console.locator("#fb-assignee-name")).to_contain_text(agent)
    await expect(console.locator("#fb-thread .ev-assigned")).to_have_count(1)
    await expect(console.locator("#fb-take")).to_be_hidden()

    # Too long for the server (4000 characters at most): said, and nothing sent.
    await console.locator("#fb-reply").fill("长" * 4001)
    await expect(console.locator("#fb-reply-count")).to_have_class(re.compile(r"\bover\b"))
    await console.locator("#fb-reply-send").click()
    await expect(console.locator("#fb-error")).to_have_text("最多 4000 字（现在 4001 字）")
    await expect(console.locator("#fb-thread .ev-replied")).to_have_count(0)

    reply = "非常抱歉，已安排师傅明天上午重新上门"
    await console.locator("#fb-reply").fill(reply)
    await console.locator("#fb-reply-send").click()
    await expect(console.locator("#fb-thread .ev-replied .ev-text")).to_have_text([reply])
    await expect(console.locator("#fb-error")).to_be_hidden()
    await expect(console.locator("#fb-reply")).to_have_value("")
    await expect(console.locator("#fb-detail-status")).to_have_text("已回复")
    data = await api(live, "GET", f"/api/feedback/{late['id']}", live.token("agent", agent))
    assert data["feedback"]["assignee"] == agent and data["feedback"]["status"] == "replied", data
    replied = [e for e in data["events"] if e["type"] == "replied"]
    assert [(e["data"]["text"], e["actor"]["id"]) for e in replied] == [(reply, agent)], data["events"]

    # An internal note, a tag, the priority, and a status move the table allows.
    await console.locator("#fb-note").fill("查一下派单记录")
    await console.locator("#fb-note-send").click()
    await expect(console.locator("#fb-thread .ev-noted .ev-text")).to_have_text(["查一下派单记录"])
    await console.locator("#fb-tag-add").fill("迟到")
    await console.locator("#fb-tag-add").press("Enter")
    await expect(console.locator("#fb-tags [data-tag]")).to_have_count(1)
    await console.locator("#fb-priority").select_option("high")
    await expect(console.locator("#fb-thread .ev-prioritized")).to_have_count(1)
    moves = console.locator("#fb-moves [data-move]")
    await expect(moves).to_have_count(3)  # replied -> in_progress | resolved | closed
    await console.locator("#fb-moves [data-move=resolved]").click()
    await expect(console.locator("#fb-detail-status")).to_have_text("已解决")
    await expect(moves).to_have_count(1)  # resolved -> in_progress only
    data = await api(live, "GET", f"/api/feedback/{late['id']}", live.token("agent", agent))
    f = data["feedback"]
    assert (f["status"], f["tags"], f["priority"]) == ("resolved", ["迟到"], "high"), f
    assert [e["data"]["text"] for e in data["events"] if e["type"] == "noted"] == ["查一下派单记录"]

    # Live: with the filters cleared, a new item and another agent's step arrive
    # on the socket: no page load, no list request.
    await console.locator("#fb-clear").click()
    await expect(bodies).to_have_text([BILL, SLOW, LATE])
    await console.evaluate("window.__same_page = true")
    asked: list[str] = []
    console.on("request", lambda r: asked.append(r.url) if "/api/feedback?" in r.url else None)
    fresh = await post_feedback(live, c1, FRESH, category="praise")
    await expect(bodies).to_have_text([FRESH, BILL, SLOW, LATE])
    await api(live, "PATCH", f"/api/feedback/{slow['id']}", live.token("agent", other),
              {"priority": "urgent"})
    await expect(console.locator(f"#feedback .fb-item[data-id='{slow['id']}'] .prio")).to_have_text("紧急")
    assert await console.evaluate("window.__same_page") is True
    assert asked == [], asked
    await expect(console.locator(f"#feedback .fb-item[data-id='{fresh['id']}']")).to_have_attribute(
        "data-status", "new")
    no_page_errors(console)


async def support_rating(live: Live, agent_id: str, stars: int) -> None:
    """A support conversation the agent took, closed and rated by its customer."""
    agent = await live.client("agent", agent_id, namespace="/chat", name="小美")
    cust = await live.client("customer", uid("c-"), namespace="/chat", name="王女士")
    try:
        cid = (await cust.ok("open", {"kind": "support", "topic": "发票"}))["conversation"]["conversation_id"]
        await agent.ok("set_status", {"status": "available"})
        await assigned(cust, cid)
        await cust.ok("close", {"conversation_id": cid})
        await cust.ok("rate", {"conversation_id": cid, "stars": stars, "comment": "很快"})
        await agent.ok("set_status", {"status": "away"})
    finally:
        await cust.close()
        await agent.close()


async def assigned(c: Client, cid: str) -> dict[str, Any]:
    while True:
        conv: dict[str, Any] = await c.next("conversation")
        if conv["conversation_id"] == cid and conv["status"] == "assigned":
            return conv


async def test_overdue_alarm_statistics_export_and_csat(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    # The first response is due 3 s after an item comes (the sweep runs every 0.4 s).
    live = await started(start_app, feedback_sla_min=0.05)
    agent, c1 = uid("a-"), uid("c-")
    await support_rating(live, agent, 5)
    console = await open_inbox(browser, contexts, live, agent)
    bodies = console.locator("#feedback .fb-body")
    await expect(console.locator("#feedback .empty")).to_have_text("暂无反馈")

    # Two items come while the console is open; the newer one is answered at once.
    late = await post_feedback(live, c1, LATE, category="service")
    slow = await post_feedback(live, c1, SLOW, category="app")
    await api(live, "POST", f"/api/feedback/{slow['id']}/replies", live.token("agent", agent),
              {"body": "已转给技术同事"}, 201)
    # The other passes its deadline: pushed, alarmed, marked, and listed first.
    await expect(console.locator("#fb-alert-text")).to_have_text("1 条反馈已超过响应时限")
    await expect(console.locator("#fb-tab-badge")).to_have_text("1")
    await expect(bodies).to_have_text([LATE, SLOW])
    overdue = console.locator(f"#feedback .fb-item[data-id='{late['id']}']")
    await expect(overdue).to_have_attribute("data-overdue", "1")
    await expect(overdue.locator(".fb-overdue")).to_have_text("已超时")
    await console.locator("#fb-alert-show").click()
    await expect(console.locator("#fb-alert")).to_be_hidden()
    await expect(console.locator("#fb-tab-badge")).to_have_text("")
    await expect(console.locator("#fb-overdue")).to_be_checked()
    await expect(bodies).to_have_text([LATE])
    await console.locator("#fb-overdue").uncheck()
    await expect(bodies).to_have_text([LATE, SLOW])

    # The period: counts per day as bars, terms, the agent's own CSAT per week.
    await console.locator("#fb-views [data-view=stats]").click()
    await expect(console.locator("#fb-total")).to_have_attribute("data-total", "2")
    bars = console.locator("#fb-chart .col")
    await expect(bars).to_have_count(30)  # the default period: the last 30 days
    assert await bars.last.get_attribute("data-count") == "2"
    await expect(console.locator("#fb-top [data-term='空调']")).to_have_count(1)
    weeks = console.locator("#csat-weeks tbody tr")
    await expect(weeks).to_have_count(1)
    await expect(weeks.locator("td")).to_have_text([re.compile(r"^\d{4}-W\d{2}$"), "1", "5.00", "100%"])
    await expect(console.locator("#fb-csat-title")).to_have_text("我的满意度（按周）")

    # The export: fetched with the token, saved as a file.
    async with console.expect_download() as info:
        await console.locator("#fb-export").click()
    download = await info.value
    assert re.fullmatch(r"feedback-\d{4}-\d{2}-\d{2}-\d{4}-\d{2}-\d{2}\.csv", download.suggested_filename)
    path = await download.path()
    text = Path(path).read_text(encoding="utf-8-sig")
    assert LATE in text and SLOW in text, text

    # A top term filters the inbox by it.
    await console.locator("#fb-top [data-term='支付']").click()
    await expect(console.locator("#fb-q")).to_have_value("支付")
    await expect(bodies).to_have_text([SLOW])

    # In English, the same desk.
    await console.locator("#lang").click()
    await expect(console.locator("#fb-views [data-view=inbox]")).to_have_text("Inbox")
    status = console.locator(f"#feedback .fb-item[data-id='{slow['id']}'] .fb-status")
    await expect(status).to_have_text("Replied")
    no_page_errors(console)


async def test_technician_rating_on_the_order_card_and_the_ops_map(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await started(start_app)
    customer, tech_id = uid("c-"), uid("t-")
    oid = await completed_order(live, customer, tech_id)
    await rate(live, customer, oid, stars=5, quality=5, attitude=4, efficiency=5, comment="很专业")
    line = re.compile(r"^评分 ★\d\.\d\d（1 条评价）· 近 30 天 5\.00（1 条）$")

    console = await open_page(browser, contexts,
                              f"{live.url}/console#token={live.token('agent', uid('a-'), name='小美')}")
    await console.locator("#lookup-id").fill(oid)
    await console.locator("#lookup-id").press("Enter")
    await expect(console.locator("#card-state")).to_have_text("已完成")
    await expect(console.locator("#card-rating")).to_have_text(line)
    no_page_errors(console)

    tech = await live.client("technician", tech_id, namespace="/tracking", name="张师傅")
    await tech.ok("location", point(ADDR, now_ms()))
    ops = await open_page(browser, contexts, f"{live.url}/ops#token={live.token('admin', name='调度员')}")
    badge = ops.locator(f".badge.tech[data-id='{tech_id}']")
    await expect(badge).to_have_count(1)
    await badge.hover()
    await expect(ops.locator(f".tech-tip[data-id='{tech_id}'] .tip-rating")).to_have_text(line)
    no_page_errors(ops)
