"""When a failed delivery is tried again (docs/webhooks.md, "Retries").

The default is Standard Webhooks' (Svix's) schedule: at once, then after
5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h: eight tries over about 28
hours. Each wait is stretched or shrunk by up to 20% at random, so that
deliveries that failed together (an endpoint's outage) do not come back
together."""

from __future__ import annotations

import random
from typing import Final

DEFAULT_SCHEDULE_S: Final = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
JITTER: Final = 0.2


def parse_schedule(text: str) -> tuple[float, ...]:
    """`5,300,1800` -> the waits after the 1st, 2nd, 3rd failure."""
    waits = tuple(float(x) for x in text.split(",") if x.strip())
    if not waits or len(waits) > 20 or any(not 0 < w <= 7 * 86400 for w in waits):
        raise ValueError("1 to 20 waits in seconds, each in (0, 604800]")
    return waits


def next_wait_s(schedule: tuple[float, ...], failures: int,
                rnd: random.Random | None = None) -> float | None:
    """The wait after the `failures`-th failed try, or None: that was the last."""
    if failures < 1 or failures > len(schedule):
        return None
    r = (rnd or random).uniform(1 - JITTER, 1 + JITTER)
    return schedule[failures - 1] * r
