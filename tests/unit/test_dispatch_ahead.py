"""Requests for later: planned over the horizon by the schedule, energy reserved, answered
per interval."""

from __future__ import annotations

import pytest

from aggregator.dispatch import SCHEDULE_STEP_S, Dispatcher
from broker.models import from_epoch
from tests.unit.test_dispatch import STEP, T0, fleet_and_state, req


def later(power: float, minutes_ahead: float, duration: float, rid: str):  # type: ignore[no-untyped-def]
    return req(power, duration, rid, start=from_epoch(T0 + 60 * minutes_ahead))


def edge(d: Dispatcher, view, minutes_ahead: float, duration: float) -> float:  # type: ignore[no-untyped-def]
    """The most the fleet can export then, read off a request for far too much."""
    probe = Dispatcher(control_step_s=STEP)
    answer = probe.submit(later(-1e5, minutes_ahead, duration, "probe"), T0, view)
    assert answer.status == "partial", answer
    return answer.allocated_kw


def test_a_request_for_later_within_reach_is_accepted_with_its_intervals() -> None:
    _, state = fleet_and_state()
    view = state.view(T0, 3 * STEP)
    d = Dispatcher(control_step_s=STEP)
    power = round(0.5 * edge(d, view, 60, 3600), 1)
    answer = d.submit(later(power, 60, 3600, "r1"), T0, view)
    assert answer.status == "accepted", answer
    assert answer.allocated_kw == power and answer.shortfall_kw == 0
    assert answer.schedule is not None and len(answer.schedule) == 4
    assert [i.start.timestamp() for i in answer.schedule] == [
        T0 + 3600 + k * SCHEDULE_STEP_S for k in range(4)
    ]
    assert all(i.power_kw == pytest.approx(power, abs=0.01) for i in answer.schedule)
    assert all(i.energy_kwh == pytest.approx(power / 4, abs=0.01) for i in answer.schedule)
    assert "scheduled for" in (answer.reason or "")


def test_energy_taken_by_one_request_is_not_offered_to_the_next() -> None:
    _, state = fleet_and_state()
    view = state.view(T0, 3 * STEP)
    d = Dispatcher(control_step_s=STEP)
    alone = edge(d, view, 120, 3600)  # what 23:00-24:00 could have on its own
    first = d.submit(later(round(0.9 * edge(d, view, 60, 3600), 1), 60, 3600, "a"), T0, view)
    assert first.status == "accepted"
    second = d.submit(later(alone, 120, 3600, "b"), T0, view)
    assert second.status == "partial", second
    assert second.allocated_kw > alone + 1.0  # less export than it could have had alone
    assert second.schedule is not None
    got = [i.power_kw for i in second.schedule]
    assert sum(got) > 4 * alone + 1.0 and min(got) < 0  # some of it, not all
    # A third one in the same hours finds nothing left where the second took it all.
    third = d.submit(later(alone, 165, 900, "c"), T0, view)
    assert third.status == "rejected", third
    # The first one's terms stand.
    assert d.answers["a"] == first and d.dispatches["a"].allocated_kw == first.allocated_kw


def test_beyond_the_fleet_the_answer_is_partial_with_what_it_can_hold() -> None:
    _, state = fleet_and_state()
    view = state.view(T0, 3 * STEP)
    d = Dispatcher(control_step_s=STEP)
    answer = d.submit(later(-1e5, 30, 1800, "big"), T0, view)
    assert answer.status == "partial"
    assert -1e5 < answer.allocated_kw < 0
    assert answer.shortfall_kw == pytest.approx(abs(-1e5 - answer.allocated_kw), abs=0.01)
    assert answer.schedule is not None
    # It can hold that much through every interval.
    assert all(i.power_kw <= answer.allocated_kw + 0.01 for i in answer.schedule)


def test_a_request_beyond_the_planning_horizon_is_rejected_with_a_reason() -> None:
    _, state = fleet_and_state()
    view = state.view(T0, 3 * STEP)
    d = Dispatcher(control_step_s=STEP)
    answer = d.submit(later(-10.0, 60 * 47, 7200, "far"), T0, view)
    assert answer.status == "rejected"
    assert "planned up to 48 h ahead" in (answer.reason or "")
