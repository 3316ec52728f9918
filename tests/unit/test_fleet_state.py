"""Fleet state folds telemetry in order, never moves back in time, and restores exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator.fleet_state import NODE_NAMES, FleetState
from broker.columns import TelemetryRow
from broker.models import Telemetry
from tests.support.samples import GOOD

T = 1_795_716_000.0  # 2026-11-26T18:00:00Z, GOOD's ts


def tel(
    vid: str = "ev-0001", seq: int = 1, ts: str = "2026-11-26T18:00:00Z", **kw: object
) -> Telemetry:
    return Telemetry.model_validate_json(
        json.dumps(dict(GOOD, vehicle_id=vid, seq=seq, ts=ts, **kw))
    )


def test_latest_report_wins_and_replays_are_counted_stale() -> None:
    s = FleetState()
    applied, stale = s.apply_telemetry(
        [tel(seq=2, ts="2026-11-26T18:00:05Z", soc=0.6), tel(seq=1, soc=0.5)]
    )
    assert (applied, stale) == (2, 0)
    assert s.col("soc")[0] == 0.6  # ordered by time, not arrival
    applied, stale = s.apply_telemetry([tel(seq=1, soc=0.1), tel(seq=2, ts="2026-11-26T18:00:05Z")])
    assert (applied, stale) == (0, 2)
    assert s.col("soc")[0] == 0.6


def test_rows_are_stable_as_the_fleet_grows_past_its_capacity() -> None:
    s = FleetState(initial_capacity=2)
    s.apply_telemetry([tel(f"ev-{i}", soc=i / 10) for i in range(7)])
    assert len(s) == 7
    assert s.index["ev-3"] == 3
    assert s.col("soc")[3] == 0.3
    assert np.isnan(s.col("departure")).sum() == 0


def test_view_holds_only_plugged_online_fresh_vehicles() -> None:
    s = FleetState()
    s.apply_telemetry(
        [
            tel("ev-a"),
            tel("ev-b", plugged_in=False, departure=None),
            tel("ev-c"),
            tel("ev-old", ts="2026-11-26T17:00:00Z"),
        ]
    )
    s.apply_status("ev-c", False, T - 60)  # a will: made at connect time, older than its data
    view = s.view(T + 5, 15.0)
    assert [s.ids[r] for r in view.rows] == ["ev-a"]
    assert view.energy[0] == 0.5 * 60
    assert s.counts(T + 5, 15.0) == (2, 1)  # ev-a and ev-b online and fresh


def test_new_telemetry_after_a_will_brings_the_vehicle_back() -> None:
    s = FleetState()
    s.apply_status("ev-a", True, T - 10)
    s.apply_telemetry([tel("ev-a")])
    s.apply_status("ev-a", False, T - 10)
    assert not s.col("online")[0]
    s.apply_telemetry([tel("ev-a", seq=2, ts="2026-11-26T18:00:05Z")])
    assert s.col("online")[0]


def test_snapshot_restores_every_column() -> None:
    s = FleetState()
    s.apply_telemetry([tel(f"ev-{i}", soc=i / 10) for i in range(5)])
    s.apply_status("ev-2", False, T)
    ids, cols = s.snapshot()
    r = FleetState.restore(ids, cols)
    assert r.ids == s.ids
    for name in cols:
        if name == NODE_NAMES:  # one entry per node name, not per row
            continue
        assert np.array_equal(r.col(name), s.col(name), equal_nan=True), name
    assert r.node_names == s.node_names
    r.apply_telemetry([tel("ev-new")])
    assert r.index["ev-new"] == 5


def test_meter_integrates_each_report_until_the_next_one() -> None:
    s = FleetState()
    s.apply_telemetry([tel(power_kw=-10.0)])
    # Two reports of one car in one batch, out of order: 36 s at -10 kW, then 36 s at 20.
    s.apply_telemetry(
        [
            tel(seq=3, ts="2026-11-26T18:01:12Z", power_kw=0.0),
            tel(seq=2, ts="2026-11-26T18:00:36Z", power_kw=20.0),
        ]
    )
    assert s.col("meter_kwh")[0] == pytest.approx(-10.0 * 36 / 3600 + 20.0 * 36 / 3600)
    assert s.col("power_kw")[0] == 0.0


def test_meter_reading_holds_the_last_power_up_to_the_stale_limit_only() -> None:
    s = FleetState()
    s.apply_telemetry([tel("ev-a", power_kw=-36.0), tel("ev-b", power_kw=7.2, plugged_in=False)])
    assert s.meter_reading(T + 100, 200.0) == pytest.approx(-36.0 * 100 / 3600)
    # Stale: unknown beyond the limit, not held for ever, and never taken back.
    assert s.meter_reading(T + 1000, 200.0) == pytest.approx(-36.0 * 200 / 3600)
    assert s.meter_reading(T + 5000, 200.0) == s.meter_reading(T + 1000, 200.0)
    s.apply_status("ev-a", False, T + 300)  # its will: nothing held after it
    assert s.meter_reading(T + 1000, 200.0) == pytest.approx(0.0)
    # An unplugged car's charger passes nothing, whatever it last said.
    s.apply_telemetry([tel("ev-b", seq=2, ts="2026-11-26T18:01:40Z", power_kw=0.0)])
    assert s.col("meter_kwh")[1] == 0.0


def test_decoded_rows_fold_exactly_as_their_models_do() -> None:
    reports = [
        tel("ev-a", seq=2, ts="2026-11-26T18:00:05Z", soc=0.6),
        tel("ev-a", seq=1, soc=0.5),
        tel("ev-b", seq=1, plugged_in=False, departure=None),
    ]
    by_model, by_row, mixed = FleetState(), FleetState(), FleetState()
    assert by_model.apply_telemetry(reports) == (3, 0)
    assert by_row.apply_telemetry([TelemetryRow.of(t) for t in reports]) == (3, 0)
    assert mixed.apply_telemetry([TelemetryRow.of(reports[0]), *reports[1:]]) == (3, 0)
    for state in (by_row, mixed):
        assert state.ids == by_model.ids
        for name, column in by_model.cols.items():
            np.testing.assert_array_equal(state.cols[name], column, err_msg=name)
    assert by_row.col("last_ts").tolist() == [T + 5, T]
    assert by_row.col("last_seq").tolist() == [2, 1]
    assert by_row.col("soc").tolist() == [0.6, GOOD["soc"]]
    assert by_row.col("plugged").tolist() == [True, False]
    assert by_row.col("capacity_kwh").tolist() == [GOOD["capacity_kwh"]] * 2
    assert by_row.col("departure")[0] == T + 13.5 * 3600  # GOOD's: 07:30 the next day
    assert np.isnan(by_row.col("departure")[1])
