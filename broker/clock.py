"""The platform clock: simulated time that may run faster than the wall clock.

Every process that shares a fleet must share the clock. A clock is defined by an anchor
(a wall-clock instant at which simulated time equals ``sim_anchor``) and a speed, so two
processes given the same three numbers agree without talking to each other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


def raise_if_cancelled() -> None:
    """Stop a loop whose cancellation a library swallowed on the way.

    On Python 3.11 a cancel that lands just as a timeout expires can come back as a
    TimeoutError (asyncio.wait_for, libraries built on it); a loop that handles
    TimeoutError would then run for ever. Long-lived loops call this once a turn.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Clock(Protocol):
    """What the runtimes need of a clock: the time, and a way to wait for simulated time."""

    @property
    def speed(self) -> float: ...

    def now(self) -> float:
        """Simulated epoch seconds."""
        ...

    async def sleep(self, sim_seconds: float) -> None:
        """Wait for ``sim_seconds`` of simulated time."""
        ...


class SimClock:
    """Simulated time = sim_anchor + (wall − wall_anchor) × speed."""

    def __init__(
        self,
        *,
        speed: float = 1.0,
        wall_anchor: float | None = None,
        sim_anchor: float | None = None,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be > 0, got {speed}")
        self._speed = speed
        self.wall_anchor = time.time() if wall_anchor is None else wall_anchor
        self.sim_anchor = self.wall_anchor if sim_anchor is None else sim_anchor

    @property
    def speed(self) -> float:
        return self._speed

    def now(self) -> float:
        return self.sim_anchor + (time.time() - self.wall_anchor) * self._speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds) / self._speed)


def day_anchor(now: float | None = None) -> float:
    """00:00 UTC of the current day: the default anchor of an accelerated clock."""
    t = time.time() if now is None else now
    return t - (t % 86_400.0)


class ManualClock:
    """A clock that moves only when told: for tests and benchmarks."""

    def __init__(self, start: float) -> None:
        self._now = start

    @property
    def speed(self) -> float:
        return 1.0

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(0)
