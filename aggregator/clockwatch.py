"""Telemetry on another clock: count it, and say in the fleet status what is likely wrong.

Processes that share a fleet must share the platform clock (same ``--speed``, same
simulated start). When they do not, every report lands far behind (or ahead of) the
aggregator's clock: ahead is refused at the door (``future``), behind would count as
stale at once, and the fleet looks empty with no word why. The aggregator counts reports
already older than the stale limit when they arrive as ``stale`` (they cannot make a
vehicle count; they are still folded, in order, into its meter) and this watch turns the
recent counts into a warning for the fleet status.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

# Most of the reports off: the processes' clocks differ, not a few vehicles'.
WHOLE_FLEET_SHARE = 0.5
CLOCK_HINT = (
    "the agents likely run on another clock speed or simulated start than the aggregator"
    " (give every process the same --speed / V2G_SPEED and --sim-start / V2G_SIM_START)"
)


def behind(ts: NDArray[np.float64], now: float, limit_s: float) -> NDArray[np.bool_]:
    """Which reports are stamped more than ``limit_s`` before ``now``."""
    mask: NDArray[np.bool_] = ts < now - limit_s
    return mask


@dataclass(frozen=True, slots=True)
class _Step:
    now: float
    reports: int  # every report seen this step, used or not
    behind: int
    behind_vehicles: int
    max_lag_s: float
    ahead: int


@dataclass(slots=True)
class ClockWatch:
    """Recent reports behind or ahead of the platform clock, over ``window_s`` of it."""

    window_s: float
    _steps: deque[_Step] = field(default_factory=deque)

    def observe(
        self,
        now: float,
        *,
        reports: int,
        behind: int = 0,
        behind_vehicles: int = 0,
        max_lag_s: float = 0.0,
        ahead: int = 0,
    ) -> None:
        """Note one control step's counts (``reports`` includes those behind and ahead)."""
        self._steps.append(_Step(now, reports, behind, behind_vehicles, max_lag_s, ahead))
        while self._steps and self._steps[0].now < now - self.window_s:
            self._steps.popleft()

    def warnings(self) -> list[str]:
        """What the fleet status says about the clocks, if anything is off."""
        steps = self._steps
        total = sum(s.reports for s in steps)
        n_behind = sum(s.behind for s in steps)
        n_ahead = sum(s.ahead for s in steps)
        out: list[str] = []
        window = f"in the last {self.window_s:.0f} s"
        if n_behind:
            lag = max(s.max_lag_s for s in steps)
            vehicles = max(s.behind_vehicles for s in steps)
            cause = (
                CLOCK_HINT
                if n_behind >= WHOLE_FLEET_SHARE * total
                else f"the clocks of {vehicles} vehicle(s) are behind, or their reports are delayed"
            )
            out.append(
                f"{n_behind} telemetry reports {window} were up to {lag:.0f} s behind the"
                f" aggregator's clock, too old to count (counted as rejected 'stale'): {cause}"
            )
        if n_ahead:
            cause = (
                CLOCK_HINT
                if n_ahead >= WHOLE_FLEET_SHARE * total
                else "some vehicles' clocks are ahead"
            )
            out.append(
                f"{n_ahead} telemetry reports {window} were stamped ahead of the aggregator's"
                f" clock and refused (counted as rejected 'future'): {cause}"
            )
        return out
