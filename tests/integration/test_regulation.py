"""Frequency regulation over real Mosquitto: 500 simulated vehicles follow a RegD-like
signal (a sample every 2 s of platform time) around their operating point, in accelerated
time, and the aggregator's own PJM-style score of the run is at least 0.9."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from broker.models import DispatchRequest, DispatchSignal, Service, from_epoch
from broker.settings import Settings
from tests.conftest import Recorder
from tests.unit.test_scoring import regd_like
from v2g import operator

pytestmark = pytest.mark.integration

SIGNAL_S = 2.0  # RegD: a new value every 2 s
RUN_S = 660.0  # two whole 5-minute scoring windows, and a step's slack


async def test_five_hundred_vehicles_follow_a_regd_signal_and_score_above_0_9(
    loop_factory: Callable[..., Any], settings: Settings, figure: Recorder
) -> None:
    async with loop_factory(count=500, seed=21, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online(timeout=30.0)
        cap15 = loop.aggregator.last_report.capability.windows[0]  # type: ignore[union-attr]
        capacity = round(0.3 * min(-cap15.min_power_kw, cap15.max_power_kw), 1)
        rid = f"reg-{uuid.uuid4().hex[:8]}"
        req = DispatchRequest(
            request_id=rid,
            service=Service.FREQUENCY_REGULATION,
            capacity_kw=capacity,
            duration_s=RUN_S + 60.0,
        )
        answer = await operator.dispatch(
            settings, req, wait=False, timeout_s=15.0, on_result=lambda _: None
        )
        assert answer.status == "accepted", answer
        signal = regd_like(int(RUN_S / SIGNAL_S) + 1, seed=3)
        clock = loop.clock
        t_topic = settings.topics.dispatch_signal(rid)
        async with operator.operator_link(settings, []) as (link, _):
            start = clock.now()
            for k, value in enumerate(signal):
                await clock.sleep(start + k * SIGNAL_S - clock.now())
                sample = DispatchSignal(value=float(value), ts=from_epoch(clock.now()))
                await link.publish(t_topic, sample.to_json(), qos=0)
        d = loop.aggregator.dispatcher.dispatches[rid]
        score = loop.aggregator.dispatcher.score(d)
        latencies = sorted(loop.aggregator.signal_latency_ms)
        fleet = loop.fleet
    assert score is not None, "no whole scoring window"
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"\nregulation, 500 vehicles, ±{capacity} kW: score {score:.3f}; signal → setpoints"
        f" p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(latencies)} samples"
    )
    figure("regulation, 500 vehicles, RegD-like: PJM-style score", score, "", limit=">= 0.9")
    figure("... signal -> setpoints on the wire, p99", p99, "ms wall", limit="< 500 ms")
    assert score >= 0.9
    assert p99 < 500.0  # a quarter of the 2 s period, in wall time
    assert fleet.short == 0
    assert len(latencies) >= 0.9 * len(signal)
