"""The "Notify me" button of the customer's tracking page (Web Push) and the notifications
missed while the page was closed, in a real browser against a live app, as in
tests/realtime/test_pages.py.

What a test can do for real here: /sw.js is served with the headers a root
service worker needs and registers (`navigator.serviceWorker.ready`), the
page fetches the server's key, and the worker turns a push payload into a
notification. What it cannot: reach a push service. Playwright's contexts
are incognito profiles, where Chromium refuses `pushManager.subscribe`
("Registration failed - permission denied"), and this machine has no route
to one anyway; so the test checks that the page says so plainly and stays
usable, then drives the subscription API the page calls (POST/DELETE
/api/push/subscriptions) from the page with a generated P-256 key, the way
`PushSubscription.toJSON()` shapes it.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.async_api import Browser, BrowserContext, Page, Worker, expect

from realtime.api import SERVICES
from tests.conftest import Live, StartApp
from tests.harness import uid, until
from tests.realtime.test_pages import PAGE_ERRORS, VIEWPORT, WAIT_MS

expect.set_options(timeout=WAIT_MS)

# Chromium's own console note when a page subscribes in an incognito profile
# (every Playwright context): not an error of the page.
INCOGNITO_PUSH = "does not support the Push API in incognito mode"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def browser_keys() -> dict[str, str]:
    """What a browser's PushSubscription.toJSON() holds in `keys`: its P-256
    public key (65 bytes, uncompressed) and a 16-byte auth secret, base64url."""
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"p256dh": b64url(point), "auth": b64url(os.urandom(16))}


async def open_track(browser: Browser, contexts: list[BrowserContext], live: Live, order_id: str,
                     customer_id: str, *, notifications: bool) -> Page:
    ctx = await browser.new_context(viewport=VIEWPORT, locale="zh-CN")
    contexts.append(ctx)
    if notifications:
        await ctx.grant_permissions(["notifications"], origin=live.url)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and INCOGNITO_PUSH not in m.text else None)
    PAGE_ERRORS[page] = errors
    token = live.token("customer", customer_id, name="王女士")
    await page.goto(f"{live.url}/track/{order_id}#token={token}")
    return page


async def page_fetch(page: Page, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """A call from the page, with its own token, as its scripts make them."""
    reply: dict[str, Any] = await page.evaluate(
        """async ([method, path, body]) => {
             const headers = { Authorization: `Bearer ${sessionStorage.getItem("rt.token")}` };
             if (body !== null) headers["Content-Type"] = "application/json";
             const init = { method, headers, body: body === null ? undefined : JSON.stringify(body) };
             const resp = await fetch(path, init);
             return { status: resp.status, body: await resp.json() };
           }""", [method, path, body])
    return reply


async def service_worker(ctx: BrowserContext) -> Worker:
    if not ctx.service_workers:
        await ctx.wait_for_event("serviceworker", timeout=WAIT_MS)
    return ctx.service_workers[0]


async def push_in_worker(worker: Worker, payload: dict[str, Any]) -> dict[str, Any]:
    """Delivers `payload` to the worker's push handler as a push service would
    (a PushEvent with the decrypted JSON) and returns the notification it asked
    for: {title, options, shown ("ok" or the browser's error)}.

    What was asked, not `getNotifications()`: headless Chromium sometimes
    lists nothing for a notification it has just shown. Dispatched by the
    test, the event is untrusted, so the handler's `waitUntil` throws, after
    `showNotification` was called."""
    asked: dict[str, Any] = await worker.evaluate(
        """async (n) => {
             const reg = self.registration;
             const calls = [];
             const show = reg.showNotification;
             reg.showNotification = function (title, options) {
               const shown = show.call(this, title, options);
               calls.push(shown.then(() => ({ title, options, shown: "ok" }),
                                     (e) => ({ title, options, shown: String(e) })));
               return shown;
             };
             try {
               self.dispatchEvent(new PushEvent("push", { data: JSON.stringify(n) }));
             } finally {
               reg.showNotification = show;
             }
             return calls.length === 1 ? await calls[0] : { calls: calls.length };
           }""", payload)
    return asked


def no_page_errors(page: Page, allow: tuple[str, ...] = ()) -> None:
    errors = [e for e in PAGE_ERRORS[page] if not any(a in e for a in allow)]
    assert not errors, errors


# -- /sw.js over HTTP ------------------------------------------------------------------------------

async def test_service_worker_is_served_at_the_root_with_its_headers(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("np"))
    session = live.http.session
    async with session.get(live.url + "/sw.js") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/javascript"
        assert resp.headers["Service-Worker-Allowed"] == "/"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "worker-src 'self'" in resp.headers["Content-Security-Policy"]
        text = await resp.text()
    assert 'addEventListener("push"' in text and 'addEventListener("notificationclick"' in text
    async with session.get(live.url + "/track/o-1") as resp:
        assert resp.status == 200
        assert "worker-src 'self'" in resp.headers["Content-Security-Policy"]
    # The worker is served from the root only, never as a static file of another scope.
    async with session.get(live.url + "/static/sw.js") as resp:
        assert resp.status == 404


# -- the button, the worker, the key, the subscription API ---------------------------------------

async def test_notify_me_registers_the_worker_and_says_when_push_is_unavailable(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("np"))
    order = await live.create_order()
    oid, cust = order["order_id"], order["customer_id"]
    page = await open_track(browser, contexts, live, oid, cust, notifications=True)
    await expect(page.locator("#order-state")).to_have_text("已预约")
    button = page.locator("#notify")
    await expect(button).to_be_visible()
    await expect(button).to_have_text("通知我")
    await expect(page.locator("#notify-off")).to_be_hidden()
    assert await page.evaluate("Notification.permission") == "granted"

    await button.click()
    # The worker registers at the root and activates, whatever the push service says.
    reg = await page.evaluate("""async () => { const r = await navigator.serviceWorker.ready;
                                  return { scope: r.scope, script: r.active && r.active.scriptURL }; }""")
    assert reg == {"scope": live.url + "/", "script": live.url + "/sw.js"}, reg
    await expect(button).not_to_have_attribute("data-state", "working", timeout=20_000)
    state = await button.get_attribute("data-state")
    if state == "on":  # a browser with a push service (not headless Chromium here)
        await expect(button).to_have_text("通知已开启")
        await page.locator("#notify-off").click()
        await expect(button).to_have_text("通知我")
    else:
        # Incognito Chromium refuses the subscription: the page says so and stays usable.
        assert state == "off"
        await expect(button).to_have_attribute("data-error", "subscribe")
        await expect(page.locator("#toasts .toast.error")).to_contain_text("无法开启通知")
        await expect(button).to_have_text("通知我")
        await expect(button).to_be_enabled()
        await expect(page.locator("#notify-off")).to_be_hidden()

    no_page_errors(page)

    # The key the page subscribes with: the server's VAPID public key, an uncompressed P-256 point.
    key = await page_fetch(page, "GET", "/api/push/key")
    assert key["status"] == 200, key
    public_key = key["body"]["data"]["public_key"]
    assert public_key == live.app[SERVICES].vapid_public_key
    raw = base64.urlsafe_b64decode(public_key + "=" * (-len(public_key) % 4))
    assert len(raw) == 65 and raw[0] == 4

    # The subscription the page would save, as PushSubscription.toJSON() gives it.
    endpoint = f"https://push.example.invalid/wp/{uid()}"
    sub: dict[str, Any] = {"endpoint": endpoint, "expirationTime": None, "keys": browser_keys()}
    first = await page_fetch(page, "POST", "/api/push/subscriptions", sub)
    assert first["status"] == 201, first
    saved = first["body"]["data"]["subscription"]
    assert saved["endpoint"] == endpoint and saved["id"] and saved["created_ts"] > 0
    again = await page_fetch(page, "POST", "/api/push/subscriptions", sub)
    assert again["status"] == 200 and again["body"]["data"]["subscription"]["id"] == saved["id"], again
    bad = {**sub, "keys": {**sub["keys"], "auth": b64url(os.urandom(8))}}
    refused = await page_fetch(page, "POST", "/api/push/subscriptions", bad)
    assert refused["status"] == 400 and refused["body"]["error"]["code"] == "invalid", refused
    gone = await page_fetch(page, "DELETE", "/api/push/subscriptions", {"endpoint": endpoint})
    assert gone["status"] == 200, gone
    twice = await page_fetch(page, "DELETE", "/api/push/subscriptions", {"endpoint": endpoint})
    assert twice["status"] == 404 and twice["body"]["error"]["code"] == "not_found", twice

    # The worker turns a push into a notification: title, body, the order's link.
    worker = await service_worker(page.context)
    payload = {"id": "ntf_1", "user_id": cust, "role": "customer", "kind": "order",
               "topic": "order.state_changed", "title": "技师已出发",
               "body": "空调维修：技师正在前往您家，点击查看实时位置", "lang": "zh-CN",
               "link": f"/track/{oid}", "collapse_key": f"order:{oid}", "priority": "normal",
               "ttl_s": 86400, "data": {"order_id": oid}, "read": False}
    asked = await push_in_worker(worker, payload)
    assert asked["shown"] == "ok", asked
    assert asked["title"] == "技师已出发", asked
    options = asked["options"]
    assert options["body"] == payload["body"] and options["lang"] == "zh-CN"
    # One notification per order (the tag): a newer one replaces it, and rings again.
    assert options["tag"] == f"order:{oid}" and options["renotify"] is True
    assert options["data"]["link"] == f"{live.url}/track/{oid}"
    assert options["requireInteraction"] is False
    # An offer (high priority) waits for the user; a link off this site opens the site's root.
    asked = await push_in_worker(worker, {**payload, "id": "ntf_2", "title": "新的派单邀请",
                                          "priority": "high", "link": "https://evil.example/x"})
    assert asked["shown"] == "ok" and asked["title"] == "新的派单邀请", asked
    assert asked["options"]["requireInteraction"] is True
    assert asked["options"]["data"]["link"] == live.url + "/"
    # No collapse key: no tag (renotify without one would throw); no title: a generic one.
    asked = await push_in_worker(worker, {"body": "hello", "lang": "en", "link": f"/track/{oid}#chat"})
    assert asked["shown"] == "ok" and asked["title"] == "Order update", asked
    assert "tag" not in asked["options"] and "renotify" not in asked["options"]
    assert asked["options"]["data"]["link"] == f"{live.url}/track/{oid}#chat"
    # (The refused POST and the second DELETE above are the browser's only complaints.)
    no_page_errors(page, allow=("status of 400 (Bad Request)", "status of 404 (Not Found)"))


async def test_notify_me_says_when_permission_is_denied(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("np"))
    order = await live.create_order()
    # No permission granted: headless Chromium answers the prompt with "denied".
    page = await open_track(browser, contexts, live, order["order_id"], order["customer_id"],
                            notifications=False)
    button = page.locator("#notify")
    await expect(button).to_have_text("通知我")
    await button.click()
    await expect(page.locator("#toasts .toast.error")).to_have_text(re.compile("^通知权限被拒绝"))
    await expect(button).to_have_attribute("data-error", "denied")
    await expect(button).to_have_text("通知我")
    # Asked nothing of the server or the browser past the refusal: no worker registered.
    assert await page.evaluate("navigator.serviceWorker.getRegistration('/').then((r) => !!r)") is False
    no_page_errors(page)


# -- notifications missed while the page was closed -----------------------------------------------

async def test_missed_notifications_show_when_the_page_opens(
        start_app: StartApp, browser: Browser, contexts: list[BrowserContext]) -> None:
    live = await start_app(mongo_db=uid("np"))
    order = await live.create_order()
    oid, cust = order["order_id"], order["customer_id"]
    other = (await live.create_order(customer_id=cust))["order_id"]
    # While no page of the customer's is open: assigned, then on the way; another order assigned.
    await live.assign(oid, uid("t-"))
    status, body = await live.post_event(oid, "en_route")
    assert status == 200, body
    await live.assign(other, uid("t-"))
    token = live.token("customer", cust)

    async def inbox() -> dict[str, Any]:
        status, body = await live.http.request("GET", "/api/notifications", token)
        assert status == 200, body
        return dict(body["data"])

    async def all_three() -> bool:
        return len((await inbox())["notifications"]) >= 3

    await until(all_three, 10, what="the customer's three notifications in the inbox")
    assert (await inbox())["unread"] == 3

    page = await open_track(browser, contexts, live, oid, cust, notifications=False)
    box = page.locator("#missed")
    await expect(box).to_be_visible()
    await expect(box.locator(".card-head strong")).to_have_text("您不在时的通知")
    mine = box.locator("li[data-order=this]")
    await expect(mine.locator(".title")).to_have_text(["技师已出发", "已安排服务人员"])
    await expect(mine.first.locator(".line2")).to_have_text("空调维修：技师正在前往您家，点击查看实时位置")
    # This order's first; another order's after them, with a link to its page.
    await expect(box.locator("li")).to_have_count(3)
    elsewhere = box.locator("li").last
    await expect(elsewhere).to_have_attribute("data-order", "other")
    await expect(elsewhere.locator("a")).to_have_attribute("href", f"/track/{other}")
    # Shown: the inbox has nothing unread any more, so they are not shown twice.
    async def all_read() -> bool:
        return bool((await inbox())["unread"] == 0)

    await until(all_read, 10, what="the missed notifications marked read")

    await page.locator("#missed-close").click()
    await expect(box).to_be_hidden()
    await expect(page.locator("#order-state")).to_have_text("在路上")
    no_page_errors(page)

