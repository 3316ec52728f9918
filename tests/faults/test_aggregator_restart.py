"""The aggregator killed (kill -9) mid-dispatch and started again: it rebuilds the fleet and
the running dispatch from Redis (AOF on) and the retained statuses, and the dispatch's
delivered energy carries on from where it was, to a completion that settles the whole window.

The aggregator runs as a real ``v2g aggregator`` process on the test's own Mosquitto and
Redis; the fleet runs in the test (so its physics can be checked) on the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest

from agents.runtime import AgentRuntime
from broker.models import DispatchProgress, DispatchRequest, DispatchResult, FleetStatus, to_epoch
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import SIM_START, make_fleet
from tests.support.loop import on_target, request, spy
from tests.support.processes import aggregator_env, aggregator_process

pytestmark = pytest.mark.integration

DURATION_S = 300.0  # simulated: 30 s of wall time at x10
DOWN_WALL_S = 1.0  # from the kill to the new process being spawned


async def test_a_killed_aggregator_resumes_its_fleet_and_dispatch_from_redis(
    settings: Settings,
    test_id: str,
    tmp_path: Path,
    figure: Recorder,
) -> None:
    cfg = settings
    wall_anchor = time.time()
    clock = SimClock(speed=cfg.speed, wall_anchor=wall_anchor, sim_anchor=SIM_START)
    fleet = make_fleet(cfg, clock, count=20, seed=7)
    n = len(fleet)
    floor = fleet.bat.min_soc * fleet.bat.capacity_kwh
    above_floor = fleet.energy >= floor
    agents = AgentRuntime(
        settings=cfg,
        clock=clock,
        fleet=fleet,
        mode="multiplexed",
        connections=2,
        client_prefix=f"ftest-{test_id}-ev",
    )
    env = aggregator_env(cfg, wall_anchor)
    log = tmp_path / "aggregator.log"
    rid = f"restart-{test_id}"
    t = cfg.topics
    statuses: asyncio.Queue[FleetStatus] = asyncio.Queue()
    progress: list[DispatchProgress] = []
    results: list[DispatchResult] = []
    completed = asyncio.Event()

    agents_task = asyncio.create_task(agents.run(), name="agents")
    try:
        async with (
            spy(cfg, t.fleet_status, t.dispatch_result(rid), t.dispatch_progress(rid)) as events,
            aggregator_process(env, log) as first,
        ):

            async def sort_events() -> None:
                while True:
                    ev = await events.get()
                    if ev.topic == t.fleet_status and ev.payload:
                        statuses.put_nowait(FleetStatus.model_validate_json(ev.payload))
                    elif ev.topic == t.dispatch_progress(rid):
                        progress.append(DispatchProgress.model_validate_json(ev.payload))
                    elif ev.topic == t.dispatch_result(rid):
                        results.append(DispatchResult.model_validate_json(ev.payload))
                        if results[-1].status == "completed":
                            completed.set()

            sorter = asyncio.create_task(sort_events())

            async def status_where(what: str, ok: object, timeout: float = 20.0) -> FleetStatus:
                try:
                    async with asyncio.timeout(timeout):
                        while True:
                            s = await statuses.get()
                            if ok(s):  # type: ignore[operator]
                                return s
                except TimeoutError:
                    print(log.read_text(errors="replace")[-3000:])
                    pytest.fail(f"no fleet status with {what} within {timeout} s")

            s0 = await status_where(
                f"{n} vehicles online",
                lambda s: s.vehicles_online == n and s.capability is not None,
            )
            assert s0.capability is not None
            power = round(0.5 * s0.capability.min_power_kw, 1)
            assert power < -20.0, f"no export capability to test with: {s0.capability}"
            answer = await request(
                cfg, DispatchRequest(request_id=rid, power_kw=power, duration_s=DURATION_S)
            )
            assert answer.status == "accepted", answer
            await status_where(f"power on {power} kW", lambda s: on_target(s.power_kw, power))
            await asyncio.sleep(3.0)  # a few steps of delivery, each saved to Redis
            before = max((p.delivered_kwh for p in progress if p.request_id == rid), key=abs)
            seen_before = len(progress)
            first.kill()  # kill -9, mid-step or mid-save: whatever it was doing is cut
            await first.wait()
            killed_sim = clock.now()
            await asyncio.sleep(DOWN_WALL_S)

            async with aggregator_process(env, log):
                spawned = time.monotonic()
                s1 = await status_where(
                    "a status from the new process", lambda s: to_epoch(s.ts) > killed_sim
                )
                first_status_s = time.monotonic() - spawned
                restored = [d.request_id for d in s1.dispatches]
                sim1 = to_epoch(s1.ts)
                s2 = await status_where(
                    f"{n} online and power on {power} kW",
                    lambda s: (
                        s.vehicles_online == n
                        and [d.request_id for d in s.dispatches] == [rid]
                        and on_target(s.power_kw, power)
                    ),
                )
                correct_periods = (to_epoch(s2.ts) - sim1) / cfg.telemetry_interval_s
                after = [p.delivered_kwh for p in progress[seen_before:] if p.request_id == rid]
                async with asyncio.timeout(DURATION_S / cfg.speed + 10.0):
                    await completed.wait()
            sorter.cancel()
    finally:
        agents_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10.0):
                await agents_task

    final = next(r for r in results if r.request_id == rid and r.status == "completed")
    print(
        f"\naggregator kill -9: new process's first status after {first_status_s:.2f} s wall"
        f" (restored dispatches {restored}); fleet correct {correct_periods:.1f} telemetry"
        f" periods later; delivered {before:.3f} kWh before the kill, {final.delivered_kwh}"
        f" kWh of {final.requested_kwh} at completion"
    )
    figure("aggregator kill -9: restart -> first fleet status", first_status_s, "s wall")
    figure(
        "... -> fleet and dispatch correct again",
        correct_periods,
        "telemetry periods",
        limit="<= 2",
    )
    assert restored == [rid], "the running dispatch was not rebuilt from Redis"
    # Statuses come at control steps, each stamped a few ms after its 5 s mark.
    assert correct_periods <= 2.05
    # The ledger is continuous: nothing delivered before the kill is forgotten, and the
    # whole window settles close to what was asked (vehicles held their setpoints while
    # the aggregator was away).
    assert after and abs(min(after, key=abs)) >= abs(before) - 1e-6, (before, after)
    assert final.delivered_kwh is not None and final.requested_kwh is not None
    gap = abs(final.delivered_kwh - final.requested_kwh) / abs(final.requested_kwh)
    figure("... delivered vs requested over the window", 100 * gap, "% off", limit="<= 5 %")
    assert gap <= 0.05, final
    assert fleet.short == 0, f"drivers left short: {fleet.short_ids}"
    low = fleet.plugged & above_floor & (fleet.energy < floor - 1e-6)
    assert not low.any(), f"below their min_soc floor: {np.array(fleet.ids)[low].tolist()}"
