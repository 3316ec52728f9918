"""Bridges on real Mosquitto: a multiplexed fleet that reports in batches (``--batch``) is
pooled, dispatched with batched setpoints, and tracks the request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
import numpy as np
import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_batch_payloads, telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import RedisStore
from broker.models import SetpointBatch, TelemetryBatch
from broker.settings import Settings
from core.clock import SimClock
from tests.support.harness import HOST, MQTT_PORT, eventually
from tests.support.loop import discharge_half, drain_events, next_event, spy, track

pytestmark = pytest.mark.integration


async def test_a_batched_multiplexed_fleet_is_dispatched_through_its_bridges_and_tracks(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    t = settings.topics
    async with loop_factory(count=60, seed=5, connections=3, batch=True) as loop:
        bridges = loop.agents.bridge_ids
        async with spy(settings, t.all_bridge_telemetry, t.all_setpoints) as wire:
            # One batch per bridge per interval, nothing per vehicle.
            ev = await next_event(wire, lambda e: e.topic.endswith("/telemetry"), 5)
            batch = TelemetryBatch.model_validate_json(ev.payload)
            assert ev.topic == t.bridge_telemetry(batch.bridge_id) and batch.bridge_id in bridges
            assert len(batch) == 20
            report = await loop.wait_all_online()
            assert report.status.vehicles_plugged_in > 20
            assert sorted(loop.aggregator.bridges) == sorted(bridges)
            assert loop.aggregator.batched_updates >= 60
            assert loop.aggregator.state.ids and not loop.aggregator.rejected

            async with spy(settings, t.all_bridge_setpoints) as setpoints:
                power, *_ = await discharge_half(loop, f"bridge-{uuid.uuid4().hex[:8]}", 900.0)
                await track(loop, power, "discharge through bridges")
                got = [
                    SetpointBatch.model_validate_json(e.payload) for e in drain_events(setpoints)
                ]
            assert {b.bridge_id for b in got} == set(bridges)
            assert sum(len(b) for b in got) >= report.status.vehicles_plugged_in
            # No setpoint went out one by one: every vehicle is known behind its bridge.
            assert not [e for e in drain_events(wire) if e.topic.endswith("/setpoint")]
        assert loop.agents.setpoints_applied > 0
        assert not loop.agents.rejected


async def test_fast_ingest_takes_vehicle_and_bridge_telemetry_and_refuses_garbage(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str, retained_cleanup: None
) -> None:
    agg = AggregatorService(
        settings=settings,
        clock=clock,
        store=store,
        client_id=f"itest-{test_id}-fast",
        fast_ingest=True,
    )
    assert agg.ingest is not None
    agg.reports = asyncio.Queue()
    fleet = SimFleet(generate_fleet(30, 2), clock.now())
    now = clock.now()
    singles = telemetry_payloads(fleet, now, np.arange(10))
    (batch,) = telemetry_batch_payloads(fleet, now, np.arange(10, 30), "gw-1")
    t = settings.topics
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agg.run(), name="aggregator")
        try:
            await agg.ingest.wait_connected(10)
            await agg.link.wait_connected(10)
            async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{test_id}-pub") as c:
                for vid, body in zip(fleet.ids[:10], singles, strict=True):
                    await c.publish(t.telemetry(vid), body, qos=0)
                await c.publish(t.bridge_telemetry("gw-1"), batch, qos=1)
                await c.publish(t.bridge_telemetry("gw-1"), b"\x00garbage", qos=0)
            await eventually(lambda: agg.received >= 12, "12 messages on the fast ingest", 10)
            assert agg.accepted == 11 and agg.rejected == {"json": 1}
            assert agg.batched_updates == 20
            async with asyncio.timeout(10):  # folded at the next control step
                while (await agg.reports.get()).status.vehicles_online < 30:
                    pass
            assert agg.ingest.stats.received == 12 and agg.link.stats.received == 0
        finally:
            task.cancel()
