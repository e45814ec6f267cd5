"""Feedback under misuse, over the wire: every route and /chat event of
feedback as work fed bad payloads, bad query strings and the wrong caller.
Each is answered with a clear error (400 `invalid` naming its fields, 401,
403 `forbidden`, 404 `not_found`, 409 `conflict`), never a 500 or a hang,
and nothing is logged as a server error. Concurrent replies keep an item's
log gap-free."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from tests.conftest import Live, StartApp
from tests.feedback.helpers import api, completed_order, post_feedback, rate
from tests.harness import Client, Http, MongoServer, uid
from tests.server_procs import log_text, server_process, start, stop
from tests.wire import assert_error, assert_no_server_errors, claims, hmac_jwt

TZ = ZoneInfo("Asia/Shanghai")
WAIT = 10.0  # replies come in milliseconds; longer is a hang
MISSING = "fb-no-such-item-0000"
BAD_IDS = ("bad%20id", "x" * 65, "bad%2Fid", "bad%23id", "%E5%8F%8D%E9%A6%88")
JSON = {"Content-Type": "application/json"}
NON_OBJECTS = (b"[]", b'["body"]', b'"text"', b"42", b"true", b"null")
NOBODY: Any = type("NoBody", (), {"__repr__": lambda self: "NOBODY"})()


async def call(live: Live, method: str, path: str, token: str | None, json: Any = NOBODY,
               data: bytes | None = None) -> tuple[int, Any]:
    """One request, bounded: a reply that does not come within WAIT is a hang."""
    kw: dict[str, Any] = {}
    if json is not NOBODY:
        kw["json"] = json
    if data is not None:
        kw["data"], kw["headers"] = data, JSON
    return await asyncio.wait_for(live.http.request(method, path, token, **kw), WAIT)


class Refusals:
    """Collects every refusal that was not the one expected, so that one run
    of a matrix reports all of them at once."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.failures: list[str] = []

    async def http(self, method: str, path: str, token: str | None, status: int, code: str,
                   fields: set[str] | None = None, json: Any = NOBODY,
                   data: bytes | None = None) -> dict[str, Any]:
        got, reply = await call(self.live, method, path, token, json, data)
        try:
            assert got == status, f"status {got}, not {status}"
            return assert_error(reply, code, fields)
        except AssertionError as exc:
            shown = json if json is not NOBODY else data
            self.failures.append(f"{method} {path} {str(shown)[:80]} -> {got} {reply} ({exc})")
            return {}

    async def event(self, client: Client, event: str, data: Any, code: str,
                    fields: set[str] | None = None) -> dict[str, Any]:
        reply = await client.call(event, data, timeout=WAIT)
        try:
            return assert_error(reply, code, fields)
        except AssertionError as exc:
            self.failures.append(f"{event} {str(data)[:80]} -> {reply} ({exc})")
            return {}

    def check(self) -> None:
        assert not self.failures, "\n".join(self.failures)


def staff(live: Live, role: str = "agent", sub: str | None = None) -> str:
    return live.token(role, sub or uid(f"{role[0]}-"), name=f"{role}-name")


async def events_of(live: Live, fid: str, token: str) -> list[dict[str, Any]]:
    data = await api(live, "GET", f"/api/feedback/{fid}/events?since_seq=0&limit=500", token)
    events = list(data["events"])
    # The log is gap-free whatever was refused: seqs 1..n, each once.
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert data["last_seq"] == len(events), data
    return events


# -- a cold process ---------------------------------------------------------------------------

async def test_the_first_feedback_of_a_fresh_process_is_stored_not_refused(
        mongo_server: MongoServer, caplog: pytest.LogCaptureFixture) -> None:
    """A node that has just started (after every deploy or restart) takes
    its first item like any other: 201, not `unavailable` because the first
    request waited on the term dictionary's load. A real child process, on
    the session's store and a database of its own."""
    secret = "fresh-process-secret-0123456789abcdef-0123"
    root = Path(tempfile.mkdtemp(prefix="rt-fb-fresh-"))
    node = server_process({"REALTIME_MONGO_URL": mongo_server.url, "REALTIME_MONGO_DB": uid("fbf"),
                           "REALTIME_JWT_SECRET": secret, "REALTIME_DATA_DIR": str(root / "data"),
                           "REALTIME_LOG_LEVEL": "WARNING"})
    await start(node)
    try:
        token = hmac_jwt(claims(sub=uid("c-"), role="customer"), secret.encode())
        async with aiohttp.ClientSession() as session:
            replies = [await asyncio.wait_for(Http(node.url, session).request(
                "POST", "/api/feedback", token, json={"category": "service", "body": body}), WAIT)
                for body in ("师傅迟到了半个小时", "空调还是不制冷")]
    finally:
        await stop(node)
        log = log_text(node)
        shutil.rmtree(root, ignore_errors=True)
    assert_no_server_errors(caplog)
    assert [status for status, _ in replies] == [201, 201], (
        f"the first feedback of a fresh process was refused: {replies}\n{log[-2000:]}")
    assert "Traceback" not in log, log[-3000:]


# -- replies and notes ------------------------------------------------------------------------

async def test_replies_and_notes_refuse_bad_bodies_unknown_items_and_the_wrong_caller(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    r = Refusals(live)
    author, stranger = uid("c-"), uid("c-")
    atoken = live.token("customer", author, name="周女士")
    stoken = live.token("customer", stranger)
    ttoken = live.token("technician", uid("t-"))
    agent = staff(live)
    fid = (await post_feedback(live, author, "空调修完还是不制冷"))["id"]

    for kind in ("replies", "notes"):
        path = f"/api/feedback/{fid}/{kind}"
        # Bodies the model refuses, naming the field.
        for body, fields in [
            ({}, {"body"}),
            ({"body": ""}, {"body"}),
            ({"body": "x" * 4001}, {"body"}),
            ({"body": "修" * 4001}, {"body"}),
            ({"body": 5}, {"body"}),
            ({"body": None}, {"body"}),
            ({"body": ["a"]}, {"body"}),
            ({"body": {"text": "a"}}, {"body"}),
            ({"body": "ok", "extra": 1}, {"extra"}),
            ({"body": "ok", "status": "resolved"}, {"status"}),
            ({"text": "ok"}, {"body", "text"}),
        ]:
            await r.http("POST", path, agent, 400, "invalid", fields, json=body)
        # No body at all, JSON that is not an object, JSON that is not JSON.
        await r.http("POST", path, agent, 400, "invalid")
        for raw in NON_OBJECTS:
            await r.http("POST", path, agent, 400, "invalid", {"(payload)"}, data=raw)
        for raw in (b"{", b'{"body": "x",}', b"{'body': 'x'}", b"\xff\xfe", b"body=x"):
            await r.http("POST", path, agent, 400, "invalid", data=raw)
        # Unknown item (a valid body): 404; an id the router does not take: 404.
        await r.http("POST", f"/api/feedback/{MISSING}/{kind}", agent, 404, "not_found",
                     json={"body": "ok"})
        for bad in BAD_IDS:
            await r.http("POST", f"/api/feedback/{bad}/{kind}", agent, 404, "not_found",
                         json={"body": "ok"})
        # No token, a token that is not one: 401, before anything else.
        await r.http("POST", path, None, 401, "unauthorized", json={"body": "ok"})
        await r.http("POST", path, "not-a-token", 401, "unauthorized", json={"body": "ok"})
        await r.http("POST", f"/api/feedback/{MISSING}/{kind}", None, 401, "unauthorized",
                     json={"body": "ok"})

    # Notes are the staff's: not the author's, nor anybody else's who is not staff.
    for token in (atoken, stoken, ttoken):
        await r.http("POST", f"/api/feedback/{fid}/notes", token, 403, "forbidden",
                     json={"body": "我也写一条"})
    # Someone else's item is not found for a customer or technician (as a
    # missing one), with the same message but for the id.
    theirs = await r.http("POST", f"/api/feedback/{fid}/replies", stoken, 404, "not_found",
                          json={"body": "插一句"})
    absent = await r.http("POST", f"/api/feedback/{MISSING}/replies", stoken, 404, "not_found",
                          json={"body": "插一句"})
    assert theirs.get("message", "").replace(fid, "?") == absent.get("message", "").replace(MISSING, "?")
    await r.http("POST", f"/api/feedback/{fid}/replies", ttoken, 404, "not_found",
                 json={"body": "插一句"})
    await r.http("GET", f"/api/feedback/{fid}", stoken, 404, "not_found")
    r.check()

    # Nothing refused reached the item: only its creation is in the log.
    assert [e["type"] for e in await events_of(live, fid, agent)] == ["created"]
    # The boundaries that are fine: the author's own reply, 4000 characters, a note of one.
    mine = await api(live, "POST", f"/api/feedback/{fid}/replies", atoken, {"body": "修" * 4000}, 201)
    assert mine["event"]["type"] == "user_replied" and mine["event"]["data"]["text"] == "修" * 4000
    assert "assignee" not in mine["feedback"] and mine["feedback"]["seq"] == 2
    note = await api(live, "POST", f"/api/feedback/{fid}/notes", agent, {"body": "a"}, 201)
    assert note["event"]["type"] == "noted" and note["feedback"]["status"] == "new"
    reply = await api(live, "POST", f"/api/feedback/{fid}/replies", agent, {"body": "x" * 4000}, 201)
    assert reply["event"]["type"] == "replied" and reply["feedback"]["status"] == "replied"
    assert [e["type"] for e in await events_of(live, fid, agent)] == [
        "created", "user_replied", "noted", "replied"]
    # The author's thread does not show the note.
    thread = await api(live, "GET", f"/api/feedback/{fid}/events", atoken)
    assert [(e["seq"], e["type"]) for e in thread["events"]] == [
        (1, "created"), (2, "user_replied"), (3, "replied")]
    assert_no_server_errors(caplog)


# -- PATCH --------------------------------------------------------------------------------------

async def test_patch_refuses_bad_fields_the_wrong_role_and_moves_off_the_table(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    r = Refusals(live)
    author = uid("c-")
    atoken = live.token("customer", author)
    agent = staff(live)
    fid = (await post_feedback(live, author, "发票一直没开"))["id"]
    path = f"/api/feedback/{fid}"

    for body, fields in [
        ({"foo": 1}, {"foo"}),
        ({"status": "new", "foo": 1}, {"foo"}),
        ({"status": "done"}, {"status"}),
        ({"status": "Resolved"}, {"status"}),
        ({"status": 1}, {"status"}),
        ({"tags": [f"t{i}" for i in range(11)]}, {"tags"}),
        ({"tags": ["x" * 33]}, {"tags.0"}),
        ({"tags": ["ok", ""]}, {"tags.1"}),
        ({"tags": ["   "]}, {"tags.0"}),
        ({"tags": ["退款", "退款"]}, {"tags"}),
        ({"tags": ["a", " a "]}, {"tags"}),  # the same once trimmed
        ({"tags": "退款"}, {"tags"}),
        ({"tags": {"退款": 1}}, {"tags"}),
        ({"tags": [1]}, {"tags.0"}),
        ({"priority": "critical"}, {"priority"}),
        ({"priority": 3}, {"priority"}),
        ({"assignee": "bad id"}, {"assignee"}),
        ({"assignee": "a/b"}, {"assignee"}),
        ({"assignee": ""}, {"assignee"}),
        ({"assignee": "a" * 65}, {"assignee"}),
        ({"assignee": 7}, {"assignee"}),
        ({"status": "closed", "priority": "p0"}, {"priority"}),
    ]:
        await r.http("PATCH", path, agent, 400, "invalid", fields, json=body)
    # Nothing to change; no body; not an object; not JSON.
    await r.http("PATCH", path, agent, 400, "invalid", json={})
    await r.http("PATCH", path, agent, 400, "invalid")
    for raw in NON_OBJECTS:
        await r.http("PATCH", path, agent, 400, "invalid", {"(payload)"}, data=raw)
    await r.http("PATCH", path, agent, 400, "invalid", data=b'{"status": ')
    # Not staff: refused whatever the body.
    for role in ("customer", "technician"):
        for body in ({"status": "resolved"}, {"tags": ["x"]}, {"assignee": "a-1"}, {}):
            await r.http("PATCH", path, live.token(role), 403, "forbidden", json=body)
    await r.http("PATCH", path, atoken, 403, "forbidden", json={"status": "closed"})
    await r.http("PATCH", path, None, 401, "unauthorized", json={"status": "resolved"})
    await r.http("PATCH", f"/api/feedback/{MISSING}", agent, 404, "not_found",
                 json={"status": "resolved"})
    for bad in BAD_IDS:
        await r.http("PATCH", f"/api/feedback/{bad}", agent, 404, "not_found",
                     json={"status": "resolved"})
    r.check()
    assert [e["type"] for e in await events_of(live, fid, agent)] == ["created"]

    # The boundaries that are fine: ten tags of 32 characters, trimmed.
    tags = [f"{i}" + "签" * 31 for i in range(10)]
    data = await api(live, "PATCH", path, agent, {"tags": [f" {t} " for t in tags]})
    assert data["feedback"]["tags"] == tags and [e["type"] for e in data["events"]] == ["tagged"]
    # Asked as it is: no step.
    data = await api(live, "PATCH", path, agent, {"status": "new", "tags": tags, "priority": "normal"})
    assert data["events"] == [] and data["feedback"]["seq"] == 2

    # The status table.
    async def refused(status: str, current: str, allowed: list[str] | None) -> None:
        err = await r.http("PATCH", path, agent, 409, "conflict", json={"status": status})
        assert err.get("details", {}).get("status") == current, err
        if allowed is not None:
            assert err["details"].get("allowed") == allowed, err

    async def moved(status: str) -> None:
        data = await api(live, "PATCH", path, agent, {"status": status})
        assert data["feedback"]["status"] == status and [e["type"] for e in data["events"]] == ["status"]

    await refused("replied", "new", None)  # only a reply makes an item `replied`
    await moved("in_progress")
    await refused("new", "in_progress", ["closed", "resolved"])
    await refused("replied", "in_progress", None)
    await moved("resolved")
    await refused("closed", "resolved", ["in_progress"])
    await refused("new", "resolved", ["in_progress"])
    # A resolved item is reopened before support replies; its author may answer.
    await r.http("POST", f"{path}/replies", agent, 409, "conflict", json={"body": "补充一下"})
    await moved("in_progress")
    await moved("closed")
    await refused("resolved", "closed", ["in_progress"])
    await refused("replied", "closed", None)
    await r.http("POST", f"{path}/replies", agent, 409, "conflict", json={"body": "补充一下"})
    await r.http("POST", f"{path}/replies", atoken, 409, "conflict", json={"body": "还没好"})
    r.check()
    assert [e["type"] for e in await events_of(live, fid, agent)] == [
        "created", "tagged", "status", "status", "status", "status"]
    assert_no_server_errors(caplog)


async def test_an_item_assigned_to_one_agent_is_not_anothers_to_handle_but_an_admins(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    r = Refusals(live)
    one, other = uid("a-"), uid("a-")
    otoken, xtoken = staff(live, "agent", one), staff(live, "agent", other)
    admin = staff(live, "admin")
    fid = (await post_feedback(live, uid("c-"), "师傅没有按时上门"))["id"]
    path = f"/api/feedback/{fid}"
    data = await api(live, "PATCH", path, otoken, {"assignee": one})
    assert data["feedback"]["assignee"] == one

    # Another agent may not reply, change the status, take it, hand it on or unassign it.
    for method, sub, body, status in [
        ("POST", "/replies", {"body": "我来回复"}, 403),
        ("PATCH", "", {"status": "in_progress"}, 403),
        ("PATCH", "", {"status": "resolved"}, 403),
        ("PATCH", "", {"assignee": other}, 403),
        ("PATCH", "", {"assignee": uid("a-")}, 403),
        ("PATCH", "", {"assignee": None}, 403),
    ]:
        err = await r.http(method, path + sub, xtoken, status, "forbidden", json=body)
        assert err.get("details") == {"assignee": one}, err
    await r.event(await live.client("agent", other, namespace="/chat"), "feedback_reply",
                  {"feedback_id": fid, "body": "我来回复"}, "forbidden")
    r.check()
    assert [e["type"] for e in await events_of(live, fid, admin)] == ["created", "assigned"]

    # Notes are any staff's.
    await api(live, "POST", f"{path}/notes", xtoken, {"body": "这单我跟过"}, 201)
    # An admin replies to, changes and re-assigns anyone's item.
    data = await api(live, "POST", f"{path}/replies", admin, {"body": "已安排"}, 201)
    assert data["feedback"]["status"] == "replied" and data["feedback"]["assignee"] == one
    data = await api(live, "PATCH", path, admin, {"status": "in_progress"})
    assert data["feedback"]["status"] == "in_progress"
    data = await api(live, "PATCH", path, admin, {"assignee": other})
    assert data["feedback"]["assignee"] == other
    assert data["events"][0]["data"] == {"assignee": other, "previous": one}
    # Now the first agent is the other one.
    await r.http("POST", f"{path}/replies", otoken, 403, "forbidden", json={"body": "我来"})
    await r.http("PATCH", path, otoken, 403, "forbidden", json={"assignee": one})
    data = await api(live, "PATCH", path, xtoken, {"status": "resolved"})
    assert data["feedback"]["status"] == "resolved"
    # An admin unassigns; then any agent may take it.
    await api(live, "PATCH", path, admin, {"assignee": None})
    data = await api(live, "PATCH", path, otoken, {"assignee": one, "status": "in_progress"})
    assert [e["type"] for e in data["events"]] == ["assigned", "status"]
    r.check()
    assert [e["type"] for e in await events_of(live, fid, admin)] == [
        "created", "assigned", "noted", "replied", "status", "assigned", "status", "assigned",
        "assigned", "status"]
    assert_no_server_errors(caplog)


async def test_a_refused_patch_changes_nothing(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    """A PATCH answered 409 or 403 leaves the item as it was: the caller is
    told it failed, so none of its fields may have been applied."""
    live = await start_app()
    one, other = uid("a-"), uid("a-")
    otoken, xtoken = staff(live, "agent", one), staff(live, "agent", other)
    fid = (await post_feedback(live, uid("c-"), "退款还没到"))["id"]
    path = f"/api/feedback/{fid}"

    # Off the status table, with tags and a priority alongside.
    status, reply = await call(live, "PATCH", path, otoken,
                               {"tags": ["退款"], "priority": "high", "status": "replied"})
    assert status == 409, reply
    assert_error(reply, "conflict")
    await api(live, "PATCH", path, otoken, {"assignee": one})
    # Another agent's item: the status is refused, so the tags are too.
    status, reply = await call(live, "PATCH", path, xtoken, {"tags": ["插手"], "status": "resolved"})
    assert status == 403, reply
    assert_error(reply, "forbidden")
    item = (await api(live, "GET", path, otoken))["feedback"]
    assert_no_server_errors(caplog)
    assert (item["tags"], item["priority"], item["status"]) == ([], "normal", "new"), (
        "a PATCH answered with an error applied part of its fields: "
        f"tags={item['tags']} priority={item['priority']} status={item['status']}; "
        f"log: {[e['type'] for e in await events_of(live, fid, otoken)]}")


# -- query strings ---------------------------------------------------------------------------

async def test_query_strings_of_the_inbox_events_stats_export_ratings_and_csat(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    r = Refusals(live)
    agent, admin, service = staff(live), staff(live, "admin"), live.token("service")
    author, tech = uid("c-"), uid("t-")
    customer, technician = live.token("customer", author), live.token("technician", tech)
    fid = (await post_feedback(live, author, "定位不准"))["id"]

    # The inbox.
    for qs, fields in [
        ("foo=1", {"foo"}),
        ("Status=new", {"Status"}),
        ("status=done", {"status"}),
        ("status=", {"status"}),
        ("priority=critical", {"priority"}),
        ("limit=0", {"limit"}),
        ("limit=201", {"limit"}),
        ("limit=x", {"limit"}),
        ("limit=1.5", {"limit"}),
        ("limit=-1", {"limit"}),
        ("offset=-1", {"offset"}),
        ("offset=10001", {"offset"}),
        ("offset=x", {"offset"}),
        ("overdue=maybe", {"overdue"}),
        ("open=2", {"open"}),
        ("assignee=bad%20id", {"assignee"}),
        ("assignee=" + "a" * 65, {"assignee"}),
        ("tag=" + "x" * 33, {"tag"}),
        ("q=" + "词" * 33, {"q"}),
        ("technician_id=bad%20id", {"technician_id"}),
        ("limit=0&offset=-1&overdue=maybe", {"limit", "offset", "overdue"}),
    ]:
        await r.http("GET", f"/api/feedback?{qs}", agent, 400, "invalid", fields)
    for qs in ("status=new&status=closed", "limit=1&limit=2", "overdue=true&overdue=true"):
        await r.http("GET", f"/api/feedback?{qs}", agent, 400, "invalid")
    for token in (customer, technician):
        await r.http("GET", "/api/feedback", token, 403, "forbidden")
    await r.http("GET", "/api/feedback", None, 401, "unauthorized")

    # An item's events.
    events = f"/api/feedback/{fid}/events"
    for qs, fields in [("since_seq=-1", {"since_seq"}), ("since_seq=x", {"since_seq"}),
                       ("since_seq=9007199254740992", {"since_seq"}),
                       ("limit=0", {"limit"}), ("limit=501", {"limit"}), ("after=1", {"after"})]:
        await r.http("GET", f"{events}?{qs}", agent, 400, "invalid", fields)
        await r.http("GET", f"{events}?{qs}", customer, 400, "invalid", fields)
    await r.http("GET", f"{events}?since_seq=1&since_seq=2", agent, 400, "invalid")
    await r.http("GET", f"/api/feedback/{MISSING}/events", agent, 404, "not_found")
    await r.http("GET", events, live.token("customer"), 404, "not_found")
    await r.http("GET", events, technician, 404, "not_found")
    for bad in BAD_IDS:
        await r.http("GET", f"/api/feedback/{bad}/events", agent, 404, "not_found")
    await r.http("GET", events, None, 401, "unauthorized")

    # Statistics and the export.
    today = dt.datetime.now(TZ).date()
    for route in ("/api/feedback/stats", "/api/feedback/export.csv"):
        for token in (customer, technician):
            await r.http("GET", route, token, 403, "forbidden")
            await r.http("GET", f"{route}?from=2026-13-01", token, 403, "forbidden")
        await r.http("GET", route, None, 401, "unauthorized")
        for qs, fields in [
            ("from=2026-13-01", {"from/to"}),
            ("to=2026-02-30", {"from/to"}),
            ("from=2026-1-01", {"from"}),
            ("to=yesterday", {"to"}),
            ("from=", {"from"}),
            ("from=20260101", {"from"}),
            ("from=2026-12-06&to=2026-11-01", {"from"}),
            ("from=2025-01-01&to=2026-01-02", {"from"}),  # 367 days
            ("from=2000-01-01", {"from"}),  # up to today
            ("frm=2026-01-01", {"frm"}),
            ("from_=2026-01-01", {"from_"}),
        ]:
            await r.http("GET", f"{route}?{qs}", agent, 400, "invalid", fields)
        await r.http("GET", f"{route}?from={today}&from={today}", agent, 400, "invalid")
    await r.http("GET", "/api/feedback/stats?group_by=month", agent, 400, "invalid", {"group_by"})
    await r.http("GET", "/api/feedback/stats?group_by=", agent, 400, "invalid", {"group_by"})
    await r.http("GET", "/api/feedback/export.csv?group_by=day", agent, 400, "invalid", {"group_by"})
    # 366 days (a leap year) is the longest period.
    stats = await api(live, "GET", "/api/feedback/stats?from=2024-01-01&to=2024-12-31&group_by=week",
                      admin)
    assert stats["total"] == 0 and stats["from"] == "2024-01-01"
    async with live.http.session.get(f"{live.url}/api/feedback/export.csv?from=2024-01-01&to=2024-12-31",
                                     headers={"Authorization": f"Bearer {service}"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
        assert (await resp.read()).decode("utf-8-sig").startswith("id,created,")

    # A technician's ratings: staff and the technician themselves.
    oid = await completed_order(live, author, tech)
    await rate(live, author, oid, stars=5, comment="很专业")
    ratings = f"/api/technicians/{tech}/ratings"
    await r.http("GET", ratings, customer, 403, "forbidden")
    await r.http("GET", ratings, live.token("technician"), 403, "forbidden")
    await r.http("GET", ratings, None, 401, "unauthorized")
    for bad in BAD_IDS:
        await r.http("GET", f"/api/technicians/{bad}/ratings", agent, 404, "not_found")
    for token in (technician, agent, admin, service):
        data = await api(live, "GET", ratings, token)
        assert data["technician_id"] == tech, data
        assert [(x["order_id"], x["stars"]) for x in data["recent"]] == [(oid, 5)], data

    # CSAT of support chats.
    for token in (customer, technician):
        await r.http("GET", "/api/chat/csat", token, 403, "forbidden")
    await r.http("GET", "/api/chat/csat", None, 401, "unauthorized")
    for qs, fields in [("from=2026-13-01", {"from/to"}), ("from=2026-1-1", {"from"}),
                       ("to=x", {"to"}), ("from=2026-12-06&to=2026-11-01", {"from"}),
                       ("from=2025-01-01&to=2026-01-02", {"from"}), ("group_by=week", {"group_by"}),
                       ("agent_id=a-1", {"agent_id"})]:
        await r.http("GET", f"/api/chat/csat?{qs}", agent, 400, "invalid", fields)
    await r.http("GET", f"/api/chat/csat?to={today}&to={today}", admin, 400, "invalid")
    r.check()
    for token in (agent, admin, service):
        data = await api(live, "GET", f"/api/chat/csat?from={today}&to={today}", token)
        assert data["from"] == data["to"] == today.isoformat(), data
    assert_no_server_errors(caplog)


# -- /chat events -----------------------------------------------------------------------------

async def test_feedback_events_on_chat_refuse_bad_payloads_and_strangers(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    r = Refusals(live)
    author = uid("c-")
    user = await live.client("customer", author, namespace="/chat")
    stranger = await live.client("customer", uid("c-"), namespace="/chat")
    tech = await live.client("technician", uid("t-"), namespace="/chat")
    agent = await live.client("agent", uid("a-"), namespace="/chat")
    fid = (await post_feedback(live, author, "客服电话打不通"))["id"]
    sids = (user.sio.get_sid("/chat"), agent.sio.get_sid("/chat"))

    cases: list[tuple[Client, str, Any, str, set[str] | None]] = [
        # feedback_replay
        (user, "feedback_replay", {}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", None, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"since_seq": 0}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": ""}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": "bad id"}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": "a/b"}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": "x" * 65}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": 5}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": [fid]}, "invalid", {"feedback_id"}),
        (user, "feedback_replay", {"feedback_id": fid, "since_seq": -1}, "invalid", {"since_seq"}),
        (user, "feedback_replay", {"feedback_id": fid, "since_seq": "1"}, "invalid", {"since_seq"}),
        (user, "feedback_replay", {"feedback_id": fid, "since_seq": 1.5}, "invalid", {"since_seq"}),
        (user, "feedback_replay", {"feedback_id": fid, "since_seq": True}, "invalid", {"since_seq"}),
        (user, "feedback_replay", {"feedback_id": fid, "since_seq": 2**53}, "invalid", {"since_seq"}),
        (user, "feedback_replay", {"feedback_id": fid, "x": 1}, "invalid", {"x"}),
        (agent, "feedback_replay", {"feedback_id": fid, "limit": 5}, "invalid", {"limit"}),
        (user, "feedback_replay", {"feedback_id": MISSING}, "not_found", None),
        (stranger, "feedback_replay", {"feedback_id": fid}, "not_found", None),
        (tech, "feedback_replay", {"feedback_id": fid}, "not_found", None),
        (agent, "feedback_replay", {"feedback_id": MISSING}, "not_found", None),
        # feedback_reply
        (user, "feedback_reply", {"feedback_id": fid}, "invalid", {"body"}),
        (user, "feedback_reply", {"body": "x"}, "invalid", {"feedback_id"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": ""}, "invalid", {"body"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": "x" * 4001}, "invalid", {"body"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": "修" * 4001}, "invalid", {"body"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": 5}, "invalid", {"body"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": None}, "invalid", {"body"}),
        (user, "feedback_reply", {"feedback_id": "bad id", "body": "x"}, "invalid", {"feedback_id"}),
        (user, "feedback_reply", {"feedback_id": fid, "body": "x", "status": "resolved"}, "invalid",
         {"status"}),
        (user, "feedback_reply", {}, "invalid", {"feedback_id", "body"}),
        (user, "feedback_reply", {"feedback_id": MISSING, "body": "x"}, "not_found", None),
        (stranger, "feedback_reply", {"feedback_id": fid, "body": "插一句"}, "not_found", None),
        (tech, "feedback_reply", {"feedback_id": fid, "body": "插一句"}, "not_found", None),
        # feedback_mine
        (user, "feedback_mine", {"limit": 0}, "invalid", {"limit"}),
        (user, "feedback_mine", {"limit": 101}, "invalid", {"limit"}),
        (user, "feedback_mine", {"limit": -1}, "invalid", {"limit"}),
        (user, "feedback_mine", {"limit": "5"}, "invalid", {"limit"}),
        (user, "feedback_mine", {"limit": 5.0}, "invalid", {"limit"}),
        (user, "feedback_mine", {"limit": None}, "invalid", {"limit"}),
        (user, "feedback_mine", {"status": "new"}, "invalid", {"status"}),
        (user, "feedback_mine", {"user_id": "c-1"}, "invalid", {"user_id"}),
    ]
    for event in ("feedback_replay", "feedback_reply", "feedback_mine"):
        for data in ("text", 42, 1.5, True, [fid], []):
            cases.append((user, event, data, "invalid", {"(payload)"}))
        cases.append((user, event, ({"feedback_id": fid}, {"feedback_id": fid}), "invalid",
                      {"(payload)"}))
    for client, event, data, code, fields in cases:
        await r.event(client, event, data, code, fields)
    # A stranger's not_found says no more than an unknown id's.
    theirs = await stranger.call("feedback_replay", {"feedback_id": fid})
    absent = await stranger.call("feedback_replay", {"feedback_id": MISSING})
    assert (theirs["error"]["message"].replace(fid, "?")
            == absent["error"]["message"].replace(MISSING, "?")), (theirs, absent)
    r.check()

    # Nothing refused reached the item, the same connections still work,
    # and the boundaries are fine.
    replay = await user.ok("feedback_replay", {"feedback_id": fid})
    assert [(e["seq"], e["type"]) for e in replay["events"]] == [(1, "created")]
    assert (await user.ok("feedback_replay", {"feedback_id": fid, "since_seq": 2**53 - 1}))["events"] == []
    answer = await user.ok("feedback_reply", {"feedback_id": fid, "body": "修" * 4000})
    assert answer["event"]["seq"] == 2 and answer["event"]["data"]["text"] == "修" * 4000
    assert [f["id"] for f in (await user.ok("feedback_mine", {"limit": 100}))["feedback"]] == [fid]
    assert [f["id"] for f in (await user.ok("feedback_mine", None))["feedback"]] == [fid]
    assert (await stranger.ok("feedback_mine", {"limit": 1}))["feedback"] == []
    staff_replay = await agent.ok("feedback_replay", {"feedback_id": fid, "since_seq": 1})
    assert [e["type"] for e in staff_replay["events"]] == ["user_replied"]
    # Closed: the author's answer is a conflict, on the socket as over HTTP.
    await api(live, "PATCH", f"/api/feedback/{fid}", staff(live), {"status": "closed"})
    await r.event(user, "feedback_reply", {"feedback_id": fid, "body": "还没好"}, "conflict")
    await r.event(agent, "feedback_reply", {"feedback_id": fid, "body": "好的"}, "conflict")
    r.check()
    assert (user.sio.get_sid("/chat"), agent.sio.get_sid("/chat")) == sids
    assert user.sio.connected and agent.sio.connected and stranger.sio.connected
    assert_no_server_errors(caplog)


# -- concurrency ------------------------------------------------------------------------------

async def test_concurrent_replies_are_each_stored_once_and_the_log_stays_gap_free(
        start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    live = await start_app()
    one, other = uid("a-"), uid("a-")
    tokens = {one: staff(live, "agent", one), other: staff(live, "agent", other)}
    items = [(await post_feedback(live, uid("c-"), f"第 {i} 条：上门太晚"))["id"] for i in range(6)]

    async def reply(fid: str, agent: str) -> tuple[str, int, Any]:
        status, body = await call(live, "POST", f"/api/feedback/{fid}/replies", tokens[agent],
                                  {"body": "您好，我们马上处理"})
        return agent, status, body

    # Two agents send the same reply to each unassigned item at once.
    results = await asyncio.gather(*(reply(fid, a) for fid in items for a in (one, other)))
    for i, fid in enumerate(items):
        pair = results[2 * i: 2 * i + 2]
        won = [a for a, status, _ in pair if status == 201]
        for _, status, body in pair:
            assert status in (201, 403), pair
            if status == 403:
                assert_error(body, "forbidden")
        assert won, pair
        events = await events_of(live, fid, tokens[one])
        replies = [e for e in events if e["type"] == "replied"]
        # Each reply answered 201 is stored exactly once, none refused is.
        assert sorted(e["actor"]["id"] for e in replies) == sorted(won), (pair, events)
        item = (await api(live, "GET", f"/api/feedback/{fid}", tokens[one]))["feedback"]
        assert item["status"] == "replied" and item["seq"] == len(events)
        if len(won) == 1:
            assert item["assignee"] == won[0]  # who answered, has it
    # The same agent sending the same reply twice at once: two replies, seqs in order.
    fid = items[0]
    item = (await api(live, "GET", f"/api/feedback/{fid}", tokens[one]))["feedback"]
    mine = tokens[item["assignee"]]
    both = await asyncio.gather(*(call(live, "POST", f"/api/feedback/{fid}/replies", mine,
                                       {"body": "补充：明早九点"}) for _ in range(2)))
    assert [s for s, _ in both] == [201, 201], both
    seqs = sorted(b["data"]["event"]["seq"] for _, b in both)
    assert seqs == [item["seq"] + 1, item["seq"] + 2], both
    events = await events_of(live, fid, mine)
    assert [e["type"] for e in events[-2:]] == ["replied", "replied"]
    assert_no_server_errors(caplog)
