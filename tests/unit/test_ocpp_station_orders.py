"""How the stations' runtime turns profiles into the power their cars hold, without a
socket: the handlers' methods called directly, on a manual clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ocpp.charge_point import snake_to_camel_case

from agents.ocpp_stations import OcppStations, build_stations
from core.clock import ManualClock
from core.physics import feasible_range

T0 = datetime(2026, 11, 26, 21, tzinfo=UTC).timestamp()


def _stations(mix: str = "v21bpt=1") -> tuple[OcppStations, ManualClock]:
    clock = ManualClock(T0)
    stations = build_stations(url="ws://127.0.0.1:9", count=20, clock=clock, mix=mix, seed=2)
    stations.advance(T0)  # opens every session (the messages wait in the outboxes)
    return stations, clock


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _profile(*periods: dict[str, Any], **schedule: Any) -> dict[str, Any]:
    return {
        "id": 3,
        "stack_level": 0,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Absolute",
        "charging_schedule": [
            {"id": 1, "charging_rate_unit": "W", "start_schedule": _iso(T0),
             "charging_schedule_period": list(periods), **schedule}
        ],
    }  # fmt: skip


def _discharger(stations: OcppStations) -> int:
    f = stations.fleet
    p_lo, _ = feasible_range(f.bat, f.energy, f.departure, f.now, 3600.0)
    i = int(np.argmin(p_lo))
    assert p_lo[i] < -3.0
    return i


def test_a_schedule_moves_from_period_to_period_then_back_to_baseline() -> None:
    stations, clock = _stations()
    i = _discharger(stations)
    st = stations.stations[i]
    stations.allow_transfer(st, ["AC_BPT", "DC_BPT"], str(st.tx_id))
    prof = _profile(
        {"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": -3000},
        {"start_period": 60, "operation_mode": "CentralSetpoint", "setpoint": 1500},
        duration=120,
    )
    assert stations.apply_profile(st, prof) == ("Accepted", None)
    f = stations.fleet
    for t, want in ((1, -3.0), (61, 1.5)):
        clock.advance(t - (clock.now() - T0))
        stations.advance(clock.now())
        assert f.power[i] == pytest.approx(want)
    clock.advance(60)
    stations.advance(clock.now())
    baseline = f.power.copy()
    assert baseline[i] != pytest.approx(1.5) or f.bat.max_charge_kw[i] == pytest.approx(1.5)
    assert stations.next_period_at[i] == np.inf
    assert sum(stations.violations.values()) == 0


def test_a_cleared_or_ended_session_drops_its_profile() -> None:
    stations, clock = _stations()
    i = _discharger(stations)
    st = stations.stations[i]
    stations.allow_transfer(st, ["AC_BPT"], str(st.tx_id))
    prof = _profile({"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": -2000})
    assert stations.apply_profile(st, prof)[0] == "Accepted"
    clock.advance(1)
    stations.advance(clock.now())
    assert stations.fleet.power[i] == pytest.approx(-2.0)
    assert stations.clear_profile(st)
    clock.advance(1)
    stations.advance(clock.now())
    assert stations.fleet.power[i] >= 0.0
    assert not stations.clear_profile(st)  # nothing left: answered Unknown


def test_a_profile_for_no_transaction_or_in_another_mode_is_rejected() -> None:
    stations, _ = _stations("v21=1")
    st = stations.stations[0]
    freq = _profile({"start_period": 0, "operation_mode": "LocalFrequency"})
    assert stations.apply_profile(st, freq) == ("Rejected", "UnsupportedRequest")
    assert stations.allow_transfer(st, ["AC_BPT", "DC_BPT"], str(st.tx_id)) == "Rejected"
    neg = _profile({"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": -1})
    assert stations.apply_profile(st, neg) == ("Rejected", "NoDischarge")
    stations._session_ended(st, T0)
    pos = _profile({"start_period": 0, "limit": 1000})
    assert stations.apply_profile(st, pos) == ("Rejected", "TxNotFound")


def test_variables_and_triggers_answer_what_the_station_knows() -> None:
    stations, _ = _stations()
    st = stations.stations[0]
    hb = {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}
    assert stations.set_variable(st, {**hb, "attribute_value": "30"})["attribute_status"] == (
        "Accepted"
    )
    assert stations.get_variable(st, hb)["attribute_value"] == "30"
    assert st.heartbeat_s == 30.0
    assert stations.set_variable(st, {**hb, "attribute_value": "-1"})["attribute_status"] == (
        "Rejected"
    )
    other = {"component": {"name": "X"}, "variable": {"name": "Y"}, "attribute_value": "1"}
    assert stations.set_variable(st, other)["attribute_status"] == "UnknownVariable"
    assert stations.get_variable(st, other)["attribute_status"] == "UnknownVariable"
    assert stations.trigger(st, "MeterValues", None) == "Accepted"
    assert stations.trigger(st, "LogStatusNotification", None) == "NotImplemented"
    assert stations.trigger(st, "CustomTrigger", "NotifyEVChargingNeeds") == "Accepted"


_power = st.one_of(st.none(), st.floats(-30_000, 30_000, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(
    periods=st.lists(
        st.tuples(st.sampled_from(["CentralSetpoint", "ChargingOnly", "Idle", None]), _power,
                  _power, st.one_of(st.none(), st.floats(-30_000, 0))),
        min_size=1, max_size=3,
    ),
    kind=st.sampled_from(["v21", "v201"]),
    allowed=st.booleans(),
)  # fmt: skip
def test_a_station_that_cannot_discharge_never_does_whatever_it_is_sent(
    periods: list[tuple[str | None, float | None, float | None, float | None]],
    kind: str,
    allowed: bool,
) -> None:
    stations, clock = _stations(f"{kind}=1")
    target = stations.stations[0]
    if allowed:  # a charge-only car refuses BPT; the allowed set stays plain
        stations.allow_transfer(target, ["AC_BPT", "DC_BPT", "AC_three_phase"], "x")
    rows = []
    for k, (mode, setpoint, limit, dlimit) in enumerate(periods):
        p: dict[str, Any] = {"start_period": 30 * k}
        for key, v in (("operation_mode", mode), ("setpoint", setpoint), ("limit", limit),
                       ("discharge_limit", dlimit)):  # fmt: skip
            if v is not None:
                p[key] = v
        rows.append(p)
    negative = any(p.get(k, 0) < 0 for p in rows for k in ("setpoint", "limit", "discharge_limit"))
    prof = _profile(*rows)
    # As on the wire: screen() reads the raw camelCase message, the handler snake_case.
    raw = {"evseId": 1, "chargingProfile": snake_to_camel_case(prof)}
    stations.screen(target, "SetChargingProfile", raw)
    status, _ = stations.apply_profile(target, prof)
    assert sum(stations.violations.values()) == int(negative)
    if negative:
        assert status == "Rejected"
    for _ in range(4):
        clock.advance(20)
        stations.advance(clock.now())
        assert (stations.fleet.power >= 0).all()


def _fcr_curve(capacity_w: float) -> list[dict[str, float]]:
    """An FCR droop around 50 Hz: 10 mHz deadband, full activation at +/-200 mHz."""
    return [
        {"frequency": 49.8, "power": -capacity_w},
        {"frequency": 49.99, "power": 0.0},
        {"frequency": 50.01, "power": 0.0},
        {"frequency": 50.2, "power": capacity_w},
    ]


def test_a_local_frequency_curve_is_followed_at_the_station_with_no_message() -> None:
    stations, clock = _stations()
    i = _discharger(stations)
    st = stations.stations[i]
    stations.allow_transfer(st, ["AC_BPT", "DC_BPT"], str(st.tx_id))
    period = {"start_period": 0, "operation_mode": "LocalFrequency", "v2x_baseline": 500.0,
              "v2x_freq_watt_curve": _fcr_curve(2000.0), "limit": 2000.0,
              "discharge_limit": -3000.0}  # fmt: skip
    assert stations.apply_profile(st, _profile(period, duration=600)) == ("Accepted", None)
    f = stations.fleet
    # (frequency, kW held): the deadband, half activation both ways, clipped by limit
    for hz, want in ((50.0, 0.5), (50.005, 0.5), (49.895, -0.5), (50.105, 1.5), (50.3, 2.0)):
        stations.set_frequency(hz)
        clock.advance(1)
        stations.advance(clock.now())
        assert f.power[i] == pytest.approx(want, abs=1e-6), hz
    assert stations.counts["frequency_profiles"] == 1
    # a curve is not moved by UpdateDynamicSchedule; ClearChargingProfile ends it
    assert stations.update_dynamic(st, 3, {"setpoint": 100.0})[0] == "Rejected"
    assert stations.clear_profile(st)
    assert stations.droop is not None and stations.droop.until[i] == -np.inf
    assert stations.apply_profile(st, _profile(period, duration=600))[0] == "Accepted"
    stations._session_ended(st, clock.now())  # the next car at this station is not held
    assert stations.droop.until[i] == -np.inf
    stations.set_frequency(49.8)
    clock.advance(1)
    stations.advance(clock.now())
    assert f.power[i] >= 0.0
    assert sum(stations.violations.values()) == 0


def test_a_curve_that_discharges_is_refused_by_a_station_that_may_not() -> None:
    stations, _ = _stations("v21=1")
    st = stations.stations[0]
    period = {"start_period": 0, "operation_mode": "LocalFrequency",
              "v2x_freq_watt_curve": _fcr_curve(1000.0)}  # fmt: skip
    assert stations.apply_profile(st, _profile(period)) == ("Rejected", "NoDischarge")
    # a charge-only curve (0..2 kW) is carried out, and never below 0 kW
    up = [{"frequency": 49.8, "power": 0.0}, {"frequency": 50.2, "power": 2000.0}]
    ok = {"start_period": 0, "operation_mode": "LocalFrequency", "v2x_freq_watt_curve": up}
    assert stations.apply_profile(st, _profile(ok, duration=60)) == ("Accepted", None)
    stations.set_frequency(49.7)
    stations.advance(T0 + 1)
    assert stations.fleet.power[0] >= 0.0
