"""The technician's day in the pages (issue 17), in a real browser against a
live app, as in tests/realtime/test_pages.py: the customer's late banner
driven by real projections (a technician idling far away, then close by;
no marker until they set off), the queued job's page while its technician
is on the job before, then not yet on the way, then after a re-assignment
(which clears the lateness), and the ops page's day timeline (rows, bars,
live states, lateness, the dispatch record behind a bar).

Privacy (docs/tracking.md): a technician's position shows only on the page
of the order they have set off to (`en_route`, `arrived`); before that the
page says they have not set off (or are on another job) and when they could
come, never where they are.

Lateness is real here: the app projects every connected technician's day
every `project_interval_s` and flags a job `late_risk` past its window's
start by more than `late_grace_min` (docs/scheduling.md, "Lateness"). The
technicians jump tens of kilometres between fixes, so the teleport filter is
opened (`max_speed_mps`): these tests are about lateness, not GPS noise.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from playwright.async_api import Browser, BrowserContext, Locator, Page, expect

from tests.conftest import Live, StartApp
from tests.harness import Client, uid
from tests.realtime.test_pages import (
    FAST,
    PHONE,
    VIEWPORT,
    WAIT_MS,
    at,
    eta_s,
    marker_at,
    no_page_errors,
    now_ms,
    open_page,
    point,
    shot,
)

SH = ZoneInfo("Asia/Shanghai")  # the technicians' timezone (scheduling.calendar.DEFAULT_TZ)
MIN = 60_000
HOUR = 60 * MIN
# Project every 0.2 s and warn a minute past the window's start: the tests wait
# for events, and these make them come at once.
LATE = {"late_grace_min": 1, "project_interval_s": 0.2, "max_speed_mps": 100_000.0}
FAR_M = 40_000.0  # 40 km: over two hours of driving at the ETA model's 25 km/h

expect.set_options(timeout=WAIT_MS)


def window(start: int, minutes: int = 30) -> dict[str, int]:
    return {"start_ts": start, "end_ts": start + minutes * MIN}


async def technician(live: Live, tech_id: str, name: str,
                     skills: list[str] | None = None) -> tuple[Client, Client]:
    """The technician's app: /tracking (fixes) and /orders (offers, progress)."""
    kw: dict[str, Any] = {"name": name}
    if skills:
        kw["skills"] = skills
    track = await live.client("technician", tech_id, namespace="/tracking", **kw)
    orders = await live.client("technician", tech_id, namespace="/orders", **kw)
    return track, orders


async def move(live: Live, order_id: str, *states: str) -> None:
    for state in states:
        status, body = await live.post_event(order_id, state)
        assert status == 200, body


async def order_doc(live: Live, order_id: str) -> dict[str, Any]:
    status, body = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert status == 200, body
    return dict(body["data"])


# -- the customer's page ---------------------------------------------------------------------------

async def test_customer_page_shows_the_late_banner_and_hides_it_when_on_time_again(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(**FAST, **LATE)
    start = now_ms() + 5 * MIN  # the job starts in five minutes
    order = await live.create_order(window=window(start))
    oid, cust = order["order_id"], order["customer_id"]
    tech_id = uid("t-")
    await live.assign(oid, tech_id)
    token = live.token("customer", cust, name="王女士")
    page = await open_page(browser, contexts, f"{live.url}/track/{oid}#token={token}", PHONE)
    await expect(page.locator("#order-state")).to_have_text("已分配")
    banner = page.locator("#late-banner")
    await expect(banner).to_be_hidden()
    # An agent has the order's card open in the console.
    agent = live.token("agent", name="小美")
    console = await open_page(browser, contexts, f"{live.url}/console#token={agent}")
    await console.locator("#lookup-id").fill(oid)
    await console.locator("#lookup-id").press("Enter")
    await expect(console.locator("#card-state")).to_have_text("已分配")
    await expect(console.locator("#card-late")).to_have_count(0)

    # The technician comes online 40 km away, idle: two hours' drive for a job in five minutes.
    tech, tech_orders = await technician(live, tech_id, "张师傅")
    assert (await tech.ok("location", point(at(FAR_M), now_ms())))["status"] == "accepted"
    await expect(banner).to_be_visible()
    await expect(banner).to_have_text(re.compile(r"^师傅预计晚到 \d+ 分钟$"))
    minutes = int(await banner.get_attribute("data-minutes-late") or "0")
    assert 100 < minutes < 150, minutes  # 40 km × 1.35 at 25 km/h = 130 min, less the 5 to go
    await expect(console.locator("#card-late")).to_have_text(re.compile(r"^预计晚到 \d+ 分钟$"))
    # They have not set off: when they could come (from where they are, leaving now), never
    # where. No marker, on the page or in the console.
    status, eta = page.locator("#tech-status"), page.locator("#eta")
    await expect(status).to_have_text("师傅尚未出发")
    await expect(status).to_have_attribute("data-status", "not_started")
    await expect(eta).to_have_attribute("data-basis", "idle")
    await expect(eta).to_have_text(re.compile(r"^预计 \d+ 分钟 后到达$"))
    assert 120 * 60 < await eta_s(page) < 150 * 60
    await expect(page.locator("#tech-marker")).to_have_count(0)
    await expect(console.locator("#card-eta")).to_have_text(
        re.compile(r"^师傅尚未出发 · 预计 \d+ 分钟 后到达$"))
    await shot(console, "console-late")
    # What the page showed is what the order says (a minute on, it may say one more).
    doc = await order_doc(live, oid)
    late = doc["order"]["late"]
    assert minutes <= late["minutes_late"] <= minutes + 1 and late["basis"] == "idle", late
    assert [e["type"] for e in doc["events"]][-1] == "late_risk"
    await shot(page, "track-late-phone")

    # A page opened now shows it from the order itself (in English on request).
    en = await open_page(browser, contexts, f"{live.url}/track/{oid}?lang=en#token={token}", PHONE)
    await expect(en.locator("#late-banner")).to_have_text(
        re.compile(r"^Your technician may be about \d+ min late$"))
    await expect(en.locator("#tech-status")).to_have_text("Your technician has not set off yet")
    await expect(en.locator("#tech-marker")).to_have_count(0)

    # The technician turns out to be 300 m away after all: on time again, the banners go.
    near = at(-300)
    assert (await tech.ok("location", point(near, now_ms())))["status"] == "accepted"
    await expect(banner).to_be_hidden()
    await expect(page.locator("#toasts")).to_contain_text("师傅预计可准时到达")
    await expect(en.locator("#late-banner")).to_be_hidden()
    await expect(console.locator("#card-late")).to_have_count(0)
    await expect(console.locator("#order-card .events li").last).to_contain_text("恢复准时")
    doc = await order_doc(live, oid)
    assert doc["order"]["late"] is None
    assert [e["type"] for e in doc["events"]][-2:] == ["late_risk", "on_time_again"]
    # Still not on the way: the new ETA (pushed) says a minute or so, and still no marker.
    await page.wait_for_function(
        "() => { const v = document.getElementById('eta').dataset.etaS;"
        " return v !== undefined && +v < 120; }", timeout=WAIT_MS)
    await expect(status).to_have_text("师傅尚未出发")
    await expect(page.locator("#tech-marker")).to_have_count(0)

    # They set off: this order is their job now. The fix from before is not shown; the
    # next one, on the way, is.
    await tech_orders.ok("progress", {"order_id": oid, "state": "en_route"})
    await expect(page.locator("#order-state")).to_have_text("在路上")
    await expect(status).to_be_hidden()
    await expect(eta).to_have_text("正在获取师傅位置…")
    await expect(page.locator("#tech-marker")).to_have_count(0)
    on_way = at(-250)
    assert (await tech.ok("location", point(on_way, now_ms())))["status"] == "accepted"
    await marker_at(page, on_way)
    await marker_at(en, on_way)
    await expect(eta).to_have_attribute("data-basis", "live")
    await expect(banner).to_be_hidden()
    no_page_errors(page)
    no_page_errors(en)
    no_page_errors(console)


async def test_customer_page_of_a_queued_job_then_its_turn_then_a_new_technician(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(**FAST, **LATE)
    tech_id, other_id = uid("t-"), uid("t-")
    now = now_ms()
    # The technician's job before this one is under way 2 km east.
    before_at = at(0, 2000)
    before = await live.create_order(window=window(now - 10 * MIN),
                                     address={"lat": before_at[0], "lng": before_at[1], "text": "前一单"})
    await live.assign(before["order_id"], tech_id)
    await move(live, before["order_id"], "en_route")
    mine = await live.create_order(window=window(now + 90 * MIN))
    oid, cust = mine["order_id"], mine["customer_id"]
    await live.assign(oid, tech_id)
    tech, _ = await technician(live, tech_id, "张师傅")
    await tech.ok("location", point(at(0, 2100), now_ms()))

    page = await open_page(browser, contexts,
                           f"{live.url}/track/{oid}#token={live.token('customer', cust)}", PHONE)
    # Where the technician is belongs to the other customer: no marker, a status line
    # and when they will come (behind the job before).
    status, eta, banner = page.locator("#tech-status"), page.locator("#eta"), page.locator("#late-banner")
    await expect(status).to_have_text("师傅正在完成上一单服务")
    await expect(status).to_have_attribute("data-status", "on_another_job")
    await expect(eta).to_have_attribute("data-basis", "queued")
    await expect(eta).to_have_text(re.compile(r"^预计 \d+ 分钟 后到达$"))
    await expect(page.locator("#tech-name")).to_have_text("张师傅")
    assert await page.locator("#tech-marker").count() == 0
    await shot(page, "track-queued-phone")

    # The job before ends: no job under way, but they have not set off to this one either.
    # The page learns it from the pushed ETA (now from where they are: basis idle); still
    # no marker, also after a fix.
    await move(live, before["order_id"], "arrived", "in_service", "completed")
    await expect(status).to_have_text("师傅尚未出发")
    await expect(status).to_have_attribute("data-status", "not_started")
    await expect(eta).to_have_attribute("data-basis", "idle")
    await expect(eta).to_have_text(re.compile(r"^预计 \d+ 分钟 后到达$"))
    # Then they drive off 40 km for something of their own: this job turns late.
    await tech.ok("location", point(at(FAR_M), now_ms()))
    await expect(banner).to_be_visible()
    await expect(banner).to_have_text(re.compile(r"^师傅预计晚到 \d+ 分钟$"))
    await expect(status).to_have_text("师傅尚未出发")
    assert await page.locator("#tech-marker").count() == 0
    await shot(page, "track-not-started-phone")

    # Another technician takes the job: their name replaces the first's, live, and the
    # first one's lateness goes with them. Nor has the new one set off: no marker yet.
    other, other_orders = await technician(live, other_id, "李师傅")
    there = at(1200, -800)
    await other.ok("location", point(there, now_ms()))
    await live.assign(oid, other_id)
    await expect(page.locator("#tech-name")).to_have_text("李师傅")
    await expect(banner).to_be_hidden()
    await expect(status).to_have_text("师傅尚未出发")
    assert (await order_doc(live, oid))["order"]["late"] is None
    assert await page.locator("#tech-marker").count() == 0

    # They set off: their position on the way shows.
    await other_orders.ok("progress", {"order_id": oid, "state": "en_route"})
    await expect(page.locator("#order-state")).to_have_text("在路上")
    await expect(status).to_be_hidden()
    on_way = at(1100, -700)
    await other.ok("location", point(on_way, now_ms()))
    await marker_at(page, on_way)
    await expect(page.locator("#tech-marker")).to_have_count(1)
    await expect(eta).to_have_attribute("data-basis", "live")
    await expect(banner).to_be_hidden()
    no_page_errors(page)


# -- the ops page: the technicians' day ---------------------------------------------------------------

def plan(now: int) -> tuple[str, dict[str, int], dict[str, int], dict[str, int], bool]:
    """A day with three jobs for one technician: the first in five minutes (the
    one that will run late), two more on the same day in the technicians'
    timezone, after it when the day has room, else before it (then done)."""
    first = now + 5 * MIN
    on = datetime.fromtimestamp(first / 1000, SH).date()
    day_end = int(datetime.combine(on + timedelta(days=1), time(0), SH).timestamp() * 1000)
    after = first + 6 * HOUR <= day_end
    if after:
        return on.isoformat(), window(first), window(first + 3 * HOUR), window(first + 5 * HOUR), True
    return on.isoformat(), window(first), window(first - 4 * HOUR), window(first - 2 * HOUR), False


async def bar_lefts(page: Page, order_ids: list[str]) -> list[float]:
    out = []
    for oid in order_ids:
        box = await page.locator(f"#day-rows .bar[data-order-id='{oid}']").bounding_box()
        assert box is not None, oid
        out.append(box["x"])
    return out


async def test_ops_day_timeline_rows_bars_live_states_lateness_and_the_dispatch_record(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("day_"), **FAST, **LATE)  # its own day: no other test's jobs
    tech_id = uid("t-day-")
    tech, tech_orders = await technician(live, tech_id, "赵师傅", ["aircon"])
    await tech.ok("location", point(at(-300), now_ms()))  # close to every job's address
    date, w1, w2, w3, later = plan(now_ms())
    j1, j2, j3 = [(await live.create_order(window=w, skills=["aircon"]))["order_id"] for w in (w1, w2, w3)]
    await live.assign(j1, tech_id)
    await live.assign(j3, tech_id)
    # The second job goes through dispatch, so that it has a record to show.
    status, body = await live.http.request("POST", f"/api/orders/{j2}/dispatch", live.token("service"),
                                           json={"timeout_s": 30})
    assert status == 202, body
    offer = await tech_orders.next("offer")
    assert offer["order_id"] == j2, offer
    await tech_orders.ok("accept", {"order_id": j2})
    if not later:  # the day's earlier jobs are done by now
        for oid in (j2, j3):
            await move(live, oid, "en_route", "arrived", "in_service", "completed")

    ops = await open_page(browser, contexts,
                          f"{live.url}/ops?date={date}#token={live.token('admin', name='调度员')}")
    await expect(ops.locator("#day")).to_have_attribute("data-date", date)
    row = ops.locator(f"#day-rows .day-row[data-tech-id='{tech_id}']")
    await expect(ops.locator("#day-rows .day-row")).to_have_count(1)
    bars = row.locator(".bar")
    await expect(bars).to_have_count(3)
    assert set(await bars.evaluate_all("bs => bs.map(b => b.dataset.orderId)")) == {j1, j2, j3}
    # Placed by their windows on the axis.
    by_start = sorted((j1, j2, j3), key=lambda o: {j1: w1, j2: w2, j3: w3}[o]["start_ts"])
    lefts = await bar_lefts(ops, by_start)
    assert lefts == sorted(lefts) and len(set(lefts)) == 3, lefts
    j1_bar = row.locator(f".bar[data-order-id='{j1}']")
    await expect(j1_bar).to_have_attribute("data-state", "assigned")
    await expect(row.locator(".bar.late")).to_have_count(0)
    done = "assigned" if later else "completed"
    for oid in (j2, j3):
        await expect(row.locator(f".bar[data-order-id='{oid}']")).to_have_attribute("data-state", done)

    # Live: the technician sets off for the first job.
    await move(live, j1, "en_route")
    await expect(j1_bar).to_have_attribute("data-state", "en_route")
    await expect(j1_bar).to_have_class(re.compile(r"\bs-en_route\b"))

    # ...but from 40 km away: the first job turns late, and only it.
    far = at(FAR_M)
    await tech.ok("location", point(far, now_ms()))
    await expect(j1_bar).to_have_class(re.compile(r"\blate\b"))
    await expect(row).to_have_class(re.compile(r"\blate\b"))
    await expect(row.locator(".bar.late")).to_have_count(1)
    # On the map their marker has a red ring.
    await ops.evaluate(f"window.__rt.map.setView([{far[0]}, {far[1]}], 14, {{animate: false}})")
    marker = ops.locator(f".badge.tech[data-id='{tech_id}']")
    await marker_at(ops, far, f".badge.tech[data-id='{tech_id}']")
    await expect(marker).to_have_class(re.compile(r"\blate\b"))
    status, body = await live.http.request("GET", "/api/orders/late", live.token("service"))
    assert status == 200 and j1 in {o["order_id"] for o in body["data"]["orders"]}, body

    # A bar opens its order's dispatch record: every candidate with status and reason.
    await row.locator(f".bar[data-order-id='{j2}']").click()
    await expect(ops.locator("#dispatch")).to_have_attribute("data-order-id", j2)
    cand = ops.locator(f"#dispatch table.candidates tr[data-tech='{tech_id}']")
    await expect(cand).to_have_count(1)
    await expect(cand.locator("td").nth(2)).to_contain_text("已接单")
    # When they could be there (`arrival_ts`), and how long the drive is.
    await expect(cand.locator("td.arrival")).to_have_text(re.compile(r"^\d\d:\d\d"))
    await expect(row.locator(f".bar[data-order-id='{j2}']")).to_have_class(re.compile(r"\bselected\b"))
    await shot(ops, "ops-day")
    # One assigned by hand has none, and says so.
    await j1_bar.click()
    await expect(ops.locator("#dispatch")).to_have_attribute("data-order-id", j1)
    await expect(ops.locator("#dispatch-none")).to_have_text("该订单没有派单记录")
    await expect(ops.locator("#dispatch .late-badge")).to_be_visible()
    no_page_errors(ops)


async def test_ops_day_moves_a_reassigned_job_and_survives_bad_pushes(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("day_"))
    first, second = uid("t-a-"), uid("t-b-")
    date, w1, _, _, _ = plan(now_ms())
    oid = (await live.create_order(window=w1))["order_id"]
    await live.assign(oid, first)
    ops = await open_page(browser, contexts,
                          f"{live.url}/ops?date={date}&lang=en#token={live.token('agent', name='Mei')}",
                          VIEWPORT)
    def bar_of(tech: str) -> Locator:
        return ops.locator(f".day-row[data-tech-id='{tech}'] .bar[data-order-id='{oid}']")

    await expect(bar_of(first)).to_have_count(1)
    await live.assign(oid, second)
    await expect(bar_of(second)).to_have_count(1)
    await expect(ops.locator(f".bar[data-order-id='{oid}']")).to_have_count(1)
    await expect(ops.locator(f".day-row[data-tech-id='{first}']")).to_have_count(0)  # nothing left that day
    # Pushes with fields missing are ignored, not thrown on.
    sio_emit = """(async () => {
        const s = window.__rt.sockets.ops;
        for (const job of [null, {}, {order_id: 5}, {order_id: 'x', technician_id: 't', window: null},
                           {order_id: 'y', technician_id: 't', state: 'assigned', window: {start_ts: 'a'}},
                           {order_id: 'z', late: {minutes_late: 'soon'}, state: 'assigned'}])
          s.listeners('job').forEach((fn) => fn(job));
        return true; })()"""
    assert await ops.evaluate(sio_emit)
    await expect(ops.locator(".bar")).to_have_count(1)
    # Cancelled: the time is given back, the bar goes.
    await move(live, oid, "cancelled")
    await expect(ops.locator(".bar")).to_have_count(0)
    await expect(ops.locator("#day-rows .empty")).to_have_text("No assigned jobs on this day")
    no_page_errors(ops)
