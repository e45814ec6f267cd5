"""Support and order chats over the wire: the support flow, idempotency
and ordering, catching up, routing and the queue, order chats."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.chat.wire import (
    connect,
    conversation_event,
    messages,
    next_where,
    open_assigned,
    payload,
    send,
    transcript,
    until_marker,
)
from tests.conftest import Live, StartApp
from tests.harness import (
    Client,
    uid,
)

# -- the support flow ---------------------------------------------------------------------

async def test_support_flow_open_queue_assign_messages_close_rate(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id, name="王女士")
    cust2 = await connect(app, "customer", cust_id, name="王女士")
    agent = await connect(app, "agent", agent_id, name="小李")

    opened = await cust.ok("open", {"kind": "support", "topic": "空调漏水"})
    conv = opened["conversation"]
    cid = conv["conversation_id"]
    assert conv["kind"] == "support" and conv["status"] == "queued"
    assert conv["customer_id"] == cust_id and conv["topic"] == "空调漏水"
    assert conv["assignee"] is None and conv["last_seq"] == 0 and conv["csat"] is None
    assert opened["queue_position"] == 1
    for internal in ("read", "queue_rank", "open_key", "_id"):
        assert internal not in conv

    # Opening again while one is open returns that one (from any connection).
    again = await cust2.ok("open", {"kind": "support"})
    assert again["conversation"]["conversation_id"] == cid and again["queue_position"] == 1

    status = await agent.ok("set_status", {"status": "available"})
    assert status["status"] == "available" and status["cap"] == 5
    for c in (agent, cust, cust2):
        changed = await conversation_event(c, cid, "assigned")
        assert changed["assignee"] == agent_id and changed["kind"] == "support"
    again = await cust.ok("open", {"kind": "support"})
    assert again["conversation"]["conversation_id"] == cid
    assert again["conversation"]["status"] == "assigned" and "queue_position" not in again

    # A supervisor who joins follows the conversation without being its agent.
    sup = await connect(app, "agent")
    watched = await sup.ok("join", {"conversation_id": cid})
    assert watched["conversation"]["assignee"] == agent_id and watched["messages"] == []

    # Rating before close is a conflict.
    await cust.error("rate", {"conversation_id": cid, "stars": 5}, "conflict")

    # Customer -> agent. The sender's connection has it in the ack only.
    m1 = await send(cust, cid, "你好，空调漏水了", "c-1")
    assert m1["seq"] == 1 and m1["kind"] == "text" and m1["body"] == "你好，空调漏水了"
    assert m1["conversation_id"] == cid and m1["client_msg_id"] == "c-1"
    assert m1["sender"] == {"id": cust_id, "role": "customer", "name": "王女士"}
    assert isinstance(m1["ts"], int) and isinstance(m1["id"], str) and m1["id"]
    assert await agent.next("message") == m1
    assert await cust2.next("message") == m1

    # Agent -> customer.
    m2 = await send(agent, cid, "您好，我来帮您看看", "a-1")
    assert m2["seq"] == 2 and m2["sender"] == {"id": agent_id, "role": "agent", "name": "小李"}
    assert await cust.next("message") == m2
    assert await cust2.next("message") == m2
    # Events on one connection arrive in order: had the customer's own message been
    # pushed to it, it would have come before m2.
    assert cust.received["message"] == [m2]
    assert agent.received["message"] == [m1]
    assert await messages(sup, 2) == [m1, m2]
    assert await sup.ok("leave", {"conversation_id": cid}) == {"conversation_id": cid}

    m3 = await send(cust, cid, "好的", "c-2")
    assert await agent.next("message") == m3
    # A reply on sup's own socket comes after any push emitted before it: none came.
    assert [m["seq"] for m in (await sup.ok("history", {"conversation_id": cid}))["messages"]] == [1, 2, 3]
    assert sup.drain("message") == []  # left: no longer pushed

    closed = (await cust.ok("close", {"conversation_id": cid}))["conversation"]
    assert closed["status"] == "closed" and isinstance(closed["closed_ts"], int)
    assert closed["closed_by"]["id"] == cust_id
    for c in (agent, cust2):
        assert (await conversation_event(c, cid, "closed"))["status"] == "closed"
    await cust.error("close", {"conversation_id": cid}, "conflict")
    await cust.error("send", payload(cid, "还在吗"), "conflict")
    # A retried send of an already stored message still returns it after close.
    assert await send(cust, cid, "你好，空调漏水了", "c-1") == m1

    await agent.error("rate", {"conversation_id": cid, "stars": 1}, "forbidden")
    rated = (await cust.ok("rate", {"conversation_id": cid, "stars": 4, "comment": "很快"}))["conversation"]
    assert rated["csat"]["stars"] == 4 and rated["csat"]["comment"] == "很快"
    assert isinstance(rated["csat"]["ts"], int)
    await cust.error("rate", {"conversation_id": cid, "stars": 5}, "conflict")

    # Once closed, opening support starts a new conversation.
    fresh = await cust.ok("open", {"kind": "support"})
    assert fresh["conversation"]["conversation_id"] != cid
    assert fresh["conversation"]["status"] in ("queued", "assigned")


async def test_concurrent_opens_by_one_customer_make_one_conversation(app: Live) -> None:
    cust_id = uid("c-")
    clients = await asyncio.gather(*(connect(app, "customer", cust_id) for _ in range(3)))
    replies = await asyncio.gather(*(c.ok("open", {"kind": "support"}) for c in clients for _ in range(3)))
    ids = {r["conversation"]["conversation_id"] for r in replies}
    assert len(ids) == 1, ids
    listed = (await clients[0].ok("list", {}))["conversations"]
    assert [c["conversation_id"] for c in listed] == list(ids)


# -- idempotency and ordering ---------------------------------------------------------------

async def test_idempotent_resend_from_two_connections_stores_one_message(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    c1 = await connect(app, "customer", cust_id)
    c2 = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, c1, agent, agent_id)

    body = payload(cid, "师傅几点到？", "dup-1")
    replies = await asyncio.gather(*(c.call("send", body) for c in (c1, c2) * 5))
    assert all(r["ok"] for r in replies), replies
    stored = [r["data"]["message"] for r in replies]
    assert {m["id"] for m in stored} == {stored[0]["id"]}
    assert {m["seq"] for m in stored} == {1}
    assert all(m == stored[0] for m in stored)

    after = await send(c1, cid, "在吗", "dup-2")
    assert after["seq"] == 2  # the nine duplicates took no seq
    got = await until_marker(agent, "dup-2")
    assert [m["id"] for m in got] == [stored[0]["id"]]
    # The other connection of the sender saw it pushed exactly once in all.
    pushed = [m for c in (c1, c2) for m in c.received["message"] if m["client_msg_id"] == "dup-1"]
    assert len(pushed) == 1

    # The key includes the sender: the agent's "dup-1" is a message of its own.
    theirs = await send(agent, cid, "收到", "dup-1")
    assert theirs["seq"] == 3 and theirs["id"] != stored[0]["id"]
    assert theirs["sender"]["id"] == agent_id

    status, reply = await transcript(app, cid)
    assert status == 200, reply
    assert [(m["seq"], m["client_msg_id"], m["sender"]["role"]) for m in reply["data"]["messages"]] == [
        (1, "dup-1", "customer"), (2, "dup-2", "customer"), (3, "dup-1", "agent")]


async def test_twenty_concurrent_senders_get_contiguous_seqs_in_one_order(start_app: StartApp) -> None:
    # 30 sends per user and 60 into the conversation at once: over the default send
    # limits (docs/protocol.md), which this test is not about.
    app = await start_app(mongo_db=uid("chat_"), chat_send_burst=100, chat_conversation_burst=100)
    cust_id, agent_id = uid("c-"), uid("a-")
    custs = list(await asyncio.gather(*(connect(app, "customer", cust_id) for _ in range(10))))
    agents = list(await asyncio.gather(*(connect(app, "agent", agent_id) for _ in range(10))))
    cust_watch = await connect(app, "customer", cust_id)
    agent_watch = await connect(app, "agent", agent_id)
    marker = await connect(app, "customer", cust_id)
    cid = await open_assigned(app, custs[0], agent_watch, agent_id)
    # In the staff room and the agent's own room: still one copy of each message.
    await agent_watch.ok("join", {"conversation_id": cid})
    for c in [*custs, *agents]:
        c.drain("conversation")

    per_sender = 3
    senders = custs + agents

    async def burst(i: int, c: Client) -> list[dict[str, Any]]:
        return [await send(c, cid, f"来自 {i} 的第 {k} 条", f"s{i}-{k}") for k in range(per_sender)]

    sent = await asyncio.gather(*(burst(i, c) for i, c in enumerate(senders)))
    total = per_sender * len(senders)
    all_seqs = sorted(m["seq"] for batch in sent for m in batch)
    assert all_seqs == list(range(1, total + 1))
    await send(marker, cid, "end", "marker")

    for i, c in enumerate(senders):
        got = await until_marker(c, "marker")
        own = {m["seq"] for m in sent[i]}
        # On one node the fan-out is serialized per conversation: seq order, once each.
        assert [m["seq"] for m in got] == [s for s in range(1, total + 1) if s not in own], i
    for c in (cust_watch, agent_watch):
        got = await until_marker(c, "marker")
        assert [m["seq"] for m in got] == list(range(1, total + 1))

    status, reply = await transcript(app, cid, limit=1000)
    assert status == 200
    assert [m["seq"] for m in reply["data"]["messages"]] == list(range(1, total + 2))


async def test_sends_on_one_socket_are_numbered_in_the_order_sent(start_app: StartApp) -> None:
    """A client that sends again before the first ack (as the pages do) gets its
    messages stored in the order it sent them, not in the order their
    transactions happened to commit."""
    app = await start_app(mongo_db=uid("chat_"), chat_send_burst=100, chat_conversation_burst=100)
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)
    # All emitted at once, in this order, on one socket; the acks come back as they may.
    replies = await asyncio.gather(*(send(agent, cid, f"第 {k} 条", f"burst-{k}") for k in range(12)))
    assert [m["client_msg_id"] for m in sorted(replies, key=lambda m: m["seq"])] == \
        [f"burst-{k}" for k in range(12)]
    assert [m["seq"] for m in replies] == list(range(1, 13))


# -- catching up ----------------------------------------------------------------------------

async def test_reconnect_and_join_since_seq_returns_exactly_the_missed_messages(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)
    for i in range(2):
        await send(agent, cid, f"第 {i} 条")
    last = max(m["seq"] for m in await messages(cust, 2))
    assert last == 2
    await cust.close()

    missed = [await send(agent, cid, f"断线时的第 {i} 条") for i in range(3)]
    back = await connect(app, "customer", cust_id)
    joined = await back.ok("join", {"conversation_id": cid, "since_seq": last})
    assert joined["conversation"]["conversation_id"] == cid
    assert joined["conversation"]["last_seq"] == 5
    assert joined["messages"] == missed
    assert joined["has_more"] is False
    # A join with since_seq at the end returns nothing; without it, everything.
    assert (await back.ok("join", {"conversation_id": cid, "since_seq": 5}))["messages"] == []
    everything = await back.ok("join", {"conversation_id": cid})
    assert [m["seq"] for m in everything["messages"]] == [1, 2, 3, 4, 5]

    # Live again after the reconnect.
    m6 = await send(agent, cid, "回来了吗")
    assert await back.next("message") == m6


async def test_history_pages_back_to_the_start(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)
    for i in range(25):
        await send(cust if i % 2 else agent, cid, f"消息 {i + 1}")

    pages, before = [], None
    for _ in range(5):
        req: dict[str, Any] = {"conversation_id": cid, "limit": 10}
        if before is not None:
            req["before_seq"] = before
        page = await cust.ok("history", req)
        pages.append(page)
        if not page["has_more"]:
            break
        before = page["messages"][0]["seq"]
    assert len(pages) == 3
    assert [[m["seq"] for m in p["messages"]] for p in pages] == [
        list(range(16, 26)), list(range(6, 16)), list(range(1, 6))]
    assert [p["has_more"] for p in pages] == [True, True, False]
    union = [m["seq"] for p in pages for m in p["messages"]]
    assert sorted(union) == list(range(1, 26)) and len(set(union)) == 25
    assert pages[2]["messages"][0]["body"] == "消息 1"

    # The transcript pages forward.
    status, reply = await transcript(app, cid, after_seq=0, limit=10)
    assert status == 200 and reply["data"]["has_more"] is True
    assert [m["seq"] for m in reply["data"]["messages"]] == list(range(1, 11))
    status, reply = await transcript(app, cid, after_seq=20, limit=10)
    assert [m["seq"] for m in reply["data"]["messages"]] == list(range(21, 26))
    assert reply["data"]["has_more"] is False

    default = await agent.ok("history", {"conversation_id": cid})
    assert [m["seq"] for m in default["messages"]] == list(range(1, 26))
    assert default["has_more"] is False


# -- routing ----------------------------------------------------------------------------------

async def test_routing_least_loaded_with_cap_and_queue_positions(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("chat_"), agent_cap=2)
    base = uid("a-")
    a_id, b_id = base + "-a", base + "-b"
    a = await connect(live, "agent", a_id)
    b = await connect(live, "agent", b_id)
    for ag in (a, b):
        st = await ag.ok("set_status", {"status": "available"})
        assert st == {"status": "available", "load": 0, "cap": 2}

    custs = [await connect(live, "customer") for _ in range(6)]
    convs = []
    for c in custs[:4]:
        opened = await c.ok("open", {"kind": "support"})
        assert opened["conversation"]["status"] == "assigned", opened
        assert "queue_position" not in opened
        convs.append(opened["conversation"])
    assignees = [c["assignee"] for c in convs]
    # Least loaded first: the second and fourth go to the agent who did not get the one before.
    assert assignees[0] != assignees[1] and assignees[2] != assignees[3]
    assert sorted(assignees) == [a_id, a_id, b_id, b_id]
    for ag, ag_id in ((a, a_id), (b, b_id)):
        mine = [c["conversation_id"] for c in convs if c["assignee"] == ag_id]
        got = [(await ag.next("conversation"))["conversation_id"] for _ in mine]
        assert got == mine
        listed = (await ag.ok("list", {}))["conversations"]
        assert sorted(c["conversation_id"] for c in listed) == sorted(mine)

    # Both agents at the cap: the fifth and sixth wait, in order.
    fifth = await custs[4].ok("open", {"kind": "support"})
    assert fifth["conversation"]["status"] == "queued" and fifth["queue_position"] == 1
    sixth = await custs[5].ok("open", {"kind": "support"})
    assert sixth["conversation"]["status"] == "queued" and sixth["queue_position"] == 2
    cid5, cid6 = fifth["conversation"]["conversation_id"], sixth["conversation"]["conversation_id"]
    assert (await next_where(custs[5], "queue_position", lambda p: True))["position"] == 2
    assert (await a.ok("set_status", {"status": "available"}))["load"] == 2

    # Closing one of a's conversations frees a slot: the oldest waiting one goes to a.
    a_conv = next(c["conversation_id"] for c in convs if c["assignee"] == a_id)
    await a.ok("close", {"conversation_id": a_conv})
    got5 = await conversation_event(custs[4], cid5, "assigned")
    assert got5["assignee"] == a_id
    assert (await conversation_event(a, cid5, "assigned"))["assignee"] == a_id
    # The sixth customer moved up.
    moved = await next_where(custs[5], "queue_position", lambda p: True)
    assert moved == {"conversation_id": cid6, "position": 1}
    again = await custs[5].ok("open", {"kind": "support"})
    assert again["queue_position"] == 1
    # Nobody else got the fifth conversation.
    assert all(c["conversation_id"] != cid5 for c in b.received["conversation"])


async def test_agent_grace_requeue_to_front_and_transfer(start_app: StartApp) -> None:
    grace = 1.0
    live = await start_app(mongo_db=uid("chat_"), agent_grace_s=grace, agent_cap=1)
    a_id = uid("a-")
    a = await connect(live, "agent", a_id)
    c1_id = uid("c-")
    c1 = await connect(live, "customer", c1_id)
    cid1 = await open_assigned(live, c1, a, a_id)
    c1.drain("queue_position")

    # Back within the grace period: the agent keeps the conversation.
    await a.close()
    a = await connect(live, "agent", a_id)
    await asyncio.sleep(grace * 1.5)  # let the grace period pass on purpose
    assert c1.drain("conversation") == []
    listed = (await a.ok("list", {}))["conversations"]
    assert [(c["conversation_id"], c["status"]) for c in listed] == [(cid1, "assigned")]

    # Gone for good: after the grace the conversation is queued again, ahead of one
    # that was already waiting.
    await a.close()
    c2 = await connect(live, "customer")
    waiting = await c2.ok("open", {"kind": "support"})
    cid2 = waiting["conversation"]["conversation_id"]
    assert waiting["queue_position"] == 1
    requeued = await conversation_event(c1, cid1, "queued")
    assert requeued.get("assignee") is None
    assert (await next_where(c1, "queue_position", lambda p: True)) == {"conversation_id": cid1,
                                                                        "position": 1}
    assert (await next_where(c2, "queue_position", lambda p: p["position"] == 2))["conversation_id"] == cid2
    assert (await c1.ok("open", {"kind": "support"}))["queue_position"] == 1
    assert (await c2.ok("open", {"kind": "support"}))["queue_position"] == 2

    # A newly available agent (cap 1) gets the requeued conversation first.
    b_id = uid("b-")
    b = await connect(live, "agent", b_id)
    await b.ok("set_status", {"status": "available"})
    got = await conversation_event(b, cid1, "assigned")
    assert got["assignee"] == b_id
    assert (await conversation_event(c1, cid1, "assigned"))["assignee"] == b_id
    assert (await next_where(c2, "queue_position", lambda p: True))["position"] == 1

    # Transfer to another online agent (status away; the cap does not apply).
    t_id = uid("t-")
    t = await connect(live, "agent", t_id)
    other = await connect(live, "agent")
    await other.error("transfer", {"conversation_id": cid1, "to_agent_id": t_id}, "forbidden")
    await b.error("transfer", {"conversation_id": cid1, "to_agent_id": uid("offline-")}, "conflict")
    await b.error("transfer", {"conversation_id": cid1, "to_agent_id": b_id}, "conflict")
    moved = (await b.ok("transfer", {"conversation_id": cid1, "to_agent_id": t_id}))["conversation"]
    assert moved["assignee"] == t_id and moved["status"] == "assigned"
    for c in (t, b, c1):
        assert (await conversation_event(c, cid1))["assignee"] == t_id
    # The previous agent may no longer post or transfer; the new one may.
    await b.error("send", payload(cid1, "还在"), "forbidden")
    await b.error("transfer", {"conversation_id": cid1, "to_agent_id": b_id}, "forbidden")
    m = await send(t, cid1, "您好，我接手了")
    assert (await c1.next("message"))["id"] == m["id"]


async def test_transfer_frees_capacity_for_a_waiting_customer(start_app: StartApp) -> None:
    """Routing: the oldest waiting conversation goes to an available agent below the
    cap. A transfer away frees the sender's slot, so the waiting customer is taken."""
    live = await start_app(mongo_db=uid("chat_"), agent_cap=1)
    b_id, t_id = uid("b-"), uid("t-")
    b = await connect(live, "agent", b_id)
    t = await connect(live, "agent", t_id)  # online, away
    c1 = await connect(live, "customer")
    cid1 = await open_assigned(live, c1, b, b_id)
    c2 = await connect(live, "customer")
    waiting = await c2.ok("open", {"kind": "support"})
    cid2 = waiting["conversation"]["conversation_id"]
    assert waiting["conversation"]["status"] == "queued"

    await b.ok("transfer", {"conversation_id": cid1, "to_agent_id": t_id})
    assert (await conversation_event(t, cid1))["assignee"] == t_id
    # Assigning takes milliseconds; 3 s is generous.
    got = await conversation_event(c2, cid2, "assigned", timeout=3)
    assert got["assignee"] == b_id


# -- order chats ------------------------------------------------------------------------------

async def test_masking_both_ways_in_an_order_chat(app: Live) -> None:
    cust_id, tech_id, agent_id = uid("c-"), uid("t-"), uid("a-")
    order = await app.create_order(cust_id)
    oid = order["order_id"]
    await app.assign(oid, tech_id)
    cust = await connect(app, "customer", cust_id, name="张先生")
    tech = await connect(app, "technician", tech_id, name="李师傅")
    agent = await connect(app, "agent", agent_id)

    conv = (await cust.ok("open", {"kind": "order", "order_id": oid}))["conversation"]
    cid = conv["conversation_id"]
    assert cid == f"order:{oid}" and conv["kind"] == "order" and conv["status"] == "open"
    assert conv["technician_id"] == tech_id and conv["customer_id"] == cust_id
    tech_open = await tech.ok("open", {"kind": "order", "order_id": oid})
    assert tech_open["conversation"]["conversation_id"] == cid
    joined = (await agent.ok("open", {"kind": "order", "order_id": oid}))["conversation"]
    assert agent_id in joined["staff"]
    base = joined["last_seq"]  # the order timeline's system messages come first

    phone_text = "师傅您好，我的电话是 138-1234-5678，到了打给我"
    m1 = await send(cust, cid, phone_text, "p-1")
    assert m1["seq"] == base + 1
    assert m1["body"] == phone_text and "masked" not in m1
    seen_by_tech = await tech.next("message")
    assert seen_by_tech["id"] == m1["id"]
    assert seen_by_tech["body"] == "师傅您好，我的电话是 [号码已隐藏]，到了打给我"
    assert "138" not in seen_by_tech["body"] and "masked" not in seen_by_tech
    seen_by_agent = await agent.next("message")
    assert seen_by_agent["body"] == phone_text and seen_by_agent["masked"] is True

    wechat_text = "加我微信 zhang_shifu88 方便联系"
    m2 = await send(tech, cid, wechat_text, "w-1")
    assert m2["body"] == wechat_text and "masked" not in m2
    seen_by_cust = await cust.next("message")
    assert seen_by_cust["body"] == "加我微信 [微信号已隐藏] 方便联系"
    seen_by_agent = await agent.next("message")
    assert seen_by_agent["body"] == wechat_text and seen_by_agent["masked"] is True

    plain = await send(cust, cid, "好的，谢谢", "plain")
    assert "masked" not in await tech.next("message")
    assert "masked" not in await agent.next("message")

    # Stored views: each side sees the other's contact masked and its own original.
    tech_view = {m["id"]: m for m in (await tech.ok("join", {"conversation_id": cid}))["messages"]}
    assert tech_view[m1["id"]]["body"] == "师傅您好，我的电话是 [号码已隐藏]，到了打给我"
    assert tech_view[m2["id"]]["body"] == wechat_text
    cust_view = {m["id"]: m for m in (await cust.ok("history", {"conversation_id": cid}))["messages"]}
    assert cust_view[m1["id"]]["body"] == phone_text
    assert cust_view[m2["id"]]["body"] == "加我微信 [微信号已隐藏] 方便联系"
    agent_view = {m["id"]: m for m in (await agent.ok("history", {"conversation_id": cid}))["messages"]}
    assert agent_view[m1["id"]]["body"] == phone_text and agent_view[m1["id"]]["masked"] is True

    # The transcript keeps the originals, flagged.
    status, reply = await transcript(app, cid, "agent")
    assert status == 200, reply
    by_id = {m["id"]: m for m in reply["data"]["messages"]}
    assert by_id[m1["id"]]["body"] == phone_text and by_id[m1["id"]]["masked"] is True
    assert by_id[m2["id"]]["body"] == wechat_text and by_id[m2["id"]]["masked"] is True
    assert by_id[plain["id"]]["body"] == "好的，谢谢" and "masked" not in by_id[plain["id"]]
    assert "masked_body" not in by_id[m1["id"]]


async def test_transcript_for_the_backend_service_has_the_originals(app: Live) -> None:
    """docs/protocol.md: GET /api/conversations/{id}/messages (agent, admin, service)
    returns the originals, flagged `masked: true`."""
    cust_id, tech_id = uid("c-"), uid("t-")
    order = await app.create_order(cust_id)
    await app.assign(order["order_id"], tech_id)
    cust = await connect(app, "customer", cust_id)
    cid = (await cust.ok("open", {"kind": "order", "order_id": order["order_id"]}))["conversation"][
        "conversation_id"]
    m = await send(cust, cid, "电话 13812345678")
    for role in ("admin", "service"):
        status, reply = await transcript(app, cid, role)
        assert status == 200, reply
        got = next(x for x in reply["data"]["messages"] if x["id"] == m["id"])
        assert got["body"] == "电话 13812345678" and got.get("masked") is True, (role, got)


async def test_order_timeline_as_system_messages(app: Live) -> None:
    cust_id, tech_id = uid("c-"), uid("t-")
    cust = await connect(app, "customer", cust_id)
    tech = await connect(app, "technician", tech_id)

    order = await app.create_order(cust_id)
    oid, cid = order["order_id"], f"order:{order['order_id']}"
    created = await cust.next("message")
    assert created["conversation_id"] == cid and created["kind"] == "system"
    assert created["sender"]["role"] == "system" and created["body"] == "订单状态：已预约"
    assert created["order_event"]["seq"] == 1 and created["order_event"]["state"] == "created"

    await app.assign(oid, tech_id)
    for c in (cust, tech):
        msg = await c.next("message")
        assert msg["kind"] == "system" and msg["body"] == "订单状态：已分配"
        assert msg["order_event"]["seq"] == 2 and msg["order_event"]["state"] == "assigned"
        assert msg["order_event"]["type"] == "state_changed"

    status, reply = await app.post_event(oid, "en_route")
    assert status == 200, reply
    for c in (cust, tech):
        msg = await c.next("message")
        assert msg["kind"] == "system" and msg["body"] == "订单状态：在路上"
        assert msg["order_event"]["seq"] == 3 and msg["order_event"]["state"] == "en_route"
        assert msg["seq"] == 3

    # The timeline is in the conversation too, matching the order's own events.
    status, got = await app.http.request("GET", f"/api/orders/{oid}", app.token("service"))
    assert status == 200
    events = got["data"]["events"]
    joined = await tech.ok("join", {"conversation_id": cid})
    system = [m for m in joined["messages"] if m["kind"] == "system"]
    assert [m["order_event"]["seq"] for m in system] == [e["seq"] for e in events] == [1, 2, 3]
    assert [m["order_event"]["state"] for m in system] == [e["state"] for e in events]
    assert [m["order_event"]["actor"] for m in system] == [e["actor"] for e in events]

    # Chat and timeline share the conversation's seq.
    text = await send(tech, cid, "我在路上了")
    assert text["seq"] == 4
    await cust.next("message")
    status, _ = await app.post_event(oid, "arrived")
    assert status == 200
    arrived = await cust.next("message")
    assert arrived["seq"] == 5 and arrived["order_event"]["seq"] == 4
    assert arrived["body"] == "订单状态：已到达"


async def test_typing_read_and_unread_counts(app: Live) -> None:
    cust_id, agent_id = uid("c-"), uid("a-")
    cust = await connect(app, "customer", cust_id)
    agent = await connect(app, "agent", agent_id)
    cid = await open_assigned(app, cust, agent, agent_id)

    assert await cust.ok("typing", {"conversation_id": cid, "typing": True}) == {}
    assert await agent.next("typing") == {"conversation_id": cid, "user_id": cust_id, "typing": True}
    await agent.ok("typing", {"conversation_id": cid, "typing": False})
    assert await cust.next("typing") == {"conversation_id": cid, "user_id": agent_id, "typing": False}
    assert cust.received["typing"] == [{"conversation_id": cid, "user_id": agent_id, "typing": False}]

    for i in range(6):
        await send(agent, cid, f"第 {i + 1} 条")
    await messages(cust, 6)
    # Typing is never stored.
    hist = await cust.ok("history", {"conversation_id": cid})
    assert [m["seq"] for m in hist["messages"]] == [1, 2, 3, 4, 5, 6]
    assert all(m["kind"] == "text" for m in hist["messages"])

    def unread(listing: dict[str, Any]) -> tuple[int, int]:
        conv = next(c for c in listing["conversations"] if c["conversation_id"] == cid)
        assert conv["unread"] == conv["last_seq"] - conv["last_read_seq"]
        return conv["last_read_seq"], conv["unread"]

    assert unread(await cust.ok("list", {})) == (0, 6)
    assert await cust.ok("read", {"conversation_id": cid, "seq": 5}) == {"conversation_id": cid, "seq": 5}
    assert await agent.next("read") == {"conversation_id": cid, "user_id": cust_id, "seq": 5}
    assert unread(await cust.ok("list", {})) == (5, 1)
    # Only forward.
    assert (await cust.ok("read", {"conversation_id": cid, "seq": 3}))["seq"] == 5
    assert (await agent.next("read"))["seq"] == 5
    assert unread(await cust.ok("list", {})) == (5, 1)
    # Never past the last message.
    assert (await cust.ok("read", {"conversation_id": cid, "seq": 1000}))["seq"] == 6
    assert (await agent.next("read"))["seq"] == 6
    assert unread(await cust.ok("list", {})) == (6, 0)
    joined = await cust.ok("join", {"conversation_id": cid, "since_seq": 6})
    assert joined["conversation"]["last_read_seq"] == 6 and joined["conversation"]["unread"] == 0

    # The agent's own marker is separate.
    await agent.ok("read", {"conversation_id": cid, "seq": 2})
    assert (await cust.next("read")) == {"conversation_id": cid, "user_id": agent_id, "seq": 2}
    assert unread(await agent.ok("list", {})) == (2, 4)
    await send(agent, cid, "还有问题吗？")
    assert unread(await cust.ok("list", {})) == (6, 1)
