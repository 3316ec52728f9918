"""Running the whole loop in one test: an aggregator and a simulated fleet as tasks of one
TaskGroup, with bounded waits on the aggregator's step reports.

Phase: the agents tick and the aggregator steps on the same 5 s (simulated) period. If
the two loops run in phase, a setpoint published at the end of a step can miss the next
vehicle tick by a few milliseconds, and a response then shows one step later than it
would otherwise, at random. The harness starts each aggregator half a step after the
agents' ticks, so responses land at a known step and the tests are deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime, Mode
from aggregator.service import AggregatorService, StepReport
from aggregator.store import RedisStore
from broker.models import DispatchResult
from broker.settings import Settings
from core.clock import SimClock

HOST = "127.0.0.1"
MQTT_PORT = 1883
REDIS_PORT = 6379

# 21:00 UTC on a Monday: the home and depot cars are plugged in, the workplace cars gone.
SIM_START = datetime(2024, 6, 3, 21, 0, tzinfo=UTC).timestamp()
SPEED = 10.0
STEP_S = 5.0  # simulated seconds per control step and per telemetry interval
STEP_WALL_S = STEP_S / SPEED


# -- running the loop --------------------------------------------------------------------
@dataclass
class Loop:
    """An aggregator and a simulated fleet running as tasks of one TaskGroup."""

    settings: Settings
    clock: SimClock
    fleet: SimFleet
    agents: AgentRuntime
    aggregator: AggregatorService
    tg: asyncio.TaskGroup
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def reports(self) -> asyncio.Queue[StepReport]:
        q = self.aggregator.reports
        assert q is not None
        return q

    def start(self, name: str, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.tg.create_task(coro, name=name)
        self.tasks[name] = task
        return task

    async def stop(self, name: str, timeout: float = 10.0) -> None:
        """Cancel one task and wait (bounded) until it has finished."""
        task = self.tasks.pop(name)
        task.cancel()
        async with asyncio.timeout(timeout):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def half_step_after_agents(self, timeout: float = 15.0) -> None:
        """Wait for the agents' first tick, then until half a step after one of their ticks."""
        await eventually(lambda: self.agents.ticks >= 1, "the agents' first tick", timeout)
        step = self.settings.telemetry_interval_s
        lag = (self.clock.now() - self.fleet.now) % step
        await self.clock.sleep((0.5 * step - lag) % step)

    def drain(self) -> None:
        """Forget the reports so far: the next one is from a step that starts after now."""
        while not self.reports.empty():
            self.reports.get_nowait()

    async def next_report(self, timeout: float = 10 * STEP_WALL_S) -> StepReport:
        async with asyncio.timeout(timeout):
            return await self.reports.get()

    async def wait_for(
        self, what: str, ok: Callable[[StepReport], bool], timeout: float = 15.0
    ) -> StepReport:
        """The first report from now on for which ``ok`` holds; fails after ``timeout``."""
        last: StepReport | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = await self.reports.get()
                    if ok(last):
                        return last
        except TimeoutError:
            status = None if last is None else last.status.model_dump(exclude={"capability"})
            pytest.fail(f"no control step with {what} within {timeout} s; last status: {status}")

    async def wait_result(self, request_id: str, timeout: float = 15.0) -> DispatchResult:
        """The first dispatch result for ``request_id`` in a step report from now on."""
        found: list[DispatchResult] = []

        def has(r: StepReport) -> bool:
            found.extend(a for a in r.results if a.request_id == request_id)
            return bool(found)

        await self.wait_for(f"a result for {request_id}", has, timeout)
        return found[0]

    async def wait_all_online(self, timeout: float = 15.0) -> StepReport:
        n = len(self.fleet)
        return await self.wait_for(
            f"all {n} vehicles online", lambda r: r.status.vehicles_online >= n, timeout
        )


async def eventually(ok: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``ok`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def make_fleet(settings: Settings, clock: SimClock, count: int, seed: int) -> SimFleet:
    return SimFleet(generate_fleet(count, seed), clock.now(), step_s=settings.telemetry_interval_s)


def make_aggregator(
    settings: Settings,
    clock: SimClock,
    store: RedisStore,
    test_id: str,
    name: str = "agg",
    *,
    fast_setpoints: bool = True,
    fast_ingest: bool = False,
) -> AggregatorService:
    """The aggregator as ``v2g aggregator`` runs it (setpoints on the fast connection;
    ``fast_ingest`` for telemetry on its own connection too, the CLI's default)."""
    agg = AggregatorService(
        settings=settings,
        clock=clock,
        store=store,
        client_id=f"itest-{test_id}-{name}",
        fast_setpoints=fast_setpoints,
        fast_ingest=fast_ingest,
    )
    agg.reports = asyncio.Queue()
    return agg


@contextlib.asynccontextmanager
async def running_loop(
    settings: Settings,
    clock: SimClock,
    store: RedisStore,
    test_id: str,
    *,
    count: int,
    seed: int,
    mode: Mode = "multiplexed",
    connections: int = 2,
    batch: bool = False,
    fast_setpoints: bool = True,
    fast_ingest: bool = False,
) -> AsyncIterator[Loop]:
    """Aggregator and agents as tasks of one TaskGroup; all cancelled (bounded) at exit.

    A task that crashes cancels the test body and the TaskGroup re-raises its error.
    """
    fleet = make_fleet(settings, clock, count, seed)
    agents = AgentRuntime(
        settings=settings,
        clock=clock,
        fleet=fleet,
        mode=mode,
        connections=connections,
        client_prefix=f"itest-{test_id}-ev",
        batch=batch,
    )
    aggregator = make_aggregator(
        settings, clock, store, test_id, fast_setpoints=fast_setpoints, fast_ingest=fast_ingest
    )
    async with asyncio.TaskGroup() as tg:
        loop = Loop(settings, clock, fleet, agents, aggregator, tg)
        loop.start("agents", agents.run())
        try:
            await loop.half_step_after_agents()
            loop.start("aggregator", aggregator.run())
            yield loop
        finally:
            for task in loop.tasks.values():
                task.cancel()
            async with asyncio.timeout(15.0):
                await asyncio.gather(*loop.tasks.values(), return_exceptions=True)
