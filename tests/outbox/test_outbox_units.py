"""The outbox's pure parts: topics and patterns, the retry schedule, who
hears what, quiet hours."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from outbox.notices import check_clock, held_until, notices_for
from outbox.records import PARTITIONS, check_pattern, order_record, partition, topic_matches
from outbox.retry import DEFAULT_SCHEDULE_S, next_wait_s, parse_schedule

SH = ZoneInfo("Asia/Shanghai")


def ms(y: int, mo: int, d: int, h: int, mi: int = 0) -> int:
    return int(dt.datetime(y, mo, d, h, mi, tzinfo=SH).timestamp() * 1000)


def order(**kw: object) -> dict[str, object]:
    return {"order_id": "o1", "customer_id": "c1", "technician_id": "t1", "state": "assigned",
            "seq": 2, "service": {"code": "x", "name": "空调维修"}, **kw}


def event(ev_type: str, state: str, actor: str = "backend", **data: object) -> dict[str, object]:
    return {"order_id": "o1", "seq": 2, "type": ev_type, "state": state, "ts": 1,
            "actor": {"id": actor, "role": "service"}, "data": data}


def test_topics_and_patterns() -> None:
    assert order_record(order(), event("state_changed", "en_route"))["topic"] == "order.en_route"
    assert order_record(order(), event("late_risk", "assigned"))["topic"] == "order.late_risk"
    assert topic_matches(["order.*"], "order.en_route")
    assert not topic_matches(["order.*"], "orders.x") and not topic_matches(["chat.*"], "order.x")
    assert topic_matches(["*"], "anything") and topic_matches(["chat.csat"], "chat.csat")
    for bad in ("foo.*", "order.**", "", "order.*.x", "order..x"):
        assert check_pattern(bad) is not None, bad
    for good in ("*", "order.*", "order.en_route", "notification.created"):
        assert check_pattern(good) is None, good
    assert {partition(f"order:{i}") for i in range(1000)} == set(range(PARTITIONS))
    assert partition("order:o1") == partition("order:o1")


def test_the_retry_schedule_is_jittered_and_ends() -> None:
    rnd = random.Random(7)
    waits = [next_wait_s(DEFAULT_SCHEDULE_S, n, rnd) for n in range(1, 9)]
    assert waits[-1] is None and all(w is not None for w in waits[:-1])
    for w, base in zip(waits, DEFAULT_SCHEDULE_S, strict=False):
        assert w is not None and 0.8 * base <= w <= 1.2 * base
    assert parse_schedule("0.5, 2,10") == (0.5, 2.0, 10.0)
    for bad in ("", "0", "-1", "x", ",".join(["1"] * 21), "700000"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_who_hears_what() -> None:
    def who(ev: dict[str, object], o: dict[str, object] | None = None) -> list[tuple[str, str]]:
        rec = order_record(o or order(), ev)
        return [(n.user_id, n.kind) for n in notices_for(rec, 0)]

    assert who(event("state_changed", "assigned")) == [("c1", "order"), ("t1", "order")]
    assert who(event("state_changed", "en_route", actor="t1")) == [("c1", "order")]
    # Whoever made the change is not told of it.
    assert who(event("state_changed", "cancelled", actor="c1")) == [("t1", "order")]
    assert who(event("state_changed", "refunded")) == [("c1", "refund")]
    assert who(event("reassigned", "assigned", previous_technician_id="t0")) == [
        ("c1", "order"), ("t1", "order"), ("t0", "order")]
    assert who(event("late_risk", "assigned", minutes_late=15)) == [("c1", "late")]
    assert who(event("rated", "completed", actor="c1", stars=5)) == [("t1", "rating")]
    assert who(event("dispatch_failed", "created")) == []
    rec = order_record(order(), event("late_risk", "assigned", minutes_late=15))
    (n,) = notices_for(rec, 0)
    assert n.body["zh-CN"] == "空调维修：技师预计晚到约 15 分钟" and n.urgent
    assert n.link == "/track/o1" and n.collapse_key == "order:o1"


def test_quiet_hours() -> None:
    night = {"start": "22:00", "end": "08:00", "tz": "Asia/Shanghai"}
    assert held_until(night, ms(2026, 12, 6, 23)) == ms(2026, 12, 7, 8)
    assert held_until(night, ms(2026, 12, 7, 3)) == ms(2026, 12, 7, 8)
    assert held_until(night, ms(2026, 12, 7, 8)) is None
    assert held_until(night, ms(2026, 12, 7, 12)) is None
    day = {"start": "12:00", "end": "14:00", "tz": "Asia/Shanghai"}
    assert held_until(day, ms(2026, 12, 7, 13, 30)) == ms(2026, 12, 7, 14)
    assert held_until(day, ms(2026, 12, 7, 14, 30)) is None
    assert held_until({"start": "09:00", "end": "09:00"}, ms(2026, 12, 7, 9)) is None
    assert held_until(None, 0) is None
    assert check_clock("07:05") and not check_clock("7:05") and not check_clock("24:00")
