"""The web pages in a real browser: Debian's Chromium driven by Playwright against
a live app, with Python Socket.IO clients playing the technician and the backend.

Playwright never downloads a browser here: it launches /usr/bin/chromium
(scripts/setup --test installs it with fonts-noto-cjk, so Chinese renders).
Screenshots go to test-artifacts/ and, with REALTIME_UPDATE_SCREENSHOTS=1,
to docs/screenshots/ for the README.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, ViewportSize, expect
from yarl import URL

import realtime.pages as pages
from realtime.api import CTX
from tests.conftest import StartApp
from tests.harness import ROOT, Client, free_port, uid
from tracking.geo import haversine_m

ARTIFACTS = ROOT / "test-artifacts"
SHOTS = ROOT / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1000, "height": 700}
PHONE: ViewportSize = {"width": 390, "height": 780}
WAIT_MS = 10_000
ADDR = (31.2304, 121.4737)  # live.create_order()'s address (People's Square, WGS-84)
M_PER_DEG = haversine_m(0, 0, 1, 0)
# The technician here sends points faster than the default rate limit allows.
FAST = {"location_rate": 1000.0, "location_burst": 1000.0}
# The script and console errors of each page open_page opened, as they come.
PAGE_ERRORS: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()

expect.set_options(timeout=WAIT_MS)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def at(north_m: float, east_m: float = 0.0) -> tuple[float, float]:
    lat0, lng0 = ADDR
    return (lat0 + north_m / M_PER_DEG, lng0 + east_m / (M_PER_DEG * math.cos(math.radians(lat0))))


def point(where: tuple[float, float], ts: int, **extra: Any) -> dict[str, Any]:
    return {"lat": where[0], "lng": where[1], "ts": ts, **extra}


async def open_page(browser: Browser, contexts: list[BrowserContext], url: str,
                    viewport: ViewportSize = VIEWPORT) -> Page:
    ctx = await browser.new_context(viewport=viewport, locale="zh-CN")
    contexts.append(ctx)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    PAGE_ERRORS[page] = errors
    await page.goto(url)
    return page


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.evaluate("document.getElementById('toasts')?.replaceChildren()")  # transient notes
    await page.screenshot(path=str(path))
    # The README's screenshots change only when asked for, so that a test run
    # leaves the work tree clean: REALTIME_UPDATE_SCREENSHOTS=1 scripts/test -k pages
    if os.environ.get("REALTIME_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SHOTS / f"{name}.png")


def no_page_errors(page: Page) -> None:
    """No script error and no console error, except the browser's own reports of
    the connection attempts that failed while a test had the network off."""
    errors = [e for e in PAGE_ERRORS[page] if "ERR_INTERNET_DISCONNECTED" not in e]
    assert not errors, errors


async def marker_latlng(page: Page) -> tuple[float, float]:
    el = page.locator("#tech-marker")
    lat, lng = await el.get_attribute("data-lat"), await el.get_attribute("data-lng")
    return float(lat or "nan"), float(lng or "nan")


async def marker_at(page: Page, where: tuple[float, float], selector: str = "#tech-marker") -> None:
    """Waits until the marker (its animation done) stands at `where`."""
    await page.wait_for_function(
        """([sel, lat, lng]) => { const el = document.querySelector(sel);
             const near = (a, b) => Math.abs(a - b) < 2e-6;
             return el && near(+el.dataset.lat, lat) && near(+el.dataset.lng, lng); }""",
        arg=[selector, where[0], where[1]], timeout=WAIT_MS)


async def eta_s(page: Page) -> float:
    raw = await page.locator("#eta").get_attribute("data-eta-s")
    assert raw is not None
    return float(raw)


# -- HTTP: the routes, the vendor files, the dev sign-in endpoint ---------------------------------

async def test_pages_vendor_files_and_dev_token(start_app: StartApp, monkeypatch: pytest.MonkeyPatch) -> None:
    live = await start_app()
    session = live.http.session
    async with session.get(live.url + "/console") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert '<script id="rt-config" type="application/json">' in html and '"dev":false' in html
    assert "script-src 'self'" in csp and resp.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/ops", "/track/o-1", "/static/common.js", "/static/style.css",
                 "/static/vendor/socket.io.min.js", "/static/vendor/leaflet.js",
                 "/static/vendor/leaflet.css", "/static/vendor/images/layers.png"):
        async with session.get(live.url + path) as resp:
            assert resp.status == 200, path
    for path in ("/static/vendor/package.json", "/static/vendor/..%2F..%2Fpackage.json",
                 "/static/..%2F..%2Fpyproject.toml", "/static/%2E%2E/realtime/pages.py", "/track/a%20b"):
        async with session.get(URL(live.url + path, encoded=True)) as resp:
            assert resp.status in (403, 404), path

    # Not in dev mode: the dev sign-in does not exist (and needs no bearer to say so).
    status, body = await live.http.request("POST", "/api/dev/token", json={"role": "agent", "sub": "a1"})
    assert status == 404 and body["error"]["code"] == "not_found", body

    # No npm packages: the pages still load, the vendor files say what to run.
    monkeypatch.setattr(pages, "NODE_MODULES", Path("/nonexistent/node_modules"))
    async with session.get(live.url + "/static/vendor/leaflet.js") as resp:
        assert resp.status == 503 and "scripts/setup" in await resp.text()
    async with session.get(live.url + "/console") as resp:
        assert resp.status == 200

    dev = await start_app(dev=True)
    status, body = await dev.http.request("POST", "/api/dev/token",
                                          json={"role": "technician", "sub": "t-1", "name": "张师傅",
                                                "skills": ["aircon"]})
    assert status == 200, body
    p = dev.app[CTX].verifier.verify(body["data"]["token"])
    assert (p.id, p.role, p.name, p.skills) == ("t-1", "technician", "张师傅", ("aircon",))
    status, body = await dev.http.request("POST", "/api/dev/token", json={"role": "root", "sub": "x"})
    assert status == 400 and body["error"]["code"] == "invalid", body
    async with session.get(dev.url + "/ops") as resp:
        assert '"dev":true' in await resp.text()


# -- the customer's tracking page ------------------------------------------------------------------

async def test_customer_sees_technician_approach_and_arrive(start_app: StartApp, browser: Browser,
                                                            contexts: list[BrowserContext]) -> None:
    live = await start_app(**FAST)
    order = await live.create_order()
    oid, cust = order["order_id"], order["customer_id"]
    tech_id = uid("t-")
    await live.assign(oid, tech_id)
    tech = await live.client("technician", tech_id, namespace="/tracking", name="张师傅")
    tech_orders = await live.client("technician", tech_id, namespace="/orders", name="张师傅")
    # Before setting off the technician is somewhere of their own, 1.5 km away (a fix
    # four minutes old).
    start = at(-1500)
    assert (await tech.ok("location", point(start, now_ms() - 240_000)))["status"] == "accepted"

    token = live.token("customer", cust, name="王女士")
    page = await open_page(browser, contexts, f"{live.url}/track/{oid}#token={token}")
    await expect(page.locator("#order-state")).to_have_text("已分配")
    await expect(page.locator("#tech-name")).to_have_text("张师傅")
    # Not on the way yet: when they could come (from where they are, leaving now), never where.
    status = page.locator("#tech-status")
    eta = page.locator("#eta")
    await expect(status).to_have_text("师傅尚未出发")
    await expect(status).to_have_attribute("data-status", "not_started")
    await expect(eta).to_have_attribute("data-basis", "idle")
    await expect(eta).to_have_text(re.compile(r"^预计 \d+ 分钟 后到达$"))
    await expect(page.locator("#tech-marker")).to_have_count(0)
    await expect(page.locator("#last-seen")).to_be_hidden()
    # The token left the address bar for this tab's sessionStorage; never a query string.
    assert "token" not in page.url
    assert await page.evaluate("sessionStorage.getItem('rt.token')") == token

    await tech_orders.ok("progress", {"order_id": oid, "state": "en_route"})
    await expect(page.locator("#order-state")).to_have_text("在路上")
    await expect(page.locator("#timeline li.current")).to_have_attribute("data-state", "en_route")
    # On the way: the status line goes; the fix from before setting off is not theirs to show.
    await expect(status).to_be_hidden()
    await expect(eta).to_have_text("正在获取师傅位置…")
    await expect(page.locator("#tech-marker")).to_have_count(0)

    # On the way, the app uploads its last fix late: three minutes old (no signal since).
    # The page must say so rather than look live.
    assert (await tech.ok("location", point(start, now_ms() - 180_000)))["status"] == "accepted"
    await expect(page.locator("#last-seen")).to_have_text("最后更新于 3 分钟前")
    lat0, lng0 = await marker_latlng(page)
    assert abs(lat0 - start[0]) < 1e-5 and abs(lng0 - start[1]) < 1e-5

    # Drive north 100 m per fix, 2 s apart (fix times end near now).
    t0 = now_ms() - 26_000
    etas: list[float] = []
    for i in range(1, 13):
        where = at(-1500 + 100 * i)
        if i == 6:  # the marker glides between fixes instead of jumping
            await marker_at(page, at(-1000))
            sampler = asyncio.ensure_future(page.evaluate("""() => new Promise((resolve) => {
                const el = document.getElementById('tech-marker'), seen = [], t = performance.now();
                (function frame() { seen.push(el.dataset.lat);
                  performance.now() - t < 1200 ? requestAnimationFrame(frame) : resolve(seen); })(); })"""))
            await asyncio.sleep(0.1)
        ts = t0 + 2000 * i
        await tech.ok("location", point(where, ts, speed=12.0))
        if i == 6:
            samples = [float(v) for v in await sampler]
            between = {round(v, 6) for v in samples if at(-1000)[0] + 1e-6 < v < where[0] - 1e-6}
            assert len(between) >= 3, samples
        await expect(page.locator("#tech-marker")).to_have_attribute("data-ts", str(ts))
        etas.append(await eta_s(page))
    await marker_at(page, where)
    await expect(page.locator("#last-seen")).to_be_hidden()
    assert etas[-1] < etas[0] and etas == sorted(etas, reverse=True), etas
    await expect(page.locator("#eta")).to_contain_text("预计")
    # The technician writes in the order chat (the page's first tab).
    tech_chat = await live.client("technician", tech_id, namespace="/chat", name="张师傅")
    conv = (await tech_chat.ok("open", {"kind": "order", "order_id": oid}))["conversation"]
    await tech_chat.ok("send", {"conversation_id": conv["conversation_id"], "client_msg_id": "m-1",
                                "body": "您好，我是张师傅，马上就到。"})
    await expect(page.locator("#messages .msg.theirs .body")).to_have_text(["您好，我是张师傅，马上就到。"])
    await shot(page, "track")

    # Inside the 100 m geofence twice: the server moves the order to 已到达 by itself.
    for i, north in enumerate((-200, -100, -40, -10), start=13):
        await tech.ok("location", point(at(north), t0 + 2000 * i, speed=8.0))
    await expect(page.locator("#order-state")).to_have_text("已到达")
    await expect(page.locator("#eta")).to_have_text("师傅已到达")
    trail = await page.evaluate(f"JSON.parse(sessionStorage.getItem('rt.trail.{oid}'))")
    assert len(trail) >= 12
    steps = await page.locator("#timeline li.done").evaluate_all("els => els.map(e => e.dataset.state)")
    assert steps == ["created", "assigned", "en_route", "arrived"]

    # Service starts: the position is no longer shown (privacy), the timeline moves on.
    await tech_orders.ok("progress", {"order_id": oid, "state": "in_service"})
    await expect(page.locator("#order-state")).to_have_text("服务中")
    await expect(page.locator("#tech-marker")).to_have_count(0)
    assert await page.evaluate(f"sessionStorage.getItem('rt.trail.{oid}')") is None  # nor the trail
    await expect(page.locator("#tech-name")).to_have_text("张师傅")
    await tech_orders.ok("progress", {"order_id": oid, "state": "completed"})
    await expect(page.locator("#rate-form")).to_be_visible()
    form = page.locator("#rate-form")
    for name, stars in (("stars", 5), ("quality", 5), ("attitude", 4), ("efficiency", 5)):
        await form.locator(f".stars[data-name={name}] button").nth(stars - 1).click()
    await form.locator("textarea").fill("师傅很专业")
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#rating-done")).to_contain_text("★★★★★")
    await page.locator("details.refund summary").click()
    await page.locator("#refund-form textarea").fill("空调还是不制冷")
    await page.locator("#refund-form button[type=submit]").click()
    await expect(page.locator("#order-state")).to_have_text("退款申请中")
    await expect(page.locator("#timeline li.current")).to_have_attribute("data-state", "refund_requested")
    _, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service"))
    assert body["data"]["order"]["rating"]["attitude"] == 4
    no_page_errors(page)

    phone = await open_page(browser, contexts, f"{live.url}/track/{oid}#token={token}", PHONE)
    await expect(phone.locator("#order-state")).to_have_text("退款申请中")
    assert await phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await shot(phone, "track-phone")


# -- support chat: customer page <-> agent console --------------------------------------------------

async def test_console_takes_queued_conversation_and_the_page_catches_up_after_offline(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("pages_"))  # its own support queue
    order = await live.create_order()
    oid, cust = order["order_id"], order["customer_id"]
    agent_id = uid("a-")
    console = await open_page(browser, contexts,
                              f"{live.url}/console#token={live.token('agent', agent_id, name='小美')}")
    await expect(console.locator("#avail")).to_have_attribute("aria-checked", "false")
    await expect(console.locator("#queue .empty")).to_be_visible()
    customer = await open_page(browser, contexts,
                               f"{live.url}/track/{oid}#token={live.token('customer', cust, name='王女士')}")
    await expect(customer.locator("#order-state")).to_have_text("已预约")

    # The customer asks for support and waits in the queue; the console shows the wait.
    await customer.locator(".tabs [data-tab=support]").click()
    await customer.locator("#support-start").click()
    await expect(customer.locator("#chat-status")).to_have_text("排队中，您是第 1 位")
    await expect(console.locator("#queue .item")).to_have_count(1)
    await expect(console.locator("#queue .item .wait")).to_contain_text("秒")
    await shot(console, "console-queue")

    # Available: the router hands the conversation to this agent.
    await console.locator("#avail").click()
    await expect(console.locator("#avail")).to_have_attribute("aria-checked", "true")
    await expect(console.locator("#mine .item")).to_have_count(1)
    await expect(console.locator("#conv-title")).to_have_text(f"订单 {oid} 咨询")
    await expect(console.locator("#queue .item")).to_have_count(0)
    await expect(customer.locator("#chat-status")).to_have_text("客服已接入，请描述您的问题")
    await expect(console.locator("#card-state")).to_have_text("已预约")  # the order card

    # Round trip, with the typing indicator and the read marker.
    await customer.locator("#chat-input").fill("师傅几点到？")
    await expect(console.locator("#typing")).to_have_text("对方正在输入…")
    await customer.locator("#chat-input").press("Enter")
    await expect(console.locator("#messages .msg.theirs .body")).to_have_text(["师傅几点到？"])
    await expect(customer.locator("#messages .msg.mine .meta")).to_contain_text("已读")
    reply = "您好，师傅大约 30 分钟后到。"
    await console.locator("#chat-input").fill(reply)
    await console.locator("#chat-input").press("Enter")
    await expect(customer.locator("#messages .msg.theirs .body")).to_have_text([reply])

    # The customer's network drops. Meanwhile the agent writes twice and the order moves.
    await customer.context.set_offline(True)
    await expect(customer.locator("body")).to_have_attribute("data-online", "0")
    await expect(customer.locator("#conn")).to_have_text("连接已断开，正在重新连接…")
    for text in ("第一条：已为您催单", "第二条：师傅已接单"):
        await console.locator("#chat-input").fill(text)
        await console.locator("#chat-input").press("Enter")
        await expect(console.locator("#messages .msg.mine .body").last).to_have_text(text)
    await expect(console.locator("#messages .msg.pending")).to_have_count(0)
    await live.assign(oid, uid("t-"))
    await asyncio.sleep(0.5)
    assert await customer.locator("#messages .msg").count() == 2  # nothing arrived while offline

    await customer.context.set_offline(False)
    await expect(customer.locator("body")).to_have_attribute("data-online", "1", timeout=15_000)
    bodies = customer.locator("#messages .msg .body")
    await expect(bodies).to_have_text(["师傅几点到？", reply,
                                       "第一条：已为您催单", "第二条：师傅已接单"])
    seqs = await customer.locator("#messages .msg").evaluate_all("els => els.map(e => +e.dataset.seq)")
    assert seqs == [1, 2, 3, 4], seqs  # once each, in order
    await expect(customer.locator("#order-state")).to_have_text("已分配")
    await expect(console.locator("#card-state")).to_have_text("已分配")
    # The order chat got the timeline card too, once.
    await customer.locator(".tabs [data-tab=order]").click()
    await expect(customer.locator("#messages .msg.system")).to_have_text(
        [re.compile("^订单状态：已预约 · "), re.compile("^订单状态：已分配 · ")])
    await customer.locator(".tabs [data-tab=support]").click()
    await shot(customer, "track-chat")
    await shot(console, "console")

    # After a cluster outage the server asks everyone to replay: nothing shows twice.
    sio = live.app[CTX].sio
    for ns in ("/orders", "/chat", "/tracking"):
        await sio.emit("resync", {"reason": "cluster_link_restored"}, namespace=ns)
    await console.locator("#chat-input").fill("第三条：回来了")
    await console.locator("#chat-input").press("Enter")
    await expect(bodies).to_have_count(5)
    seqs = await customer.locator("#messages .msg").evaluate_all("els => els.map(e => +e.dataset.seq)")
    assert seqs == [1, 2, 3, 4, 5], seqs

    # Close from the console: the customer sees it end.
    console.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await console.locator("#close-conv").click()
    await expect(customer.locator("#chat-status")).to_have_text("会话已结束")

    # A second customer is routed to this agent: unread count, then a transfer.
    other_agent_id = uid("a-")
    other_agent = await live.client("agent", other_agent_id, namespace="/chat", name="小刚")
    second = await live.client("customer", uid("c-"), namespace="/chat", name="刘先生")
    cid = (await second.ok("open", {"kind": "support", "topic": "发票"}))["conversation"]["conversation_id"]
    for i, text in enumerate(("你好", "想开发票")):
        await second.ok("send", {"conversation_id": cid, "client_msg_id": f"m{i}", "body": text})
    item = console.locator(f"#mine .item[data-id='{cid}']")
    await expect(item.locator(".badge-n")).to_have_text("2")
    await item.click()
    await expect(item.locator(".badge-n")).to_have_count(0)
    await expect(console.locator("#messages .msg.theirs .body")).to_have_text(["你好", "想开发票"])
    await console.locator("#transfer-to").fill(other_agent_id)
    await console.locator("#transfer-form button").click()
    moved = await other_agent.next("conversation")
    assert moved["conversation_id"] == cid and moved["assignee"] == other_agent_id, moved
    await expect(item).to_contain_text("已转出")
    await expect(console.locator("#composer")).to_be_hidden()
    no_page_errors(console)
    no_page_errors(customer)


# -- the console: refunds and the feedback inbox -------------------------------------------------------

async def test_console_decides_a_refund_and_lists_feedback(start_app: StartApp, browser: Browser,
                                                           contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("pages_"))  # its own feedback inbox
    order = await live.create_order()
    oid, cust = order["order_id"], order["customer_id"]
    cust_orders = await live.client("customer", cust)
    await cust_orders.ok("cancel", {"order_id": oid, "reason": "时间冲突"})
    await cust_orders.ok("request_refund", {"order_id": oid, "reason": "已取消，请退款"})
    status, _ = await live.http.request("POST", "/api/feedback", live.token("customer", cust, name="周女士"),
                                        json={"category": "app", "body": "页面很清楚", "order_id": oid})
    assert status == 201

    token = live.token("agent", name="小美")
    console = await open_page(browser, contexts, f"{live.url}/console#token={token}")
    await console.locator("#lookup-id").fill(oid)
    await console.locator("#lookup-id").press("Enter")
    await expect(console.locator("#card-state")).to_have_text("退款申请中")
    await console.locator("#refund-note").fill("已核实")
    await console.locator("#refund-approve").click()
    await expect(console.locator("#card-state")).to_have_text("已退款")
    await console.locator("#side-tabs [data-tab=feedback]").click()
    await expect(console.locator("#feedback .fb-body")).to_have_text(["页面很清楚"])
    _, body = await live.http.request("GET", f"/api/orders/{oid}", live.token("service"))
    assert body["data"]["events"][-1]["data"] == {"note": "已核实"}
    no_page_errors(console)


# -- the ops map ------------------------------------------------------------------------------------------

async def test_ops_map_shows_technicians_by_status_and_a_dispatch_record(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(**FAST)
    # Three technicians around People's Square: one on an order, one free, one gone offline.
    busy_id, free_id, gone_id, other_id = (uid("t-busy-"), uid("t-free-"), uid("t-gone-"), uid("t-plumb-"))
    active = await live.create_order()
    await live.assign(active["order_id"], busy_id)
    # On a job under way ("busy" on the map); for an order with a window that is
    # a question of the schedule, not a reason to skip (docs/dispatch.md): they
    # are eligible, ranked by when they could arrive after that job.
    status, reply = await live.post_event(active["order_id"], "en_route")
    assert status == 200, reply
    techs: dict[str, Client] = {}
    for tid, name, where, skills in ((busy_id, "张师傅", at(-800, -600), ["aircon"]),
                                     (free_id, "李师傅", at(400, 700), ["aircon"]),
                                     (gone_id, "孙师傅", at(900, -300), ["aircon"]),
                                     (other_id, "王师傅", at(-300, 900), ["plumbing"])):
        techs[tid] = await live.client("technician", tid, namespace="/tracking", name=name, skills=skills)
        await techs[tid].ok("location", point(where, now_ms() - 20_000))
    await techs[gone_id].close()

    order = await live.create_order(skills=["aircon"])
    status, body = await live.http.request("POST", f"/api/orders/{order['order_id']}/dispatch",
                                           live.token("service"), json={"timeout_s": 30})
    assert status == 202, body

    ops = await open_page(browser, contexts, f"{live.url}/ops#token={live.token('admin', name='调度员')}")
    for tid, st in ((busy_id, "busy"), (free_id, "available"), (gone_id, "offline"), (other_id, "available")):
        await expect(ops.locator(f".badge.tech[data-id='{tid}']")).to_have_attribute("data-status", st)
    counts = ops.locator("#area-counts li .n")
    await expect(counts).to_have_text(["2", "1", "1"])  # available, busy, offline
    await expect(ops.locator("#totals")).to_contain_text("在线师傅 3")

    # Live: a move arrives in the next positions batch.
    moved = at(500, 650)
    assert (await techs[free_id].ok("location", point(moved, now_ms())))["status"] == "accepted"
    await marker_at(ops, moved, f".badge.tech[data-id='{free_id}']")

    # The dispatch record, with a reason for every technician considered.
    await ops.locator("#dispatch-order").fill(order["order_id"])
    await ops.locator("#dispatch-order").press("Enter")
    rows = ops.locator("#dispatch table.candidates tbody tr")
    await expect(rows).to_have_count(4)
    reasons = dict(zip(await rows.evaluate_all("rs => rs.map(r => r.dataset.tech)"),
                       await rows.locator("td:nth-child(4)").all_text_contents(), strict=True))
    assert reasons == {free_id: "—", busy_id: "—", gone_id: "离线",
                       other_id: "技能不符"}, reasons
    offered = ops.locator(f"#dispatch tr[data-tech='{free_id}'] td:nth-child(3)")
    await expect(offered).to_contain_text("已发送")
    await shot(ops, "ops")

    # Panning away re-watches the new area: nobody there.
    await ops.evaluate("window.__rt.map.setView([31.30, 121.60], 15, {animate: false})")
    await expect(ops.locator("#area-counts li .n")).to_have_text(["0", "0", "0"])
    await expect(ops.locator(".badge.tech")).to_have_count(0)
    # English on request, remembered.
    await ops.locator("#lang").click()
    await expect(ops.locator("h1")).to_have_text("Ops map")
    assert await ops.evaluate("localStorage.getItem('rt.lang')") == "en"
    no_page_errors(ops)


# -- dev sign-in ---------------------------------------------------------------------------------------

async def test_dev_sign_in_form_and_unreachable_tiles(start_app: StartApp, browser: Browser,
                                                      contexts: list[BrowserContext]) -> None:
    # Nothing listens on that port: the tile layer fails and the map keeps its plain background.
    live = await start_app(dev=True, tile_url=f"http://127.0.0.1:{free_port()}/{{z}}/{{x}}/{{y}}.png")
    page = await open_page(browser, contexts, f"{live.url}/ops?lang=en")
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#signin-title")).to_have_text("Sign in")
    await page.locator("#dev-sub").fill("a-dev-1")
    await page.locator("#dev-name").fill("Mei")
    await page.locator("#dev-signin").click()
    await expect(page.locator("#signin")).to_have_count(0)
    await expect(page.locator("#who")).to_have_text("Mei · Agent")
    await expect(page.locator("body")).to_have_attribute("data-online", "1")
    assert "token" not in page.url
    await expect(page.locator("#map")).to_have_attribute("data-tiles", "unreachable")
    assert await page.locator(".leaflet-tile-pane canvas").count() > 0  # the plain grid
    errors = [e for e in PAGE_ERRORS[page] if "ERR_CONNECTION_REFUSED" not in e]
    assert not errors, errors
