"""What the chat wire tests share: clients, conversations, and helpers to read what they received."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.conftest import Live
from tests.harness import (
    Client,
    uid,
)

NS = "/chat"
WAIT = 10.0


# -- helpers ------------------------------------------------------------------------------


async def connect(live: Live, role: str, sub: str | None = None, name: str | None = None) -> Client:
    kw: dict[str, Any] = {"name": name} if name else {}
    return await live.client(role, sub or uid(f"{role}-"), namespace=NS, **kw)


def payload(cid: str, body: str, cmid: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"conversation_id": cid, "client_msg_id": cmid or uid("m-"), "body": body, **extra}


async def send(c: Client, cid: str, body: str, cmid: str | None = None) -> dict[str, Any]:
    data = await c.ok("send", payload(cid, body, cmid))
    assert set(data) == {"message"}, data
    return dict(data["message"])


async def next_where(c: Client, event: str, pred: Callable[[Any], bool],
                     timeout: float = WAIT) -> Any:
    """The next `event` matching pred (earlier non-matching ones are consumed)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no matching {event!r}; received: {c.received.get(event)}")
        item = await c.next(event, timeout=remaining)
        if pred(item):
            return item


async def conversation_event(c: Client, cid: str, status: str | None = None,
                             timeout: float = WAIT) -> dict[str, Any]:
    conv = await next_where(c, "conversation", lambda x: x["conversation_id"] == cid
                            and (status is None or x["status"] == status), timeout)
    return dict(conv)


async def messages(c: Client, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    return [await c.next("message", timeout=timeout) for _ in range(n)]


async def until_marker(c: Client, marker_cmid: str, timeout: float = WAIT) -> list[dict[str, Any]]:
    """Messages pushed to c before the marker message (which proves nothing else was queued)."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await c.next("message", timeout=timeout)
        if msg["client_msg_id"] == marker_cmid:
            return seen
        seen.append(msg)


async def open_assigned(live: Live, cust: Client, agent: Client, agent_id: str) -> str:
    """The customer opens support; the agent becomes available and gets it."""
    opened = await cust.ok("open", {"kind": "support"})
    cid = opened["conversation"]["conversation_id"]
    await agent.ok("set_status", {"status": "available"})
    conv = await conversation_event(agent, cid, "assigned")
    assert conv["assignee"] == agent_id
    await conversation_event(cust, cid, "assigned")
    return str(cid)


async def transcript(live: Live, cid: str, role: str = "agent", **query: int) -> tuple[int, Any]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return await live.http.request("GET", f"/api/conversations/{cid}/messages" + (f"?{qs}" if qs else ""),
                                   live.token(role))
