"""Hostile input: counted always, logged at most once per kind per interval.

Anyone can send junk frames, malformed packets, absurd headers or deeply
nested JSON without a token. Each must cost the server a counter increment,
never a log line (let alone a traceback) per occurrence: a log that an
anonymous client can fill is a denial of service on the disk and on the
people who read it. So every such event goes through `Hostile.report(kind)`:

- `realtime_hostile_input_total{kind}` counts every occurrence;
- the first occurrence of a kind in each `interval_s` is logged at WARNING,
  with how many were suppressed since the last line of that kind.

Kinds are a small fixed vocabulary chosen by the code (never by the input),
so the metric's label set stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("realtime.transport.hostile")

# One line per kind per minute: enough to notice an attack in the log and
# find its counter, never enough to fill a disk.
LOG_INTERVAL_S = 60.0


class Hostile:
    __slots__ = ("_count", "_last_log", "_suppressed", "counts", "interval_s")

    def __init__(self, interval_s: float = LOG_INTERVAL_S,
                 count: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        # Also counts each report in the app's metrics.
        self._count = count

    def report(self, kind: str, detail: str = "") -> None:
        """One occurrence of hostile input of `kind` (a fixed word, never
        input). `detail` is a short description by the code (a peer address
        at most), logged only with the first of an interval."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self._count is not None:
            self._count(kind)
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_log[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        more = f" ({suppressed} more since the last line of this kind)" if suppressed else ""
        log.warning("hostile input: %s%s%s", kind, f": {detail}" if detail else "", more)


class HostileLogFilter(logging.Filter):
    """Turns a third-party logger's per-request error line into a counted,
    rate-limited report: aiohttp logs "Error handling request" with a
    traceback for every malformed request (an oversized header, a bad
    request line). Only records whose exception is one of `exc_types` are
    taken; the same line for a real failure (a handler's bug) stays."""

    def __init__(self, hostile: Hostile, kind: str, prefix: str,
                 exc_types: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.hostile = hostile
        self.kind = kind
        self.prefix = prefix
        self.exc_types = exc_types

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.exc_types) and str(record.msg).startswith(self.prefix):
            self.hostile.report(self.kind)
            return False
        return True
