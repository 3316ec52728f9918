"""Helpers for tests that run the whole loop (tests/support/harness.py) over real servers:
tracking a target, asking over MQTT, and listening on the bus like an operator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from aggregator.service import StepReport
from broker.models import Capability, DispatchRequest, DispatchResult
from broker.settings import Settings
from v2g import operator

from .harness import Loop

TOL = 0.02  # tracking tolerance: 2 % of the request
SETTLE_STEPS = 3  # the fleet must be on target within this many control steps
HOLD_STEPS = 4  # ... and stay there for this many more


def on_target(power_kw: float, target_kw: float) -> bool:
    return abs(power_kw - target_kw) <= TOL * abs(target_kw)


async def track(loop: Loop, target_kw: float, what: str) -> list[float]:
    """The next SETTLE_STEPS + HOLD_STEPS measured fleet powers; asserts the fleet reaches
    the target within SETTLE_STEPS steps and then stays on it."""
    powers = [(await loop.next_report()).status.power_kw for _ in range(SETTLE_STEPS + HOLD_STEPS)]
    first = next((k for k, p in enumerate(powers) if on_target(p, target_kw)), None)
    assert first is not None and first < SETTLE_STEPS, (
        f"{what}: fleet power {powers} kW did not come within {TOL:.0%} of {target_kw} kW"
        f" within {SETTLE_STEPS} control steps"
    )
    off = [p for p in powers[first:] if not on_target(p, target_kw)]
    assert not off, f"{what}: fleet left the {TOL:.0%} band around {target_kw} kW: {powers}"
    return powers


async def request(
    settings: Settings, req: DispatchRequest, timeout_s: float = 10.0
) -> DispatchResult:
    """Send a request over MQTT with the operator client and return the first answer."""
    return await operator.dispatch(
        settings, req, wait=False, timeout_s=timeout_s, on_result=lambda _: None
    )


async def discharge_half(
    loop: Loop, request_id: str, duration_s: float, *, capability: Capability | None = None
) -> tuple[float, DispatchResult, StepReport]:
    """Ask over MQTT for half of the fleet's 900 s export capability; returns the power,
    the answer and the report of the step that accepted it."""
    cap = capability or loop.aggregator.last_report.capability  # type: ignore[union-attr]
    win = next(w for w in cap.windows if w.duration_s == 900.0)
    assert win.min_power_kw < -50.0, f"the fleet has no export capability to test with: {win}"
    power = round(0.5 * win.min_power_kw, 1)
    loop.drain()
    req = DispatchRequest(request_id=request_id, power_kw=power, duration_s=duration_s)
    answer = await request(loop.settings, req)
    assert answer.status == "accepted", answer
    assert answer.shortfall_kw == 0.0
    assert answer.allocated_kw == pytest.approx(power, abs=1e-3)
    accepted = await loop.wait_for(
        f"the acceptance of {request_id}",
        lambda r: any(a.request_id == request_id and a.status == "accepted" for a in r.results),
    )
    return power, answer, accepted


@contextlib.asynccontextmanager
async def spy(settings: Settings, *filters: str) -> AsyncIterator[asyncio.Queue[operator.Event]]:
    """A separate MQTT client whose messages on ``filters`` land in a queue."""
    async with operator.operator_link(settings, [(f, 1) for f in filters]) as (_, queue):
        yield queue


async def next_event(
    queue: asyncio.Queue[operator.Event], ok: Callable[[operator.Event], bool], timeout: float
) -> operator.Event:
    async with asyncio.timeout(timeout):
        while True:
            ev = await queue.get()
            if ok(ev):
                return ev


def drain_events(queue: asyncio.Queue[operator.Event]) -> list[operator.Event]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
