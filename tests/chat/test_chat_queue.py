"""Extension for the agent console: `queue {limit?}` on /chat lists the waiting
support conversations, first in line first (docs/protocol.md, Support chat)."""

from __future__ import annotations

import time

from tests.conftest import StartApp
from tests.harness import uid

NS = "/chat"


async def test_agents_see_the_support_queue_in_order(start_app: StartApp) -> None:
    live = await start_app(mongo_db=uid("queue_"), agent_cap=1)
    before = time.time_ns() // 1_000_000
    customers = [await live.client("customer", uid("c-"), namespace=NS) for _ in range(3)]
    opened = []
    for i, c in enumerate(customers):
        data = await c.ok("open", {"kind": "support", "topic": f"问题 {i}"})
        assert data["queue_position"] == i + 1
        opened.append(data["conversation"]["conversation_id"])

    agent_id = uid("a-")
    agent = await live.client("agent", agent_id, namespace=NS)
    queue = await agent.ok("queue", {})
    assert [c["conversation_id"] for c in queue["conversations"]] == opened
    assert [c["position"] for c in queue["conversations"]] == [1, 2, 3]
    assert [c["topic"] for c in queue["conversations"]] == ["问题 0", "问题 1", "问题 2"]
    assert queue["has_more"] is False
    assert queue["agent"] == {"status": "away", "load": 0, "cap": 1}
    first = queue["conversations"][0]
    assert first["status"] == "queued" and first["kind"] == "support"
    assert before <= first["waiting_since_ts"] <= time.time_ns() // 1_000_000
    for internal in ("read", "queue_rank", "open_key"):
        assert internal not in first
    page = await agent.ok("queue", {"limit": 2})
    assert [c["conversation_id"] for c in page["conversations"]] == opened[:2] and page["has_more"] is True

    # The agent becomes available (cap 1): the first in line leaves the queue.
    await agent.ok("set_status", {"status": "available"})
    queue = await agent.ok("queue", {})
    assert [(c["conversation_id"], c["position"]) for c in queue["conversations"]] == [
        (opened[1], 1), (opened[2], 2)]
    assert queue["agent"] == {"status": "available", "load": 1, "cap": 1}
    # Another tab of the same agent sees the same status.
    other_tab = await live.client("agent", agent_id, namespace=NS)
    assert (await other_tab.ok("queue", {}))["agent"]["status"] == "available"
    admin = await live.client("admin", uid("adm-"), namespace=NS)
    assert "agent" not in await admin.ok("queue", {})

    # Customers and technicians may not look at the queue; bad limits are invalid.
    await customers[0].error("queue", {}, "forbidden")
    tech = await live.client("technician", uid("t-"), namespace=NS)
    await tech.error("queue", {}, "forbidden")
    await agent.error("queue", {"limit": 0}, "invalid")
    await agent.error("queue", {"limit": 101}, "invalid")
    await agent.error("queue", {"status": "queued"}, "invalid")
