"""realtime/interest.py on its own: who announces what, who gets a position."""

from __future__ import annotations

from typing import Any

from realtime.interest import Interest


def pair() -> tuple[Interest, Interest, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    a = Interest("A", lambda name, data: sent.append((name, data)), ttl_s=30.0)
    b = Interest("B", lambda name, data: sent.append((name, data)), ttl_s=30.0)
    return a, b, sent


def relay(sent: list[tuple[str, dict[str, Any]]], *nodes: Interest) -> None:
    while sent:
        name, data = sent.pop(0)
        for n in nodes:
            (n.on_interest if name == "interest" else n.on_query)(data)


def test_first_and_last_watcher_are_announced_once() -> None:
    a, b, sent = pair()
    b.add_order("o1")
    b.add_order("o1")
    assert [d for _, d in sent] == [{"node": "B", "orders": ["o1"]}]
    relay(sent, a)
    assert a.targets("o1") == ["B"] and a.targets("o2") == [] and a.targets(None) == []
    b.remove_order("o1")
    assert sent == []  # one watcher is left
    b.remove_order("o1")
    relay(sent, a)
    assert a.targets("o1") == []
    b.remove_order("o1")  # more removes than adds: nothing to say
    assert sent == []


def test_area_watchers_want_everything_and_own_node_is_never_a_target() -> None:
    a, b, sent = pair()
    b.add_area()
    a.add_order("o1")  # A's own interest never makes A a target of itself
    relay(sent, a, b)
    assert a.targets("o1") == ["B"] and a.targets(None) == ["B"]
    assert b.targets("o1") == ["A"] and b.targets(None) == []
    b.remove_area()
    relay(sent, a)
    assert a.targets("o9") == []


def test_interest_not_repeated_within_ttl_is_forgotten() -> None:
    now = [1000.0]
    a = Interest("A", lambda n, d: None, ttl_s=30.0, clock=lambda: now[0])
    a.on_interest({"node": "B", "orders": ["o1"], "area": True})
    now[0] += 29.9
    assert a.targets("o1") == ["B"]
    now[0] += 0.2
    assert a.targets("o1") == [] and a.targets(None) == []


def test_a_query_is_answered_with_everything() -> None:
    _, b, sent = pair()
    b.add_order("o1")
    b.add_area()
    sent.clear()
    b.on_query({"node": "A"})
    assert sent == [("interest", {"node": "B", "orders": ["o1"], "area": True})]
    b.on_query({"node": "B"})  # its own query: nothing
    assert len(sent) == 1


def test_malformed_announcements_are_ignored() -> None:
    a, _, _ = pair()
    for bad in ({}, {"node": 7, "orders": ["o1"]}, {"node": "A", "orders": ["o1"]}):
        a.on_interest(bad)
    assert a.targets("o1") == []
