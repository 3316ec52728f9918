"""Per-vehicle settlement: metered and baseline kWh per interval, drivers left short."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator.ledger import departure_entry, vehicles_entry
from aggregator.settlement import EARLY_S, Settlement
from core.physics import baseline_power
from tests.support.memory_loop import STEP, T0, close_loop, fleet_and_state
from v2g import report

T_GRID = T0  # on the 15-min grid


def test_intervals_close_on_the_grid_with_each_vehicles_meter_and_baseline() -> None:
    fleet, state = fleet_and_state(n=30)
    s = Settlement(interval_s=900.0)
    t = T_GRID
    closed_all = []
    base_kwh = np.zeros(len(state))
    meter0 = state.col("meter_kwh").copy()
    for _ in range(int(1200 / STEP)):  # 20 minutes: one boundary crossed
        view = state.view(t, 3 * STEP)
        closed, gone = s.observe(t, view, state.col("meter_kwh"), state.col("plugged"),
                                 state.ids, STEP)  # fmt: skip
        closed_all += closed
        assert gone == []
        base_kwh[view.rows] += baseline_power(view.batteries, view.energy, STEP) * STEP / 3600
        t += STEP
        close_loop(fleet, state, t)
    (first,) = closed_all
    assert first.start == T_GRID and first.end == T_GRID + 900.0
    rows = state.rows_of(first.vehicle_ids)
    # The meter moves as the cars report: what closed is within a step of each car's total.
    moved = state.col("meter_kwh")[rows] - meter0[rows]
    assert np.all(first.metered_kwh <= moved + 1e-9)
    assert first.metered_kwh.sum() > 0  # plain charging at 21:00: energy went in
    last = s.flush(t, state.col("meter_kwh"), state.ids)
    assert last is not None and last.start == T_GRID + 900.0 and last.end == t
    # Together the two intervals hold every vehicle's meter and baseline since the start.
    total = np.zeros(len(state))
    total_base = np.zeros(len(state))
    for iv in (first, last):
        r = state.rows_of(iv.vehicle_ids)
        total[r] += iv.metered_kwh
        total_base[r] += iv.baseline_kwh
    np.testing.assert_allclose(total, state.col("meter_kwh") - meter0, atol=1e-9)
    np.testing.assert_allclose(total_base, base_kwh, rtol=1e-9, atol=1e-9)
    assert s.flush(t, state.col("meter_kwh"), state.ids) is None  # nothing open


def test_a_driver_who_leaves_under_target_is_short_unless_they_left_early() -> None:
    _, state = fleet_and_state(n=10)
    s = Settlement()
    t = T_GRID
    rows = state.view(t, 3 * STEP).rows
    on_time, early, silent = (int(r) for r in rows[:3])
    # What they announced: now (so leaving is on time), and an hour from now.
    state.cols["departure"][on_time] = t + STEP
    state.cols["departure"][early] = t + 3600.0
    view = state.view(t, 3 * STEP)
    s.observe(t, view, state.col("meter_kwh"), state.col("plugged"), state.ids, STEP)
    want = {
        state.ids[r]: float(view.batteries.target_soc[k] * view.batteries.capacity_kwh[k]
                            - view.energy[k])
        for k, r in enumerate(view.rows.tolist())
    }  # fmt: skip
    t += STEP
    state.cols["plugged"][[on_time, early]] = False  # as their unplug reports say
    state.cols["online"][silent] = False  # this one only went offline: not a departure
    _, gone = s.observe(t, state.view(t, 3 * STEP), state.col("meter_kwh"),
                        state.col("plugged"), state.ids, STEP)  # fmt: skip
    by_id = {d.vehicle_id: d for d in gone}
    assert set(by_id) == {state.ids[on_time], state.ids[early]}
    left, fled = by_id[state.ids[on_time]], by_id[state.ids[early]]
    assert left.short_kwh == pytest.approx(max(0.0, want[left.vehicle_id]))
    assert left.short_kwh > 0.1 and left.short and not left.early  # 21:00: still charging
    assert fled.early and not fled.short and fled.short_kwh > 0.1
    assert EARLY_S < 3600.0


def test_the_report_sums_each_vehicle_over_intervals_and_lists_the_short() -> None:
    fleet, state = fleet_and_state(n=12)
    s = Settlement(interval_s=60.0)
    t = T_GRID
    entries = []
    for _ in range(30):  # 150 s: two whole intervals and a part
        closed, _ = s.observe(t, state.view(t, 3 * STEP), state.col("meter_kwh"),
                              state.col("plugged"), state.ids, STEP)  # fmt: skip
        entries += [vehicles_entry(iv) for iv in closed]
        t += STEP
        close_loop(fleet, state, t)
    last = s.flush(t, state.col("meter_kwh"), state.ids)
    assert last is not None
    entries.append(vehicles_entry(last))
    from aggregator.settlement import Departure

    entries.append(departure_entry(Departure("ev-x", t, 10.0, 40.0, t)))
    entries.append(departure_entry(Departure("ev-y", t, 10.0, 40.0, t + 3600.0)))
    totals = report.vehicle_totals(entries)
    assert totals.intervals == 3
    per_interval = [json.loads(e["json"]) for e in entries if e["kind"] == "vehicles"]
    want = sum(sum(c["metered_kwh"]) for c in per_interval)
    assert totals.metered_kwh.sum() == pytest.approx(want, abs=1e-3)
    assert [d["vehicle_id"] for d in totals.short] == ["ev-x"]  # ev-y left an hour early
