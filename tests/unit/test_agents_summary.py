"""A running fleet of agents says what it is doing, in its log, every so often."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from structlog.testing import capture_logs

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from broker.settings import Settings
from core.clock import ManualClock

T0 = 1_795_651_200.0 + 2 * 3600.0  # 02:00 UTC: a night fleet, mostly plugged in


def _runtime(every_s: float) -> AgentRuntime:
    fleet = SimFleet(generate_fleet(50, 1), T0, step_s=5.0, warm_start=True)
    settings = Settings(topic_prefix="summary", summary_every_wall_s=every_s)
    return AgentRuntime(settings=settings, clock=ManualClock(T0), fleet=fleet, mode="multiplexed")


def test_the_summary_counts_plugged_following_departed_and_short() -> None:
    rt = _runtime(60.0)
    fleet = rt.fleet
    plugged = np.flatnonzero(fleet.plugged)
    for i in plugged[:3]:
        fleet.set_setpoint(int(i), -5.0, T0 + 60.0)
    fleet.set_setpoint(int(np.flatnonzero(~fleet.plugged)[0]), -5.0, T0 + 60.0)
    s = rt.summary()
    assert s["vehicles"] == 50
    assert s["plugged"] == plugged.size > 0
    assert s["following"] == 3  # a setpoint to a car on the road is followed by nobody
    assert s["departed"] == s["drivers_short"] == s["left_early"] == 0
    fleet.tick(T0 + 120.0)  # the setpoints expire: back on the baseline
    assert rt.summary()["following"] == 0
    fleet.tick(T0 + 86_400.0)  # a day later every car has left once
    after = rt.summary()
    assert after["departed"] >= plugged.size
    assert after["drivers_short"] == 0


async def test_the_agents_log_their_summary_periodically() -> None:
    rt = _runtime(0.05)
    with capture_logs() as logs:
        task = asyncio.create_task(rt._summary_loop(), name="summary-under-test")
        try:
            for _ in range(500):  # up to ~5 s under load; two lines take ~0.1 s
                if sum(e["event"] == "agents_summary" for e in logs) >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    lines = [e for e in logs if e["event"] == "agents_summary"]
    assert len(lines) >= 2
    assert lines[0]["plugged"] == int(rt.fleet.plugged.sum()) > 0
    assert {"following", "departed", "drivers_short"} <= set(lines[0])
