"""Services that follow a signal: regulation around the baseline, FCR droop, the score."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher, StepOutput
from broker.models import DispatchRequest, DispatchSignal, Service, from_epoch
from tests.support.memory_loop import REACT_S, STEP, T0, close_loop, fleet_and_state
from tests.support.samples import regd_like


def regulation(capacity: float, duration: float, rid: str = "reg") -> DispatchRequest:
    return DispatchRequest(
        request_id=rid,
        service=Service.FREQUENCY_REGULATION,
        capacity_kw=capacity,
        duration_s=duration,
    )


def test_a_fleet_follows_a_regd_like_signal_and_scores_above_0_9() -> None:
    fleet, state = fleet_and_state(n=120, seed=5)
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    cap15 = envelope(view, T0)[0]
    capacity = round(0.3 * min(-cap15.min_power_kw, cap15.max_power_kw), 1)
    answer = d.submit(regulation(capacity, 1200.0), T0, view)
    assert answer.status == "accepted", answer
    assert answer.allocated_kw == capacity
    signal = regd_like(130, seed=7)
    t = T0
    energy0 = float(fleet.energy.sum())

    def apply(out: StepOutput | None) -> None:
        assert out is not None
        for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(fleet.index[state.ids[row]], float(p), float(until))

    for k in range(130):  # ~11 minutes: two whole 5-minute windows
        # A signal sample goes out at once and the chargers act on it within a second;
        # the control step then measures and samples; then time passes.
        apply(d.signal("reg", DispatchSignal(value=float(signal[k]), ts=from_epoch(t)), t,
                       state.view(t, 3 * STEP)))  # fmt: skip
        close_loop(fleet, state, t + REACT_S)
        apply(d.step(t + REACT_S, state.view(t + REACT_S, 3 * STEP), len(state)))
        t += STEP
        close_loop(fleet, state, t)
    score = d.score(d.dispatches["reg"])
    assert score is not None and score >= 0.9, score
    progress = d._progress(d.dispatches["reg"], t)
    assert progress.score == score
    # Around the operating point, not a drain: the books match what the signal asked,
    # the fleet's energy did not fall, and no driver is short.
    books = d.dispatches["reg"]
    assert books.delivered_kwh == pytest.approx(books.requested_kwh, rel=0.03)
    assert float(fleet.energy.sum()) >= energy0
    assert fleet.short == 0


def test_capacity_beyond_the_fleet_is_partial_and_power_kw_is_refused() -> None:
    _, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    big = d.submit(regulation(1e5, 900.0, "big"), T0, view)
    assert big.status == "partial" and 0 < big.allocated_kw < 1e5
    d.cancel("big", T0, view)
    wrong = DispatchRequest(
        request_id="w", service=Service.FREQUENCY_REGULATION, capacity_kw=10.0,
        power_kw=-5.0, duration_s=900.0,
    )  # fmt: skip
    assert d.submit(wrong, T0, view).status == "rejected"


def test_fcr_droop_moves_the_target_with_the_frequency() -> None:
    _, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    req = DispatchRequest(
        request_id="fcr", service=Service.FREQUENCY_CONTAINMENT, capacity_kw=50.0,
        duration_s=900.0,
    )  # fmt: skip
    assert d.submit(req, T0, view).status == "accepted"
    disp = d.dispatches["fcr"]
    base = disp.base_kw
    d.signal("fcr", DispatchSignal(frequency_hz=50.005, ts=from_epoch(T0)), T0, view)
    assert disp.requested_kw == pytest.approx(base)  # inside the deadband
    d.signal("fcr", DispatchSignal(frequency_hz=49.8, ts=from_epoch(T0)), T0, view)
    assert disp.requested_kw == pytest.approx(base - 50.0)  # full activation: export
    out = d.signal("fcr", DispatchSignal(frequency_hz=50.105, ts=from_epoch(T0)), T0, view)
    assert disp.requested_kw == pytest.approx(base + 25.0)
    assert out is not None and out.rows.size > 0
    assert np.all(np.isfinite(out.power_kw))
    assert d.signal("nope", DispatchSignal(value=0.1, ts=from_epoch(T0)), T0, view) is None
