"""Feedback statistics and export (docs/feedback.md, Analysis). Pure.

The statistics read daily rollups, never the items: one document per day
(in REALTIME_REPORT_TZ) with its counts by status, category, tag and source,
the number of items mentioning each term, and the durations to first
response and to resolution of the items created that day. A month is ~30
small documents whatever the number of items; the medians are exact (the
durations are kept, not bucketed).
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final
from zoneinfo import ZoneInfo

from kernel.errors import Invalid

MAX_DAYS: Final = 366
TOP_TERMS: Final = 20
RISING_TERMS: Final = 10
# A term "rose" when it is in at least this many items of the period and in
# at least twice as many as in the previous period of the same length.
RISING_MIN: Final = 3
RISING_FACTOR: Final = 2.0
# Cells a spreadsheet would run as a formula (OWASP's CSV injection list).
FORMULA_LEAD: Final = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS: Final = ("id", "created", "category", "status", "priority", "assignee", "tags",
                      "order_id", "technician_id", "source", "user_id", "first_response_min",
                      "resolution_min", "body")


@dataclass(frozen=True)
class Period:
    start: dt.date
    end: dt.date  # inclusive

    @classmethod
    def parse(cls, start: str | None, end: str | None, today: dt.date) -> Period:
        """`from`/`to` as YYYY-MM-DD (inclusive); by default the last 30 days."""
        try:
            to = dt.date.fromisoformat(end) if end else today
            frm = dt.date.fromisoformat(start) if start else to - dt.timedelta(days=29)
        except ValueError as exc:
            raise Invalid("from and to are dates, YYYY-MM-DD",
                          [{"field": "from/to", "error": str(exc)}]) from None
        if frm > to:
            raise Invalid("from is after to", [{"field": "from", "error": "after to"}])
        if (to - frm).days + 1 > MAX_DAYS:
            raise Invalid(f"a period is at most {MAX_DAYS} days",
                          [{"field": "from", "error": f"at most {MAX_DAYS} days before to"}])
        return cls(frm, to)

    def days(self) -> list[str]:
        n = (self.end - self.start).days + 1
        return [(self.start + dt.timedelta(days=i)).isoformat() for i in range(n)]

    def previous(self) -> Period:
        length = self.end - self.start + dt.timedelta(days=1)
        return Period(self.start - length, self.start - dt.timedelta(days=1))

    def bounds_ms(self, tz: ZoneInfo) -> tuple[int, int]:
        """[start, end) in ms: the period's first midnight to the midnight after it."""
        start = dt.datetime.combine(self.start, dt.time(), tz)
        end = dt.datetime.combine(self.end + dt.timedelta(days=1), dt.time(), tz)
        return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def week_of(day: str) -> str:
    year, week, _ = dt.date.fromisoformat(day).isocalendar()
    return f"{year}-W{week:02d}"


def _counts(docs: list[dict[str, Any]], kind: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in docs:
        total.update({k: v for k, v in (d.get(kind) or {}).items()})
    return {k: v for k, v in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0}


def _median_min(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    values = [v for d in docs for v in (d.get(kind) or [])]
    return {"count": len(values),
            "median_min": round(statistics.median(values) / 60_000, 1) if values else None}


def summarize(period: Period, docs: list[dict[str, Any]], previous: list[dict[str, Any]],
              group_by: str) -> dict[str, Any]:
    terms = _counts(docs, "term")
    before = _counts(previous, "term")
    rose = sorted(((t, n, before.get(t, 0)) for t, n in terms.items()
                   if n >= RISING_MIN and n >= RISING_FACTOR * before.get(t, 0)),
                  key=lambda r: (r[2] - r[1], r[0]))
    rising = [{"term": t, "count": n, "previous": p} for t, n, p in rose]
    series: Counter[str] = Counter()
    by_day = {d["_id"]: int(d.get("n", 0)) for d in docs}
    for day in period.days():
        key = day if group_by == "day" else week_of(day)
        series[key] += by_day.get(day, 0)
    return {
        "from": period.start.isoformat(), "to": period.end.isoformat(), "group_by": group_by,
        "total": sum(by_day.values()),
        "previous_total": sum(int(d.get("n", 0)) for d in previous),
        "by_status": _counts(docs, "status"),
        "by_category": _counts(docs, "category"),
        "by_tag": _counts(docs, "tag"),
        "by_source": _counts(docs, "source"),
        "first_response": _median_min(docs, "frt"),
        "resolution": _median_min(docs, "res"),
        "series": [{"period": k, "count": v} for k, v in series.items()],
        "top_terms": [{"term": t, "count": n} for t, n in list(terms.items())[:TOP_TERMS]],
        "rising_terms": rising[:RISING_TERMS],
    }


def escape_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: one that would start a
    formula gets a leading apostrophe."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_LEAD):
        return "'" + text
    return text


def csv_row(item: dict[str, Any], tz: ZoneInfo) -> list[str]:
    def minutes(at: Any) -> str:
        return "" if at is None else f"{(int(at) - int(item['ts'])) / 60_000:.1f}"

    created = dt.datetime.fromtimestamp(item["ts"] / 1000, tz).isoformat(timespec="seconds")
    values = [item.get("id") or item.get("_id"), created, item.get("category"), item.get("status"),
              item.get("priority"), item.get("assignee"), ";".join(item.get("tags") or []),
              item.get("order_id"), item.get("technician_id"), item.get("source"),
              (item.get("user") or {}).get("id"), minutes(item.get("first_response_ts")),
              minutes(item.get("resolved_ts")), item.get("body")]
    return [escape_cell(v) for v in values]


def csat_summary(rows: list[dict[str, Any]], tz: ZoneInfo) -> dict[str, Any]:
    """CSAT per agent, and per agent and ISO week: count, mean stars and the
    share of 4-5 stars (`satisfied`, the usual CSAT score)."""
    def stats(stars: list[int]) -> dict[str, Any]:
        return {"count": len(stars), "mean": round(sum(stars) / len(stars), 2),
                "satisfied": round(sum(1 for s in stars if s >= 4) / len(stars), 3)}

    per_agent: dict[str, list[int]] = {}
    per_week: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        agent = str(r.get("agent_id") or "")
        if not agent:
            continue
        day = dt.datetime.fromtimestamp(int(r["ts"]) / 1000, tz).date().isoformat()
        per_agent.setdefault(agent, []).append(int(r["stars"]))
        per_week.setdefault((agent, week_of(day)), []).append(int(r["stars"]))
    return {
        "agents": [{"agent_id": a, **stats(s)} for a, s in sorted(per_agent.items())],
        "weeks": [{"agent_id": a, "week": w, **stats(s)} for (a, w), s in sorted(per_week.items())],
    }
