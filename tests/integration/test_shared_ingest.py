"""Shared ingest through the real Redis: what a follower received reaches the leader's
fleet state at its next step, folded with the leader's own reports in one pass, so the
newest report of a vehicle wins whichever process it reached; a process that takes over
reads the stream on from the cursor in the last leader's snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import RedisStore
from broker.models import Telemetry, VehicleStatus, from_epoch
from broker.settings import Settings
from core.clock import ManualClock
from tests.support.harness import SIM_START

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair(
    settings: Settings, redis_keys: None
) -> AsyncIterator[tuple[AggregatorService, AggregatorService]]:
    cfg = settings.model_copy(update={"share_group": "g", "lease_ttl_s": 5.0})
    clock = ManualClock(SIM_START)
    services = [
        AggregatorService(
            settings=cfg,
            clock=clock,
            store=RedisStore(cfg.redis_url, prefix=cfg.redis_prefix),
            client_id=f"itest-{name}",
        )
        for name in ("leader", "follower")
    ]
    try:
        yield services[0], services[1]
    finally:
        for svc in services:
            assert svc.scale is not None
            await svc.scale.close()
            await svc.store.close()


def reports(fleet: SimFleet, at: float, seq: int) -> list[Telemetry]:
    fleet.seq[:] = seq
    return [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, at)]


async def test_a_followers_rows_reach_the_leaders_fleet_state_and_the_newest_report_wins(
    pair: tuple[AggregatorService, AggregatorService],
) -> None:
    leader, follower = pair
    assert leader.scale is not None and follower.scale is not None
    assert await leader.scale.lease.acquire() is not None
    assert await leader.lead()  # promoted: restored (an empty fleet)
    fleet = SimFleet(generate_fleet(6, 3), SIM_START - 10.0)
    ids = fleet.ids
    old, new = reports(fleet, SIM_START - 10.0, 1), reports(fleet, SIM_START - 5.0, 2)
    # Vehicles 0-2: the newer report reached the follower, the older one the leader;
    # vehicles 3-5 the other way round. Vehicle 5 also went offline (its will) via the
    # follower.
    follower.inbox.telemetry = new[:3] + old[3:]
    will = VehicleStatus(vehicle_id=ids[5], online=False, ts=from_epoch(SIM_START - 1.0))
    follower.inbox.status = [will]
    assert not await follower.lead()  # a follower: forwards, no step
    assert follower.scale.stats.forwarded_rows == 7
    leader.inbox.telemetry = old[:3] + new[3:]
    report = await leader.step()
    state = leader.state
    assert sorted(state.ids) == sorted(ids)
    rows = state.rows_of(ids)
    assert state.col("last_seq")[rows].tolist() == [2] * 6, "an older report overwrote a newer"
    assert state.col("online")[rows].tolist() == [True] * 5 + [False]
    assert leader.scale.stats.merged_rows == 7
    assert report.status.vehicles_online == 5
    # The cursor moved past the entry: the next step merges nothing twice.
    await leader.step()
    assert leader.scale.stats.merged_rows == 7


async def test_a_new_leader_reads_the_stream_on_from_the_snapshots_cursor(
    pair: tuple[AggregatorService, AggregatorService],
) -> None:
    leader, follower = pair
    assert leader.scale is not None and follower.scale is not None
    assert await leader.scale.lease.acquire() is not None
    assert await leader.lead()
    fleet = SimFleet(generate_fleet(3, 4), SIM_START - 10.0)
    follower.inbox.telemetry = reports(fleet, SIM_START - 5.0, 1)
    assert not await follower.lead()
    await leader.step()  # merges the entry
    merged_to = leader.scale.cursor
    assert merged_to != "0-0"
    # A snapshot records the cursor as of its step's start: the next steps' carry this one.
    async with asyncio.timeout(10):
        while True:
            await leader.step()
            snap = await leader.store.load()
            if snap is not None and snap.ingest_cursor == merged_to:
                break
            await asyncio.sleep(0.05)
    assert await leader.scale.lease.release()
    assert await follower.scale.lease.acquire() is not None
    assert await follower.lead()  # took over: reset, restored, cursor from the snapshot
    assert follower.scale.cursor == merged_to
    assert sorted(follower.state.ids) == sorted(fleet.ids)
    await follower.step()
    assert follower.scale.stats.merged_rows == 0, "merged the old leader's rows again"
