"""The order state machine as pure functions (orders/lifecycle.py): the table,
who may move an order where, and the order of the checks."""

from __future__ import annotations

import pytest

from kernel.actor import Actor
from kernel.errors import Conflict, Forbidden
from orders.lifecycle import NEXT, STATES, TECHNICIAN_PHASE, check_transition, may_move

CUSTOMER = Actor("c-1", "customer")
TECH = Actor("t-1", "technician")
OTHER_TECH = Actor("t-2", "technician")
AGENT = Actor("a-1", "agent")
ADMIN = Actor("adm-1", "admin")
BACKEND = Actor("backend", "service")
DISPATCH = Actor("dispatch", "system")
GEOFENCE = Actor("geofence", "system")


def moves(actor: Actor, target: str) -> bool:
    return may_move(actor, target=target, customer_id="c-1", technician_id="t-1")


def test_the_table_covers_every_state_and_ends_in_terminal_states() -> None:
    assert set(NEXT) == set(STATES)
    for successors in NEXT.values():
        assert successors <= set(STATES)
    assert {s for s, nxt in NEXT.items() if not nxt} == {"refunded", "refund_rejected"}
    # Only a re-assignment goes from a state to itself.
    assert [s for s, nxt in NEXT.items() if s in nxt] == ["assigned"]
    assert TECHNICIAN_PHASE == {"assigned", "en_route", "arrived", "in_service"}


@pytest.mark.parametrize(("actor", "allowed"), [
    (CUSTOMER, {"cancelled", "refund_requested"}),
    (Actor("c-2", "customer"), set()),
    (TECH, {"en_route", "arrived", "in_service", "completed"}),
    (OTHER_TECH, set()),
    # (Agents re-assign only: check_transition refuses their first assignment.)
    (AGENT, {"assigned", "cancelled", "refunded", "refund_rejected"}),
    (ADMIN, {"assigned", "en_route", "arrived", "in_service", "completed", "cancelled",
             "refunded", "refund_rejected"}),
    (BACKEND, {"assigned", "en_route", "arrived", "in_service", "completed", "cancelled",
               "refunded", "refund_rejected"}),
    # Assigning is dispatch's alone; arrival may be marked by any system actor.
    (DISPATCH, {"assigned", "arrived"}),
    (Actor("other", "system"), {"arrived"}),
    (GEOFENCE, {"arrived"}),
])
def test_who_may_move_an_order_where(actor: Actor, allowed: set[str]) -> None:
    targets = set(STATES) - {"created"}  # nothing leads to `created`
    assert {t for t in targets if moves(actor, t)} == allowed


def test_permission_is_checked_before_the_state() -> None:
    """Whoever may not make a move learns nothing of the order's state."""
    with pytest.raises(Forbidden):
        check_transition(OTHER_TECH, state="completed", target="en_route", customer_id="c-1",
                         technician_id="t-1")
    with pytest.raises(Forbidden):
        check_transition(CUSTOMER, state="created", target="refunded", customer_id="c-1",
                         technician_id=None)
    with pytest.raises(Conflict) as info:
        check_transition(TECH, state="completed", target="en_route", customer_id="c-1",
                         technician_id="t-1")
    assert info.value.details == {"state": "completed"}


@pytest.mark.parametrize(("state", "customer_may"), [
    ("created", True), ("assigned", True), ("en_route", False), ("arrived", False),
])
def test_a_customer_cancels_only_before_the_technician_sets_off(state: str,
                                                               customer_may: bool) -> None:
    def cancel(actor: Actor) -> None:
        check_transition(actor, state=state, target="cancelled", customer_id="c-1",
                         technician_id="t-1")

    if customer_may:
        cancel(CUSTOMER)
    else:
        with pytest.raises(Conflict) as info:
            cancel(CUSTOMER)
        assert info.value.details == {"state": state}
    cancel(AGENT)  # support may always cancel where the table allows it


def test_every_legal_move_passes_for_staff() -> None:
    for state, successors in NEXT.items():
        for target in successors:
            if target == "refund_requested":
                actor = CUSTOMER
            else:
                actor = ADMIN
            check_transition(actor, state=state, target=target, customer_id="c-1",
                             technician_id="t-1")
        for target in set(STATES) - successors - {"refund_requested"}:
            with pytest.raises(Conflict):
                check_transition(ADMIN, state=state, target=target, customer_id="c-1",
                                 technician_id="t-1")
