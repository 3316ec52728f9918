"""The whole loop against real Mosquitto and real Redis: agents, aggregator, operator.

Each test runs on its own topic and Redis prefix (see tests/conftest.py) with a x10 clock:
a control step and a telemetry interval are 5 simulated seconds, half a wall second.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import redis.asyncio as aioredis

from aggregator.dispatch import Dispatch
from aggregator.fleet_state import FleetState
from aggregator.ledger import LedgerWriter, RedisLedger
from aggregator.store import RedisStore, Snapshot
from broker.models import (
    Capability,
    DispatchAmend,
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    FleetStatus,
    Setpoint,
    Telemetry,
    VehicleStatus,
    from_epoch,
)
from broker.settings import Settings
from core.clock import SimClock
from tests.support.harness import HOST, MQTT_PORT, SIM_START, STEP_S, Loop, make_aggregator
from tests.support.loop import (
    TOL,
    discharge_half,
    drain_events,
    next_event,
    on_target,
    request,
    spy,
    track,
)
from v2g import operator

pytestmark = pytest.mark.integration


# -- helpers ------------------------------------------------------------------------------
def biggest_discharger(loop: Loop) -> tuple[str, int]:
    """The plugged-in vehicle that exports the most right now: (id, index in the SimFleet)."""
    fleet = loop.fleet
    power = np.where(fleet.plugged, fleet.power, np.inf)
    i = int(np.argmin(power))
    assert power[i] < 0, f"no vehicle is discharging: {fleet.power}"
    return fleet.ids[i], i


# -- the closed loop ----------------------------------------------------------------------
@pytest.mark.parametrize("fast_setpoints", [True, False], ids=["fastpub", "paho"])
async def test_fifty_vehicles_on_their_own_connections_track_a_discharge_within_2pct(
    loop_factory: Callable[..., Any], settings: Settings, fast_setpoints: bool
) -> None:
    async with loop_factory(
        count=50, seed=7, mode="per-vehicle", fast_setpoints=fast_setpoints
    ) as loop:
        assert len(loop.agents.links) == 50
        report = await loop.wait_all_online()
        assert report.status.vehicles_plugged_in > 20
        # The operator's view: the retained capability and status topics.
        async with spy(
            settings, settings.topics.fleet_capability, settings.topics.fleet_status
        ) as events:
            ev = await next_event(events, lambda e: "capability" in e.topic and bool(e.payload), 5)
            capability = Capability.model_validate_json(ev.payload)
            assert [w.duration_s for w in capability.windows] == [900, 1800, 3600, 7200, 14400]

            rid = f"peak-{uuid.uuid4().hex[:8]}"
            power, answer, _ = await discharge_half(loop, rid, 900.0, capability=capability)
            assert answer.vehicles == report.status.vehicles_plugged_in
            await track(loop, power, "discharge")

            # What went over the wire agrees: the published fleet status and progress.
            drain_events(events)
            ev = await next_event(events, lambda e: e.topic == settings.topics.fleet_status, 5)
            status = FleetStatus.model_validate_json(ev.payload)
            assert on_target(status.power_kw, power), status
            assert [d.request_id for d in status.dispatches] == [rid]
            assert on_target(status.dispatches[0].delivered_kw, power), status.dispatches

        # And the physical truth in the simulator: what plugged-in vehicles draw now.
        fleet = loop.fleet
        assert on_target(float(fleet.power[fleet.plugged].sum()), power)


async def test_progress_reports_delivered_power_on_target(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=30, seed=11, mode="multiplexed", connections=3) as loop:
        await loop.wait_all_online()
        rid = f"dr-{uuid.uuid4().hex[:8]}"
        async with spy(settings, settings.topics.dispatch_progress(rid)) as events:
            power, *_ = await discharge_half(loop, rid, 600.0)
            await track(loop, power, "discharge (multiplexed)")
            drain_events(events)
            ev = await next_event(events, lambda e: e.topic.endswith("/progress"), 5)
            progress = DispatchProgress.model_validate_json(ev.payload)
            assert progress.requested_kw == power
            assert on_target(progress.delivered_kw, power), progress
            assert progress.delivered_kwh < 0 and progress.requested_kwh < 0
            assert progress.elapsed_s > 0 and progress.remaining_s < 600.0


async def test_unplugged_vehicle_is_dropped_and_the_others_pick_up_its_share(
    loop_factory: Callable[..., Any], settings: Settings, clock: SimClock
) -> None:
    async with loop_factory(count=30, seed=3, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        power, *_ = await discharge_half(loop, f"unplug-{uuid.uuid4().hex[:8]}", 900.0)
        await track(loop, power, "before the unplug")

        vid, i = biggest_discharger(loop)
        share = float(loop.fleet.power[i])
        assert abs(share) > TOL * abs(power), "the victim's share must matter for the test"
        agg = loop.aggregator
        row = agg.state.index[vid]
        plugged_before = agg.last_report.status.vehicles_plugged_in  # type: ignore[union-attr]

        async with spy(settings, settings.topics.setpoint(vid)) as setpoints:
            loop.fleet.departure[i] = clock.now()  # the driver leaves now
            dropped = await loop.wait_for(
                f"{vid} unplugged", lambda r: not agg.state.cols["plugged"][row], timeout=5
            )
            assert dropped.status.vehicles_plugged_in == plugged_before - 1
            assert row not in agg.state.view(dropped.now, settings.stale_s).rows
            await track(loop, power, "after the unplug")

            late = [
                sp
                for sp in (Setpoint.model_validate_json(e.payload) for e in drain_events(setpoints))
                if sp.issued_at >= from_epoch(dropped.now)
            ]
            assert late == [], f"{vid} got setpoints after it unplugged: {late}"
        assert not loop.fleet.plugged[i]
        assert loop.fleet.power[i] == 0.0


async def test_vehicle_whose_connection_dies_is_taken_out_by_its_last_will(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=20, seed=5, mode="per-vehicle") as loop:
        await loop.wait_all_online()
        power, *_ = await discharge_half(loop, f"will-{uuid.uuid4().hex[:8]}", 900.0)
        await track(loop, power, "before the drop")

        vid, i = biggest_discharger(loop)
        agg = loop.aggregator
        row = agg.state.index[vid]
        link = loop.agents.links[i]
        task = next(t for t in asyncio.all_tasks() if t.get_name() == f"agent-link-{i}")
        async with spy(settings, settings.topics.vehicle_status(vid)) as statuses:
            drain_events(statuses)  # the retained birth
            # Drop the TCP connection without an MQTT DISCONNECT, and keep it down.
            assert link._client is not None
            sock = link._client._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await task

            ev = await next_event(statuses, lambda e: b'"online":false' in e.payload, 5)
            will = VehicleStatus.model_validate_json(ev.payload)
            assert will.vehicle_id == vid
            assert not link.connected

            gone = await loop.wait_for(
                "the online count to drop",
                lambda r: r.status.vehicles_online == len(loop.fleet) - 1,
            )
        # Taken out by the will (the status), not by silence: its telemetry is still fresh.
        assert not agg.state.cols["online"][row]
        assert gone.now - agg.state.cols["last_ts"][row] <= settings.stale_s
        await track(loop, power, "after the drop")


async def test_restarted_aggregator_restores_fleet_and_dispatch_from_redis_and_completes_it(
    loop_factory: Callable[..., Any], settings: Settings, test_id: str, clock: SimClock
) -> None:
    duration_s = 100.0
    async with loop_factory(count=20, seed=9, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        rid = f"restart-{uuid.uuid4().hex[:8]}"
        results: list[DispatchResult] = []
        win = loop.aggregator.last_report.capability.windows[0]  # type: ignore[union-attr]
        power = round(0.5 * win.min_power_kw, 1)
        req = DispatchRequest(request_id=rid, power_kw=power, duration_s=duration_s)
        follower = loop.tg.create_task(
            operator.dispatch(settings, req, wait=True, timeout_s=30, on_result=results.append)
        )
        await loop.wait_for("the acceptance", lambda r: any(a.request_id == rid for a in r.results))
        await track(loop, power, "before the restart")
        old = loop.aggregator
        ids_before = list(old.state.ids)
        await loop.stop("aggregator")

        store2 = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
        fresh = None
        try:
            fresh = make_aggregator(settings, clock, store2, test_id, "agg2")
            await fresh.restore()
            # Before any telemetry: the fleet and the running request come from Redis.
            assert fresh.inbox.telemetry == []
            assert len(fresh.state) == 20
            assert fresh.state.ids == ids_before
            assert rid in fresh.dispatcher.dispatches
            restored = fresh.dispatcher.dispatches[rid]
            assert restored.state == "active"
            assert restored.requested_kw == power
            assert restored.requested_kwh < 0 and restored.delivered_kwh < 0
            # What the dispatcher learned per vehicle came back with it.
            rows = np.arange(20)
            cycled = fresh.dispatcher.cycled_kwh(rows)
            assert 0 < cycled.sum() <= old.dispatcher.cycled_kwh(rows).sum() + 1e-9

            loop.aggregator = fresh
            await loop.half_step_after_agents()
            restarted_at = clock.now()
            loop.start("aggregator", fresh.run())
            await track(loop, power, "after the restart")
            async with asyncio.timeout(duration_s / settings.speed + 15):
                final = await follower
        finally:
            # The fresh aggregator writes snapshots through store2 until it stops: stop it
            # first, or a write after the close opens a connection nobody closes.
            if fresh is not None and loop.aggregator is fresh and "aggregator" in loop.tasks:
                await loop.stop("aggregator")
            await store2.close()

    assert final.status == "completed", results
    assert [r.status for r in results] == ["accepted", "completed"]
    # The books cover the whole delivery window (from when the setpoints took hold), the
    # restart gap included ...
    assert final.delivery_start is not None
    window_s = restored.end - final.delivery_start.timestamp()
    assert 0 < duration_s - window_s < STEP_S
    assert final.requested_kwh == pytest.approx(power * window_s / 3600.0, abs=2e-3)
    # ... and went on from what was restored: the energy delivered after the restart adds to
    # what was delivered before (the fleet was on target for most of what remained).
    assert final.delivered_kwh is not None
    after_kwh = final.delivered_kwh - restored.delivered_kwh
    assert after_kwh < 0.8 * power * (restored.end - restarted_at) / 3600.0


async def test_malformed_telemetry_is_rejected_counted_by_reason_and_service_keeps_running(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    t = settings.topics
    good = Telemetry(
        vehicle_id="ghost-1",
        seq=1,
        ts=from_epoch(SIM_START),
        plugged_in=True,
        soc=0.5,
        capacity_kwh=60.0,
        power_kw=0.0,
        max_charge_kw=11.0,
        max_discharge_kw=11.0,
        charge_efficiency=0.92,
        discharge_efficiency=0.92,
        min_soc=0.2,
        target_soc=0.8,
    ).model_dump(mode="json")

    def body(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    bad: list[tuple[str, bytes, str]] = [
        (t.telemetry("ghost-1"), b'{"vehicle_id": "ghost-1", "seq": ', "json"),
        (t.telemetry("ghost-1"), body(soc="0.5"), "schema"),
        (t.telemetry("ghost-1"), body().replace(b'"soc": 0.5', b'"soc": NaN'), "schema"),
        (t.telemetry("ghost-2"), body(), "identity"),
        # Wildcard-looking ids: no broker takes '+' or '#' in a topic, but a payload can say so.
        (t.telemetry("ghost-1"), body(vehicle_id="ghost-+"), "schema"),
        (t.telemetry("ghost-1"), body(vehicle_id="#"), "schema"),
        (t.telemetry("ghost!1"), body(vehicle_id="ghost!1"), "topic"),
        (t.telemetry("ghost-1"), body(padding="x" * 70_000), "size"),
    ]
    assert b"NaN" in bad[2][1]
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1

    async with loop_factory(count=5, seed=2, mode="multiplexed", connections=1) as loop:
        await loop.wait_all_online()
        agg = loop.aggregator
        assert not agg.rejected
        async with aiomqtt.Client(
            HOST, MQTT_PORT, identifier=f"itest-raw-{uuid.uuid4().hex[:8]}"
        ) as raw:
            for topic, payload, _ in bad:
                await raw.publish(topic, payload, qos=1)

        counted = await loop.wait_for(
            f"rejections {expected}",
            lambda r: all(r.status.rejected.get(k, 0) >= n for k, n in expected.items()),
            timeout=5,
        )
        assert {k: agg.rejected[k] for k in expected} == expected
        assert {k: counted.status.rejected[k] for k in expected} == expected
        assert not any(v.startswith("ghost") for v in agg.state.ids)

        # The published, retained fleet status carries the same counts.
        async with spy(settings, t.fleet_status) as events:
            ev = await next_event(events, lambda e: bool(e.payload), 5)
            published = FleetStatus.model_validate_json(ev.payload)
        assert {k: published.rejected.get(k) for k in expected} == expected

        # The service is alive: later steps happen and the fleet still reports in.
        later = await loop.wait_for(
            "a later step with the fleet online",
            lambda r: r.now > counted.now and r.status.vehicles_online == 5,
        )
        assert later.status.rejected == counted.status.rejected
        assert not loop.tasks["aggregator"].done()


async def test_absurd_dispatch_requests_are_rejected_with_a_reason(
    loop_factory: Callable[..., Any], settings: Settings, clock: SimClock
) -> None:
    async with loop_factory(count=5, seed=4) as loop:
        await loop.wait_all_online()
        now, hour = from_epoch(clock.now()), timedelta(hours=1)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"power_kw": -2e6, "duration_s": 900.0}, "beyond the platform limit"),
            ({"power_kw": -10.0, "duration_s": 900.0, "start": now - 2 * hour}, "in the past"),
            ({"power_kw": -10.0, "duration_s": 30 * 86_400.0}, "longer than the limit"),
            ({"power_kw": -10.0, "duration_s": 900.0, "start": now + 720 * hour}, "too far ahead"),
        ]
        for i, (terms, why) in enumerate(cases):
            rid = f"absurd-{i}-{uuid.uuid4().hex[:6]}"
            answer = await request(
                settings, DispatchRequest.model_validate({"request_id": rid, **terms})
            )
            assert answer.request_id == rid
            assert answer.status == "rejected", answer
            assert answer.reason is not None and why in answer.reason, answer.reason
        assert loop.aggregator.dispatcher.dispatches == {}
        report = await loop.next_report()
        assert report.status.dispatches == []


async def test_cancel_stops_a_running_request_with_cancelled_and_delivered_energy(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=20, seed=6, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        baseline_kw = loop.aggregator.last_report.status.power_kw  # type: ignore[union-attr]
        rid = f"cancel-{uuid.uuid4().hex[:8]}"
        t = settings.topics
        async with spy(settings, t.dispatch_result(rid), t.dispatch_progress(rid)) as events:
            power, _, accepted = await discharge_half(loop, rid, 900.0)
            await track(loop, power, "before the cancel")
            await operator.cancel(settings, rid)
            stopped = await loop.wait_for(
                "the cancel", lambda r: any(a.status == "cancelled" for a in r.results), 5
            )
            progress: list[DispatchProgress] = []
            async with asyncio.timeout(5):
                while True:
                    ev = await events.get()
                    if ev.topic == t.dispatch_progress(rid):
                        progress.append(DispatchProgress.model_validate_json(ev.payload))
                    elif b'"cancelled"' in ev.payload:
                        done = DispatchResult.model_validate_json(ev.payload)
                        break
        assert done.status == "cancelled"
        assert done.reason == "cancelled by the operator"
        assert rid not in loop.aggregator.dispatcher.dispatches
        # The books close at the cancel: requested from when the setpoints took hold (just
        # after the acceptance) to the cancel, and delivered as the last progress plus one
        # more step on target.
        assert done.delivery_start is not None
        start = done.delivery_start.timestamp()
        assert accepted.now < start < accepted.now + STEP_S
        assert done.requested_kwh == pytest.approx(power * (stopped.now - start) / 3600.0, abs=1e-3)
        last = max(progress, key=lambda p: p.ts)
        step_h = (stopped.now - last.ts.timestamp()) / 3600.0
        assert 0 < step_h * 3600.0 <= 2 * settings.control_step_s
        assert done.delivered_kwh is not None
        assert done.delivered_kwh < 0
        assert done.delivered_kwh == pytest.approx(
            last.delivered_kwh + power * step_h, abs=TOL * abs(power) * step_h + 1e-3
        )

        # Released: no active dispatch, and the vehicles go back to plain charging.
        back = await loop.wait_for(
            "the fleet back to plain charging",
            lambda r: not r.status.dispatches and r.status.power_kw > 0,
        )
        assert back.status.power_kw == pytest.approx(baseline_kw, rel=0.25)
        assert not np.any(loop.fleet.setpoint_until > loop.clock.now())


# -- the state store ----------------------------------------------------------------------
async def test_redis_store_round_trips_a_snapshot_exactly(
    store: RedisStore, settings: Settings, redis_url: str
) -> None:
    rng = np.random.default_rng(42)
    n = 257
    ids = [f"ev-{k:04d}" for k in range(n - 2)] + ["oem:fleet.A_1", "x" * 64]
    floats = rng.normal(size=n)
    floats[:4] = [np.nan, np.inf, -np.inf, -0.0]
    columns: dict[str, np.ndarray] = {
        "f8": floats,
        "f4": rng.normal(size=n).astype(np.float32),
        "be_f8": floats.astype(">f8"),
        "bool": rng.random(n) < 0.5,
        "i8": rng.integers(-(2**62), 2**62, size=n, dtype=np.int64),
        "i4": rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int32),
        "u2": rng.integers(0, 2**16, size=n, dtype=np.uint16),
        "u1": rng.integers(0, 256, size=n, dtype=np.uint8),
    }
    req = DispatchRequest(
        request_id="rt-1",
        service="peak_shaving",  # type: ignore[arg-type]
        power_kw=-123.456,
        start=from_epoch(1_717_448_400.25),
        duration_s=900.0,
        priority=3,
    )
    d = Dispatch(request=req, start=1_717_448_400.25, end=1_717_449_300.25, state="active")
    d.delivered_kwh, d.requested_kwh, d.last_t = -1.0 / 3.0, -0.1234567890123, 1_717_448_410.5
    records = [d.to_record(), {"unicode": "Δ kW ≥ 0", "nested": [1, 2.5, None, {"a": True}]}]
    snap = Snapshot(ids, columns, records, saved_at=1_717_448_412.123456)
    await store.save(snap)

    other = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    try:
        loaded = await other.load()
    finally:
        await other.close()
    assert loaded is not None
    assert loaded.ids == ids
    assert loaded.saved_at == snap.saved_at
    assert loaded.columns.keys() == columns.keys()
    for name, arr in columns.items():
        got = loaded.columns[name]
        assert got.dtype == arr.dtype, name
        assert got.shape == arr.shape, name
        assert got.tobytes() == arr.tobytes(), name  # bit for bit, NaN and -0.0 included
        assert got.flags.writeable, name
    assert loaded.dispatches == records
    back = Dispatch.from_record(loaded.dispatches[0])
    assert back == d

    # One hash per prefix; a smaller snapshot replaces the whole of the old one.
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.type(store.key) == b"hash"
        await store.save(Snapshot([], {}, [], saved_at=1.0))
        fields = await client.hkeys(store.key)  # type: ignore[misc]
        assert not [f for f in fields if f.startswith(b"col:")]
    finally:
        await client.aclose()
    empty = await store.load()
    assert empty is not None
    assert (empty.ids, empty.columns, empty.dispatches, empty.saved_at) == ([], {}, [], 1.0)

    nothing = RedisStore(settings.redis_url, prefix=f"{settings.redis_prefix}:never-written")
    try:
        assert await nothing.load() is None
    finally:
        await nothing.close()


async def test_fleet_state_survives_a_round_trip_through_redis(store: RedisStore) -> None:
    state = FleetState(initial_capacity=4)
    batch = [
        Telemetry(
            vehicle_id=f"ev-{k}",
            seq=k,
            ts=from_epoch(1_717_448_400.0 + k),
            plugged_in=k % 3 != 0,
            soc=0.1 * k,
            capacity_kwh=40.0 + k,
            power_kw=-3.5 * k,
            max_charge_kw=11.0,
            max_discharge_kw=7.4,
            charge_efficiency=0.93,
            discharge_efficiency=0.91,
            min_soc=0.2,
            target_soc=0.8,
            departure=None if k % 2 else from_epoch(1_717_480_000.0 + k),
        )
        for k in range(10)
    ]
    assert state.apply_telemetry(batch) == (10, 0)
    state.apply_status("ev-3", False, 1_717_448_500.0)
    ids, columns = state.snapshot()
    await store.save(Snapshot(ids, columns, [], saved_at=1_717_448_500.0))
    loaded = await store.load()
    assert loaded is not None
    again = FleetState.restore(loaded.ids, loaded.columns)
    assert again.ids == state.ids and again.index == state.index
    for name in state.cols:
        np.testing.assert_array_equal(again.col(name), state.col(name), err_msg=name)
    assert not again.col("online")[again.index["ev-3"]]


async def test_capability_and_forecast_are_retained_and_read_back(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=20, seed=6, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        report = await loop.next_report()  # the step after all are in publishes a forecast
        cap, forecast = await operator.read_capability(settings, timeout_s=5.0)
    assert cap is not None and forecast is not None
    assert [w.duration_s for w in cap.windows] == [900.0, 1800.0, 3600.0, 7200.0, 14400.0]
    periods = forecast.periods
    assert len(periods) == 24
    starts = [p.start.timestamp() for p in periods]
    assert all(s % 3600 == 0 for s in starts) and starts[0] > report.now - 1
    assert all(b - a == 3600 for a, b in itertools.pairwise(starts))
    assert all(p.min_power_kw <= 0 <= p.max_power_kw for p in periods)
    # The cars plugged in now (home and depot, 21:00) offer something for the first hours,
    # and with no history yet the forecast says so with confidence 0.
    assert periods[0].min_power_kw < 0 and periods[0].max_power_kw > 0
    assert all(p.confidence == 0.0 for p in periods)
    assert loop.aggregator.forecaster.samples().sum() > 0


async def test_the_ledger_in_redis_records_a_request_and_v2g_report_reads_it(
    loop_factory: Callable[..., Any], settings: Settings, tmp_path: Path
) -> None:
    ledger = RedisLedger(settings.redis_url, prefix=settings.redis_prefix)
    rid = f"ledger-{uuid.uuid4().hex[:8]}"
    try:
        async with loop_factory(count=20, seed=6, mode="multiplexed", connections=2) as loop:
            loop.aggregator.ledger = LedgerWriter(ledger)
            await loop.wait_all_online()
            power, _, _ = await discharge_half(loop, rid, 60.0)
            await loop.wait_for(
                "the completion", lambda r: any(a.status == "completed" for a in r.results), 15
            )
            await loop.next_report()  # the step after: its ledger write has gone out
        got = await ledger.read(rid)
    finally:
        await ledger.close()
    kinds = [e["kind"] for e in got]
    assert kinds[0] == "answer" and kinds[-1] == "answer"
    assert kinds.count("step") >= 60 / STEP_S - 1
    statuses = [e["status"] for e in got if e["kind"] == "answer"]
    assert statuses == ["accepted", "completed"]
    # Per-vehicle settlement: one minute is inside one interval, closed when it ended,
    # and the vehicles' meters add up to what the fleet delivered.
    (books,) = [e for e in got if e["kind"] == "vehicles"]
    cols = json.loads(books["json"])
    done = DispatchResult.model_validate_json(got[-1]["json"])
    assert len(cols["vehicle_id"]) >= 1 and done.delivered_kwh is not None
    assert sum(cols["metered_kwh"]) == pytest.approx(done.delivered_kwh, rel=0.15)
    # The real command in a process of its own (in-process, typer would re-point the
    # shared log configuration at its captured output).
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    env["V2G_REDIS_PREFIX"] = settings.redis_prefix
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "v2g"),
        "report", rid, "--redis", settings.redis_url, "--interval", "20", "--out", str(tmp_path),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60.0):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "status=completed" in text
    assert (tmp_path / "report.csv").exists() and (tmp_path / "report.png").exists()
    assert "drivers_short=0" in text
    # Its rows add up to the request's totals, the piece booked at the close included.
    with (tmp_path / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert table and done.requested_kwh is not None
    tol = 1e-4 * len(table) + 1e-4  # each row to 4 decimals
    assert sum(float(r["delivered_kwh"]) for r in table) == pytest.approx(
        done.delivered_kwh, abs=tol
    )
    assert sum(float(r["requested_kwh"]) for r in table) == pytest.approx(
        done.requested_kwh, abs=tol
    )
    with (tmp_path / "vehicles.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(cols["vehicle_id"])
    # --json: the same rows, one JSON object a line, then the totals.
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "v2g"),
        "report", rid, "--redis", settings.redis_url, "--interval", "20", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60.0):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    *rows, last = [json.loads(line) for line in out.decode().splitlines()]
    assert len(rows) == len(table)
    assert rows[0]["start"] == table[0]["start"] and rows[0]["start"].endswith("Z")
    assert sum(r["delivered_kwh"] for r in rows) == pytest.approx(done.delivered_kwh, abs=tol)
    assert last["totals"]["status"] == "completed" and last["short"] == []
    assert power < 0


async def test_a_request_amended_over_mqtt_moves_the_fleet_to_its_new_power(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=20, seed=6, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        rid = f"amend-{uuid.uuid4().hex[:8]}"
        power, _, _ = await discharge_half(loop, rid, 900.0)
        await track(loop, power, "before the amendment")
        half = round(power / 2, 1)
        answer = await operator.amend(settings, rid, DispatchAmend(power_kw=half), timeout_s=10.0)
        assert answer.status == "accepted", answer
        assert answer.reason == "amended" and answer.allocated_kw == half
        await track(loop, half, "after the amendment")
        refused = await operator.amend(settings, rid, DispatchAmend(duration_s=1.0), timeout_s=10.0)
        assert refused.status == "rejected" and "cancel it instead" in (refused.reason or "")
        assert loop.aggregator.dispatcher.dispatches[rid].requested_kw == half
