"""Issue 13: with frequency containment running, the aggregator's batched setpoints carry
SetpointBatch's FCR extension (each vehicle's share of the capacity, the droop and the
frequency the setpoints were computed at); every other setpoint is as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.control_step import ControlStep, StepPlan
from aggregator.inbox import Inbox
from aggregator.scoring import fcr_activation
from broker.codec import setpoint_batch_payload
from broker.columns import TelemetryArrays
from broker.link import Outgoing
from broker.models import (
    DispatchRequest,
    DispatchSignal,
    FcrDroop,
    Service,
    SetpointBatch,
    Telemetry,
    from_epoch,
)
from broker.settings import Settings
from tests.support.memory_loop import STEP, T0, req

N = 60
OWN = 10  # the first OWN vehicles talk for themselves; the rest are behind two bridges


def inbox_of(fleet: SimFleet, t: float) -> Inbox:
    tel = [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, t)]
    arrays = [TelemetryArrays.from_telemetry(tel[OWN : OWN + 25]),
              TelemetryArrays.from_telemetry(tel[OWN + 25 :])]  # fmt: skip
    return Inbox(telemetry=list(tel[:OWN]), batches=[("br-a", arrays[0]), ("br-b", arrays[1])])


def started(request: DispatchRequest) -> tuple[ControlStep, SimFleet, StepPlan]:
    step = ControlStep(settings=Settings(topic_prefix="fcrfill", control_step_s=STEP))
    fleet = SimFleet(generate_fleet(N, 7), T0, step_s=STEP)
    step.run(inbox_of(fleet, T0), T0)
    inbox = inbox_of(fleet, T0 + STEP)
    inbox.requests.append((request, None))
    return step, fleet, step.run(inbox, T0 + STEP)


def batches(step: ControlStep, msgs: list[Outgoing]) -> list[SetpointBatch]:
    return [
        SetpointBatch.model_validate_json(m.payload)
        for m in msgs
        if step.topics.parse(m.topic)[0] == "bridge_setpoints"
    ]


def test_a_containment_request_fills_the_fcr_extension_of_the_bridges_batches() -> None:
    fcr = DispatchRequest(request_id="fcr-1", service=Service.FREQUENCY_CONTAINMENT,
                          capacity_kw=30.0, duration_s=900.0)  # fmt: skip
    step, _, plan = started(fcr)
    assert [a.status for a in plan.answers] == ["accepted"]
    held = plan.answers[0].allocated_kw
    assert held == pytest.approx(30.0)
    out = plan.output
    plugged = out.rows.shape[0]
    assert out.fcr_kw is not None and out.fcr_kw.shape[0] == plugged > OWN
    # The first step tells every plugged-in car: their shares are all of the capacity.
    assert float(out.fcr_kw.sum()) == pytest.approx(held, abs=1e-9)
    # None over its car's half range for the plan's window (it can move that both ways).
    now = T0 + STEP
    view = step.state.view(now, step.settings.stale_s)
    assert view.rows.tolist() == out.rows.tolist()
    lo, hi = step.dispatcher.ranges(view, now, step.dispatcher.dispatches["fcr-1"].end - now)
    assert np.all(out.fcr_kw <= 0.5 * (hi - lo) + 1e-9) and np.all(out.fcr_kw >= 0.0)
    got = batches(step, plan.setpoints)
    assert {b.bridge_id for b in got} == {"br-a", "br-b"}
    share = dict(zip((step.state.ids[r] for r in out.rows.tolist()), out.fcr_kw.tolist(),
                     strict=True))  # fmt: skip
    bridged = 0
    for b in got:
        assert b.fcr is not None and b.fcr_capacity_kw is not None
        assert b.fcr.frequency_hz == 50.0  # no sample yet: computed at no activation
        assert b.fcr.deadband_hz == 0.01 and b.fcr.full_activation_hz == 0.2
        for vid, kw in zip(b.vehicle_id, b.fcr_capacity_kw, strict=True):
            assert kw == pytest.approx(share.pop(vid), abs=5e-4)  # the wire's rounding
            bridged += 1
    # What is left is the vehicles that talk for themselves: their Setpoint has no FCR.
    own = [json.loads(m.payload) for m in plan.setpoints
           if step.topics.parse(m.topic)[0] == "setpoint"]  # fmt: skip
    assert {p["vehicle_id"] for p in own} == set(share) and all("fcr" not in p for p in own)
    assert bridged + len(own) == plugged
    wire_total = sum(sum(b.fcr_capacity_kw or []) for b in got) + sum(share.values())
    assert wire_total == pytest.approx(held, abs=5e-4 * plugged)

    # A frequency sample: the setpoints move out of turn and say at which frequency.
    sample = DispatchSignal(frequency_hz=49.9, ts=from_epoch(T0 + STEP + 1))
    followed = step.follow({"fcr-1": sample}, T0 + STEP + 1)
    assert followed is not None
    moved, msgs = followed
    after = batches(step, msgs)
    assert after and all(b.fcr is not None and b.fcr.frequency_hz == 49.9 for b in after)
    droop = after[0].fcr
    assert droop is not None
    assert droop.activation(49.9) == pytest.approx(float(fcr_activation([49.9])[0]))
    assert moved.fcr_kw is not None and moved.fcr_hz == 49.9


def test_without_containment_the_batches_are_as_before() -> None:
    step, _, plan = started(req(-40.0, 600.0, rid="pw-1"))
    assert [a.status for a in plan.answers] == ["accepted"]
    assert plan.output.fcr_hz is None and plan.output.fcr_kw is None
    got = [m for m in plan.setpoints if step.topics.parse(m.topic)[0] == "bridge_setpoints"]
    assert len(got) == 2
    for m in got:
        b = SetpointBatch.model_validate_json(m.payload)
        assert b.fcr is None and b.fcr_capacity_kw is None
        # Byte for byte what the batch's own columns format to without the extension.
        assert m.payload == setpoint_batch_payload(
            b.bridge_id, b.request_id, b.issued_at, b.vehicle_id,
            np.array(b.power_kw), np.array(b.valid_until),
        )  # fmt: skip
        assert set(json.loads(m.payload)) == {"bridge_id", "request_id", "issued_at",
                                              "vehicle_id", "power_kw", "valid_until"}  # fmt: skip


def test_the_codec_writes_the_extension_as_the_model_reads_it() -> None:
    droop = FcrDroop(frequency_hz=49.93)
    body = setpoint_batch_payload(
        "gw", "r-1", from_epoch(T0), ["a", "b"], np.array([1.0, -2.0]),
        np.full(2, T0 + 30.0), droop, np.array([1.23456, 0.0]),
    )  # fmt: skip
    b = SetpointBatch.model_validate_json(body)
    assert b.fcr == droop and b.fcr_capacity_kw == [1.235, 0.0]
    for bad in (np.array([-1.0, 0.0]), np.array([np.nan, 0.0]), np.array([1.0])):
        with pytest.raises(ValueError, match="fcr_capacity_kw"):
            setpoint_batch_payload("gw", "r-1", from_epoch(T0), ["a", "b"],
                                   np.array([1.0, -2.0]), np.full(2, T0 + 30.0), droop, bad)  # fmt: skip
    with pytest.raises(ValueError, match="both or neither"):
        setpoint_batch_payload("gw", "r-1", from_epoch(T0), ["a", "b"], np.array([1.0, -2.0]),
                               np.full(2, T0 + 30.0), droop, None)  # fmt: skip
