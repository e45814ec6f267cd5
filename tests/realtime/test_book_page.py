"""The booking page `/book` in a real browser (Debian's Chromium driven by
Playwright, as in tests/realtime/test_pages.py) against a live app in dev
mode: two customers' pages see each other's holds live, a hold that expires
resets the page, and "pay" (the dev-only `POST /api/dev/pay`) confirms the
hold and opens the order's tracking page. Also: the dev payment's refusals,
its absence outside dev mode, and the demo's calendars (the slots /book shows
there, and the demo's own orders still assigned).
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from playwright.async_api import Browser, BrowserContext, expect

from realtime.demo import BOOKABLE, Demo
from realtime.pages import paid_order_id
from tests.conftest import Live, StartApp
from tests.harness import uid, until
from tests.realtime.test_pages import (
    PHONE,
    WAIT_MS,
    no_page_errors,
    open_page,
    shot,
)

SH = ZoneInfo("Asia/Shanghai")
CENTRE = (31.2304, 121.4737)  # the page's default place
ALL_DAY = [{"weekday": d, "start": "00:00", "end": "00:00"} for d in range(7)]
SERVICE = {"code": "aircon_repair", "name": "空调维修"}
ADDRESS = {"lat": CENTRE[0], "lng": CENTRE[1], "text": "上海市黄浦区人民广场 1 号"}

expect.set_options(timeout=WAIT_MS)


def tomorrow() -> date:
    """The page's second day tab: whole in the future, whatever the time now."""
    return datetime.now(SH).date() + timedelta(days=1)


def at(day: date, hh: int, mm: int = 0) -> int:
    return int(datetime.combine(day, time(hh, mm), SH).timestamp() * 1000)


async def set_calendar(live: Live, tech: str, skills: list[str]) -> None:
    body = {"weekly": ALL_DAY, "skills": skills, "home": {"lat": CENTRE[0], "lng": CENTRE[1]},
            "area": {"circle": {"lat": CENTRE[0], "lng": CENTRE[1], "radius_m": 20_000}}}
    status, reply = await live.http.request("PUT", f"/api/technicians/{tech}/calendar",
                                            live.token("service"), json=body)
    assert status == 200, reply


def book_url(live: Live, customer: str, name: str, query: str = "") -> str:
    return f"{live.url}/book{query}#token={live.token('customer', customer, name=name)}"


# -- the page --------------------------------------------------------------------------------------

async def test_two_pages_see_each_others_hold_live_and_one_pays_into_tracking(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    # Its own store: the page asks for the real skill `aircon`, which no other test's
    # technicians may add to.
    live = await start_app(dev=True, mongo_db=uid("book_"))
    tech = uid("t-")
    await set_calendar(live, tech, ["aircon"])  # one technician: a hold takes the slot
    day = tomorrow()
    ten = at(day, 10)
    a = await open_page(browser, contexts, book_url(live, uid("c-a-"), "王女士"), PHONE)
    buyer = uid("c-b-")
    b = await open_page(browser, contexts, book_url(live, buyer, "刘先生"))
    for page in (a, b):
        await expect(page.locator("#services [data-skill=aircon]")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator("#slots")).to_have_attribute("data-state", "ready")
        await page.locator(f"#days [data-day='{day.isoformat()}']").click()
    slot_a = a.locator(f"#slots .slot[data-start='{ten}']")
    slot_b = b.locator(f"#slots .slot[data-start='{ten}']")
    for slot in (slot_a, slot_b):
        await expect(slot).to_be_enabled()
        await expect(slot).to_have_attribute("data-count", "1")
        await expect(slot.locator(".t")).to_have_text("10:00")

    # A holds 10:00: a countdown from five minutes; B sees the time go grey, live.
    await slot_a.click()
    await expect(a.locator("#hold")).to_be_visible()
    await expect(a.locator("#hold-countdown")).to_have_text(re.compile(r"^0[45]:[0-5]\d$"))
    await expect(a.locator("#hold-what")).to_contain_text("空调维修")
    await expect(slot_a).to_have_class(re.compile(r"\bmine\b"))
    await expect(slot_b).to_be_disabled()
    await expect(slot_b).to_have_attribute("data-count", "0")
    await expect(slot_b.locator(".n")).to_have_text("已约满")
    # The countdown runs (waits for the text to change; no fixed sleep).
    first = await a.locator("#hold-countdown").get_attribute("data-left-s")
    await expect(a.locator("#hold-countdown")).not_to_have_attribute("data-left-s", first or "")
    await shot(a, "book-phone")

    # A lets it go: B can have it again.
    await a.locator("#release").click()
    await expect(a.locator("#hold")).to_be_hidden()
    await expect(slot_b).to_be_enabled()
    await expect(slot_b).to_have_attribute("data-count", "1")

    # B holds it (A sees it go), pays, and lands on the order's tracking page.
    await slot_b.click()
    await expect(b.locator("#hold")).to_be_visible()
    await expect(slot_a).to_be_disabled()
    hold_id = await b.locator("#hold").get_attribute("data-hold-id")
    assert hold_id
    await shot(b, "book")
    await b.locator("#address-text").fill("人民大道 200 号 3 楼")
    await b.locator("#pay").click()
    order_id = paid_order_id(hold_id)
    await b.wait_for_url(f"{live.url}/track/{order_id}", timeout=WAIT_MS)
    await expect(b.locator("#order-state")).to_have_text("已分配")
    await expect(b.locator("#service")).to_have_text("空调维修")
    await expect(slot_a).to_be_disabled()  # booked now, not held
    status, body = await live.http.request("GET", f"/api/orders/{order_id}", live.token("service"))
    assert status == 200, body
    order = body["data"]["order"]
    assert (order["state"], order["technician_id"], order["customer_id"]) == ("assigned", tech, buyer)
    assert order["window"] == {"start_ts": ten, "end_ts": ten + 3_600_000}
    assert order["address"]["text"] == "人民大道 200 号 3 楼" and order["skills"] == ["aircon"]
    assert await b.evaluate("sessionStorage.getItem('rt.book.hold')") is None
    no_page_errors(a)
    no_page_errors(b)


async def test_an_expired_hold_resets_the_page(start_app: StartApp, browser: Browser,
                                              contexts: list[BrowserContext]) -> None:
    live = await start_app(dev=True, mongo_db=uid("book_"), hold_ttl_s=2.0)
    await set_calendar(live, uid("t-"), ["plumbing"])
    page = await open_page(browser, contexts, book_url(live, uid("c-"), "Ann", "?lang=en"))
    await expect(page.locator("h1")).to_have_text("Book a service")
    await page.locator("#services [data-skill=plumbing]").click()
    await expect(page.locator("#services [data-skill=plumbing]")).to_have_attribute("aria-pressed", "true")
    day = tomorrow()
    await page.locator(f"#days [data-day='{day.isoformat()}']").click()
    slot = page.locator(f"#slots .slot[data-start='{at(day, 14)}']")
    await expect(slot).to_be_enabled()
    await slot.click()
    await expect(page.locator("#hold")).to_be_visible()
    await expect(slot).to_have_attribute("data-count", "0")
    # Two seconds later the server's sweep ends it: `hold_ended {reason: expired}`.
    await expect(page.locator("#hold")).to_be_hidden()
    await expect(page.locator("#toasts")).to_contain_text("Your hold expired")
    await expect(slot).to_be_enabled()
    await expect(slot).to_have_attribute("data-count", "1")
    assert await page.evaluate("sessionStorage.getItem('rt.book.hold')") is None
    no_page_errors(page)


# -- the dev payment -------------------------------------------------------------------------------

async def test_dev_pay_confirms_only_the_callers_own_hold_and_only_in_dev_mode(start_app: StartApp) -> None:
    live = await start_app(dev=True, mongo_db=uid("book_"))
    skill, tech = uid("skill-"), uid("t-")
    await set_calendar(live, tech, [skill])
    owner = uid("c-")
    client = await live.client("customer", owner, namespace="/booking")
    ten = at(tomorrow(), 10)
    held = await client.ok("hold", {"start_ts": ten, "duration_min": 60, "lat": CENTRE[0],
                                    "lng": CENTRE[1], "skill": skill})
    hid = held["hold_id"]
    mine = live.token("customer", owner)

    async def pay(token: str, body: Any) -> tuple[int, Any]:
        return await live.http.request("POST", "/api/dev/pay", token, json=body)

    good = {"hold_id": hid, "service": SERVICE, "address": ADDRESS}
    for bad, field in (({"hold_id": hid, "service": SERVICE}, "address"),
                       ({**good, "address": {**ADDRESS, "lat": 91}}, "address.lat"),
                       ({**good, "hold_id": "a b"}, "hold_id"),
                       ({**good, "extra": 1}, "extra")):
        status, body = await pay(mine, bad)
        assert status == 400 and body["error"]["code"] == "invalid", body
        assert field in {d["field"] for d in body["error"]["details"]}, body
    status, body = await live.http.request("POST", "/api/dev/pay", mine, data=b"[1,",
                                           headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid", body
    status, body = await live.http.request("POST", "/api/dev/pay", None, json=good)
    assert status == 401, body

    # Someone else's hold, or not a customer at all: forbidden. No such hold: not found.
    for token in (live.token("customer"), live.token("service"), live.token("technician", tech)):
        status, body = await pay(token, good)
        assert status == 403 and body["error"]["code"] == "forbidden", body
    status, body = await pay(mine, {**good, "hold_id": "h-nope"})
    assert status == 404 and body["error"]["code"] == "not_found", body
    status, body = await live.http.request("GET", f"/api/holds/{hid}", live.token("service"))
    assert body["data"]["hold"]["state"] == "live", body  # none of that touched it

    # The owner pays: the hold becomes its order, assigned; paying again is the same order.
    status, body = await pay(mine, good)
    assert status == 201 and body["data"]["created"] is True, body
    order = body["data"]["order"]
    assert order["order_id"] == paid_order_id(hid)
    assert (order["state"], order["technician_id"], order["customer_id"], order["hold_id"]) == (
        "assigned", tech, owner, hid)
    assert order["service"] == SERVICE and order["window"]["start_ts"] == ten
    ended = await client.next("hold_ended")
    assert {k: ended[k] for k in ("hold_id", "reason", "start_ts", "end_ts")} == {
        "hold_id": hid, "reason": "confirmed", "start_ts": ten, "end_ts": ten + 3_600_000}
    assert ended["order_id"] == order["order_id"], ended
    status, again = await pay(mine, good)
    assert status == 200 and again["data"]["created"] is False, again
    assert again["data"]["order"]["order_id"] == order["order_id"]
    _, body = await live.http.request("GET", f"/api/orders/{order['order_id']}", live.token("service"))
    assert [e["state"] for e in body["data"]["events"]] == ["created", "assigned"]
    assert body["data"]["events"][1]["actor"] == {"id": "demo-backend", "role": "service"}
    # A released hold cannot be paid for.
    other = await client.ok("hold", {"start_ts": at(tomorrow(), 15), "duration_min": 60,
                                     "lat": CENTRE[0], "lng": CENTRE[1], "skill": skill})
    await client.ok("release", {"hold_id": other["hold_id"]})
    status, body = await pay(mine, {**good, "hold_id": other["hold_id"]})
    assert status == 409 and body["error"]["code"] == "conflict", body

    # Not in dev mode: the route does not exist, and the page does not offer it.
    plain = await start_app(mongo_db=uid("book_"))
    status, body = await plain.http.request("POST", "/api/dev/pay", plain.token("customer", owner),
                                            json=good)
    assert status == 404 and body["error"]["code"] == "not_found", body
    async with plain.http.session.get(plain.url + "/book") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert '"dev":false' in html and '<script type="module" src="/static/book.js">' in html
    for path in ("/static/book.js", "/static/i18n.js"):
        async with plain.http.session.get(plain.url + path) as resp:
            assert resp.status == 200, path


# -- the demo --------------------------------------------------------------------------------------

async def test_the_demo_sets_calendars_so_book_shows_its_technicians_and_its_orders_still_go(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(dev=True, mongo_db=uid("demo_"))
    demo = Demo(live.settings, live.url, live.url)
    try:
        await demo.start()
        status, body = await live.http.request("GET", "/api/technicians/t-zhang/calendar",
                                               live.token("service"))
        assert status == 200, body
        cal = body["data"]["calendar"]
        assert set(cal["skills"]) == {"aircon", "appliance"} and cal["home"] is not None
        assert len(cal["weekly"]) == 7 and cal["area"]["circle"]["radius_m"] > 0

        # The demo's first order (now + 10 min) fits 张师傅's calendar: dispatched to him.
        featured = f"o-{demo.run_id}-1"

        async def assigned() -> bool:
            _, got = await live.http.request("GET", f"/api/orders/{featured}", live.token("service"))
            order = got["data"]["order"]
            return bool(order["state"] != "created" and order.get("technician_id") == "t-zhang")

        await until(assigned, 30, every=0.25, what="the demo's first order assigned")

        # /book at the centre: tomorrow 10:00 has every air-con technician, simulated
        # (all day) and bookable only (daytime).
        aircon = 3 + sum("aircon" in skills for _, skills, _ in BOOKABLE)
        page = await open_page(browser, contexts, book_url(live, uid("c-"), "王女士"), PHONE)
        day = tomorrow()
        await page.locator(f"#days [data-day='{day.isoformat()}']").click()
        ten = page.locator(f"#slots .slot[data-start='{at(day, 10)}']")
        await expect(ten).to_have_attribute("data-count", str(aircon))
        # Night: only the simulated technicians work.
        await expect(page.locator(f"#slots .slot[data-start='{at(day, 2)}']")).to_have_attribute(
            "data-count", "3")
        no_page_errors(page)
    finally:
        await demo.stop()
