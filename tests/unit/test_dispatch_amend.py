"""Amending a request in flight: new power or duration, books carried on, refusals explained."""

from __future__ import annotations

import pytest

from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher
from broker.models import from_epoch
from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop


def test_a_running_request_takes_its_new_power_and_keeps_its_books() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    first = round(0.3 * envelope(view, T0)[0].min_power_kw, 1)
    assert d.submit(req(first, 900.0, "r"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 12)
    before = d.dispatches["r"].delivered_kwh
    assert before < 0
    view = state.view(t, 3 * STEP)
    answer = d.amend("r", t, view, power_kw=round(first / 2, 1))
    assert answer is not None and answer.status == "accepted", answer
    assert answer.reason == "amended" and answer.allocated_kw == round(first / 2, 1)
    t, _ = run_loop(fleet, state, d, t, 6)
    assert float(state.view(t, 3 * STEP).power.sum()) == pytest.approx(first / 2, rel=0.02)
    assert d.dispatches["r"].delivered_kwh < before  # more export on the same books
    # The amended terms are now the request's: resending the original is a conflict.
    again = d.submit(req(first, 900.0, "r"), t, view)
    assert again.status == "rejected" and "different terms" in (again.reason or "")


def test_a_shorter_duration_ends_the_request_early_and_one_in_the_past_is_refused() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    power = round(0.3 * envelope(view, T0)[0].min_power_kw, 1)
    d.submit(req(power, 900.0, "r"), T0, view)
    t, _ = run_loop(fleet, state, d, T0, 4)
    view = state.view(t, 3 * STEP)
    refused = d.amend("r", t, view, duration_s=5.0)
    assert refused is not None and refused.status == "rejected"
    assert "cancel it instead" in (refused.reason or "")
    assert d.dispatches["r"].request.duration_s == 900.0  # old terms stand
    assert d.amend("r", t, view, duration_s=60.0) is not None
    t, outs = run_loop(fleet, state, d, t, 10)
    done = [r for o in outs for r in o.results if r.status == "completed"]
    assert [r.request_id for r in done] == ["r"]
    assert "r" not in d.dispatches


def test_absurd_or_unknown_amendments_are_answered_plainly() -> None:
    _, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP, max_request_kw=1000.0)
    view = state.view(T0, 3 * STEP)
    assert d.amend("nope", T0, view, power_kw=-1.0) is None
    d.submit(req(-10.0, 900.0, "r"), T0, view)
    bad = d.amend("r", T0, view, power_kw=-5000.0)
    assert bad is not None and bad.status == "rejected"
    assert "platform limit" in (bad.reason or "")
    assert d.dispatches["r"].requested_kw == -10.0
    assert d.answers["r"].status == "accepted"  # the refusal is not remembered as its answer


def test_a_request_planned_ahead_is_planned_again() -> None:
    _, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    start = from_epoch(T0 + 3600)
    first = d.submit(req(-50.0, 1800.0, "later", start=start), T0, view)
    assert first.status == "accepted" and first.schedule is not None and len(first.schedule) == 2
    answer = d.amend("later", T0, view, power_kw=-80.0, duration_s=3600.0)
    assert answer is not None and answer.status == "accepted", answer
    assert answer.schedule is not None and len(answer.schedule) == 4
    assert all(i.power_kw == pytest.approx(-80.0) for i in answer.schedule)
