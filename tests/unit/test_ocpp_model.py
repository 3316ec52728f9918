"""The pure part of the simulated OCPP stations: the mix, identities, payloads that the
``ocpp`` library's own JSON schemas accept, and charging profiles read into power."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ocpp.charge_point import snake_to_camel_case
from ocpp.messages import Call, _validate_payload

from agents.fleet import SimFleet
from agents.ocpp_model import (
    KINDS,
    CarState,
    ProfileRefused,
    asks_discharge,
    assign_kinds,
    charging_needs,
    has_negative,
    id_token,
    parse_mix,
    plan_stations,
    plugged_at,
    read_profile,
    sampled_values,
)
from agents.profiles import generate_fleet

T0 = 1_795_651_200.0 + 14 * 3600  # 14:00 UTC: most home cars are away on their pattern


def test_parse_mix_normalises_and_names_a_bad_entry() -> None:
    assert parse_mix("v21bpt=3,v21=1") == {"v21bpt": 0.75, "v21": 0.25}
    assert parse_mix("") == {"v21bpt": 1.0}
    with pytest.raises(ValueError, match=r"'v22=1'.*v21bpt, v21, v201"):
        parse_mix("v22=1")
    with pytest.raises(ValueError, match="bad share"):
        parse_mix("v21=-1")
    with pytest.raises(ValueError, match="no positive share"):
        parse_mix("v21=0")


@given(
    count=st.integers(0, 500),
    shares=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda s: sum(s) > 0),
    seed=st.integers(0, 5),
)
def test_assign_kinds_holds_the_mix_within_one_station(
    count: int, shares: list[float], seed: int
) -> None:
    mix = dict(zip(KINDS, shares, strict=True))
    kinds = assign_kinds(count, mix, seed)
    assert kinds.size == count
    total = sum(shares)
    for k, share in enumerate(shares):
        assert abs(int((kinds == k).sum()) - share / total * count) < 1.0 + 1e-9
    assert np.array_equal(kinds, assign_kinds(count, mix, seed))


def test_a_cars_identity_depends_on_the_car_not_the_station() -> None:
    mac, kind = id_token("ev-0000", 0)
    assert kind == "MacAddress"
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", mac)
    emaid, kind = id_token("ev-0001", 1)
    assert kind == "eMAID"
    assert re.fullmatch(r"ZZ-V2G-C[0-9A-F]{8}-\d", emaid)
    assert id_token("ev-0001", 1) == (emaid, "eMAID")
    assert id_token("depot-0001", 1) != (emaid, "eMAID")


def test_plugged_at_puts_every_car_on_its_charger_whatever_the_hour() -> None:
    profile = plugged_at(generate_fleet(200, 3), T0, 3)
    fleet = SimFleet(profile, T0)
    assert fleet.plugged.all()
    assert (fleet.departure - T0 >= 0.5 * profile.stay_s - 1e-6).all()


def _plan(mix: str, n: int = 30) -> tuple[Any, Any]:
    profile = plugged_at(generate_fleet(n, 1), T0, 1)
    plan = plan_stations(
        profile.ids, profile.batteries.max_charge_kw, assign_kinds(n, parse_mix(mix), 1)
    )
    return profile, plan


def _car(profile: Any, i: int) -> CarState:
    b = profile.batteries
    return CarState(
        energy_kwh=0.5 * float(b.capacity_kwh[i]),
        capacity_kwh=float(b.capacity_kwh[i]),
        max_charge_kw=float(b.max_charge_kw[i]),
        max_discharge_kw=float(b.max_discharge_kw[i]),
        min_soc=float(b.min_soc[i]),
        target_soc=float(b.target_soc[i]),
        departure=T0 + 3600.0,
    )


def _valid(action: str, payload: dict[str, Any], version: str) -> None:
    """As the ``ocpp`` library validates a CALL it sends: raises if the schema says no."""
    _validate_payload(Call("1", action, snake_to_camel_case(payload)), version)


@pytest.mark.parametrize("mix", ["v21bpt=1", "v21=1", "v201=1"])
def test_charging_needs_carry_what_each_version_has(mix: str) -> None:
    profile, plan = _plan(mix)
    for i in range(len(plan.station_ids)):
        car = _car(profile, i)
        needs = charging_needs(plan, i, car)
        _valid("NotifyEVChargingNeeds", {"evse_id": 1, "charging_needs": needs}, plan.version(i))
        assert needs["departure_time"].endswith("Z")
        if mix == "v201=1":
            assert "v2x_charging_parameters" not in needs
            assert "available_energy_transfer" not in needs
            params = needs["dc_charging_parameters" if plan.dc[i] else "ac_charging_parameters"]
            assert params["energy_amount"] == max(
                round((car.target_soc - 0.5) * car.capacity_kwh * 1000), 0
            )
            continue
        v2x = needs["v2x_charging_parameters"]
        assert v2x["max_charge_power"] == pytest.approx(car.max_charge_kw * 1000)
        floor_wh = (car.min_soc - 0.5) * car.capacity_kwh * 1000
        assert v2x["ev_min_v2x_energy_request"] == pytest.approx(floor_wh, abs=0.1)
        assert v2x["ev_target_energy_request"] == pytest.approx(
            (car.target_soc - 0.5) * car.capacity_kwh * 1000, abs=0.1
        )
        assert v2x["ev_max_energy_request"] == pytest.approx(0.5 * car.capacity_kwh * 1000, abs=0.1)
        assert v2x["target_soc"] == round(car.target_soc * 100)
        bpt_modes = {"AC_BPT", "DC_BPT"} & set(needs["available_energy_transfer"])
        if mix == "v21bpt=1":
            assert needs["requested_energy_transfer"] in ("AC_BPT", "DC_BPT")
            assert bpt_modes
            assert v2x["max_discharge_power"] == pytest.approx(car.max_discharge_kw * 1000)
        else:
            assert not bpt_modes
            assert v2x["max_discharge_power"] == 0.0


@pytest.mark.parametrize("version", ["2.1", "2.0.1"])
def test_meter_values_split_power_into_import_and_export(version: str) -> None:
    values = sampled_values(0.4567, -7.4, 12.0, 3.5)
    _valid("MeterValues", {"evse_id": 1, "meter_value": [{"timestamp": "2026-11-26T21:00:00Z",
           "sampled_value": values}]}, version)  # fmt: skip
    got = {v["measurand"]: v["value"] for v in values}
    assert got == {
        "SoC": 45.67,
        "Power.Active.Import": 0.0,
        "Power.Active.Export": 7400.0,
        "Energy.Active.Import.Register": 12000.0,
        "Energy.Active.Export.Register": 3500.0,
    }


def _profile(*periods: dict[str, Any], unit: str = "W", **extra: Any) -> dict[str, Any]:
    schedule = {
        "id": 1,
        "charging_rate_unit": unit,
        "start_schedule": "2026-11-26T21:00:00Z",
        "charging_schedule_period": list(periods),
    }
    return {
        "id": 7,
        "stack_level": 0,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Absolute",
        "charging_schedule": [schedule | extra.pop("schedule", {})],
        **extra,
    }


NOW = datetime(2026, 11, 26, 21, tzinfo=UTC).timestamp()


def test_a_central_setpoint_is_signed_and_clipped_to_its_bounds() -> None:
    read = read_profile(
        _profile({"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": -9000,
                  "discharge_limit": -6000, "limit": 11000}),
        now=NOW + 10, volts_per_amp=690.0,
    )  # fmt: skip
    assert read.negative
    (order,) = read.orders
    assert (order.mode, order.power_kw, order.until) == ("setpoint", -6.0, math.inf)


def test_charging_only_is_a_cap_and_is_the_default_mode() -> None:
    read = read_profile(_profile({"start_period": 0, "limit": 16}, unit="A"), now=NOW,
                        volts_per_amp=690.0)  # fmt: skip
    assert not read.negative
    assert [(o.mode, o.power_kw) for o in read.orders] == [("cap", pytest.approx(11.04))]


def test_periods_run_until_the_next_the_duration_or_valid_to() -> None:
    read = read_profile(
        _profile(
            {"start_period": 600, "operation_mode": "CentralSetpoint", "setpoint": 3000},
            {"start_period": 0, "operation_mode": "CentralSetpoint", "setpoint": -2000},
            schedule={"duration": 900},
            max_offline_duration=120,
            invalid_after_offline_duration=True,
        ),
        now=NOW + 1,
        volts_per_amp=690.0,
    )
    assert [(o.power_kw, o.start - NOW, o.until - NOW) for o in read.orders] == [
        (-2.0, 0.0, 600.0),
        (3.0, 600.0, 900.0),
    ]
    assert (read.max_offline_s, read.invalid_after_offline) == (120.0, True)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"charging_profile_purpose": "ChargingStationMaxProfile"}, "Purpose"),
        ({"charging_profile_kind": "Recurring"}, "Kind"),
    ],
)
def test_what_the_station_does_not_do_is_refused_with_a_reason(
    change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ProfileRefused, match=reason):
        read_profile(_profile({"start_period": 0, "limit": 1}) | change, now=NOW,
                     volts_per_amp=1.0)  # fmt: skip
    with pytest.raises(ProfileRefused, match="LocalFrequency"):
        read_profile(_profile({"start_period": 0, "operation_mode": "LocalFrequency"}), now=NOW,
                     volts_per_amp=1.0)  # fmt: skip


values = st.one_of(st.none(), st.floats(-50_000, 50_000, allow_nan=False))


@given(
    periods=st.lists(
        st.tuples(st.sampled_from(["CentralSetpoint", "ChargingOnly", None]), values, values,
                  st.floats(-50_000, 0)),
        min_size=1, max_size=4,
    )
)  # fmt: skip
def test_a_profile_without_a_negative_value_never_discharges(
    periods: list[tuple[str | None, float | None, float | None, float]],
) -> None:
    """The property the gateway's charge-only sessions rely on, seen from the station:
    ``negative`` is set exactly when some value is negative, and a profile without one
    never yields a negative power."""
    rows = []
    for k, (mode, setpoint, limit, dlimit) in enumerate(periods):
        p: dict[str, Any] = {"start_period": 60 * k, "discharge_limit": dlimit}
        if mode:
            p["operation_mode"] = mode
        p["setpoint"] = setpoint if setpoint is not None else 1000.0
        p["limit"] = limit if limit is not None else 11000.0
        rows.append(p)
    negative = any(p[k] < 0 for p in rows for k in ("setpoint", "limit", "discharge_limit"))
    read = read_profile(_profile(*rows), now=NOW, volts_per_amp=1.0)
    assert read.negative == negative
    if not negative:
        assert all(o.power_kw >= 0 for o in read.orders)


def test_a_cap_holds_charging_under_it_and_never_above_the_baseline() -> None:
    fleet = SimFleet(plugged_at(generate_fleet(50, 2), T0, 2), T0, step_s=5.0)
    base = fleet.power.copy()
    fleet.set_cap(0, 2.0, T0 + 60)
    fleet.set_cap(1, 1e6, T0 + 60)
    fleet.tick(T0 + 5)
    assert fleet.power[0] == pytest.approx(min(2.0, base[0]))
    assert fleet.power[1] <= fleet.bat.max_charge_kw[1] + 1e-9
    fleet.tick(T0 + 65)  # the cap is over: back to the baseline
    assert fleet.power[0] > 2.0 or fleet.power[0] == pytest.approx(base[0], abs=0.5)


def test_a_negative_power_value_is_found_anywhere_in_a_raw_message() -> None:
    period = {"startPeriod": 0, "limit": 11000, "setpointReactive": -500}
    msg = {"evseId": 1, "chargingProfile": {"chargingSchedule": [
        {"chargingSchedulePeriod": [period]}]}}  # fmt: skip
    assert not has_negative(msg)  # reactive power is not discharge
    period["dischargeLimit_L2"] = -1
    assert has_negative(msg)
    assert has_negative({"scheduleUpdate": {"setpoint": -0.5}})
    assert not has_negative({"scheduleUpdate": {"setpoint": 0, "dischargeLimit": 0}})


@given(
    points=st.lists(
        st.tuples(st.floats(49.0, 51.0), st.floats(-20_000, 20_000)),
        min_size=1, max_size=20, unique_by=lambda p: round(p[0], 6),
    ),
    hz=st.floats(48.5, 51.5),
    base=st.floats(-5_000, 5_000),
)  # fmt: skip
def test_the_droop_of_many_stations_is_numpys_interpolation_of_each_curve(
    points: list[tuple[float, float]], hz: float, base: float
) -> None:
    """droop_power (vectorised over rows, curves padded) == np.interp of each curve."""
    from agents.ocpp_model import MAX_CURVE_POINTS, droop_power

    pts = sorted((round(f, 6), p / 1000.0) for f, p in points)
    fs, ps = [f for f, _ in pts], [p for _, p in pts]
    pad = MAX_CURVE_POINTS - len(fs)
    hz_rows = np.array([fs + [fs[-1]] * pad] * 2)
    kw_rows = np.array([ps + [ps[-1]] * pad, [-p for p in ps] + [-ps[-1]] * pad])
    got = droop_power(np.array([base, base]) / 1000.0, hz_rows, kw_rows,
                      np.array([-np.inf, -1.0]), np.array([np.inf, 1.0]), hz)  # fmt: skip
    want0 = base / 1000.0 + np.interp(hz, fs, ps)
    want1 = np.clip(base / 1000.0 + np.interp(hz, fs, [-p for p in ps]), -1.0, 1.0)
    assert got[0] == pytest.approx(want0, abs=1e-9)
    assert got[1] == pytest.approx(want1, abs=1e-9)


def test_a_local_frequency_period_reads_as_a_curve_on_its_baseline() -> None:
    period = {"start_period": 0, "operation_mode": "LocalFrequency", "v2x_baseline": -1000,
              "v2x_freq_watt_curve": [{"frequency": 50.2, "power": 3000},
                                      {"frequency": 49.8, "power": -3000}],
              "limit": 4000, "discharge_limit": -4000}  # fmt: skip
    read = read_profile(_profile(period), now=NOW, volts_per_amp=1.0)
    (order,) = read.orders
    assert order.mode == "frequency" and order.power_kw == -1.0
    assert order.curve_hz == (49.8, 50.2) and order.curve_kw == (-3.0, 3.0)
    assert (order.low_kw, order.high_kw) == (-4.0, 4.0)
    assert read.negative  # a negative baseline or curve point asks for discharge
    assert asks_discharge({"v2x_freq_watt_curve": [{"frequency": 50, "power": -1}]})
    assert not asks_discharge({"v2x_freq_watt_curve": [{"frequency": 50, "power": 1}]})
    assert has_negative({"chargingSchedulePeriod": [{"v2xBaseline": -5}]})
    assert has_negative({"v2xFreqWattCurve": [{"frequency": 50.0, "power": -5}]})
