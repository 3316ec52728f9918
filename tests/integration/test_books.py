"""A request's books on the real loop (Mosquitto, Redis, agents, aggregator): a request
the fleet tracks is booked with the energy it asked, from when its setpoints took hold
to its end, not with the fleet's power from before them or after its end."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from broker.models import DispatchRequest, DispatchResult
from broker.settings import Settings
from tests.support.harness import STEP_S
from v2g import operator

pytestmark = pytest.mark.integration


async def test_a_tracked_short_request_books_the_energy_it_asked_within_1pct(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    # The aggregator steps half a step after the agents' ticks (tests/support/harness.py). 61 s puts the
    # end 1.5 s before the vehicles' next tick, when they notice their setpoints expired
    # and go back to plain charging: none of that may count.
    duration = 12 * STEP_S + 1.0
    async with loop_factory(count=30, seed=11, mode="multiplexed", connections=3) as loop:
        report = await loop.wait_all_online()
        win = next(w for w in report.capability.windows if w.duration_s == 900.0)
        assert win.min_power_kw < -50.0, f"no export capability to test with: {win}"
        assert report.status.power_kw > 0  # plain charging: far from the discharge
        power = round(0.5 * win.min_power_kw, 1)
        rid = f"books-{uuid.uuid4().hex[:8]}"
        loop.drain()
        answer = await operator.dispatch(
            settings,
            DispatchRequest(request_id=rid, power_kw=power, duration_s=duration),
            wait=False,
            timeout_s=10.0,
            on_result=lambda _: None,
        )
        assert answer.status == "accepted", answer
        sent = await loop.wait_for(
            "the acceptance", lambda r: any(a.request_id == rid for a in r.results)
        )
        found: list[DispatchResult] = []

        def completed(r: Any) -> bool:
            found.extend(a for a in r.results if a.request_id == rid and a.status == "completed")
            return bool(found)

        await loop.wait_for(
            "the completion", completed, timeout=duration / loop.settings.speed + 10
        )
    done = found[0]
    end = sent.now + duration
    assert done.delivery_start is not None
    start = done.delivery_start.timestamp()
    # The setpoints took hold after they were sent, and well within the step.
    assert sent.now < start < sent.now + STEP_S
    # Closed at its end (a step is timed there), not a control step later.
    assert done.ts.timestamp() - end < 0.5 * STEP_S
    assert done.requested_kwh == pytest.approx(power * (end - start) / 3600.0, abs=1e-3)
    assert done.delivered_kwh == pytest.approx(done.requested_kwh, rel=0.01)
