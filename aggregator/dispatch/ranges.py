"""What the fleet can do, worked out once per fleet view: each vehicle's feasible range
for a window, the fleet's capability envelope (each car counted for the share of its
setpoints it delivers), the prepared programmes behind it, and the plain-charging
baseline. Admission, settling and planning of one control step ask the same questions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from aggregator import envelope as ev
from aggregator.capability import vehicle_ranges
from aggregator.dispatch.learning import Learned
from aggregator.fleet_state import FleetView
from core.physics import Array, baseline_power


class _Sums(NamedTuple):
    """The fleet's usable range worked out at ``at`` for a fleet of ``vehicles``."""

    at: float
    vehicles: int
    lo_kw: float
    hi_kw: float


class FleetRanges:
    """Answers about one view, kept until the next view (and the usable sums across
    views for up to a control step)."""

    def __init__(self, learned: Learned, *, control_step_s: float) -> None:
        self.learned = learned
        self.control_step_s = control_step_s
        self._view: FleetView | None = None
        self._of_view: dict[Any, Any] = {}
        # Recent fleet ranges by (end of window, ratio version): see usable_sums.
        self._sums: dict[tuple[float, int], _Sums] = {}

    def _memo(self, view: FleetView) -> dict[Any, Any]:
        """What was computed from this view so far (a new view starts afresh)."""
        if view is not self._view:
            self._view, self._of_view = view, {}
        return self._of_view

    def ranges(self, view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
        """``vehicle_ranges``, computed once per view, time and window (read-only arrays)."""
        memo = self._memo(view)
        key = (now, window_s)
        got = memo.get(key)
        if got is None:
            lo, hi = vehicle_ranges(view, now, window_s)
            lo.flags.writeable = hi.flags.writeable = False
            got = memo[key] = (lo, hi)
        return got

    def usable_sums(self, view: FleetView, now: float, window_s: float) -> tuple[float, float]:
        """The fleet's range for the window as it will be delivered (the envelope, each car
        counted for the share of its setpoints it delivers). The stack is settled several
        times a step and at every signal sample in between: a range worked out less than
        a control step ago for the same end of window and the same learned ratios is
        used again (the fleet moves little in that time; the LP costs ~0.2 s at 100k)."""
        end = round(now + window_s, 6)
        key = (end, self.learned.version)
        got = self._sums.get(key)
        if got is not None and now - got.at < self.control_step_s and got.vehicles == len(view):
            return got.lo_kw, got.hi_kw
        env = self.envelope(view, now, window_s)
        self._sums = {k: v for k, v in self._sums.items() if now - v.at < self.control_step_s}
        self._sums[key] = _Sums(now, len(view), env.min_power_kw, env.max_power_kw)
        return env.min_power_kw, env.max_power_kw

    def envelope(self, view: FleetView, now: float, window_s: float) -> ev.Envelope:
        """The capability envelope for the window (aggregator/envelope.py), each car counted
        for the share of its setpoints it delivers; computed once per view, time, window
        and state of the learned ratios."""
        memo = self._memo(view)
        key = ("envelope", now, window_s, self.learned.version)
        got = memo.get(key)
        if got is None:
            self.learned.fit_rows(view.rows)
            ratio = self.learned.ratio[view.rows]
            got = memo[key] = ev.window(
                view.batteries,
                view.energy,
                view.departure,
                now,
                window_s,
                ratio=ratio,
                min_step_s=self.control_step_s,
                prepared=self.prepared(view, now, window_s, ratio),
            )
        assert isinstance(got, ev.Envelope)
        return got

    def prepared(self, view: FleetView, now: float, window_s: float, scale: Array) -> ev.Prepared:
        """The fleet made ready for a window's programmes, once per view, time, window
        and scale: admitting a request and planning it in the same step share it (most
        of the cost at 100k vehicles is here, not in the LP)."""
        memo = self._memo(view)
        key = ("prepared", now, window_s)
        got = memo.get(key)
        if got is not None and np.array_equal(got[0], scale):
            prepared: ev.Prepared = got[1]
            return prepared
        prepared = ev.prepare(
            view.batteries,
            view.energy,
            view.departure,
            now,
            window_s,
            ratio=scale,
            min_step_s=self.control_step_s,
        )
        memo[key] = (scale.copy(), prepared)
        return prepared

    def baseline(self, view: FleetView) -> float:
        """What the active fleet would draw now with plain charging (once per view)."""
        memo = self._memo(view)
        got = memo.get("baseline")
        if got is None:
            got = memo["baseline"] = float(
                baseline_power(view.batteries, view.energy, self.control_step_s).sum()
            )
        return float(got)

    def rest_s(self, end: float, now: float) -> float:
        """The window from ``now`` to ``end`` that ranges and plans are made for: at least
        a control step (setpoints hold that long, even at a request's last step)."""
        return max(end - now, self.control_step_s)
