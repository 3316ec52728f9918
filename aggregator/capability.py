"""The capability envelope: what fleet net power the fleet can hold, and for how long.

Each window is the range of fleet net power the fleet can hold constant for the whole
window, every car's departure inside it taken into account and every driver's floor kept
at every moment: the linear programme of aggregator/envelope.py.
"""

from __future__ import annotations

from aggregator import envelope as ev
from aggregator.fleet_state import FleetView
from broker.models import CapabilityWindow
from core.physics import Array, feasible_range

WINDOWS_S: tuple[float, ...] = (900.0, 1800.0, 3600.0, 7200.0, 14400.0)
# Above this many vehicles one window of the envelope is computed per control step, in
# turn (about 0.15-0.3 s each at 100k vehicles, see bench/envelope.py); below, all of them.
ALL_WINDOWS_BELOW = 20_000


def vehicle_ranges(view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
    """Each active vehicle's constant-power range [p_lo, p_hi] for the window from ``now``
    (what a car can hold alone: the vehicles' own protection and the drift checks use it;
    the fleet's envelope is :func:`window`)."""
    return feasible_range(view.batteries, view.energy, view.departure, now, window_s)


def window(
    view: FleetView,
    now: float,
    window_s: float,
    scale: Array | None = None,
    step_s: float = ev.MIN_STEP_S,
) -> CapabilityWindow:
    """The fleet's range for one window; ``scale`` (per vehicle, e.g. the share of its
    setpoints a vehicle is measured to deliver) counts each car for that share of itself;
    the programme's steps are no shorter than ``step_s`` (the control step)."""
    env = ev.window(
        view.batteries, view.energy, view.departure, now, window_s, ratio=scale, min_step_s=step_s
    )
    return CapabilityWindow(
        duration_s=window_s,
        min_power_kw=round(env.min_power_kw, 3),
        max_power_kw=round(env.max_power_kw, 3),
        feasible=env.feasible,
    )


def envelope(
    view: FleetView,
    now: float,
    windows: tuple[float, ...] = WINDOWS_S,
    scale: Array | None = None,
) -> list[CapabilityWindow]:
    """The envelope over the standard windows (900 s to 4 h)."""
    return [window(view, now, w, scale) for w in windows]


class Envelopes:
    """The published envelope, kept up to date within a control step's budget: for a
    fleet under ``all_below`` vehicles the first window every step and one longer window
    in turn, else only the one computed longest ago (the others are those of the steps
    before, at most len(windows) - 1 steps old)."""

    def __init__(
        self,
        windows: tuple[float, ...] = WINDOWS_S,
        all_below: int = ALL_WINDOWS_BELOW,
        step_s: float = ev.MIN_STEP_S,
    ) -> None:
        self.windows = windows
        self.all_below = all_below
        self.step_s = step_s
        self._last: dict[float, CapabilityWindow] = {}
        self._turn = 0

    def update(
        self, view: FleetView, now: float, scale: Array | None = None
    ) -> list[CapabilityWindow]:
        """The windows to publish at ``now``."""
        if len(self._last) < len(self.windows):
            todo = self.windows
        elif len(view) < self.all_below:
            # The first window (the status's) every step, the longer ones in turn: an LP
            # per window per step made a step of a small fleet ~70 ms, which at a fast
            # clock (x30-x60) is seconds of simulated time without setpoints.
            rest = self.windows[1:]
            todo = (self.windows[0], rest[self._turn % len(rest)]) if rest else self.windows
            self._turn += 1
        else:
            todo = (self.windows[self._turn % len(self.windows)],)
            self._turn += 1
        for w in todo:
            self._last[w] = window(view, now, w, scale, self.step_s)
        return [self._last[w] for w in self.windows]
