"""The deadline of the request being served, shared by every step of it.

A client is promised an answer within REALTIME_MONGO_TIMEOUT_MS, store down or
not (docs/protocol.md, Replies). A request may take several steps that each
wait (a lock, one store operation, another): each bounded alone, together
they could take several bounds. The edge sets the request's deadline once
(`start`); every wait takes the earlier of its own bound and what is left
(`remaining`). It lives in a ContextVar: each request runs in a task of its
own, and what that task starts inherits it.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

# The loop time by which the current request must be answered (None: no
# request, e.g. the server's own background work).
_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)


def start(bound_s: float) -> None:
    """The request served by this task must be answered within `bound_s`."""
    _DEADLINE.set(asyncio.get_running_loop().time() + bound_s)


def at() -> float | None:
    """The current request's deadline (loop time), if any."""
    return _DEADLINE.get()


def remaining(bound_s: float | None) -> float | None:
    """How long a wait bounded by `bound_s` (None: unbounded) may take now:
    the shorter of it and what is left of the request's time (never below 0)."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return bound_s
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    return left if bound_s is None else min(bound_s, left)
