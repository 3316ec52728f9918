"""Requests for later: planned over the horizon by the schedule, energy reserved, answered
per interval."""

from __future__ import annotations

import pytest

from aggregator.dispatch import SCHEDULE_STEP_S, Dispatcher
from broker.models import from_epoch
from tests.support.memory_loop import STEP, T0, close_loop, fleet_and_state, req


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


def test_a_planned_request_is_scheduled_on_its_own_start_and_the_quarter_hours() -> None:
    """Asked at 21:02 for 22:07-22:37: 22:07-22:15, 22:15-22:30, 22:30-22:37 (not on a
    15-min grid from the moment it was asked)."""
    _, state = fleet_and_state()
    asked = T0 + 120.0
    view = state.view(asked, 200.0)  # the reports of T0 still count
    d = Dispatcher(control_step_s=STEP)
    start = T0 + 3600.0 + 7 * 60.0
    answer = d.submit(req(-20.0, 1800.0, "q", start=from_epoch(start)), asked, view)
    assert answer.status == "accepted", answer
    assert answer.schedule is not None
    spans = [(i.start.timestamp(), i.duration_s) for i in answer.schedule]
    assert spans == [(start, 480.0), (T0 + 4500.0, 900.0), (T0 + 5400.0, 420.0)]
    # Each interval's energy is its power over its own length.
    for i in answer.schedule:
        assert i.energy_kwh == pytest.approx(i.power_kw * i.duration_s / 3600.0, abs=1e-3)
    assert sum(i.duration_s for i in answer.schedule) == 1800.0


def test_a_second_request_keeps_off_the_energy_of_one_between_quarter_hours() -> None:
    """Reserved intervals that do not fall on the quarter hours still hold their energy:
    an off-grid request, then another right after it, each on its own bounds."""
    _, state = fleet_and_state()
    view = state.view(T0, 3 * STEP)
    d = Dispatcher(control_step_s=STEP)
    s1 = T0 + 3600.0 + 7 * 60.0  # 22:07 for an hour, then 23:07 for an hour
    alone = edge(d, view, 127, 3600)  # what 23:07-00:07 could have on its own
    power = round(0.9 * edge(d, view, 67, 3600), 1)
    first = d.submit(req(power, 3600.0, "a", start=from_epoch(s1)), T0, view)
    assert first.status == "accepted", first
    second = d.submit(req(alone, 3600.0, "b", start=from_epoch(s1 + 3600.0)), T0, view)
    assert second.schedule is not None
    q = T0 + 2 * 3600.0  # 23:00
    assert [i.start.timestamp() for i in second.schedule] == [
        s1 + 3600.0,
        q + 900.0,
        q + 1800.0,
        q + 2700.0,
        q + 3600.0,
    ]
    # The first one's energy was not offered again: the second gets less than alone.
    assert second.status == "partial", second
    assert second.allocated_kw > alone + 1.0


def test_a_planned_request_gets_a_started_result_when_it_begins() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    start = T0 + 60.0
    answer = d.submit(req(-10.0, 600.0, "soon", start=from_epoch(start)), T0, view)
    assert answer.status == "accepted"
    seen: list[tuple[float, str]] = []
    t = T0
    while t <= start + 3 * STEP:
        out = d.step(t, state.view(t, 3 * STEP), len(state))
        seen += [(t, r.status) for r in out.results if r.request_id == "soon"]
        if any(r.status == "started" for r in out.results):
            started = next(r for r in out.results if r.status == "started")
        t += STEP
        close_loop(fleet, state, t)
    assert seen == [(start, "started")], seen
    assert started.ts.timestamp() == start
    assert started.allocated_kw == -10.0 and started.shortfall_kw == 0.0
    assert "planned for" in (started.reason or "")
    assert d.answers["soon"].status == "started"  # a repeat of the request hears it runs
