"""ChatService and its Router called directly: no socket. Built as the app
builds them with the memory engine's pieces (MemoryAgentDirectory,
MemoryPresence, local_lock, SendLimits of LocalRateLimiters) and the real
stores (MongoChatStore, MongoOrderStore on SecantusDB, one database per
test). Order changes reach the chat as the app wires them
(`append_order_event`); what the service hands the edge (`delivered`,
`conversation_changed`, `queue_position`) is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from chat.limits import LocalRateLimiter, SendLimits
from chat.masking import PHONE_MASK, WECHAT_MASK
from chat.model import Conversation, Message
from chat.routing import MemoryAgentDirectory, Router, local_lock
from chat.service import ChatService, order_conversation_id
from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden, NotFound, RateLimited
from orders.model import Event, Order
from orders.service import OrderService
from realtime.presence.memory import MemoryPresence
from storage.chat import MongoChatStore
from storage.mongo import MongoOrderStore
from tests.harness import MongoServer, uid, until
from tests.stores import BOUND_S, own_database

BACKEND = Actor("backend", "service")
ADMIN = Actor("adm-1", "admin")
SLOW = 0.01  # tokens per second: nothing refills while a test runs


class Env:
    def __init__(self, chat_store: MongoChatStore, order_store: MongoOrderStore, *, cap: int,
                 grace_s: float, limits: SendLimits) -> None:
        self.store = chat_store
        self.presence = MemoryPresence()
        self.directory = MemoryAgentDirectory()
        self.changed: list[Conversation] = []
        self.positions: list[tuple[str, int]] = []
        self.delivered: list[tuple[Message, str | None]] = []
        self.router = Router(chat_store, directory=self.directory, presence=self.presence,
                             conversation_changed=self._conversation_changed,
                             queue_position=self._queue_position, pump_lock=local_lock(),
                             cap=cap, grace_s=grace_s)
        self.orders = OrderService(order_store, self._order_changed, busy_wait_s=BOUND_S)
        self.chat = ChatService(chat_store, self.orders, self.router, self._delivered,
                                limits=limits, busy_wait_s=BOUND_S)

    async def _conversation_changed(self, conv: Conversation) -> None:
        self.changed.append(conv)

    async def _queue_position(self, conv: Conversation, position: int) -> None:
        self.positions.append((conv["conversation_id"], position))

    async def _delivered(self, conv: Conversation, msg: Message, origin: str | None) -> None:
        self.delivered.append((msg, origin))

    async def _order_changed(self, order: Order, event: Event) -> None:
        await self.chat.append_order_event(order, event)

    # -- actors, as the chat namespace connects them --------------------------------------------
    async def agent_online(self, status: str = "available") -> Actor:
        agent = Actor(uid("a-"), "agent")
        await self.presence.connect(agent.id)
        assert await self.router.agent_connected(agent.id) == "away"
        if status != "away":
            await self.router.set_status(agent.id, status)
        return agent

    async def agent_gone(self, agent: Actor) -> None:
        assert await self.presence.disconnect(agent.id)
        self.router.agent_offline(agent.id)

    async def support(self, customer: Actor | None = None) -> tuple[Actor, Conversation, int | None]:
        customer = customer or Actor(uid("c-"), "customer")
        conv, position = await self.chat.open_support(customer, None, "空调不制冷")
        return customer, conv, position

    async def order_for(self, customer: Actor, tech: Actor) -> str:
        order, _ = await self.orders.create(BACKEND, {
            "order_id": uid("o-"), "customer_id": customer.id, "service": {"code": "aircon"},
            "address": {"lat": 31.23, "lng": 121.47, "text": "人民广场"},
            "window": {"start_ts": 1, "end_ts": 2}})
        await self.orders.transition(BACKEND, order["order_id"], "assigned",
                                     {"technician_id": tech.id})
        return str(order["order_id"])

    async def send(self, actor: Actor, cid: str, body: str, cmid: str | None = None) -> Message:
        return await self.chat.send(actor, None, cid, cmid or uid("m-"), body, "text")

    async def status(self, cid: str) -> tuple[str, str | None]:
        conv = await self.chat.get(cid)
        return conv["status"], conv.get("assignee")


Make = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make(mongo_server: MongoServer) -> AsyncIterator[Make]:
    """Builds an Env on a database of this test's own; closes what it built."""
    async with own_database(mongo_server, "chat_") as own:
        chat_store = MongoChatStore(own.client, own.db, gate=own.gate)
        await chat_store.ensure_indexes()
        order_store = MongoOrderStore(own.client, own.db, gate=own.gate)
        built: list[Env] = []

        async def build(cap: int = 5, grace_s: float = 60.0,
                        user_rate: tuple[float, float] = (2.0, 20.0),
                        conversation_rate: tuple[float, float] = (10.0, 50.0)) -> Env:
            # The defaults are the settings' (agent cap, grace, chat send limits).
            env = Env(chat_store, order_store, cap=cap, grace_s=grace_s,
                      limits=SendLimits(LocalRateLimiter(*user_rate),
                                        LocalRateLimiter(*conversation_rate)))
            built.append(env)
            return env

        try:
            yield build
        finally:
            for env in built:
                await env.router.close()


@pytest.fixture
async def env(make: Make) -> Env:
    return await make()


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


# -- opening and routing ----------------------------------------------------------------------------

async def test_a_customer_has_one_open_support_conversation_and_a_place_in_line(env: Env) -> None:
    customer, conv, position = await env.support()
    assert (conv["kind"], conv["status"], conv["customer_id"], conv["last_seq"]) == (
        "support", "queued", customer.id, 0)
    assert conv["conversation_id"].startswith("s-") and position == 1
    _, again, position_again = await env.support(customer)  # a second open: the same one
    assert again["conversation_id"] == conv["conversation_id"] and position_again == 1
    _, other, other_position = await env.support()
    assert other_position == 2
    assert env.positions == [(conv["conversation_id"], 1), (other["conversation_id"], 2)]
    for role in ("technician", "agent", "admin"):
        with pytest.raises(Forbidden):
            await env.chat.open_support(Actor(uid(), role), None, None)


async def test_support_about_someone_elses_order_is_not_found(env: Env) -> None:
    customer, tech = Actor(uid("c-"), "customer"), Actor(uid("t-"), "technician")
    oid = await env.order_for(customer, tech)
    with pytest.raises(NotFound):
        await env.chat.open_support(Actor(uid("c-"), "customer"), oid, None)
    conv, _ = await env.chat.open_support(customer, oid, "发票")
    assert (conv["order_id"], conv["topic"]) == (oid, "发票")


async def test_an_available_agent_takes_the_oldest_waiting_customer_up_to_the_cap(make: Make) -> None:
    env = await make(cap=1)
    _, first, _ = await env.support()
    _, second, _ = await env.support()
    agent = await env.agent_online("away")  # online but away: handed nothing
    assert await env.status(first["conversation_id"]) == ("queued", None)
    assert await env.router.set_status(agent.id, "available") == ("available", 1)
    assert await env.status(first["conversation_id"]) == ("assigned", agent.id)
    assert await env.status(second["conversation_id"]) == ("queued", None)
    assert [(c["conversation_id"], c["status"], c["assignee"]) for c in env.changed] == [
        (first["conversation_id"], "assigned", agent.id)]
    # The second customer moved up to the head of the line and was told so.
    assert env.positions[-1] == (second["conversation_id"], 1)
    assert await env.chat.agent_status(agent.id) == ("available", 1)


async def test_the_least_loaded_online_agent_is_chosen(make: Make) -> None:
    env = await make(cap=2)
    busy, idle = await env.agent_online(), await env.agent_online()
    offline = Actor(uid("a-"), "agent")
    await env.directory.set_status(offline.id, "available")  # available, but not connected
    convs = [(await env.support())[1]["conversation_id"] for _ in range(5)]
    owners = [(await env.status(c))[1] for c in convs]
    assert sorted(o for o in owners if o) == sorted([busy.id, busy.id, idle.id, idle.id])
    assert owners[:4].count(busy.id) == 2 and owners[4] is None  # both at the cap
    assert offline.id not in owners
    # A closed conversation frees its agent, who takes the one still waiting.
    freed = owners[0]
    assert freed is not None
    await env.chat.close(Actor(freed, "agent"), convs[0])
    assert await env.status(convs[4]) == ("assigned", freed)


async def test_after_the_grace_an_absent_agents_chats_go_back_to_the_front(make: Make) -> None:
    env = await make(cap=1, grace_s=0.05)
    gone = await env.agent_online()
    _, taken, _ = await env.support()
    _, waiting, _ = await env.support()
    assert await env.status(taken["conversation_id"]) == ("assigned", gone.id)
    await env.agent_gone(gone)

    async def requeued() -> bool:
        return (await env.status(taken["conversation_id"]))[0] == "queued"

    await until(requeued, 3.0, every=0.01, what="requeue after the grace")
    queue = await env.chat.queue(ADMIN, 10)
    assert [c["conversation_id"] for c in queue] == [taken["conversation_id"],
                                                     waiting["conversation_id"]]
    assert [c["position"] for c in queue] == [1, 2]
    assert await env.directory.status(gone.id) is None  # forgotten: away when back
    newcomer = await env.agent_online()
    assert await env.status(taken["conversation_id"]) == ("assigned", newcomer.id)


async def test_an_agent_back_within_the_grace_keeps_their_chats(make: Make) -> None:
    env = await make(grace_s=0.2)
    agent = await env.agent_online()
    _, conv, _ = await env.support()
    await env.agent_gone(agent)
    grace = env.router._graces[agent.id]
    await env.presence.connect(agent.id)
    assert await env.router.agent_connected(agent.id) == "available"
    await asyncio.wait([grace])  # its end: cancelled, before the grace ran out
    assert grace.cancelled()
    assert await env.status(conv["conversation_id"]) == ("assigned", agent.id)


async def test_transfers_go_only_to_an_online_agent(make: Make) -> None:
    env = await make(cap=1)
    first = await env.agent_online()
    _, conv, _ = await env.support()
    cid = conv["conversation_id"]
    second = await env.agent_online("away")
    with pytest.raises(Forbidden):  # not theirs to transfer
        await env.chat.transfer(second, cid, second.id)
    with pytest.raises(Conflict):
        await env.chat.transfer(first, cid, uid("a-offline-"))
    with pytest.raises(Conflict):
        await env.chat.transfer(first, cid, first.id)
    moved = await env.chat.transfer(first, cid, second.id)
    assert (moved["assignee"], moved["transferred_from"]) == (second.id, first.id)
    _, waiting, _ = await env.support()  # the first agent has room again: takes the next
    assert await env.status(waiting["conversation_id"]) == ("assigned", first.id)


# -- messages ---------------------------------------------------------------------------------------

async def test_a_send_is_stored_once_per_client_msg_id(env: Env) -> None:
    agent = await env.agent_online()
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    first = await env.chat.send(customer, "王女士", cid, "m-1", "你好", "text", origin="sid-1")
    assert (first["seq"], first["body"], first["client_msg_id"]) == (1, "你好", "m-1")
    assert first["sender"] == {"id": customer.id, "role": "customer", "name": "王女士"}
    # The retry (another connection, even other text) returns the stored message.
    retry = await env.chat.send(customer, "王女士", cid, "m-1", "你好!!", "text", origin="sid-2")
    assert retry == first
    second = await env.send(agent, cid, "您好，请讲")
    assert second["seq"] == 2
    assert [(m["seq"], origin) for m, origin in env.delivered] == [(1, "sid-1"), (2, None)]
    # The same client_msg_id from someone else is their own message.
    assert (await env.send(agent, cid, "另一条", "m-1"))["seq"] == 3
    assert (await env.chat.get(cid))["last_seq"] == 3


async def test_who_may_read_and_post(env: Env) -> None:
    assigned = await env.agent_online()
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    stranger = Actor(uid("c-"), "customer")
    for call in (env.send(stranger, cid, "hi"), env.chat.join(stranger, cid, 0),
                 env.chat.history(stranger, cid, None, 10), env.send(customer, "s-missing", "hi")):
        with pytest.raises(NotFound):
            await call
    other_agent = await env.agent_online("away")
    assert (await env.chat.join(other_agent, cid, 0))["messages"] == []  # staff may read
    with pytest.raises(Forbidden):  # but only the assigned agent answers
        await env.send(other_agent, cid, "我来")
    assert (await env.send(assigned, cid, "您好"))["seq"] == 1
    assert (await env.send(ADMIN, cid, "管理员"))["seq"] == 2


async def test_history_pages_back_to_the_first_message(env: Env) -> None:
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    for i in range(5):
        await env.send(customer, cid, f"第{i + 1}条")
    page = await env.chat.history(customer, cid, None, 2)
    assert (seqs(page["messages"]), page["has_more"]) == ([4, 5], True)
    page = await env.chat.history(customer, cid, 4, 2)
    assert (seqs(page["messages"]), page["has_more"]) == ([2, 3], True)
    page = await env.chat.history(customer, cid, 2, 2)
    assert (seqs(page["messages"]), page["has_more"]) == ([1], False)
    assert page["messages"][0]["body"] == "第1条"
    joined = await env.chat.join(customer, cid, 3)
    assert seqs(joined["messages"]) == [4, 5] and joined["has_more"] is False


async def test_read_markers_move_forward_only_and_count_unread(env: Env) -> None:
    agent = await env.agent_online()
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    for i in range(5):
        await env.send(agent, cid, f"msg {i}")
    assert (await env.chat.view(customer, await env.chat.get(cid)))["unread"] == 5
    assert (await env.chat.mark_read(customer, cid, 2))[1] == 2
    assert (await env.chat.mark_read(customer, cid, 1))[1] == 2  # never backwards
    view = await env.chat.view(customer, await env.chat.get(cid))
    assert (view["last_read_seq"], view["unread"]) == (2, 3)
    assert (await env.chat.mark_read(customer, cid, 99))[1] == 5  # no further than the last
    [listed] = await env.chat.conversations(customer)
    assert (listed["conversation_id"], listed["last_read_seq"], listed["unread"]) == (cid, 5, 0)
    # Markers are per reader: the agent has read nothing yet.
    assert (await env.chat.join(agent, cid, 0))["conversation"]["unread"] == 5
    with pytest.raises(NotFound):
        await env.chat.mark_read(Actor(uid("c-"), "customer"), cid, 1)


async def test_contact_details_are_masked_for_the_other_party_of_an_order_chat(env: Env) -> None:
    customer, tech = Actor(uid("c-"), "customer"), Actor(uid("t-"), "technician")
    oid = await env.order_for(customer, tech)
    conv = await env.chat.open_order(customer, oid)
    cid = conv["conversation_id"]
    assert (cid, conv["technician_id"]) == (order_conversation_id(oid), tech.id)
    text = "我的电话 138 1234 5678，微信 wxid_abc123"
    mine = await env.send(customer, cid, text)
    assert mine["body"] == text and "masked" not in mine  # the sender sees what they typed
    hidden = f"我的电话 {PHONE_MASK}，微信 {WECHAT_MASK}"
    theirs = (await env.chat.history(tech, cid, None, 10))["messages"][-1]
    assert theirs["body"] == hidden and "masked" not in theirs
    agent = Actor(uid("a-"), "agent")
    staff = (await env.chat.join(agent, cid, 0))["messages"][-1]
    assert (staff["body"], staff["masked"]) == (text, True)
    plain = await env.send(tech, cid, "马上到")  # nothing to hide
    assert "masked_body" not in env.delivered[-1][0] and plain["body"] == "马上到"
    # A support chat is with the platform itself: nothing is masked there.
    support_agent = await env.agent_online()
    _, sconv, _ = await env.support(customer)
    await env.send(customer, sconv["conversation_id"], text)
    seen = (await env.chat.history(support_agent, sconv["conversation_id"], None, 1))["messages"][0]
    assert seen["body"] == text and "masked" not in seen


async def test_the_order_timeline_appears_once_as_system_cards(env: Env) -> None:
    customer, tech = Actor(uid("c-"), "customer"), Actor(uid("t-"), "technician")
    oid = await env.order_for(customer, tech)
    await env.orders.transition(tech, oid, "en_route")
    cid = order_conversation_id(oid)
    cards = (await env.chat.history(customer, cid, None, 10))["messages"]
    assert [(m["seq"], m["kind"], m["body"], m["client_msg_id"]) for m in cards] == [
        (1, "system", "订单状态：已预约", "order-event:1"),
        (2, "system", "订单状态：已分配", "order-event:2"),
        (3, "system", "订单状态：在路上", "order-event:3")]
    assert cards[2]["sender"] == {"id": "system", "role": "system", "name": None}
    assert cards[2]["order_event"]["actor"] == {"id": tech.id, "role": "technician"}
    # The same event again (a retried notification) adds nothing.
    order = await env.orders.get(oid)
    [third] = await env.orders.events_since(oid, 2)
    await env.chat.append_order_event(order, third)
    assert (await env.chat.get(cid))["last_seq"] == 3


# -- limits and closing -----------------------------------------------------------------------------

async def test_a_user_over_the_send_rate_is_refused(make: Make) -> None:
    env = await make(user_rate=(SLOW, 3))
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    for _ in range(3):
        await env.send(customer, cid, "在吗")
    with pytest.raises(RateLimited) as info:
        await env.send(customer, cid, "在吗")
    assert 90_000 <= info.value.retry_after_ms <= 100_000
    assert info.value.message == "you are sending messages too fast"
    assert (await env.chat.get(cid))["last_seq"] == 3
    # Every attempt counts, a retry of a stored message too.
    with pytest.raises(RateLimited):
        await env.send(customer, cid, "在吗", "m-retry")


async def test_a_conversation_over_its_rate_is_refused_but_outsiders_cannot_spend_it(
        make: Make) -> None:
    env = await make(conversation_rate=(SLOW, 2))
    agent = await env.agent_online()
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    for _ in range(3):  # refused before the conversation's allowance is touched
        with pytest.raises(NotFound):
            await env.send(Actor(uid("c-"), "customer"), cid, "spam")
    await env.send(customer, cid, "一")
    await env.send(agent, cid, "二")
    with pytest.raises(RateLimited) as info:
        await env.send(customer, cid, "三")
    assert info.value.message == "too many messages in this conversation"


async def test_a_closed_conversation_takes_no_new_messages_but_answers_retries(env: Env) -> None:
    await env.agent_online()
    customer, conv, _ = await env.support()
    cid = conv["conversation_id"]
    stored = await env.send(customer, cid, "谢谢", "m-last")
    with pytest.raises(Conflict):  # only closed conversations are rated
        await env.chat.rate(customer, cid, 5, None)
    closed = await env.chat.close(customer, cid)
    # chat/model.py types closed_by as str; chat/service.py stores the ActorRef.
    assert closed["status"] == "closed" and closed["closed_by"] == customer.as_dict()
    with pytest.raises(Conflict):
        await env.chat.close(customer, cid)
    with pytest.raises(Conflict):
        await env.send(customer, cid, "还有一个问题")
    assert await env.send(customer, cid, "谢谢", "m-last") == stored
    rated = await env.chat.rate(customer, cid, 5, "很好")
    csat = rated["csat"]
    assert csat is not None and (csat["stars"], csat["comment"]) == (5, "很好")
    with pytest.raises(Conflict):
        await env.chat.rate(customer, cid, 1, None)
    # Closed, the customer may open a new one.
    _, fresh, _ = await env.support(customer)
    assert fresh["conversation_id"] != cid


async def test_an_agent_leaving_after_the_router_closed_starts_no_grace(make: Make) -> None:
    """A disconnect handled as the node stops (after the router closed) must
    not start a grace timer that nothing would end."""
    env = await make(grace_s=60.0)
    env.router.agent_offline("agent-before")
    assert "agent-before" in env.router._graces
    await env.router.close()
    env.router.agent_offline("agent-after")
    assert env.router._graces == {}
