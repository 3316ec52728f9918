"""Stacking: several requests at once, in priority order, each keeping its reserve."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher, StepOutput
from aggregator.dispatch.stack import holding
from aggregator.fleet_state import FleetState
from broker.models import DispatchRequest, DispatchSignal, Service, from_epoch
from tests.support.memory_loop import REACT_S, STEP, T0, close_loop, fleet_and_state, req, run_loop
from tests.support.samples import regd_like


def regulation(capacity: float, duration: float, rid: str, priority: int) -> DispatchRequest:
    return DispatchRequest(
        request_id=rid,
        service=Service.FREQUENCY_REGULATION,
        capacity_kw=capacity,
        duration_s=duration,
        priority=priority,
    )


def ranges(state: FleetState, window: float = 900.0) -> tuple[float, float]:
    w = envelope(state.view(T0, 3 * STEP), T0)[0]
    assert w.duration_s == window
    return w.min_power_kw, w.max_power_kw


def test_regulation_and_peak_shaving_stacked_are_both_honoured() -> None:
    """The acceptance case: a regulation capacity (priority 2) and a peak-shaving block
    (priority 1) at once; the fleet follows block + signal x capacity, the regulation
    scores above 0.9 and the block's own delivery (the fleet meter less what the
    regulation asked) matches it, with no driver short."""
    fleet, state = fleet_and_state(n=150, seed=5)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    capacity = round(0.15 * (hi - lo), 1)
    block_kw = round(lo + 0.35 * (hi - lo), 1)  # an export-side block, inside the range
    view = state.view(T0, 3 * STEP)
    a = d.submit(regulation(capacity, 1200.0, "reg", 2), T0, view)
    b = d.submit(req(block_kw, 1200.0, "shave", service=Service.PEAK_SHAVING, priority=1), T0, view)
    assert a.status == "accepted" and a.allocated_kw == capacity, a
    assert b.status == "accepted" and b.allocated_kw == block_kw, b
    signal = regd_like(130, seed=9)
    energy_asked = 0.0
    t = T0

    def apply(out: StepOutput | None) -> None:
        assert out is not None
        for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(fleet.index[state.ids[row]], float(p), float(until))

    for k in range(130):  # ~11 minutes: two whole 5-minute windows
        sample = DispatchSignal(value=float(signal[k]), ts=from_epoch(t))
        out = d.signal("reg", sample, t, state.view(t, 3 * STEP))
        assert out is not None and out.request_id == "reg"  # the top of the stack
        total = float(out.power_kw.sum()) + float(
            np.sum([d.setpoints.sent_kw[r] for r in np.setdiff1d(state.view(t, 45).rows, out.rows)])
        )
        assert total == pytest.approx(block_kw + signal[k] * capacity, abs=0.02 * capacity)
        apply(out)
        close_loop(fleet, state, t + REACT_S)
        step = d.step(t + REACT_S, state.view(t + REACT_S, 3 * STEP), len(state))
        assert {p.request_id for p in step.progress} == {"reg", "shave"}
        apply(step)
        energy_asked += signal[k] * capacity * STEP / 3600.0
        t += STEP
        close_loop(fleet, state, t)
    reg, shave = d.dispatches["reg"], d.dispatches["shave"]
    score = d.score(reg)
    print(
        f"stacked: score {score}, block {shave.delivered_kwh:.2f} of {shave.requested_kwh:.2f}"
        f" kWh, regulation asked {energy_asked:.2f} kWh, stacked {shave.stacked_kwh:.2f}"
    )
    assert score is not None and score >= 0.9, score
    assert shave.delivered_kwh == pytest.approx(shave.requested_kwh, rel=0.03)
    assert shave.shortfall_kw == pytest.approx(0.0, abs=0.05)
    assert reg.shortfall_kw == 0.0
    assert fleet.short == 0


def test_a_lower_priority_request_cannot_take_the_reserve_of_a_higher_one() -> None:
    _, state = fleet_and_state(n=60)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    view = state.view(T0, 3 * STEP)
    capacity = round(0.2 * (hi - lo), 1)
    d.submit(regulation(capacity, 900.0, "reg", 5), T0, view)
    # Asks for all the fleet can export: it gets what leaves the capacity below it.
    greedy = d.submit(req(lo, 900.0, "greedy", priority=1), T0, view)
    assert greedy.status == "partial"
    assert greedy.allocated_kw == pytest.approx(lo + capacity, abs=0.01)
    assert "higher priority" in (greedy.reason or "")
    out = d.step(T0, view, len(state))
    held = {p.request_id: p.allocated_kw for p in out.progress}
    assert held["reg"] == capacity
    # At full regulation down the fleet would be at lo: still inside the range.
    assert float(out.power_kw.sum()) == pytest.approx(lo + capacity, abs=0.05)


def test_a_higher_priority_request_pre_empts_a_lower_one_and_says_so() -> None:
    _, state = fleet_and_state(n=60)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    view = state.view(T0, 3 * STEP)
    first = d.submit(req(lo, 900.0, "block", priority=0), T0, view)
    assert first.status == "accepted" and first.allocated_kw == pytest.approx(lo, abs=0.01)
    capacity = round(0.2 * (hi - lo), 1)
    reg = d.submit(regulation(capacity, 900.0, "reg", 3), T0, view)
    assert reg.status == "accepted" and reg.allocated_kw == capacity
    out = d.step(T0, view, len(state))
    notice = next(r for r in out.results if r.request_id == "block")
    assert notice.status == "partial" and "pre-empted by request reg" in (notice.reason or "")
    assert notice.allocated_kw == pytest.approx(lo + capacity, abs=0.01)
    # The same request with the lower priority instead is cut to what is left.
    d2 = Dispatcher(control_step_s=STEP)
    d2.submit(req(lo, 900.0, "block", priority=5), T0, view)
    low = d2.submit(regulation(capacity, 900.0, "reg", 0), T0, view)
    assert low.status == "rejected"  # a block at the export limit leaves no room below


def test_when_the_fleet_shrinks_the_lowest_priority_is_cut_first() -> None:
    fleet, state = fleet_and_state(n=80)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    view = state.view(T0, 3 * STEP)
    capacity = round(0.2 * (hi - lo), 1)
    d.submit(regulation(capacity, 1800.0, "reg", 2), T0, view)
    d.submit(req(round(0.5 * lo, 1), 1800.0, "block", priority=1), T0, view)
    t, _ = run_loop(fleet, state, d, T0, 3)
    # Half the fleet goes away: the block keeps out of the regulation's way.
    for vid in state.ids[: len(state) // 2]:
        state.apply_status(vid, False, t)
    view = state.view(t, 3 * STEP)
    out = d.step(t, view, len(state))
    held = {p.request_id: p for p in out.progress}
    reg, block = d.dispatches["reg"], d.dispatches["block"]
    lo2 = d.fleet.usable_sums(view, t, block.end - t)[0]
    assert reg.held_kw == capacity
    assert block.allocated_kw >= lo2 + capacity - 1e-6
    assert held["block"].allocated_kw == pytest.approx(block.allocated_kw, abs=0.01)


def test_two_power_requests_still_cannot_overlap_but_signals_stack_on_either() -> None:
    _, state = fleet_and_state(n=40)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    view = state.view(T0, 3 * STEP)
    assert d.submit(req(0.3 * lo, 900.0, "a"), T0, view).status == "accepted"
    assert d.submit(req(0.3 * lo, 600.0, "b"), T0, view).status == "rejected"
    fcr = DispatchRequest(
        request_id="fcr",
        service=Service.FREQUENCY_CONTAINMENT,
        capacity_kw=round(0.1 * (hi - lo), 1),
        duration_s=900.0,
    )
    assert d.submit(fcr, T0, view).status == "accepted"
    assert d.submit(regulation(round(0.1 * (hi - lo), 1), 900.0, "r", 0), T0, view).status in {
        "accepted",
        "partial",
    }
    assert {x.request_id for x in d.active()} == {"a", "fcr", "r"}


def test_a_power_request_for_later_leaves_the_regulation_its_headroom() -> None:
    """Planned ahead, a block over a running regulation is limited by the headroom the
    regulation holds, not by the whole charger limits."""
    _, state = fleet_and_state(n=60)
    view = state.view(T0, 3 * STEP)
    alone = Dispatcher(control_step_s=STEP)
    start = from_epoch(T0 + 3600.0)
    big = -1e4  # beyond any fleet: the answer says what it can hold
    free = alone.submit(req(big, 900.0, "b", start=start), T0, view)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    capacity = round(0.2 * (hi - lo), 1)
    assert d.submit(regulation(capacity, 3 * 3600.0, "reg", 1), T0, view).status == "accepted"
    held = d.submit(req(big, 900.0, "b", start=start), T0, view)
    assert free.status == held.status == "partial"
    assert held.allocated_kw >= free.allocated_kw + capacity - 0.5


def test_fcr_share_at_30_s_is_published_in_progress_and_result() -> None:
    fleet, state = fleet_and_state(n=100, seed=6)
    d = Dispatcher(control_step_s=STEP)
    lo, hi = ranges(state)
    capacity = round(0.2 * (hi - lo), 1)
    fcr = DispatchRequest(
        request_id="fcr",
        service=Service.FREQUENCY_CONTAINMENT,
        capacity_kw=capacity,
        duration_s=600.0,
    )
    assert d.submit(fcr, T0, state.view(T0, 3 * STEP)).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 3)
    out = d.signal("fcr", DispatchSignal(frequency_hz=49.8, ts=from_epoch(t)), t,
                   state.view(t, 3 * STEP))  # fmt: skip
    assert out is not None
    for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
        fleet.set_setpoint(fleet.index[state.ids[row]], float(p), float(until))
    assert d.fcr_share(d.dispatches["fcr"]) is None
    t, outs = run_loop(fleet, state, d, t, 8)  # 40 s
    share = outs[-1].progress[0].fcr_share
    assert share is not None and 0.95 <= share <= 1.05, share
    result = d.cancel("fcr", t, state.view(t, 3 * STEP))
    assert result is not None and result.fcr_share == share


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # a signal service, or a power request
            st.floats(0.05, 1.2),  # its size, as a share of the fleet's range
            st.integers(0, 3),  # its priority
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 5),
)
def test_no_request_holds_less_than_it_would_without_those_below_it(
    stack: list[tuple[bool, float, int]], seed: int
) -> None:
    """The reserve property: what each request holds depends only on the requests of
    higher priority (or equal and earlier), never on the ones below it."""
    _, state = _STATES[seed]
    view = state.view(T0, 3 * STEP)
    lo, hi = ranges(state)

    def build(n: int) -> Dispatcher:
        d = Dispatcher(control_step_s=STEP)
        has_power = False
        for k, (is_signal, size, prio) in enumerate(order[:n]):
            if is_signal:
                r = regulation(round(size * (hi - lo), 1) + 0.2, 900.0, f"s{k}", prio)
            elif not has_power:
                r = req(round(lo + size * (hi - lo) - 0.1 * (hi - lo), 1), 900.0, f"p{k}",
                        priority=prio)  # fmt: skip
                has_power = True
            else:
                continue
            d.submit(r, T0, view)
        d.step(T0, view, len(state))
        return d

    # Submitted highest priority first, so a prefix is "those above"; ties keep order.
    order = sorted(stack, key=lambda x: -x[2])
    full = build(len(order))
    for n in range(1, len(order) + 1):
        part = build(n)
        for rid, o in part.dispatches.items():
            f = full.dispatches.get(rid)
            if f is None:
                continue  # rejected in both
            assert holding(f) >= holding(o) - 1e-6, (rid, n)


_STATES = [fleet_and_state(n=30, seed=s) for s in range(6)]
