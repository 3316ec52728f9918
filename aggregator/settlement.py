"""Per-vehicle settlement while requests run: each vehicle's metered and baseline energy
per settlement interval, and the drivers who left short of their target.

Grid operators settle a fleet per interval against its baseline; a fleet owner pays (or
answers to) each driver. The fleet books are the dispatcher's; these are the vehicles'.
Pure and vectorised: fleet-state arrays in, records out; the service writes them to the
ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from aggregator.fleet_state import FleetView
from core.physics import Array, baseline_power

INTERVAL_S = 900.0  # the market's settlement interval (15 min)
# A driver counts as short if they left this far under their target (kWh), and as having
# left early (not the platform's doing) if this long before their announced departure.
SHORT_TOL_KWH = 0.1
EARLY_S = 60.0


@dataclass(frozen=True, slots=True)
class VehicleInterval:
    """Every vehicle that took part in one settlement interval, as columns."""

    start: float
    end: float
    vehicle_ids: list[str]
    metered_kwh: Array  # through its charger, signed (+ in)
    baseline_kwh: Array  # what plain charging would have drawn


@dataclass(frozen=True, slots=True)
class Departure:
    """A driver who unplugged while requests ran, and how far from their target."""

    vehicle_id: str
    ts: float
    energy_kwh: float
    target_kwh: float
    announced: float  # the departure they had announced (nan if none)

    @property
    def short_kwh(self) -> float:
        return max(0.0, self.target_kwh - self.energy_kwh)

    @property
    def early(self) -> bool:
        """Left well before the departure they announced: the platform planned for that."""
        return math.isfinite(self.announced) and self.ts < self.announced - EARLY_S

    @property
    def short(self) -> bool:
        """Left short of target at or after the announced time: the platform's fault."""
        return self.short_kwh > SHORT_TOL_KWH and not self.early


class Settlement:
    """Accumulates per-vehicle energies between ``observe`` calls (each control step)."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._start: float | None = None
        self._t: float | None = None
        self._meter0 = np.zeros(0)
        self._base_kwh = np.zeros(0)
        self._base_kw = np.zeros(0)  # per row, from the last observation
        self._power = np.zeros(0)  # per row, what it drew at the last observation
        self._took_part = np.zeros(0, dtype=bool)
        # Per row, at the last observation: present, energy, target energy, departure.
        self._present = np.zeros(0, dtype=bool)
        self._energy = np.zeros(0)
        self._target = np.zeros(0)
        self._departure = np.zeros(0)

    @property
    def open(self) -> bool:
        return self._start is not None

    def _fit(self, n: int) -> None:
        have = self._meter0.shape[0]
        if n <= have:
            return
        grow = max(n, 2 * have) - have

        def more(a: Any, fill: float | bool) -> Any:
            return np.concatenate([a, np.full(grow, fill, dtype=a.dtype)])

        self._meter0 = more(self._meter0, 0.0)
        self._base_kwh = more(self._base_kwh, 0.0)
        self._base_kw = more(self._base_kw, 0.0)
        self._power = more(self._power, 0.0)
        self._took_part = more(self._took_part, False)
        self._present = more(self._present, False)
        self._energy = more(self._energy, 0.0)
        self._target = more(self._target, 0.0)
        self._departure = more(self._departure, np.nan)

    def observe(
        self,
        now: float,
        view: FleetView,
        meter: Array,
        plugged: NDArray[np.bool_],
        ids: list[str],
        step_s: float,
    ) -> tuple[list[VehicleInterval], list[Departure]]:
        """Book up to ``now``. ``meter`` and ``plugged`` are per fleet row (all rows);
        returns the intervals that closed and the drivers who unplugged since last time."""
        self._fit(meter.shape[0])
        closed: list[VehicleInterval] = []
        if self._start is None:
            self._start = self._t = now
            self._meter0[: meter.shape[0]] = meter
        else:
            assert self._t is not None
            boundary = (math.floor(self._start / self.interval_s) + 1) * self.interval_s
            while now >= boundary:  # close every interval that ended (one, unless a gap)
                self._accrue(boundary)
                closed.append(self._close(boundary, meter, ids))
                boundary += self.interval_s
            self._accrue(now)
        rows = view.rows
        # Who left: here last time, not now, and reported unplugged (not just silent).
        was = np.flatnonzero(self._present)
        here = np.zeros_like(self._present)
        here[rows] = True
        gone = was[~here[was] & ~plugged[was]]
        departures = [
            Departure(
                ids[r],
                now,
                float(self._energy[r]),
                float(self._target[r]),
                float(self._departure[r]),
            )
            for r in gone.tolist()
        ]
        self._present[:] = False
        self._present[rows] = True
        self._took_part[rows] = True
        self._energy[rows] = view.energy
        self._target[rows] = view.batteries.target_soc * view.batteries.capacity_kwh
        self._departure[rows] = view.departure
        self._base_kw[:] = 0.0
        self._base_kw[rows] = baseline_power(view.batteries, view.energy, step_s)
        self._power[:] = 0.0
        self._power[rows] = view.power
        return closed, departures

    def meters_at(self, end: float, now: float, meter: Array, view: FleetView) -> Array:
        """Each vehicle's meter at ``end`` (the requests' end, <= ``now``) from ``meter``,
        its meter at ``now``: less its power since its latest report or ``end``, whichever
        is later, and, before a report made after ``end`` (an expired setpoint noticed),
        the power it drew at the last observation, while the setpoints were in force."""
        out: Array = meter.copy()
        if now <= end or not len(view):
            return out
        self._fit(meter.shape[0])
        since = np.maximum(view.ts, end)
        after = view.power * (now - since) + self._power[view.rows] * (since - end)
        out[view.rows] -= after / 3600.0
        return out

    def _accrue(self, t: float) -> None:
        assert self._t is not None
        if t > self._t:
            self._base_kwh += self._base_kw * (t - self._t) / 3600.0
            self._t = t

    def _close(self, end: float, meter: Array, ids: list[str]) -> VehicleInterval:
        """The interval up to ``end`` for every vehicle that took part; the next starts."""
        assert self._start is not None
        rows = np.flatnonzero(self._took_part[: meter.shape[0]])
        out = VehicleInterval(
            start=self._start,
            end=end,
            vehicle_ids=[ids[r] for r in rows.tolist()],
            # Reports come with a lag: the meter at the step after the boundary is what
            # the vehicles have reported for it; the remainder falls in the next interval.
            metered_kwh=meter[rows] - self._meter0[rows],
            baseline_kwh=self._base_kwh[rows].copy(),
        )
        self._start = end
        self._meter0[: meter.shape[0]] = meter
        self._base_kwh[:] = 0.0
        self._took_part[:] = self._present
        return out

    def flush(self, now: float, meter: Array, ids: list[str]) -> VehicleInterval | None:
        """Close the interval in progress at ``now`` (the last request ended); the next
        observation starts afresh."""
        if self._start is None or now <= self._start:
            self._start = None
            return None
        self._accrue(now)
        out = self._close(now, meter, ids)
        self._start = self._t = None
        self._present[:] = False
        return out
