"""The books of a firming request (issue 11), per settlement interval: the energy its
node's net power spent outside the band and the steps that broke the ramp, with the
fleet and for the same node with its cars on plain charging (the baseline: the node's
meter plus what its cars would draw charging plainly). Pure: numbers in, records out;
the control step writes each closed interval to the request's ledger.

Each step's net power is held until the next step (as the dispatcher books energy); an
interval boundary inside a step splits its energy. A ramp violation is a step whose net
power changed by more than the ramp allows over that step (plus 1% of it, the platform's
tolerance for a measured power), counted in the interval the step ends in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RAMP_TOL = 0.01
"""A change counts as a ramp violation beyond the ramp's allowance plus this share of it."""


@dataclass(frozen=True, slots=True)
class FirmingInterval:
    """One settlement interval of a firming request on ``node``."""

    start: float
    end: float
    node: str
    outside_band_kwh: float
    ramp_violations: int
    baseline_outside_band_kwh: float
    baseline_ramp_violations: int


def outside(net_kw: float, min_kw: float | None, max_kw: float | None) -> float:
    """How far (kW) ``net_kw`` is outside [min_kw, max_kw] (None: open); 0 inside."""
    lo = -math.inf if min_kw is None else min_kw
    hi = math.inf if max_kw is None else max_kw
    return max(0.0, net_kw - hi, lo - net_kw)


def ramp_broken(
    before_kw: float, after_kw: float, ramp_kw_per_min: float | None, dt_s: float
) -> bool:
    """Whether the change from ``before_kw`` to ``after_kw`` over ``dt_s`` breaks the ramp."""
    if ramp_kw_per_min is None or dt_s <= 0.0 or not math.isfinite(before_kw):
        return False
    allowed = ramp_kw_per_min * dt_s / 60.0
    return abs(after_kw - before_kw) > allowed * (1.0 + RAMP_TOL)


class FirmingBooks:
    """One firming request's books, interval by interval (``interval_s``, aligned to the
    epoch as the vehicles' settlement is)."""

    def __init__(
        self,
        node: str,
        min_kw: float | None,
        max_kw: float | None,
        ramp_kw_per_min: float | None,
        interval_s: float,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        self.node = node
        self.min_kw, self.max_kw, self.ramp = min_kw, max_kw, ramp_kw_per_min
        self.interval_s = interval_s
        self.t: float | None = None  # the last step booked
        self.start: float | None = None  # the open interval's start
        self.net_kw = math.nan  # at the last step: the fleet's, the baseline's
        self.base_kw = math.nan
        self._zero()
        self.total_outside_kwh = 0.0
        self.total_violations = 0

    def _zero(self) -> None:
        self.outside_kwh = self.base_outside_kwh = 0.0
        self.violations = self.base_violations = 0

    def _accrue(self, t0: float, t1: float) -> None:
        h = max(0.0, t1 - t0) / 3600.0
        miss = outside(self.net_kw, self.min_kw, self.max_kw) if math.isfinite(self.net_kw) else 0.0
        base = (
            outside(self.base_kw, self.min_kw, self.max_kw) if math.isfinite(self.base_kw) else 0.0
        )
        self.outside_kwh += miss * h
        self.base_outside_kwh += base * h
        self.total_outside_kwh += miss * h

    def _close(self, end: float) -> FirmingInterval:
        assert self.start is not None
        out = FirmingInterval(
            start=self.start,
            end=end,
            node=self.node,
            outside_band_kwh=self.outside_kwh,
            ramp_violations=self.violations,
            baseline_outside_band_kwh=self.base_outside_kwh,
            baseline_ramp_violations=self.base_violations,
        )
        self.start = end
        self._zero()
        return out

    def step(self, now: float, net_kw: float, baseline_net_kw: float) -> list[FirmingInterval]:
        """Book up to ``now`` (the last step's net powers held), then take this step's
        net powers (fleet and baseline); returns the intervals that closed."""
        closed: list[FirmingInterval] = []
        if self.t is None or self.start is None:
            self.t = self.start = now
        else:
            cur = self.t
            boundary = (math.floor(self.start / self.interval_s) + 1) * self.interval_s
            while now >= boundary:
                self._accrue(cur, boundary)
                closed.append(self._close(boundary))
                cur = boundary
                boundary += self.interval_s
            self._accrue(cur, now)
            dt = now - self.t
            if ramp_broken(self.net_kw, net_kw, self.ramp, dt):
                self.violations += 1
                self.total_violations += 1
            if ramp_broken(self.base_kw, baseline_net_kw, self.ramp, dt):
                self.base_violations += 1
            self.t = now
        self.net_kw, self.base_kw = net_kw, baseline_net_kw
        return closed

    def close(self, end: float) -> FirmingInterval | None:
        """The request ended at ``end``: book up to it and close the last interval (None
        if nothing ran in it)."""
        if self.t is None or self.start is None:
            return None
        if end > self.t:
            self._accrue(self.t, end)
            self.t = end
        if end <= self.start:
            return None
        return self._close(end)
