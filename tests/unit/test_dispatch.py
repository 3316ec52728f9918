"""The dispatcher's admission, allocation, books and idempotency, without any I/O."""

from __future__ import annotations

import itertools
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agents.telemetry import telemetry_payloads
from aggregator.capability import WINDOWS_S, envelope, vehicle_ranges
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetView
from broker.models import DispatchRequest, Service, Telemetry, from_epoch
from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop


def test_request_inside_the_envelope_is_accepted_and_tracked_within_two_percent() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    cap = envelope(view, T0)[0]
    target = round(0.5 * cap.min_power_kw, 1)
    answer = d.submit(req(target), T0, view)
    assert answer.status == "accepted"
    assert answer.allocated_kw == pytest.approx(target)
    t, outs = run_loop(fleet, state, d, T0, 6)
    measured = state.view(t, 3 * STEP).power.sum()
    assert measured == pytest.approx(target, rel=0.02)
    assert outs[0].rows.size == len(view)  # every plugged-in vehicle gets its share


def test_request_beyond_the_envelope_is_partial_with_the_exact_shortfall() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    lo = envelope(view, T0)[0].min_power_kw
    answer = d.submit(req(lo - 500.0), T0, view)
    assert answer.status == "partial"
    assert answer.allocated_kw == pytest.approx(lo, abs=1e-3)
    assert answer.shortfall_kw == pytest.approx(500.0, abs=1e-3)
    assert "export" in (answer.reason or "")
    # Its delivered energy is the fleet meter's: its own miss is not taken off it. These
    # vehicles act on a setpoint at their next tick, a step later: the delivery window
    # opens then, and the step before (the fleet's power from before) is not booked.
    meter0 = view.meter_kwh
    t, _ = run_loop(fleet, state, d, T0, 6)
    d.step(t, state.view(t, 3 * STEP), len(state))
    books = d.dispatches["r1"]
    assert books.stacked_kwh == 0.0
    assert books.delivery_start == pytest.approx(T0 + STEP)
    before = float(view.power.sum()) * STEP / 3600.0
    assert books.delivered_kwh == pytest.approx(state.view(t, 3 * STEP).meter_kwh - meter0 - before)


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (req(5e6), "platform limit"),
        (req(-10.0, duration=30 * 86_400.0), "longer than the limit"),
        (req(-10.0, start=from_epoch(T0 - 3600)), "in the past"),
        (req(-10.0, start=from_epoch(T0 + 60 * 86_400)), "too far ahead"),
        (
            DispatchRequest(
                request_id="f",
                service=Service.FREQUENCY_REGULATION,
                capacity_kw=10,
                power_kw=-5,
                duration_s=60,
            ),
            "give capacity_kw, not power_kw",
        ),
    ],
)
def test_absurd_requests_are_rejected_with_a_reason(request_: DispatchRequest, why: str) -> None:
    _, state = fleet_and_state(10)
    answer = Dispatcher(control_step_s=STEP).submit(request_, T0, state.view(T0, 15.0))
    assert answer.status == "rejected"
    assert why in (answer.reason or "")


def test_start_up_to_one_step_in_the_past_counts_as_now() -> None:
    _, state = fleet_and_state(10)
    d = Dispatcher(control_step_s=STEP)
    answer = d.submit(req(-5.0, start=from_epoch(T0 - STEP + 1)), T0, state.view(T0, 15.0))
    assert answer.status in ("accepted", "partial")
    assert d.dispatches["r1"].state == "active"


def test_a_request_over_before_its_first_step_is_rejected_not_a_crash() -> None:
    _, state = fleet_and_state(10)
    d = Dispatcher(control_step_s=STEP)
    # Found by the inbound fuzzer: it ends the instant it starts, and crashed the step.
    answer = d.submit(req(-5.0, duration=3e-215), T0, state.view(T0, 15.0))
    assert answer.status == "rejected"
    assert "before its first control step" in (answer.reason or "")
    assert "r1" not in d.dispatches
    # The dispatcher goes on: the next request is taken as usual.
    assert d.submit(req(-5.0, rid="r2"), T0, state.view(T0, 15.0)).status in ("accepted", "partial")


def test_repeated_request_id_gets_the_same_answer_and_no_second_dispatch() -> None:
    _, state = fleet_and_state(20)
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 15.0)
    first = d.submit(req(-10.0), T0, view)
    again = d.submit(req(-10.0), T0 + 1, view)
    assert again == first
    assert len(d.dispatches) == 1
    other = d.submit(req(-20.0), T0 + 1, view)
    assert other.status == "rejected" and "different terms" in (other.reason or "")


def test_overlapping_request_is_rejected_and_a_later_one_is_scheduled() -> None:
    _, state = fleet_and_state(20)
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 15.0)
    d.submit(req(-10.0, 900.0, "a"), T0, view)
    clash = d.submit(req(-10.0, 900.0, "b"), T0, view)
    assert clash.status == "rejected" and "overlaps power request a" in (clash.reason or "")
    later = d.submit(req(-10.0, 900.0, "c", start=from_epoch(T0) + timedelta(hours=1)), T0, view)
    assert later.status == "accepted" and "scheduled" in (later.reason or "")
    assert d.dispatches["c"].state == "scheduled"


def test_a_request_at_the_step_another_ends_is_not_refused_for_overlap() -> None:
    """Windows are half-open, and a control step reads the clock a little off its beat: a
    request that started at one step (T0 + 0.37 s) ends a few ms after a later step."""
    _, state = fleet_and_state(20)
    d = Dispatcher(control_step_s=STEP)
    start = T0 + 0.37
    d.submit(req(-10.0, 600.0, "a"), start, state.view(start, 15.0))
    step = start + 600.0 - 0.04  # 120 steps on, this step's clock read 40 ms early
    assert d.dispatches["a"].end > step  # so "a" ends (just) after it
    view = state.view(step, 15.0)
    nxt = d.submit(req(-12.0, 600.0, "b"), step, view)
    assert nxt.status in ("accepted", "partial"), nxt.reason
    # Back to back, planned: the one after starts exactly where "b" ends.
    after = d.submit(req(-8.0, 600.0, "c", start=from_epoch(d.dispatches["b"].end)), step, view)
    assert "overlaps" not in (after.reason or ""), after.reason
    # A real overlap is still refused, by any amount above the clock's slack.
    for k, at in enumerate((step + 1.5, d.dispatches["b"].end - 2.0)):
        clash = d.submit(req(-8.0, 60.0, f"x{k}", start=from_epoch(at)), step, view)
        assert clash.status == "rejected" and "overlaps" in (clash.reason or ""), clash


@given(
    start=st.floats(1.7e9, 1.9e9),
    first=st.floats(1.0, 86_400.0),
    second=st.floats(1.0, 86_400.0),
)
def test_back_to_back_windows_never_overlap_and_shared_seconds_always_do(
    start: float, first: float, second: float
) -> None:
    from aggregator.dispatch import overlaps

    end = start + first
    assert not overlaps(start, end, end, end + second)
    assert not overlaps(end, end + second, start, end)
    assert overlaps(start, end, end - 0.5, end + second)
    assert overlaps(end - 0.5, end + second, start, end)


def test_completed_request_reports_delivered_energy_and_releases_vehicles() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 15.0)
    target = round(0.4 * envelope(view, T0)[0].min_power_kw, 1)
    d.submit(req(target, 600.0), T0, view)
    _, outs = run_loop(fleet, state, d, T0, 124)
    done = [r for o in outs for r in o.results if r.status == "completed"]
    assert len(done) == 1
    r = done[0]
    # Vehicles act at their next tick: the delivery window opens a step after the send
    # (the fleet's pre-request power of that first step is no one's) and ends on time.
    assert r.delivery_start is not None
    assert r.delivery_start.timestamp() == pytest.approx(T0 + STEP)
    assert r.requested_kwh == pytest.approx(target * (600 - STEP) / 3600, rel=1e-6)
    assert r.delivered_kwh == pytest.approx(r.requested_kwh, rel=0.02)
    assert not d.dispatches
    assert all(o.rows.size == 0 for o in outs[-3:])


def test_cancel_ends_a_request_with_its_books() -> None:
    fleet, state = fleet_and_state(30)
    d = Dispatcher(control_step_s=STEP)
    d.submit(req(-20.0, 900.0), T0, state.view(T0, 15.0))
    t, _ = run_loop(fleet, state, d, T0, 40)
    r = d.cancel("r1", t, state.view(t, 15.0))
    assert r is not None and r.status == "cancelled"
    # Booked from the step after the send (these vehicles act a tick later) to the cancel.
    assert r.requested_kwh == pytest.approx(-20.0 * (200 - STEP) / 3600, rel=1e-3)
    assert r.delivered_kwh is not None and r.delivered_kwh < 0
    assert d.cancel("r1", t, state.view(t, 15.0)) is None
    out = d.step(t, state.view(t, 15.0), len(state))
    assert out.release_rows.size > 0  # vehicles told to go back to plain charging


def test_vehicle_that_leaves_is_dropped_and_the_others_cover_its_share() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 15.0)
    target = round(0.5 * envelope(view, T0)[0].min_power_kw, 1)
    d.submit(req(target, 1800.0), T0, view)
    t, _ = run_loop(fleet, state, d, T0, 4)
    leaver = int(np.argmin(fleet.power))  # the one discharging hardest
    fleet.departure[leaver] = t
    t, outs = run_loop(fleet, state, d, t, 4)
    row = state.index[fleet.ids[leaver]]
    assert row not in outs[-1].rows.tolist()
    assert state.view(t, 15.0).power.sum() == pytest.approx(target, rel=0.02)


def test_drifting_vehicle_is_covered_by_the_rest() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 15.0)
    target = round(0.3 * envelope(view, T0)[0].min_power_kw, 1)
    d.submit(req(target, 1800.0), T0, view)
    t, _ = run_loop(fleet, state, d, T0, 3)
    lazy = int(np.argmin(fleet.power))
    for _ in range(6):  # this car ignores its setpoints and sits idle
        view = state.view(t, 15.0)
        out = d.step(t, view, len(state))
        for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(fleet.index[state.ids[row]], float(p), float(until))
        fleet.set_setpoint(lazy, 0.0, t + 100)
        t += STEP
        fleet.tick(t)
        state.apply_telemetry(
            [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, t)]
        )
    assert state.view(t, 15.0).power.sum() == pytest.approx(target, rel=0.02)


def test_books_survive_a_round_trip_through_records() -> None:
    _, state = fleet_and_state(20)
    d = Dispatcher(control_step_s=STEP)
    d.submit(req(-10.0, 900.0), T0, state.view(T0, 15.0))
    d.step(T0 + STEP, state.view(T0 + STEP, 15.0), len(state))
    again = Dispatcher(control_step_s=STEP)
    again.restore(d.to_records())
    assert again.dispatches["r1"].to_record() == d.dispatches["r1"].to_record()
    assert again.submit(req(-10.0, 900.0), T0 + 10, state.view(T0, 15.0)).status == "accepted"
    assert len(again.dispatches) == 1


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 1000), share=st.floats(-1.2, 1.2), hours=st.sampled_from([0.25, 1.0, 4.0])
)
@example(seed=661, share=-1.0, hours=0.25)  # a car under its floor: the envelope promised it
def test_allocation_respects_every_vehicle_range_and_sums_within_the_envelope(
    seed: int, share: float, hours: float
) -> None:
    _, state = fleet_and_state(50, seed)
    view: FleetView = state.view(T0, 15.0)
    d = Dispatcher(control_step_s=STEP)
    cap = envelope(view, T0, (hours * 3600,))[0]
    target = share * (cap.max_power_kw if share > 0 else -cap.min_power_kw)
    answer = d.submit(req(target, hours * 3600), T0, view)
    out = d.step(T0, view, len(state))
    # Every vehicle is told a power it can hold for the coming step (its floor kept).
    lo, hi = vehicle_ranges(view, T0, STEP)
    pos = {r: i for i, r in enumerate(view.rows.tolist())}
    idx = np.array([pos[r] for r in out.rows.tolist()], dtype=int)
    assert np.all(out.power_kw >= lo[idx] - 1e-6) and np.all(out.power_kw <= hi[idx] + 1e-6)
    assert out.power_kw.sum() == pytest.approx(answer.allocated_kw, abs=1e-2 + 1e-6 * abs(target))
    assert answer.shortfall_kw == pytest.approx(abs(target - answer.allocated_kw), abs=1e-2)


def test_envelope_covers_the_standard_windows_and_narrows_with_length() -> None:
    _, state = fleet_and_state()
    windows = envelope(state.view(T0, 15.0), T0)
    assert [w.duration_s for w in windows] == list(WINDOWS_S)
    for a, b in itertools.pairwise(windows):
        assert b.min_power_kw >= a.min_power_kw - 1e-6  # longer window, less to export
    assert windows[0].min_power_kw < 0 < windows[0].max_power_kw
