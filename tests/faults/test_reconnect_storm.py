"""A reconnect storm: 200 vehicles, each on its own connection, lose the broker together
(kill -9, restarted 2 s later). All must be back within 30 s, with their connects spread
out by the jittered backoff rather than arriving in one burst, and the aggregator must
count them all online again.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import numpy as np
import pytest

from aggregator.store import MemoryStore, RedisStore
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import running_loop
from tests.support.servers import Mosquitto

pytestmark = pytest.mark.integration

VEHICLES = 200
DOWN_WALL_S = 2.0
BACK_WITHIN_S = 30.0
BUCKET_S = 0.1


async def test_two_hundred_vehicles_come_back_spread_out_after_a_broker_restart(
    mosquitto: Mosquitto,
    settings: Settings,
    clock: SimClock,
    test_id: str,
    figure: Recorder,
) -> None:
    # The shipped backoff (0.2 s doubling to 10 s), not the tests' fast one.
    cfg = settings.model_copy(update={"reconnect_min_s": 0.2, "reconnect_max_s": 10.0})
    store = cast(RedisStore, MemoryStore())  # the harness's type; same interface
    async with running_loop(
        cfg, clock, store, test_id, count=VEHICLES, seed=5, mode="per-vehicle"
    ) as loop:
        await loop.wait_all_online(timeout=30.0)
        links = loop.agents.links
        assert len(links) == VEHICLES
        mosquitto.kill()
        await asyncio.sleep(DOWN_WALL_S)
        await asyncio.to_thread(mosquitto.start)
        restarted = time.monotonic()
        deadline = restarted + BACK_WITHIN_S
        while time.monotonic() < deadline:  # polling counters, bounded
            if all(link.stats.connects >= 2 for link in links):
                break
            await asyncio.sleep(0.1)
        back = np.array(
            [link.stats.connected_at - restarted for link in links if link.stats.connects >= 2]
        )
        missing = [link.client_id for link in links if link.stats.connects < 2]
        loop.drain()
        report = await loop.wait_for(
            f"all {VEHICLES} counted online again",
            lambda r: r.status.vehicles_online == VEHICLES,
            timeout=10.0,
        )
    assert not missing, f"{len(missing)} vehicles not back within {BACK_WITHIN_S} s: {missing[:5]}"
    buckets = np.bincount(np.floor(np.maximum(back, 0.0) / BUCKET_S).astype(int))
    peak = int(buckets.max())
    p50, p90, last = (float(np.percentile(back, q)) for q in (50, 90, 100))
    print(
        f"\nreconnect storm of {VEHICLES}: back after p50 {p50:.2f} s, p90 {p90:.2f} s, last"
        f" {last:.2f} s; at most {peak} connects in any {BUCKET_S * 1000:.0f} ms"
    )
    figure(
        f"reconnect storm, {VEHICLES} vehicles: all back within",
        last,
        "s wall",
        limit=f"<= {BACK_WITHIN_S:g} s",
    )
    figure(
        f"... most connects in one {BUCKET_S * 1000:.0f} ms",
        peak,
        f"of {VEHICLES}",
        limit=f"<= {VEHICLES // 4}",
    )
    assert last <= BACK_WITHIN_S
    assert peak <= VEHICLES // 4, f"the connects came in a burst: {buckets.tolist()}"
    assert report.status.vehicles_online == VEHICLES
