"""Bridges' batched messages: columns round-trip, every malformed batch is refused with a
reason (never an exception), and a batch folds to exactly what the same reports do one
by one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from agents.telemetry import telemetry_batch_payloads, telemetry_payloads
from aggregator.fleet_state import FleetState
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.codec import setpoint_batch_payload
from broker.columns import TelemetryArrays
from broker.models import (
    MAX_BATCH_VEHICLES,
    TELEMETRY_BATCH_COLUMNS,
    Setpoint,
    SetpointBatch,
    Telemetry,
    TelemetryBatch,
    from_epoch,
)
from broker.settings import Settings
from broker.topics import Topics
from core.clock import ManualClock

T0 = 1_795_716_000.0  # 2026-11-26T18:00:00Z
SENT = "2026-11-26T18:00:00Z"

finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def reports(draw: st.DrawFn, max_size: int = 30) -> list[Telemetry]:
    """Valid one-vehicle reports of a few vehicles, with repeats, replays and any order."""
    n = draw(st.integers(1, max_size))
    vids = draw(
        st.lists(st.sampled_from(["ev-1", "ev-2", "b.3:x", "Z-9", "ev-5"]), min_size=n, max_size=n)
    )
    out = []
    for vid in vids:
        plugged = draw(st.booleans())
        dep = draw(st.none() | st.floats(T0, T0 + 86_400.0, **finite)) if plugged else None
        out.append(
            Telemetry(
                vehicle_id=vid,
                seq=draw(st.integers(0, 5)),
                ts=from_epoch(T0 + draw(st.integers(-3, 3)) * 5.0),
                plugged_in=plugged,
                soc=draw(st.floats(0.0, 1.0, **finite)),
                capacity_kwh=draw(st.floats(1.0, 200.0, **finite)),
                power_kw=draw(st.floats(-50.0, 50.0, **finite)),
                max_charge_kw=draw(st.floats(0.0, 50.0, **finite)),
                max_discharge_kw=draw(st.floats(0.0, 50.0, **finite)),
                charge_efficiency=draw(st.floats(0.5, 1.0, **finite)),
                discharge_efficiency=draw(st.floats(0.5, 1.0, **finite)),
                min_soc=draw(st.floats(0.0, 0.5, **finite)),
                target_soc=draw(st.floats(0.0, 1.0, **finite)),
                departure=None if dep is None else from_epoch(dep),
            )
        )
    return out


def same_columns(a: FleetState, b: FleetState) -> None:
    assert a.ids == b.ids
    for name in a.cols:
        assert np.array_equal(a.col(name), b.col(name), equal_nan=True), name


# -- the model -------------------------------------------------------------------------
@given(reports())
def test_a_batch_round_trips_through_json_to_the_same_columns(batch: list[Telemetry]) -> None:
    wire = TelemetryBatch.from_telemetry("depot-1", from_epoch(T0), batch).to_json()
    decoded = TelemetryBatch.model_validate_json(wire)
    assert decoded.sent_at == datetime(2026, 11, 26, 18, tzinfo=UTC)
    got, want = TelemetryArrays.from_batch(decoded), TelemetryArrays.from_telemetry(batch)
    assert got.vehicle_id == want.vehicle_id
    assert np.array_equal(got.seq, want.seq)
    assert np.array_equal(got.ts, want.ts)
    assert np.array_equal(got.plugged_in, want.plugged_in)
    for name, col in want.values.items():
        assert np.array_equal(got.values[name], col, equal_nan=True), name


def test_the_agents_batch_carries_what_their_one_by_one_reports_say() -> None:
    fleet = SimFleet(generate_fleet(40, 3), T0)
    rows = np.arange(0, 40, 3)
    (body,) = telemetry_batch_payloads(fleet, T0, rows, "depot-1")
    fleet.seq[rows] -= 1  # the same reports again, one by one
    one_by_one = [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, T0, rows)]
    got = TelemetryArrays.from_batch(TelemetryBatch.model_validate_json(body))
    want = TelemetryArrays.from_telemetry(one_by_one)
    assert got.vehicle_id == want.vehicle_id
    assert np.array_equal(got.seq, want.seq)
    assert np.allclose(got.ts, want.ts, rtol=0, atol=1e-6)
    for name, col in want.values.items():
        assert np.allclose(got.values[name], col, rtol=0, atol=1e-6, equal_nan=True), name


def test_a_bridge_bigger_than_the_cap_is_split_into_several_batches() -> None:
    fleet = SimFleet(generate_fleet(25, 1), T0)
    bodies = telemetry_batch_payloads(fleet, T0, np.arange(25), "gw", max_vehicles=10)
    sizes = [len(TelemetryBatch.model_validate_json(b)) for b in bodies]
    assert sizes == [10, 10, 5]
    assert (fleet.seq == 1).all()


# -- malformed batches -------------------------------------------------------------------
def good_doc(n: int = 3) -> dict[str, Any]:
    batch = [
        Telemetry.model_validate(
            {
                "vehicle_id": f"ev-{i}",
                "seq": 1,
                "ts": SENT,
                "plugged_in": True,
                "soc": 0.5,
                "capacity_kwh": 60.0,
                "power_kw": -7.4,
                "max_charge_kw": 11.0,
                "max_discharge_kw": 11.0,
                "charge_efficiency": 0.95,
                "discharge_efficiency": 0.93,
                "min_soc": 0.2,
                "target_soc": 0.8,
                "departure": "2026-11-27T07:30:00Z",
            },
            strict=False,
        )
        for i in range(n)
    ]
    doc: dict[str, Any] = json.loads(
        TelemetryBatch.from_telemetry("depot-1", from_epoch(T0), batch).to_json()
    )
    return doc


def service() -> AggregatorService:
    return AggregatorService(
        settings=Settings(topic_prefix="bt", log_level="warning", telemetry_interval_s=5.0),
        clock=ManualClock(T0),
        store=MemoryStore(),
        logger=structlog.wrap_logger(structlog.ReturnLogger()),
    )


def deliver(svc: AggregatorService, body: bytes, bridge: str = "depot-1") -> None:
    topic = Topics("bt").bridge_telemetry(bridge)
    svc.on_message(aiomqtt.Message(topic, body, 0, False, 1, None))


BAD_VALUES: dict[str, list[Any]] = {
    "soc": [1.5, -0.1, "0.5", None, True],
    "capacity_kwh": [0, -1.0, 2000.0],
    "power_kw": [1e6, "x"],
    "charge_efficiency": [0.0, 1.2],
    "seq": [-1, 1.5, "1"],
    "ts": [1.795e12, -5.0, "2026-11-26T18:00:00Z", None],
    "departure": ["2026-11-27T07:30:00Z", 5.0],
    "plugged_in": [1, "yes", None],
    "vehicle_id": ["ev/1", "", "ev+", "#", "a" * 70, 7],
}


@st.composite
def malformed(draw: st.DrawFn) -> tuple[bytes, str]:
    """A batch broken in one way, and the reason it must be refused under."""
    doc = good_doc(3)
    how = draw(st.sampled_from(["value", "length", "missing", "header", "not_a_list", "json"]))
    if how == "value":
        column = draw(st.sampled_from(sorted(BAD_VALUES)))
        doc[column][draw(st.integers(0, 2))] = draw(st.sampled_from(BAD_VALUES[column]))
    elif how == "length":
        column = draw(st.sampled_from(TELEMETRY_BATCH_COLUMNS))
        if draw(st.booleans()):
            doc[column].pop()
        else:
            doc[column].append(doc[column][0])
    elif how == "missing":
        del doc[draw(st.sampled_from([*TELEMETRY_BATCH_COLUMNS, "bridge_id", "sent_at"]))]
    elif how == "header":
        doc["sent_at"] = draw(st.sampled_from(["2026-11-26T18:00:00", "soon", 1795716000]))
    elif how == "not_a_list":
        doc[draw(st.sampled_from(TELEMETRY_BATCH_COLUMNS))] = draw(st.sampled_from([0.5, "a", {}]))
    else:
        text = json.dumps(doc)
        cut = draw(st.integers(1, len(text) - 1))
        return text[:cut].encode(), "json"
    literal = draw(st.sampled_from(["", "NaN", "Infinity"]))
    text = json.dumps(doc)
    if literal and how == "length":  # also a non-finite number somewhere
        text = text.replace('"power_kw": [-7.4', f'"power_kw": [{literal}', 1)
    return text.encode(), "schema"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_every_malformed_batch_is_refused_with_a_reason_and_counted(
    case: tuple[bytes, str],
) -> None:
    body, reason = case
    svc = service()
    deliver(svc, body)
    assert svc.inbox.batches == []
    assert svc.rejected == {reason: 1}
    assert svc.received == svc.accepted + svc.ignored + sum(svc.rejected.values())


@pytest.mark.parametrize(
    ("doc_change", "bridge", "reason"),
    [
        ({}, "depot-2", "identity"),  # the topic's bridge is not the payload's
        ({"padding": "x" * (5 * 1024 * 1024)}, "depot-1", "size"),
    ],
)
def test_a_batch_for_another_bridge_or_too_big_is_refused(
    doc_change: dict[str, Any], bridge: str, reason: str
) -> None:
    svc = service()
    deliver(svc, json.dumps(good_doc() | doc_change).encode(), bridge)
    assert svc.rejected == {reason: 1}


def test_a_batch_over_the_vehicle_cap_is_refused_as_schema() -> None:
    doc = good_doc(1)
    n = MAX_BATCH_VEHICLES + 1
    for column in TELEMETRY_BATCH_COLUMNS:
        doc[column] = doc[column] * n
    doc["vehicle_id"] = [f"v{i}" for i in range(n)]
    svc = service()
    deliver(svc, json.dumps(doc).encode())
    assert svc.rejected == {"schema": 1}


async def test_only_the_rows_stamped_ahead_of_the_clock_are_dropped_from_a_batch() -> None:
    doc = good_doc(3)
    doc["ts"][1] = T0 + 120.0
    svc = service()
    deliver(svc, json.dumps(doc).encode())
    assert svc.accepted == 1 and not svc.rejected
    assert svc.rejected_rows == {"future": 1}
    ((bridge, got),) = svc.inbox.batches
    assert bridge == "depot-1" and got.vehicle_id == ["ev-0", "ev-2"]
    doc["ts"] = [T0 + 120.0] * 3  # nothing left: the batch itself is refused
    deliver(svc, json.dumps(doc).encode())
    assert svc.rejected == {"future": 1}
    report = await svc.step()  # operators see both, apart
    assert report.status.rejected == {"future": 1, "future_rows": 1}


async def test_accepted_batches_fold_at_the_step_and_count_vehicle_updates() -> None:
    svc = service()
    deliver(svc, json.dumps(good_doc(3)).encode())
    deliver(svc, b"not json")
    assert (svc.received, svc.accepted, svc.batched_updates) == (2, 1, 3)
    assert svc.rejected == {"json": 1}
    report = await svc.step()
    assert report.status.vehicles_plugged_in == 3
    assert svc.bridges == ["depot-1"]


# -- folding -----------------------------------------------------------------------------
@given(reports())
def test_a_batch_folds_to_the_same_columns_as_the_same_reports_in_one_step(
    batch: list[Telemetry],
) -> None:
    a, b = FleetState(initial_capacity=2), FleetState(initial_capacity=2)
    wire = TelemetryBatch.from_telemetry("gw", from_epoch(T0), batch).to_json()
    assert a.apply_telemetry(batch) == b.apply_arrays(
        TelemetryArrays.from_batch(TelemetryBatch.model_validate_json(wire))
    )
    same_columns(a, b)


@given(reports())
def test_a_batch_folds_to_the_same_columns_as_the_same_reports_one_by_one(
    batch: list[Telemetry],
) -> None:
    batch = sorted(batch, key=lambda t: (t.ts, t.seq))  # as they happened: one message each
    a, b = FleetState(), FleetState()
    applied = stale = 0
    for t in batch:
        got = a.apply_telemetry([t])
        applied, stale = applied + got[0], stale + got[1]
    assert b.apply_arrays(TelemetryArrays.from_telemetry(batch)) == (applied, stale)
    same_columns(a, b)


# -- batched setpoints -------------------------------------------------------------------
def test_setpoints_of_vehicles_behind_a_bridge_go_out_batched_and_the_rest_one_by_one() -> None:
    svc = service()
    deliver(svc, json.dumps(good_doc(3)).encode())
    solo = {k: v[0] for k, v in good_doc(1).items() if isinstance(v, list)}
    solo |= {"vehicle_id": "solo", "ts": SENT, "departure": "2026-11-27T07:30:00Z"}
    svc.inbox.telemetry.append(Telemetry.model_validate_json(json.dumps(solo)))
    svc._fold(svc.inbox)
    rows = np.array([svc.state.index[v] for v in ["ev-0", "solo", "ev-2"]])
    msgs = svc._setpoint_messages(rows, np.array([-1.0, -2.0, -3.0]), np.full(3, T0 + 30), "r1", T0)
    topics = sorted(m.topic for m in msgs)
    assert topics == ["bt/bridges/depot-1/setpoints", "bt/vehicles/solo/setpoint"]
    batch = SetpointBatch.model_validate_json(next(m.payload for m in msgs if "bridges" in m.topic))
    assert (batch.vehicle_id, batch.power_kw) == (["ev-0", "ev-2"], [-1.0, -3.0])
    Setpoint.model_validate_json(next(m.payload for m in msgs if "solo" in m.topic))


def test_a_bridge_applies_batched_setpoints_once_and_never_a_superseded_one() -> None:
    clock = ManualClock(T0)
    fleet = SimFleet(generate_fleet(4, 1), T0, step_s=5.0)
    rt = AgentRuntime(
        settings=Settings(topic_prefix="bt", log_level="warning"),
        clock=clock,
        fleet=fleet,
        mode="multiplexed",
        connections=1,
        batch=True,
        logger=structlog.wrap_logger(structlog.ReturnLogger()),
    )
    (bridge,) = rt.bridge_ids
    topic = rt.topics.bridge_setpoints(bridge)

    def send(vids: list[str], power: float, issued: float, until: float) -> None:
        body = setpoint_batch_payload(
            bridge,
            "r1",
            from_epoch(issued),
            vids,
            np.full(len(vids), power),
            np.full(len(vids), until),
        )
        rt.on_message(aiomqtt.Message(topic, body, 1, False, 1, None))

    ids = fleet.ids
    send([ids[0], ids[1], "not-ours"], -5.0, T0, T0 + 60)
    send([ids[0]], -5.0, T0, T0 + 60)  # redelivered
    send([ids[1]], -1.0, T0 - 5, T0 + 60)  # older than the one in force
    send([ids[2]], -2.0, T0 - 100, T0 - 1)  # already over: ends nothing, applies, holds nothing
    assert rt.setpoints_applied == 3
    assert rt.rejected == {"superseded": 2}
    assert fleet.setpoint_kw[:2].tolist() == [-5.0, -5.0]
    assert fleet.setpoint_until[2] == T0 - 1  # over: the car keeps plain charging
    rt.on_message(aiomqtt.Message(rt.topics.bridge_setpoints("other"), b"{}", 1, False, 1, None))
    assert rt.rejected["schema"] == 1


def test_the_fcr_extension_of_a_setpoint_batch_goes_with_its_columns_or_not_at_all() -> None:
    """Issue 13: ``fcr`` and ``fcr_capacity_kw`` together; without them the JSON is as
    before (no nulls); the droop is aggregator/scoring.fcr_activation's."""
    from aggregator.scoring import fcr_activation
    from broker.models import FcrDroop

    base = {"bridge_id": "gw", "request_id": "r-1", "issued_at": SENT,
            "vehicle_id": ["a", "b"], "power_kw": [1.0, -2.0],
            "valid_until": [T0 + 10, T0 + 10]}  # fmt: skip
    plain = SetpointBatch.model_validate_json(json.dumps(base))
    assert b"fcr" not in plain.to_json()
    with_fcr = SetpointBatch.model_validate_json(
        json.dumps(base | {"fcr": {"frequency_hz": 49.9}, "fcr_capacity_kw": [2.0, 0.0]})
    )
    assert SetpointBatch.model_validate_json(with_fcr.to_json()) == with_fcr
    for bad in (
        {"fcr": {"frequency_hz": 49.9}},
        {"fcr_capacity_kw": [1.0, 1.0]},
        {"fcr": {"frequency_hz": 49.9}, "fcr_capacity_kw": [1.0]},
        {"fcr": {"frequency_hz": 49.9, "deadband_hz": 0.3}, "fcr_capacity_kw": [1.0, 1.0]},
        {"fcr": {"frequency_hz": 49.9}, "fcr_capacity_kw": [-1.0, 1.0]},
    ):
        with pytest.raises(ValidationError):
            SetpointBatch.model_validate_json(json.dumps(base | bad))
    droop = FcrDroop(frequency_hz=50.0)
    hz = np.linspace(49.5, 50.5, 101)
    want = fcr_activation(hz)
    assert [droop.activation(float(f)) for f in hz] == pytest.approx(list(want))
