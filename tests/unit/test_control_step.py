"""The control step on its own: an inbox and the time in, a plan out, no I/O."""

from __future__ import annotations

import json

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.control_step import ControlStep
from aggregator.inbox import Inbox
from broker.models import Telemetry
from broker.settings import Settings
from tests.support.memory_loop import STEP, T0, req


def inbox_of(fleet: SimFleet, t: float) -> Inbox:
    return Inbox(telemetry=[Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, t)])


def test_a_request_becomes_setpoints_answers_status_and_books_in_one_plan() -> None:
    settings = Settings(topic_prefix="cs-test", control_step_s=STEP)
    step = ControlStep(settings=settings, books=True)
    fleet = SimFleet(generate_fleet(40, 3), T0, step_s=STEP)
    first = step.run(inbox_of(fleet, T0), T0)
    assert first.applied == 40 and not first.setpoints and not first.answers
    assert first.status.vehicles_online == 40
    assert first.forecast is not None  # the first step with vehicles forecasts
    forecast = first.forecast()
    assert forecast.topic == settings.topics.fleet_forecast and forecast.retain
    step.forecast_published(T0)  # the edge sent it
    topics = [m.topic for m in first.updates]
    assert topics[-2:] == [settings.topics.fleet_capability, settings.topics.fleet_status]

    inbox = inbox_of(fleet, T0 + STEP)
    inbox.requests.append((req(-40.0, 600.0, rid="cs-1"), None))
    plan = step.run(inbox, T0 + STEP)
    assert [a.status for a in plan.answers] == ["accepted"]
    assert [m.topic for m in plan.results] == [settings.topics.dispatch_result("cs-1")]
    plugged = int(plan.output.rows.shape[0])
    assert plugged > 0 and len(plan.setpoints) == plugged
    sent = {json.loads(m.payload)["vehicle_id"] for m in plan.setpoints}
    assert sent == {step.state.ids[r] for r in plan.output.rows.tolist()}
    assert abs(sum(json.loads(m.payload)["power_kw"] for m in plan.setpoints) + 40.0) < 1.0
    assert plan.ledger and all(rid == "cs-1" for rid, _ in plan.ledger)
    assert plan.forecast is None  # not due again for FORECAST_EVERY_S
    snap = plan.snapshot("cursor-1")
    assert snap.ids == step.state.ids and snap.ingest_cursor == "cursor-1"
    assert [r["request"]["request_id"] for r in snap.dispatches] == ["cs-1"]


def test_a_cancel_for_no_running_request_is_refused_and_books_nothing() -> None:
    settings = Settings(topic_prefix="cs-test", control_step_s=STEP)
    step = ControlStep(settings=settings)
    fleet = SimFleet(generate_fleet(10, 3), T0, step_s=STEP)
    inbox = inbox_of(fleet, T0)
    inbox.cancels.append(("nope", None))
    plan = step.run(inbox, T0)
    assert not plan.answers and not plan.ledger
    assert [json.loads(m.payload)["status"] for m in plan.results] == ["rejected"]


def test_stale_reports_are_counted_in_the_shared_rejected_counter() -> None:
    settings = Settings(topic_prefix="cs-test", control_step_s=STEP)
    step = ControlStep(settings=settings)
    fleet = SimFleet(generate_fleet(10, 3), T0, step_s=STEP)
    step.run(inbox_of(fleet, T0), T0)
    late = T0 + 10 * settings.stale_s
    plan = step.run(inbox_of(fleet, T0), late)  # the same reports, long after
    assert step.rejected["stale"] >= 10
    assert plan.status.vehicles_online == 0
