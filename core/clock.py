"""The platform clock: simulated time that may run faster than the wall clock.

Every process that shares a fleet must share the clock. A clock is defined by an anchor
(a wall-clock instant at which simulated time equals ``sim_anchor``) and a speed, so two
processes given the same three numbers agree without talking to each other.

By default the first process that starts a fleet creates the anchor (simulated time
starts at its wall time) and publishes it retained on ``{prefix}/clock``; the others
adopt it (broker/clocklink.py does the I/O). The rules for that are here, pure:
:func:`settle` decides at start, :func:`prefer` breaks a tie between two processes that
created anchors at the same moment.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol


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

    def move_to(self, *, wall_anchor: float, sim_anchor: float) -> None:
        """Re-anchor at the same speed: a process that adopts the fleet's clock after it
        started on its own (a tie between two that started at once) moves in place."""
        self.wall_anchor, self.sim_anchor = wall_anchor, sim_anchor


def day_anchor(now: float | None = None) -> float:
    """00:00 UTC of the current day (the demo starts its evening from there)."""
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


# Two anchors whose times differ by less than this (simulated s) are the same anchor;
# a hand-written V2G_SIM_START is exact to the second.
SAME_ANCHOR_S = 1e-3
SAME_SIM_START_S = 1.0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Anchor:
    """A clock's definition: simulated time ``sim_start`` at wall time ``wall_start``,
    running ``speed`` simulated seconds per wall second (epoch seconds)."""

    sim_start: float
    wall_start: float
    speed: float

    def at(self, wall: float) -> float:
        """Simulated time at wall time ``wall``."""
        return self.sim_start + (wall - self.wall_start) * self.speed

    def clock(self) -> SimClock:
        return SimClock(speed=self.speed, wall_anchor=self.wall_start, sim_anchor=self.sim_start)

    def same_as(self, other: Anchor) -> bool:
        """True if both give the same time (to SAME_ANCHOR_S, plus what the wire's
        microseconds make of it at this speed) at every wall time."""
        if not math.isclose(self.speed, other.speed, rel_tol=1e-9):
            return False
        apart = (self.sim_start - other.sim_start) - (
            self.wall_start - other.wall_start
        ) * self.speed
        return abs(apart) <= SAME_ANCHOR_S + 2e-6 * self.speed

    def describe(self) -> str:
        return (
            f"speed {self.speed:g}, simulated {_iso(self.sim_start)} at wall"
            f" {_iso(self.wall_start)}"
        )


@dataclass(frozen=True, slots=True)
class Given:
    """The clock settings a process was given by flag or V2G_* variable (None: not
    given): only these can contradict the fleet's clock."""

    speed: float | None = None
    sim_start: float | None = None
    wall_anchor: float | None = None


# adopted: the fleet's anchor; created: this process defined it and publishes it;
# explicit: its own settings against the fleet's anchor; local: no anchor on the bus and
# none created (a command that only reads the clock).
Source = Literal["adopted", "created", "explicit", "local"]


@dataclass(frozen=True, slots=True)
class Settled:
    """What a process runs on: the anchor, where it came from, whether to publish it
    (and keep it fresh), and why it disagrees with the fleet's anchor, if it does."""

    anchor: Anchor
    source: Source
    publish: bool
    conflict: str | None = None


def conflict_with(fleet: Anchor, given: Given, *, now: float) -> str | None:
    """Why explicit settings disagree with the fleet's anchor, or None if they agree.

    Only what was set explicitly counts: a process that gives nothing takes the fleet's.
    A ``sim_start`` alone is the simulated time the fleet started at; with a
    ``wall_anchor`` too, the two must give the same time now.
    """
    speed, sim_start, wall_anchor = given.speed, given.sim_start, given.wall_anchor
    why = []
    if speed is not None and not math.isclose(speed, fleet.speed, rel_tol=1e-9):
        why.append(f"speed {speed:g} here, {fleet.speed:g} on the bus")
    if sim_start is not None:
        if wall_anchor is not None:
            mine = Anchor(sim_start, wall_anchor, speed or fleet.speed)
            if abs(mine.at(now) - fleet.at(now)) > SAME_SIM_START_S:
                why.append(
                    f"simulated time now {_iso(mine.at(now))} here, {_iso(fleet.at(now))} on"
                    " the bus"
                )
        elif abs(sim_start - fleet.sim_start) > SAME_SIM_START_S:
            why.append(f"sim start {_iso(sim_start)} here, {_iso(fleet.sim_start)} on the bus")
    return "; ".join(why) or None


def settle(fleet: Anchor | None, given: Given, *, now: float, create: bool = True) -> Settled:
    """The clock a process starts on, given the fleet's anchor read from the bus (None if
    there is none) and the process's explicit settings (None where not given).

    - The fleet has an anchor that the settings agree with: adopt it (speed included).
    - It has one they contradict: the explicit settings win for this process, which
      must not publish them; ``conflict`` names both sides, to be logged as a warning.
    - It has none: this process defines the clock (simulated time starts now unless
      ``sim_start`` says otherwise; speed 1 unless given) and, if it starts a fleet
      (``create``), publishes it for the others.
    """
    speed, sim_start, wall_anchor = given.speed, given.sim_start, given.wall_anchor
    if fleet is not None:
        why = conflict_with(fleet, given, now=now)
        if why is None:
            return Settled(fleet, "adopted", publish=create)
        own_speed = fleet.speed if speed is None else speed
        if sim_start is None:  # a new speed from where the fleet's clock is now
            mine = Anchor(fleet.at(now), now, own_speed)
        else:
            mine = Anchor(sim_start, now if wall_anchor is None else wall_anchor, own_speed)
        return Settled(mine, "explicit", publish=False, conflict=why)
    wall = now if wall_anchor is None else wall_anchor
    mine = Anchor(wall if sim_start is None else sim_start, wall, 1.0 if speed is None else speed)
    return Settled(mine, "created" if create else "local", publish=create)


def prefer(a: Anchor, b: Anchor) -> Anchor:
    """Of two anchors created by processes that started at the same moment (neither saw
    the other's), the one every process keeps: the earlier wall start (a fleet that was
    already running keeps its clock), then the earlier simulated start, then the faster."""
    return min(a, b, key=lambda x: (x.wall_start, x.sim_start, -x.speed))


Verdict = Literal["same", "adopt", "republish", "ignore"]


def reconcile(running: Anchor, seen: Anchor | None, given: Given, *, now: float) -> Verdict:
    """What a process that publishes ``running`` does when the bus shows ``seen`` (None:
    the retained anchor was cleared): nothing, adopt it, or publish its own again.

    Two processes that started at the same moment may each have created an anchor; both
    apply :func:`prefer`, so they end on one. A process never adopts an anchor its
    explicit settings contradict ("ignore": it keeps its own and stops publishing)."""
    if seen is None:
        return "republish"
    if seen.same_as(running):
        return "same"
    if prefer(running, seen) is running:
        return "republish"
    return "adopt" if conflict_with(seen, given, now=now) is None else "ignore"
