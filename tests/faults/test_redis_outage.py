"""Redis unavailable for 30 s under a running dispatch: frozen first (SIGSTOP: every call
times out, as in a network partition), then killed outright, then started again from its
AOF. The aggregator keeps dispatching from memory, says it is degraded in its fleet status,
and writes its state once Redis is back.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from aggregator.store import RedisStore
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import STEP_WALL_S, running_loop
from tests.support.loop import discharge_half, on_target
from tests.support.servers import Redis

pytestmark = pytest.mark.integration

FROZEN_WALL_S = 10.0
DEAD_WALL_S = 20.0
SLOW_STEP_MS = 1000.0  # a step that waited on Redis would take its 2 s timeout


async def test_dispatch_goes_on_from_memory_while_redis_is_away_and_state_is_written_on_return(
    redis_server: Redis,
    settings: Settings,
    clock: SimClock,
    test_id: str,
    figure: Recorder,
) -> None:
    store = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    try:
        async with running_loop(settings, clock, store, test_id, count=20, seed=11) as loop:
            fleet = loop.fleet
            floor = fleet.bat.min_soc * fleet.bat.capacity_kwh
            above_floor = fleet.energy >= floor
            await loop.wait_all_online()
            rid = f"redis-away-{test_id}"
            power, _, _ = await discharge_half(loop, rid, duration_s=900.0)
            await loop.wait_for(
                f"power on {power} kW", lambda r: on_target(r.status.power_kw, power)
            )

            redis_server.freeze()
            away = time.monotonic()
            loop.drain()
            report = await loop.wait_for("degraded", lambda r: r.status.degraded, timeout=10.0)
            degraded_s = time.monotonic() - away
            outage = [report]
            while time.monotonic() - away < FROZEN_WALL_S:
                outage.append(await loop.next_report())
            redis_server.kill()  # a frozen process dies at once to kill -9
            while time.monotonic() - away < FROZEN_WALL_S + DEAD_WALL_S:
                outage.append(await loop.next_report())
            await asyncio.to_thread(redis_server.start)  # from its AOF
            back, back_sim = time.monotonic(), clock.now()
            await loop.wait_for("not degraded", lambda r: not r.status.degraded, timeout=15.0)
            recovered_s = time.monotonic() - back

            snap = await store.load()
            held = [r for r in outage[2:] if on_target(r.status.power_kw, power)]
    finally:
        await store.close()

    off = [r.status.power_kw for r in outage[2:] if not on_target(r.status.power_kw, power)]
    slow = max(r.step_ms for r in outage)
    print(
        f"\nRedis away {FROZEN_WALL_S + DEAD_WALL_S:.0f} s: degraded after {degraded_s:.2f} s,"
        f" {len(held)}/{len(outage) - 2} steps on target, slowest step {slow:.0f} ms;"
        f" state written {recovered_s:.2f} s after Redis came back"
    )
    figure("Redis away 30 s: status says degraded after", degraded_s, "s wall", limit="< 5 s")
    figure(
        "... steps on target (2%) while away",
        len(held),
        f"of {len(outage) - 2}",
        limit=f"= {len(outage) - 2}",
    )
    figure("... slowest control step while away", slow, "ms", limit=f"< {SLOW_STEP_MS:g} ms")
    figure("... back -> state written, not degraded", recovered_s, "s wall", limit="< 15 s")
    assert degraded_s < 5.0
    assert not off, f"the fleet left the band around {power} kW while Redis was away: {off}"
    assert slow < SLOW_STEP_MS, "a control step waited on Redis"
    assert len(outage) >= 0.8 * (FROZEN_WALL_S + DEAD_WALL_S) / STEP_WALL_S, "steps were lost"
    assert snap is not None, "nothing written after Redis came back"
    assert snap.saved_at >= back_sim, "what is in Redis predates its return"
    assert [d["request"]["request_id"] for d in snap.dispatches] == [rid]
    assert set(fleet.ids) <= set(snap.ids)
    assert fleet.short == 0, f"drivers left short: {fleet.short_ids}"
    low = fleet.plugged & above_floor & (fleet.energy < floor - 1e-6)
    assert not low.any(), f"below their min_soc floor: {np.array(fleet.ids)[low].tolist()}"
