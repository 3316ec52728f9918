"""What the dispatcher learns of each vehicle, per fleet row: the share of its setpoints
it delivers (its follow ratio) and the energy it has cycled under this dispatcher.

A restart should not trust a car it had found following half its setpoints, nor forget
whose battery it has cycled: these columns persist beside the fleet's.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from aggregator.fleet_state import FleetView
from core.physics import Array

# Each vehicle's follow ratio (what it draws / what it was told) is learned as an
# exponentially weighted mean: a new sample moves it by this share.
FOLLOW_ALPHA = 0.5
# A vehicle that follows less than this is not steered through its ratio (a setpoint
# divided by almost nothing): it is held at what it draws, like a drifting one.
FOLLOW_MIN_RATIO = 0.1
# The least-cost split weighs a battery by REFERENCE / capacity (a kWh is a deeper cycle
# of a small one) and by its energy cycled over the fleet's mean (at least the floor).
REFERENCE_CAPACITY_KWH = 60.0
CYCLED_FLOOR_KWH = 0.1
# The snapshot column each learned array persists as.
COLUMNS = ("learned:follow_ratio", "learned:follow_ts", "learned:cycled_kwh")


class Learned:
    """Per fleet row: the follow ratio, the report it was last learned from, and the
    energy cycled (kWh, charge plus discharge). ``version`` changes with any ratio."""

    def __init__(self) -> None:
        self.ratio: Array = np.zeros(0)
        self.ratio_ts: Array = np.zeros(0)
        self.cycled: Array = np.zeros(0)
        self.cycled_t: float | None = None
        self.version = 0

    def fit(self, n_rows: int) -> None:
        """Grow the arrays to hold ``n_rows`` rows (a new car follows fully, cycled none)."""
        have = self.ratio.shape[0]
        if n_rows > have:
            grow = max(n_rows, 2 * have) - have
            self.ratio = np.concatenate([self.ratio, np.ones(grow)])
            self.ratio_ts = np.concatenate([self.ratio_ts, np.full(grow, -np.inf)])
            self.cycled = np.concatenate([self.cycled, np.zeros(grow)])

    def fit_rows(self, rows: NDArray[np.intp]) -> None:
        self.fit(int(rows.max()) + 1 if rows.size else 0)

    def cycle(self, now: float, view: FleetView) -> None:
        """Add the energy each vehicle of the view cycled since the last call."""
        if self.cycled_t is not None and now > self.cycled_t:
            self.cycled[view.rows] += np.abs(view.power) * (now - self.cycled_t) / 3600.0
        self.cycled_t = now

    def fold(self, rows: NDArray[np.intp], sample: Array, ts: Array) -> None:
        """Fold fresh ratio samples of ``rows`` (reported at ``ts``) into their ratios:
        the first is the estimate, later ones are averaged in."""
        self.version += 1
        first = ~np.isfinite(self.ratio_ts[rows])
        self.ratio[rows] = np.where(
            first, sample, self.ratio[rows] + FOLLOW_ALPHA * (sample - self.ratio[rows])
        )
        self.ratio_ts[rows] = ts

    def gain(self, rows: NDArray[np.intp]) -> Array:
        """Each row's follow ratio as the allocation uses it (1 for a car not steered
        through its ratio)."""
        ratio = self.ratio[rows]
        out: Array = np.where(ratio >= FOLLOW_MIN_RATIO, ratio, 1.0)
        return out

    def weights(self, view: FleetView) -> Array:
        """Each vehicle's throughput cost per kWh: a kWh is a deeper cycle of a small
        battery, and a battery that has cycled more than the fleet's mean costs more."""
        cycled = self.cycled[view.rows]
        out: Array = (REFERENCE_CAPACITY_KWH / view.batteries.capacity_kwh) * (
            1.0 + cycled / max(float(cycled.mean()), CYCLED_FLOOR_KWH)
        )
        return out

    def columns(self, n_rows: int) -> dict[str, Array]:
        self.fit(n_rows)
        arrays = (self.ratio, self.ratio_ts, self.cycled)
        return {name: a[:n_rows].copy() for name, a in zip(COLUMNS, arrays, strict=True)}

    def restore(self, columns: dict[str, Array], n_rows: int) -> None:
        """Take back ``columns`` (those missing or of another length are skipped)."""
        self.fit(n_rows)
        for name, a in zip(COLUMNS, (self.ratio, self.ratio_ts, self.cycled), strict=True):
            col = columns.get(name)
            if col is not None and col.shape == (n_rows,):
                a[:n_rows] = col
        self.version += 1
