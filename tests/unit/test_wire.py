"""The wire contract: topics and models accept what DESIGN.md says and refuse the rest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from broker.models import DispatchAmend, DispatchRequest, DispatchResult, Setpoint, Telemetry
from broker.topics import Topics
from core.errors import InvalidMessage
from tests.support.samples import GOOD


def test_good_telemetry_is_accepted_with_aware_utc_times() -> None:
    t = Telemetry.model_validate_json(json.dumps(GOOD))
    assert t.ts == datetime(2026, 11, 26, 18, tzinfo=UTC)
    assert t.departure is not None and t.departure.tzinfo is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("soc", 1.2),
        ("soc", -0.1),
        ("soc", "0.5"),
        ("capacity_kwh", -60),
        ("capacity_kwh", 0),
        ("charge_efficiency", 0.0),
        ("discharge_efficiency", 1.5),
        ("max_charge_kw", -1),
        ("power_kw", "fast"),
        ("ts", "2026-11-26T18:00:00"),
        ("departure", "2026-11-27T07:30:00"),
        ("vehicle_id", "ev/1"),
        ("vehicle_id", "ev+"),
        ("vehicle_id", "#"),
        ("vehicle_id", ""),
        ("seq", -1),
        ("plugged_in", "yes"),
    ],
)
def test_telemetry_out_of_range_or_wrong_typed_is_refused(field: str, value: object) -> None:
    bad = dict(GOOD, **{field: value})
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(json.dumps(bad))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(literal: str) -> None:
    text = json.dumps(GOOD).replace('"soc": 0.5', f'"soc": {literal}')
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(text)
    text = json.dumps(GOOD).replace('"power_kw": -7.4', f'"power_kw": {literal}')
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(text)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    t = Telemetry.model_validate_json(json.dumps(dict(GOOD, firmware="1.2")))
    assert t.vehicle_id == "ev-0001"


def test_setpoint_must_expire_after_it_is_issued() -> None:
    with pytest.raises(ValidationError, match="valid_until"):
        Setpoint(
            vehicle_id="ev-1",
            request_id="r",
            power_kw=1.0,
            issued_at=datetime(2026, 1, 1, tzinfo=UTC),
            valid_until=datetime(2026, 1, 1, tzinfo=UTC),
        )


def test_dispatch_request_needs_power_or_capacity_by_service() -> None:
    r = DispatchRequest.model_validate_json('{"request_id":"r1","power_kw":-2000,"duration_s":900}')
    assert r.service == "manual"
    assert r.start is None
    with pytest.raises(ValidationError, match="power_kw"):
        DispatchRequest.model_validate_json(
            '{"request_id":"r1","service":"peak_shaving","duration_s":900}'
        )
    with pytest.raises(ValidationError, match="capacity_kw"):
        DispatchRequest.model_validate_json(
            '{"request_id":"r1","service":"frequency_regulation","power_kw":5,"duration_s":900}'
        )
    for bad in ('"duration_s":-5', '"duration_s":0', '"duration_s":"900"'):
        with pytest.raises(ValidationError):
            DispatchRequest.model_validate_json('{"request_id":"r1","power_kw":1,' + bad + "}")
    with pytest.raises(ValidationError):
        DispatchRequest.model_validate_json(
            '{"request_id":"r1","power_kw":1,"duration_s":9,"service":"x"}'
        )


def test_result_keeps_the_contract_field_names() -> None:
    r = DispatchResult(
        request_id="r", status="partial", reason="why", ts=datetime(2026, 1, 1, tzinfo=UTC)
    )
    body = json.loads(r.to_json())
    for name in (
        "request_id",
        "status",
        "reason",
        "allocated_kw",
        "shortfall_kw",
        "vehicles",
        "delivered_kwh",
    ):
        assert name in body


def test_topics_build_and_parse_round_trip() -> None:
    t = Topics("fleet7")
    assert t.telemetry("ev-1") == "fleet7/vehicles/ev-1/telemetry"
    assert t.parse(t.telemetry("ev-1")) == ("telemetry", "ev-1")
    assert t.parse(t.vehicle_status("ev-1")) == ("status", "ev-1")
    assert t.parse(t.dispatch_requests) == ("requests", "")
    assert t.parse(t.dispatch_cancel("r-9")) == ("cancel", "r-9")
    assert t.fleet_status == "fleet7/fleet/status"
    assert t.fleet_capability == "fleet7/fleet/capability"
    assert t.dispatch_result("r") == "fleet7/dispatch/r/result"
    assert t.dispatch_progress("r") == "fleet7/dispatch/r/progress"


@pytest.mark.parametrize(
    "topic",
    [
        "other/vehicles/ev-1/telemetry",
        "fleet7/vehicles/ev-1/unknown",
        "fleet7/vehicles/ev 1/telemetry",
        "fleet7/vehicles/ev-1/telemetry/extra",
        "fleet7/vehicles//telemetry",
        "fleet7/dispatch/requests/x",
    ],
)
def test_topics_outside_the_contract_are_refused(topic: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        Topics("fleet7").parse(topic)
    assert info.value.reason == "topic"


def test_fast_telemetry_payloads_are_valid_contract_messages() -> None:
    start = 1_795_651_200.0 + 20 * 3600
    fleet = SimFleet(generate_fleet(40, 5), start, step_s=5.0)
    payloads = telemetry_payloads(fleet, start)
    assert len(payloads) == 40
    decoded = [Telemetry.model_validate_json(p) for p in payloads]
    for i, t in enumerate(decoded):
        assert t.vehicle_id == fleet.ids[i]
        assert t.plugged_in == bool(fleet.plugged[i])
        assert t.soc == pytest.approx(fleet.soc()[i], abs=1e-6)
        assert t.power_kw == pytest.approx(fleet.power[i], abs=1e-4)
        assert t.capacity_kwh == fleet.bat.capacity_kwh[i]
        assert (t.departure is None) == (not fleet.plugged[i])
    assert np.all(fleet.seq == 1)  # every report numbered, the next one higher


def test_an_amendment_needs_new_terms_and_has_its_own_topic() -> None:
    from broker.topics import Topics

    assert DispatchAmend.model_validate_json(b'{"power_kw": -20}').power_kw == -20.0
    with pytest.raises(ValidationError, match="power_kw, duration_s or both"):
        DispatchAmend.model_validate_json(b"{}")
    with pytest.raises(ValidationError):
        DispatchAmend.model_validate_json(b'{"duration_s": -5}')
    t = Topics("v2g")
    assert t.parse(t.dispatch_amend("r-1")) == ("amend", "r-1")
    assert t.all_amends == "v2g/dispatch/+/amend"


def test_operator_messages_refuse_unknown_fields_and_telemetry_still_ignores_them() -> None:
    from broker.models import DispatchCancel, DispatchSignal

    operator_messages: list[tuple[type[Any], dict[str, Any]]] = [
        (DispatchRequest, {"request_id": "r1", "power_kw": -5, "duration_s": 900}),
        (DispatchAmend, {"power_kw": -20}),
        (DispatchSignal, {"value": 0.5, "ts": "2026-12-03T10:00:00Z"}),
        (DispatchCancel, {}),
    ]
    for model, doc in operator_messages:
        model.model_validate_json(json.dumps(doc))
        with pytest.raises(ValidationError, match="strat") as info:
            model.model_validate_json(json.dumps({**doc, "strat": "2026-12-03T10:00:00Z"}))
        assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert Telemetry.model_validate_json(json.dumps({**GOOD, "firmware": "1.2"})).soc == GOOD["soc"]
