"""A vehicle applies each setpoint at most once, and never one older than its order in force."""

from __future__ import annotations

import aiomqtt

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from broker.models import Setpoint, from_epoch
from broker.settings import Settings
from core.clock import ManualClock

T0 = 1_780_000_000.0


def runtime() -> tuple[AgentRuntime, ManualClock]:
    clock = ManualClock(T0)
    fleet = SimFleet(generate_fleet(3, 1), T0, step_s=5.0)
    settings = Settings(topic_prefix="sp", log_level="warning")
    return AgentRuntime(settings=settings, clock=clock, fleet=fleet, mode="multiplexed"), clock


def deliver(rt: AgentRuntime, vid: str, power: float, issued: float, until: float) -> None:
    sp = Setpoint(
        vehicle_id=vid,
        request_id="r1",
        power_kw=power,
        issued_at=from_epoch(issued),
        valid_until=from_epoch(until),
    )
    topic = rt.topics.setpoint(vid)
    rt.on_message(aiomqtt.Message(topic, sp.model_dump_json().encode(), 1, False, 1, None))


def test_a_redelivered_or_older_setpoint_does_not_undo_a_newer_one() -> None:
    rt, _ = runtime()
    vid = rt.fleet.ids[0]
    deliver(rt, vid, -7.0, T0, T0 + 60)
    deliver(rt, vid, -3.0, T0 + 5, T0 + 65)
    deliver(rt, vid, -3.0, T0 + 5, T0 + 65)  # QoS 1 duplicate
    deliver(rt, vid, -7.0, T0, T0 + 60)  # the older one, handed over late
    assert rt.fleet.setpoint_kw[0] == -3.0
    assert rt.fleet.setpoint_until[0] == T0 + 65
    assert rt.setpoints_applied == 2
    assert rt.rejected["superseded"] == 2


def test_a_newer_setpoint_that_is_already_over_ends_the_order_in_force() -> None:
    rt, clock = runtime()
    vid = rt.fleet.ids[1]
    deliver(rt, vid, -7.0, T0, T0 + 60)
    clock.advance(10.0)
    deliver(rt, vid, 0.0, T0 + 10, T0 + 10.001)  # a release: over on arrival
    assert rt.setpoints_applied == 2
    assert rt.fleet.setpoint_until[1] == T0 + 10.001  # not the -7 kW order until T0 + 60
    clock.advance(0.01)
    rt.fleet.tick(clock.now())
    assert rt.fleet.setpoint_kw[1] == 0.0 and rt.fleet.power[1] != -7.0


def test_setpoints_are_tracked_per_vehicle() -> None:
    rt, _ = runtime()
    a, b = rt.fleet.ids[:2]
    deliver(rt, a, -5.0, T0 + 10, T0 + 60)
    deliver(rt, b, -4.0, T0 + 5, T0 + 60)  # older than a's, but b has none yet
    assert rt.setpoints_applied == 2
    assert list(rt.fleet.setpoint_kw[:2]) == [-5.0, -4.0]
