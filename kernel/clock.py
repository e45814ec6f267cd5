from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch, UTC: the only time unit on the wire."""
    return time.time_ns() // 1_000_000
