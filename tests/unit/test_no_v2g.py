"""The owner's "no V2G until departure" hold: a held car never discharges, the fleet's
range shrinks by what it could give, and the hold clears by itself at its departure."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.capability import envelope, vehicle_ranges
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetState
from broker.topics import Topics
from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop


def test_a_held_car_never_discharges_during_a_discharge_request() -> None:
    fleet, state = fleet_and_state(40)
    view = state.view(T0, 3 * STEP)
    held_ids = [state.ids[r] for r in view.rows[:10]]
    for vid in held_ids:
        state.set_no_v2g(vid, True, T0)
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    lo = envelope(view, T0)[0].min_power_kw
    assert lo < 0, "the free cars can still discharge"
    assert d.submit(req(round(0.8 * lo, 1)), T0, view).status == "accepted"
    held_rows = {state.index[v] for v in held_ids}
    t, outs = run_loop(fleet, state, d, T0, 8)
    sent = 0
    for out in outs:
        mask = np.isin(out.rows, list(held_rows))
        sent += int(mask.sum())
        assert (out.power_kw[mask] >= 0).all(), "a held car was told to discharge"
    assert sent > 0, "the held cars are still dispatched (they charge)"
    power = state.col("power_kw")[sorted(held_rows)]
    assert (power >= 0).all()
    assert state.view(t, 3 * STEP).power.sum() < 0, "the rest of the fleet discharged"


def test_holding_cars_shrinks_the_fleets_discharge_range() -> None:
    _, state = fleet_and_state(40)
    before = envelope(state.view(T0, 3 * STEP), T0)[0].min_power_kw
    for vid in state.ids[:20]:
        state.set_no_v2g(vid, True, T0)
    after = envelope(state.view(T0, 3 * STEP), T0)[0].min_power_kw
    assert before < after <= 0


def test_the_hold_ends_at_the_departure_known_when_it_was_set() -> None:
    _, state = fleet_and_state(10)
    row = int(np.flatnonzero(np.isfinite(state.col("departure")))[0])
    vid, departure = state.ids[row], float(state.col("departure")[row])
    state.set_no_v2g(vid, True, T0)
    assert state.held(T0)[row] and state.held(departure - 1)[row]
    assert not state.held(departure)[row]
    # Heard again (a retained ON after a reconnect), the running hold keeps its end.
    state.cols["departure"][row] = departure + 86_400
    state.set_no_v2g(vid, True, T0 + 60)
    assert not state.held(departure)[row]
    state.set_no_v2g(vid, False, T0 + 60)
    assert not state.held(T0 + 61)[row]


def test_a_hold_without_a_known_departure_lasts_until_switched_off() -> None:
    _, state = fleet_and_state(5)
    state.set_no_v2g("unseen-car", True, T0)
    row = state.index["unseen-car"]
    assert state.held(T0 + 10 * 86_400)[row]
    state.set_no_v2g("unseen-car", False, T0)
    assert not state.held(T0)[row]


def test_the_hold_topic_is_a_vehicle_topic_of_the_contract() -> None:
    t = Topics("p1")
    assert t.no_v2g("car-1") == "p1/vehicles/car-1/no_v2g"
    assert t.parse(t.no_v2g("car-1")) == ("no_v2g", "car-1")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    held=st.lists(st.booleans(), min_size=30, max_size=30),
    window_s=st.sampled_from([300.0, 900.0, 3600.0]),
)
def test_no_held_car_has_a_discharging_range_and_the_others_keep_theirs(
    seed: int, held: list[bool], window_s: float
) -> None:
    _, state = fleet_and_state(30, seed)
    free_before = vehicle_ranges(state.view(T0, 3 * STEP), T0, window_s)
    for vid, h in zip(state.ids, held, strict=True):
        state.set_no_v2g(vid, h, T0)
    view = state.view(T0, 3 * STEP)
    lo, hi = vehicle_ranges(view, T0, window_s)
    mask = state.held(T0)[view.rows]
    assert (lo[mask] >= -1e-9).all()
    np.testing.assert_allclose(lo[~mask], free_before[0][~mask])
    np.testing.assert_allclose(hi, free_before[1])  # charging is untouched


def test_holds_survive_a_snapshot_and_an_older_snapshot_restores_without_any() -> None:
    _, state = fleet_and_state(8)
    state.set_no_v2g(state.ids[2], True, T0)
    ids, cols = state.snapshot()
    restored = FleetState.restore(ids, cols)
    np.testing.assert_array_equal(restored.held(T0), state.held(T0))
    assert restored.held(T0)[2]
    older = {k: v for k, v in cols.items() if k != "no_v2g_until"}
    assert not FleetState.restore(ids, older).held(T0).any()
