"""Planning ahead: a request for later is planned over the horizon on a grid of
intervals, with every request already taken reserved, and admitted for what the fleet
plugged in now can deliver of it interval by interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from aggregator.dispatch.records import Dispatch, Interval
from aggregator.fleet_state import FleetView
from aggregator.schedule import Block, cohorts, grid, index_of, plan
from core.physics import Array

# Requests for later are planned on this grid, this far ahead, and accepted in full
# when the plan misses them by less than this.
SCHEDULE_STEP_S = 900.0
SCHEDULE_MAX_INTERVALS = 192
SCHEDULE_TOL_KW = 0.01
HORIZON_S = SCHEDULE_MAX_INTERVALS * SCHEDULE_STEP_S


@dataclass(frozen=True, slots=True)
class Ahead:
    """What planning a request ahead found: ``too_far`` (beyond the horizon), ``none``
    (nothing deliverable), else ``accepted`` or ``partial`` (and ``d`` holds its
    reservation); the intervals (start, end) and the kW deliverable in each."""

    status: Literal["too_far", "none", "accepted", "partial"]
    spans: list[tuple[float, float]]
    deliverable_kw: Array
    hold_kw: float = 0.0


def _on_grid(bounds: Array, start: float, end: float, power_kw: float) -> Block | None:
    """``power_kw`` from ``start`` to ``end`` on the planning grid ``bounds`` (clipped to
    it; None if none of it is on it)."""
    s = index_of(bounds, max(start, float(bounds[0])))
    e = index_of(bounds, min(end, float(bounds[-1])))
    return Block(s, e, power_kw) if s < e else None


def _reserved(d: Dispatch, bounds: Array) -> list[Block]:
    """What a request already taken holds on the planning grid: its per-interval
    schedule if it was planned ahead, else its power over its window."""
    if d.follows_signal:
        return []  # it holds headroom both ways, not a power: see _headroom
    blocks = (_on_grid(bounds, t, end, kw) for t, kw, end in d.intervals())
    return [b for b in blocks if b is not None]


def _headroom(taken: Iterable[Dispatch], bounds: Array) -> Array:
    """The capacity signal services hold both ways, per interval of the grid."""
    swing = np.zeros(bounds.shape[0] - 1)
    for d in taken:
        if d.follows_signal:
            kw = d.capacity_kw if d.state == "active" else float(d.request.capacity_kw or 0)
            b = _on_grid(bounds, d.start, d.end, kw)
            if b is not None:
                swing[b.start : b.end] += kw
    return swing


def admit(d: Dispatch, taken: list[Dispatch], now: float, view: FleetView) -> Ahead:
    """Plan ``d`` (a request for later) with every request in ``taken`` reserved, so it
    cannot take their energy; on success ``d`` holds what it reserves (its schedule, the
    power it holds through all of it, its shortfall)."""
    empty = np.zeros(0)
    horizon = math.ceil((d.end - now) / SCHEDULE_STEP_S - 1e-9)
    if horizon > SCHEDULE_MAX_INTERVALS:
        return Ahead("too_far", [], empty)
    # Intervals on the quarter hours and on every request's own start and end, so
    # each request is planned over exactly its window.
    cuts = [d.start, d.end]
    for o in taken:
        cuts += [o.start, o.end]
        cuts += [b for t, _, end in o.schedule or [] for b in (t, end)]
    bounds = grid(now, d.end, step_s=SCHEDULE_STEP_S, cuts=cuts)
    new = _on_grid(bounds, d.start, d.end, d.requested_kw)
    assert new is not None  # it starts after now and ends within the horizon
    blocks: list[Block] = []
    for o in sorted(taken, key=lambda o: o.start):
        for b in _reserved(o, bounds):
            # Overlaps should not happen on exact bounds: the earlier keeps the interval.
            if not any(b.start < x.end and x.start < b.end for x in [*blocks, new]):
                blocks.append(b)
    cohort = cohorts(view.batteries, view.energy, view.departure, now, bounds=bounds)
    got = plan(cohort, blocks, new, swing_kw=_headroom(taken, bounds)).deliverable_kw(new)
    spans = [
        (float(bounds[new.start + i]), float(bounds[new.start + i + 1]))
        for i in range(new.end - new.start)
    ]
    # What the fleet can hold through every interval of the request.
    sign = -1.0 if d.requested_kw < 0 else 1.0
    part = np.clip(sign * got, 0.0, abs(d.requested_kw))  # toward the request only
    hold = sign * float(part.min())
    if float(part.max()) < SCHEDULE_TOL_KW and abs(d.requested_kw) > SCHEDULE_TOL_KW:
        return Ahead("none", spans, got)
    d.allocated_kw = hold
    d.shortfall_kw = abs(d.requested_kw - hold)
    # The energy reserved is what the plan gives it, interval by interval.
    d.schedule = [
        Interval(t0, sign * float(kw), t1) for (t0, t1), kw in zip(spans, part, strict=True)
    ]
    if d.shortfall_kw <= SCHEDULE_TOL_KW:
        d.shortfall_kw = 0.0
        d.allocated_kw = d.requested_kw
        return Ahead("accepted", spans, got, hold)
    return Ahead("partial", spans, got, hold)
