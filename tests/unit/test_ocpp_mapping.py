"""OCPP sessions to fleet vehicles, setpoints to charging profiles: the pure parts of the
gateway (chargers/sessions.py, chargers/profiles.py, chargers/auth.py), no I/O."""

from __future__ import annotations

import base64
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ocpp.messages import get_validator

from broker.models import Telemetry
from chargers.auth import check_station_id, hash_password, parse_basic, verify_password
from chargers.profiles import Fcr, Target, negative_values, set_charging_profile
from chargers.sessions import (
    Assumptions,
    EvseSession,
    apply_charging_needs,
    apply_meter_values,
    telemetry_fields,
    vehicle_id_of,
)

A = Assumptions()
NOW = 1_800_000_000.0


def session(version: str = "2.1") -> EvseSession:
    return EvseSession(station_id="cs-1", evse_id=1, version=version, vehicle_id="cs-1.1")


def valid_call(action: str, payload: dict[str, Any], version: str) -> None:
    get_validator(2, action, version).validate(payload)


# -- identity ---------------------------------------------------------------------------


def test_mac_address_token_names_the_car_in_lower_hex_without_separators() -> None:
    token = {"idToken": "00:1A:2b-3C:4d:5E", "type": "MacAddress"}
    assert vehicle_id_of("cs-1", 2, token) == "001a2b3c4d5e"


def test_emaid_token_names_the_car_in_upper_case_without_dashes() -> None:
    assert vehicle_id_of("cs-1", 2, {"idToken": "de-abc-123456-7", "type": "eMAID"}) == (
        "DEABC1234567"
    )


def test_other_tokens_name_the_evse() -> None:
    assert vehicle_id_of("cs-1", 2, {"idToken": "04A2B3", "type": "ISO14443"}) == "cs-1.2"
    assert vehicle_id_of("cs-1", 2, None) == "cs-1.2"
    # A token that would not be a valid vehicle id falls back too.
    assert vehicle_id_of("cs-1", 3, {"idToken": "--", "type": "eMAID"}) == "cs-1.3"


# -- charging needs and meter values ----------------------------------------------------


def test_v21_charging_needs_give_limits_floor_target_and_departure() -> None:
    s = session()
    apply_meter_values(
        s,
        [
            {
                "timestamp": "2027-01-15T08:00:00Z",
                "sampledValue": [{"value": 40, "measurand": "SoC"}],
            }
        ],
        A,
    )
    apply_charging_needs(
        s,
        {
            "requestedEnergyTransfer": "DC_BPT",
            "availableEnergyTransfer": ["DC", "DC_BPT"],
            "departureTime": "2027-01-15T17:00:00Z",
            "dcChargingParameters": {
                "evMaxCurrent": 100,
                "evMaxVoltage": 400,
                "evEnergyCapacity": 80000,
            },
            "v2xChargingParameters": {
                "maxChargePower": 22000,
                "maxDischargePower": 11000,
                "evMinV2XEnergyRequest": -16000,  # 16 kWh above the floor
                "targetSoC": 80,
            },
        },
        A,
    )
    assert s.bpt_modes == ("DC_BPT",)
    assert not s.can_discharge  # not before the station accepted NotifyAllowedEnergyTransfer
    f = telemetry_fields(s, A)
    assert f["capacity_kwh"] == 80.0 and s.capacity_source == "ev"
    assert f["max_charge_kw"] == 22.0 and f["max_discharge_kw"] == 0.0
    assert f["min_soc"] == pytest.approx(0.2)  # (32 - 16) / 80
    assert f["target_soc"] == pytest.approx(0.8)
    assert f["departure"] == NOW + 9 * 3600  # 17:00Z
    s.bpt_allowed = True
    assert telemetry_fields(s, A)["max_discharge_kw"] == 11.0


def test_v2x_floor_stays_an_energy_level_as_the_soc_moves() -> None:
    s = session()
    s.soc, s.capacity_kwh, s.capacity_source = 0.5, 60.0, "ev"
    apply_charging_needs(
        s,
        {
            "requestedEnergyTransfer": "AC_BPT",
            "v2xChargingParameters": {"evMinV2XEnergyRequest": -12000},
        },
        A,
    )
    assert telemetry_fields(s, A)["min_soc"] == pytest.approx(0.3)
    apply_meter_values(
        s, [{"timestamp": "t", "sampledValue": [{"value": 35, "measurand": "SoC"}]}], A
    )
    assert telemetry_fields(s, A)["min_soc"] == pytest.approx(0.3)


def test_capacity_is_derived_from_the_energy_to_target_when_the_ev_gives_none() -> None:
    s = session()
    s.soc = 0.3
    apply_charging_needs(
        s,
        {
            "requestedEnergyTransfer": "AC_BPT",
            "v2xChargingParameters": {"targetSoC": 80, "evTargetEnergyRequest": 35000},
        },
        A,
    )
    assert s.capacity_kwh == pytest.approx(70.0) and s.capacity_source == "derived"


def test_v201_ac_needs_assume_capacity_and_give_target_from_energy_amount() -> None:
    s = session("2.0.1")
    apply_charging_needs(
        s,
        {
            "requestedEnergyTransfer": "AC_three_phase",
            "departureTime": "2027-01-15T17:00:00Z",
            "acChargingParameters": {
                "energyAmount": 15000,
                "evMinCurrent": 6,
                "evMaxCurrent": 16,
                "evMaxVoltage": 230,
            },
        },
        A,
    )
    f = telemetry_fields(s, A)
    assert f["capacity_kwh"] == A.capacity_kwh and f["soc"] == A.soc
    assert f["target_soc"] == pytest.approx(0.75)  # 0.5 + 15 / 60
    assert f["max_charge_kw"] == pytest.approx(11.04)
    assert f["max_discharge_kw"] == 0.0 and not s.bpt_modes


def test_power_is_import_minus_export_in_w_or_kw() -> None:
    s = session()
    apply_meter_values(
        s,
        [
            {
                "timestamp": "2027-01-15T08:00:00Z",
                "sampledValue": [
                    {
                        "value": 0,
                        "measurand": "Power.Active.Import",
                        "unitOfMeasure": {"unit": "kW"},
                    },
                    {
                        "value": 7.4,
                        "measurand": "Power.Active.Export",
                        "unitOfMeasure": {"unit": "kW"},
                    },
                ],
            }
        ],
        A,
    )
    assert s.power_kw == pytest.approx(-7.4)
    apply_meter_values(
        s,
        [
            {
                "timestamp": "2027-01-15T08:00:05Z",
                "sampledValue": [{"value": 3700, "measurand": "Power.Active.Import"}],
            }
        ],
        A,
    )
    assert s.power_kw == pytest.approx(3.7)


def test_without_soc_the_energy_register_moves_the_soc() -> None:
    s = session("2.0.1")
    s.soc, s.capacity_kwh = 0.5, 50.0
    reg = {"measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "kWh"}}
    apply_meter_values(s, [{"timestamp": "a", "sampledValue": [{**reg, "value": 100.0}]}], A)
    apply_meter_values(s, [{"timestamp": "b", "sampledValue": [{**reg, "value": 110.0}]}], A)
    assert s.soc == pytest.approx(0.5 + 10 * A.efficiency / 50)


def test_telemetry_fields_make_a_valid_telemetry() -> None:
    s = session("2.0.1")
    Telemetry.model_validate(
        {
            **telemetry_fields(s, A),
            "vehicle_id": s.vehicle_id,
            "seq": 1,
            "ts": "2027-01-15T08:00:00Z",
        },
        strict=False,
    )


# -- profiles ---------------------------------------------------------------------------


def target(version: str, bpt: bool) -> Target:
    return Target(version, 1, "tx-1", bpt, max_charge_w=11000.0, max_discharge_w=11000.0)


def test_bpt_setpoint_is_a_signed_central_setpoint_with_offline_safeguards() -> None:
    p = set_charging_profile(target("2.1", True), -7.4, now=NOW, until=NOW + 60)
    valid_call("SetChargingProfile", p, "2.1")
    prof = p["chargingProfile"]
    period = prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]
    assert period == {
        "startPeriod": 0,
        "operationMode": "CentralSetpoint",
        "setpoint": -7400.0,
        "limit": 11000.0,
        "dischargeLimit": -11000.0,
    }
    assert (
        prof["chargingProfilePurpose"] == "TxProfile" and prof["chargingProfileKind"] == "Absolute"
    )
    assert prof["chargingSchedule"][0]["chargingRateUnit"] == "W"
    assert prof["chargingSchedule"][0]["startSchedule"] == "2027-01-15T08:00:00.000Z"
    assert prof["chargingSchedule"][0]["duration"] == 60
    assert prof["maxOfflineDuration"] > 0 and prof["invalidAfterOfflineDuration"] is True


def test_fcr_to_a_bpt_session_is_a_local_frequency_curve_with_offline_safeguards() -> None:
    fcr = Fcr(3.0, nominal_hz=50.0, deadband_hz=0.01, full_activation_hz=0.2)
    p = set_charging_profile(target("2.1", True), -1.5, now=NOW, until=NOW + 60, fcr=fcr)
    valid_call("SetChargingProfile", p, "2.1")
    prof = p["chargingProfile"]
    period = prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]
    assert period == {
        "startPeriod": 0,
        "operationMode": "LocalFrequency",
        "v2xBaseline": -1500.0,
        "v2xFreqWattCurve": [
            {"frequency": 49.8, "power": -3000.0},
            {"frequency": 49.99, "power": 0.0},
            {"frequency": 50.01, "power": 0.0},
            {"frequency": 50.2, "power": 3000.0},
        ],
        "limit": 11000.0,
        "dischargeLimit": -11000.0,
    }
    assert prof["maxOfflineDuration"] > 0 and prof["invalidAfterOfflineDuration"] is True
    # a session that cannot discharge, or a station that takes A only: the central path
    for t, unit in ((target("2.1", False), "W"), (target("2.0.1", False), "W")):
        q = set_charging_profile(t, 1.5, now=NOW, until=NOW + 60, unit=unit, fcr=fcr)
        assert "LocalFrequency" not in str(q) and negative_values(q) == []
    a = set_charging_profile(target("2.1", True), -1.5, now=NOW, until=NOW + 60, unit="A", fcr=fcr)
    assert (
        a["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["operationMode"]
        == "CentralSetpoint"
    )


def test_charge_only_gets_a_zero_limit_for_a_discharge_request() -> None:
    for version in ("2.1", "2.0.1"):
        p = set_charging_profile(target(version, False), -7.4, now=NOW, until=NOW + 60)
        valid_call("SetChargingProfile", p, version)
        period = p["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]
        assert period["limit"] == 0.0
        assert "setpoint" not in period and "dischargeLimit" not in period
        assert period.get("operationMode", "ChargingOnly") == "ChargingOnly"


def test_a_station_that_takes_amperes_gets_the_same_profile_in_a_at_nominal_voltage() -> None:
    p = set_charging_profile(target("2.1", True), -6.9, now=NOW, until=NOW + 60, unit="A")
    valid_call("SetChargingProfile", p, "2.1")
    sched = p["chargingProfile"]["chargingSchedule"][0]
    assert sched["chargingRateUnit"] == "A"
    period = sched["chargingSchedulePeriod"][0]
    assert (period["setpoint"], period["limit"], period["dischargeLimit"]) == (-10.0, 15.9, -15.9)


def test_baseline_is_full_power_charging_without_an_end() -> None:
    p = set_charging_profile(target("2.1", True), None, now=NOW, until=None)
    valid_call("SetChargingProfile", p, "2.1")
    sched = p["chargingProfile"]["chargingSchedule"][0]
    assert "duration" not in sched
    assert sched["chargingSchedulePeriod"][0]["limit"] == 11000.0


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from(["2.1", "2.0.1"]),
    bpt_modes=st.booleans(),
    accepted=st.booleans(),
    setpoint=st.one_of(
        st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-1000, 1000)
    ),
    max_charge=st.floats(-1e6, 1e6),
    max_discharge=st.floats(-1e6, 1e6),
    evse=st.integers(0, 100),
    ttl=st.floats(0.001, 3600),
    unit=st.sampled_from(["W", "A"]),
    fcr_kw=st.one_of(st.none(), st.floats(0, 1e4)),
)
def test_no_session_that_cannot_discharge_ever_gets_a_negative_value(
    version: str,
    bpt_modes: bool,
    accepted: bool,
    setpoint: float | None,
    max_charge: float,
    max_discharge: float,
    evse: int,
    ttl: float,
    unit: str,
    fcr_kw: float | None,
) -> None:
    s = EvseSession(station_id="cs", evse_id=evse, version=version, vehicle_id="cs.1")
    s.bpt_modes = ("AC_BPT",) if bpt_modes else ()
    s.bpt_allowed = accepted
    t = Target(version, evse, "tx", s.can_discharge, max_charge, max_discharge)
    until = None if setpoint is None else NOW + ttl
    fcr = None if fcr_kw is None else Fcr(fcr_kw)
    p = set_charging_profile(t, setpoint, now=NOW, until=until, unit=unit, fcr=fcr)
    if not s.can_discharge:
        assert negative_values(p) == []
        period = p["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]
        assert period["limit"] >= 0 and "setpoint" not in period
    elif setpoint is not None:
        period = p["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]
        if fcr_kw and unit == "W":  # droop at the charger, around the operating point
            assert period["operationMode"] == "LocalFrequency" and "setpoint" not in period
            assert period["dischargeLimit"] <= period["v2xBaseline"] <= period["limit"]
        else:
            assert period["operationMode"] == "CentralSetpoint"
            assert period["dischargeLimit"] <= period["setpoint"] <= period["limit"]
    valid_call("SetChargingProfile", p, version)
    assert all(math.isfinite(x) for x in _numbers(p))


def _numbers(x: Any) -> list[float]:
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [float(x)] if isinstance(x, int | float) and not isinstance(x, bool) else []


# -- auth -------------------------------------------------------------------------------


def test_password_hash_is_salted_and_verifies() -> None:
    h1, h2 = hash_password("s3cret-pass-word!"), hash_password("s3cret-pass-word!")
    assert h1 != h2
    assert verify_password("s3cret-pass-word!", h1) and verify_password("s3cret-pass-word!", h2)
    assert not verify_password("wrong", h1)
    assert not verify_password("x", "garbage")


def test_basic_header_parses_or_is_none() -> None:
    good = "Basic " + base64.b64encode(b"cs-1:pa:ss").decode()
    assert parse_basic(good) == ("cs-1", "pa:ss")
    assert parse_basic(None) is None
    assert parse_basic("Bearer abc") is None
    assert parse_basic("Basic !!!") is None


def test_station_ids_are_checked() -> None:
    assert check_station_id("CS-0001") == "CS-0001"
    with pytest.raises(ValueError, match="station id"):
        check_station_id("a/b")


# -- every CALL a station may send has a schema-valid answer -------------------------------


@pytest.mark.parametrize("version", ["2.1", "2.0.1"])
def test_every_action_a_station_may_send_has_a_schema_valid_default_answer(version: str) -> None:
    from chargers.csms import CALLRESULT, FROM_STATION, default_answer

    for action in sorted(FROM_STATION[version]):
        answer = default_answer(action, version, {"vatNumber": "DE123"}, heartbeat_s=60)
        get_validator(CALLRESULT, action, version).validate(answer)


def test_schema_errors_are_named_as_ocpp_j_names_them() -> None:
    from chargers.csms import schema_error

    assert schema_error("Heartbeat", "2.1", {}) is None
    missing = schema_error("BootNotification", "2.1", {"reason": "PowerUp"})
    assert missing is not None and missing[0] == "OccurrenceConstraintViolation"
    mv = [{"timestamp": "2027-01-15T08:00:00Z", "sampledValue": [{"value": 1.0}]}]
    wrong_type = schema_error("MeterValues", "2.0.1", {"evseId": "one", "meterValue": mv})
    assert wrong_type is not None and wrong_type[0] == "TypeConstraintViolation"
    extra = schema_error("Heartbeat", "2.0.1", {"extra": 1})
    assert extra is not None and extra[0] == "FormatViolation"
