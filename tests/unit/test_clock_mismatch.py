"""Telemetry on another clock than the aggregator's: counted as stale (or future) and named
in the fleet status's warnings, instead of an empty fleet with no word why. Runs the
aggregator's handler and control step without a broker (its link is simply down)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.clockwatch import ClockWatch
from aggregator.service import AggregatorService, StepReport
from aggregator.store import MemoryStore
from broker.settings import Settings
from core.clock import ManualClock

T0 = 1_780_000_000.0
N = 20


@pytest.fixture(autouse=True)
def _no_v2g_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("V2G_"):
            monkeypatch.delenv(name)


def service(clock: ManualClock) -> AggregatorService:
    # A fast clock: the per-vehicle rate limit counts wall seconds, and these steps take none.
    cfg = Settings(topic_prefix="cm", log_level="warning", telemetry_interval_s=5.0, speed=1e6)
    return AggregatorService(settings=cfg, clock=clock, store=MemoryStore())


async def step_with(
    svc: AggregatorService, fleet: SimFleet, stamps: np.ndarray, seq: int
) -> StepReport:
    """One report per vehicle, vehicle i stamped ``stamps[i]``, then a control step."""
    fleet.seq[:] = seq
    for i, vid in enumerate(fleet.ids):
        (body,) = telemetry_payloads(fleet, float(stamps[i]), np.array([i]))
        svc.on_payload(f"cm/vehicles/{vid}/telemetry", body)
    return await svc.step()


async def test_a_fleet_an_hour_behind_is_counted_stale_and_the_status_names_the_clocks() -> None:
    clock = ManualClock(T0)
    svc = service(clock)
    fleet = SimFleet(generate_fleet(N, 3), T0 - 3600.0, step_s=5.0)
    report = await step_with(svc, fleet, np.full(N, T0 - 3600.0), seq=1)
    status = report.status
    assert status.vehicles_online == 0
    assert status.rejected.get("stale") == N
    assert len(status.warnings) == 1, status.warnings
    (warning,) = status.warnings
    assert f"{N} telemetry reports" in warning and "3600 s behind" in warning
    assert "--speed" in warning and "--sim-start" in warning
    # It holds while the clocks differ, and goes once reports are on time again.
    clock.advance(5.0)
    report = await step_with(svc, fleet, np.full(N, T0 + 5.0 - 3600.0), seq=2)
    assert report.status.warnings and report.status.rejected["stale"] == 2 * N
    for k in range(3, 20):
        clock.advance(5.0)
        report = await step_with(svc, fleet, np.full(N, clock.now()), seq=k)
    assert report.status.warnings == []
    assert report.status.vehicles_online == N


async def test_a_few_vehicles_behind_are_named_as_their_clocks_not_the_processes() -> None:
    clock = ManualClock(T0)
    svc = service(clock)
    fleet = SimFleet(generate_fleet(N, 3), T0, step_s=5.0)
    stamps = np.full(N, T0)
    stamps[:2] = T0 - 120.0
    report = await step_with(svc, fleet, stamps, seq=1)
    assert report.status.vehicles_online == N - 2
    assert report.status.rejected.get("stale") == 2
    (warning,) = report.status.warnings
    assert "the clocks of 2 vehicle(s) are behind" in warning and "--speed" not in warning


async def test_a_fleet_ahead_of_the_aggregator_is_refused_as_future_and_named() -> None:
    clock = ManualClock(T0)
    svc = service(clock)
    fleet = SimFleet(generate_fleet(N, 3), T0 + 600.0, step_s=5.0)
    report = await step_with(svc, fleet, np.full(N, T0 + 600.0), seq=1)
    assert report.status.rejected.get("future") == N
    (warning,) = report.status.warnings
    assert "ahead of the aggregator's clock" in warning and "--sim-start" in warning


async def test_a_fleet_on_the_aggregators_clock_carries_no_warning() -> None:
    clock = ManualClock(T0)
    svc = service(clock)
    fleet = SimFleet(generate_fleet(N, 3), T0, step_s=5.0)
    report = await step_with(svc, fleet, np.full(N, T0 - 4.0), seq=1)
    assert report.status.warnings == []
    assert "stale" not in report.status.rejected
    assert report.status.vehicles_online == N


def test_the_watch_forgets_what_is_older_than_its_window() -> None:
    watch = ClockWatch(window_s=60.0)
    watch.observe(T0, reports=10, behind=10, behind_vehicles=10, max_lag_s=500.0)
    assert watch.warnings()
    watch.observe(T0 + 61.0, reports=10)
    assert watch.warnings() == []
