"""The stack: the admitted requests, and how the running ones share the fleet's range.

Requests stack by priority (ties: the earlier admitted). The fleet has one net power:
at most one power request at a time, and signal services hold capacity both ways
around it. Owns the admitted requests, their admission order, the capacity held above
each at the last settling, and the vehicles of the last step (to see who left early).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import SAME_INSTANT_S, Dispatch, overlaps
from aggregator.fleet_state import FleetView
from core.physics import Array

# A step reads the clock a little late or early: a request ending within this share of
# a control step of it ends there.
ENDING_SLACK_STEPS = 0.2


class Stack:
    """The admitted requests (scheduled and running), by request id."""

    def __init__(self, ranges: FleetRanges, *, control_step_s: float) -> None:
        self.ranges = ranges
        self.control_step_s = control_step_s
        self.dispatches: dict[str, Dispatch] = {}
        self._seq = 0  # admission order, for ties of priority
        # From the latest settling: the capacity held above each request (for answers).
        self._swing_above: dict[str, float] = {}
        # The vehicles of the last step and their announced departures: who left early.
        self._fleet_before: tuple[NDArray[np.intp], Array] = (np.zeros(0, np.intp), np.zeros(0))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq - 1

    def running(self, now: float = -math.inf) -> list[Dispatch]:
        """The running requests, highest priority first (ties: the earlier admitted); with
        ``now``, not those that have ended by then (closed at the step, but over)."""
        return sorted(
            (d for d in self.dispatches.values() if d.state == "active" and not d.over(now)),
            key=lambda d: (-d.priority, d.seq),
        )

    def next_end(self, now: float) -> float | None:
        """When the next running request ends (after ``now``), or None."""
        return min((d.end for d in self.running(now)), default=None)

    def ends_at_step(self, d: Dispatch, now: float) -> bool:
        """Does a running request end at the control step of ``now``? A step reads the
        clock a little late or early (its wake-up), so one that started at a step does not
        end exactly at a later one: within ENDING_SLACK_STEPS of a step, it ends there."""
        return d.over(now, max(SAME_INSTANT_S, ENDING_SLACK_STEPS * self.control_step_s))

    def clash(self, d: Dispatch, now: float) -> Dispatch | None:
        """The power request ``d`` (a power request) would overlap, if any: two cannot;
        services that follow a signal stack on either. One that ends at this step does
        not clash with one that starts at it: for the moment both run, the stack's books
        keep each one's energy apart."""
        if d.follows_signal:
            return None
        return next(
            (
                o
                for o in self.dispatches.values()
                if not (o.state == "active" and self.ends_at_step(o, now))
                and overlaps(o.start, o.end, d.start, d.end)
                and not o.follows_signal
            ),
            None,
        )

    def swing_above(self, d: Dispatch) -> float:
        """The capacity requests of higher priority held at the last settling."""
        return self._swing_above.get(d.request_id, 0.0)

    def settle(self, now: float, view: FleetView, stack: list[Dispatch]) -> float:
        """Share the fleet's range among the running requests, in priority order, and
        return the fleet net power they ask together now.

        Each takes its reserve from what the ones above it left: a signal service a
        capacity both ways around the operating point, a power request its power, kept
        inside the range by the capacities above it. A request of lower priority never
        eats the reserve of a higher one; when the fleet shrinks it is cut first. Each
        is checked on the fleet's ranges for its own window, to its end."""
        swing = 0.0  # capacity held both ways by the signal services so far
        point: float | None = None  # the power request's fleet net power
        lo_all, hi_all = -math.inf, math.inf  # what every signal window allows
        self._swing_above = {}
        for d in stack:
            self._swing_above[d.request_id] = swing
            if not d.follows_signal and d.committed and swing == 0.0:
                # A commitment stands: what the fleet holds was said in the answer.
                point = d.allocated_kw
                continue
            lo_sum, hi_sum = self.ranges.usable_sums(view, now, self.ranges.rest_s(d.end, now))
            if d.follows_signal:
                room = (
                    0.5 * (hi_sum - lo_sum)
                    if point is None
                    else min(point - lo_sum, hi_sum - point)
                )
                d.held_kw = max(0.0, min(d.capacity_kw, room - swing))
                swing += d.held_kw
                lo_all, hi_all = max(lo_all, lo_sum), min(hi_all, hi_sum)
            else:
                a, b = max(lo_sum, lo_all) + swing, min(hi_sum, hi_all) - swing
                want = float(d.request.power_kw or 0.0)
                point = min(max(want, a), b) if a <= b else 0.5 * (a + b)
                d.allocated_kw = point
        if point is None:  # signals only: around the baseline, moved into the range
            a, b = lo_all + swing, hi_all - swing
            point = min(max(self.ranges.baseline(view), a), b) if a <= b else 0.5 * (a + b)
        target = point + sum(d.signal * d.held_kw for d in stack if d.follows_signal)
        # What the rest of the stack asks on top of each one's own term (kept off its
        # delivered energy): for the power request the signal services' moves; a signal
        # service's base already holds the others, so nothing. A request's own shortfall
        # (a power clipped to the range, a capacity cut) is not an offset: it is its miss.
        for d in stack:
            if d.follows_signal:
                d.base_kw = target - d.signal * d.held_kw
                d.offset_kw = 0.0
            else:
                d.offset_kw = target - d.allocated_kw
        return target

    @staticmethod
    def account(stack: list[Dispatch], vehicles: int, miss_kw: float) -> None:
        """After a plan: each running request's grant and shortfall; a miss of the plan
        (what the fleet could not give of the target) falls to the request of lowest
        priority (the others hold their reserves)."""
        for d in stack:
            d.vehicles = vehicles
            if d.follows_signal:
                d.allocated_kw = d.held_kw
                d.shortfall_kw = max(0.0, d.capacity_kw - d.held_kw)
            else:
                d.shortfall_kw = abs(d.requested_kw - d.allocated_kw)
        if abs(miss_kw) > 1e-6:
            last = stack[-1]
            if last.follows_signal:
                last.allocated_kw = max(0.0, last.held_kw - abs(miss_kw))
                last.shortfall_kw = max(0.0, last.capacity_kw - last.allocated_kw)
            else:
                last.allocated_kw += miss_kw
                last.shortfall_kw = abs(last.requested_kw - last.allocated_kw)

    def count_lost(self, now: float, view: FleetView) -> None:
        """Count, against every running commitment, the vehicles gone since the last step
        that were not due to leave (no announced departure, or one still ahead): they
        left early, unplugged, went offline or fell silent. A car that leaves when it
        said it would is no change: the commitment was made knowing it."""
        prev_rows, prev_dep = self._fleet_before
        self._fleet_before = (view.rows.copy(), view.departure.copy())
        if prev_rows.size == 0:
            return
        gone = ~np.isin(prev_rows, view.rows)
        if not gone.any():
            return
        dep = prev_dep[gone]
        early = int(np.count_nonzero(np.isnan(dep) | (dep > now + self.control_step_s)))
        if early:
            for d in self.dispatches.values():
                if d.committed and d.state == "active":
                    d.lost += early


def holding(d: Dispatch) -> float:
    """How much of its terms a request holds (higher is better), to see cuts."""
    if d.follows_signal:
        return d.held_kw
    return -abs(float(d.request.power_kw or 0.0) - d.allocated_kw)
