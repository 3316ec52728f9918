"""Battery and charger physics of DESIGN.md, vectorised over a fleet.

Everything here is pure: numpy arrays in, arrays out, one element per vehicle.
Units are kW, kWh and seconds; power > 0 charges the vehicle, < 0 discharges it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# Energies closer than this to a bound count as on it, so float rounding never
# turns "exactly at the floor" into "below the floor, charge flat out".
ENERGY_TOL_KWH = 1e-6


@dataclass(frozen=True, slots=True)
class Batteries:
    """Static parameters of a fleet's batteries and chargers, one element per vehicle."""

    capacity_kwh: Array
    max_charge_kw: Array
    max_discharge_kw: Array
    charge_efficiency: Array
    discharge_efficiency: Array
    min_soc: Array
    target_soc: Array

    def __len__(self) -> int:
        return int(self.capacity_kwh.shape[0])

    def take(self, rows: NDArray[np.intp] | NDArray[np.bool_]) -> Batteries:
        """These vehicles' batteries (``rows``: indices or a mask)."""
        return Batteries(*(getattr(self, f.name)[rows] for f in fields(self)))


def energy_floor(bat: Batteries, departure: Array, at: float | Array) -> Array:
    """The driver's floor E_min(at): the least energy from which the target is still reachable.

    ``departure`` is epoch seconds, NaN when unknown (then only the reserve min_soc holds).
    """
    reserve = bat.min_soc * bat.capacity_kwh
    to_go_h = np.maximum(departure - at, 0.0) / 3600.0
    reachable = (
        bat.target_soc * bat.capacity_kwh - bat.max_charge_kw * bat.charge_efficiency * to_go_h
    )
    # An unknown departure makes ``reachable`` NaN, which fmax passes over for the reserve.
    return np.fmax(reserve, reachable)


def feasible_range(
    bat: Batteries, energy: Array, departure: Array, now: float, window_s: float
) -> tuple[Array, Array]:
    """Power range [p_lo, p_hi] each vehicle can hold for ``window_s`` from ``now``.

    Holding any power in the range keeps the vehicle at or above its floor for the whole
    window and below full. The floor is convex up to departure and flat after it, so
    checking the window's end and the departure (when it falls inside) covers every
    moment in between. A vehicle that will be under its floor at the end gets p_lo > 0:
    it must charge; one already under it now charges flat out (p_lo = p_hi).
    """
    p_lo, p_hi, _ = _range(bat, energy, departure, now, window_s)
    return p_lo, p_hi


def _range(
    bat: Batteries, energy: Array, departure: Array, now: float, window_s: float
) -> tuple[Array, Array, NDArray[np.bool_]]:
    """``feasible_range`` and which vehicles are under their floor now."""
    p_lo = _least_power(bat, energy, departure, now, window_s)
    dep_in = departure - now
    inside = (dep_in > 0.0) & (dep_in < window_s)  # False for an unknown (NaN) departure
    if inside.any():
        at_dep = _least_power(bat, energy, departure, now, np.where(inside, dep_in, window_s))
        p_lo = np.maximum(p_lo, at_dep)
    h = window_s / 3600.0
    room = np.maximum(bat.capacity_kwh - energy, 0.0) / (bat.charge_efficiency * h)
    p_hi = np.maximum(p_lo, np.minimum(bat.max_charge_kw, room))
    # Under the floor already: the car charges flat out on its own (see protect), so
    # that is all it can be counted on for.
    below = energy < energy_floor(bat, departure, now) - ENERGY_TOL_KWH
    return np.where(below, p_hi, p_lo), p_hi, below


def _least_power(
    bat: Batteries, energy: Array, departure: Array, now: float, span_s: float | Array
) -> Array:
    """The lowest constant power that leaves the vehicle on its floor at now + span_s."""
    h = np.divide(span_s, 3600.0)
    spare = energy - energy_floor(bat, departure, np.add(now, span_s))
    over = np.maximum(spare, 0.0)
    under = over - spare  # max(-spare, 0), exactly
    can_give = np.minimum(bat.max_discharge_kw, over * bat.discharge_efficiency / h)
    must_take = np.minimum(bat.max_charge_kw, under / (bat.charge_efficiency * h))
    return np.where(spare >= -ENERGY_TOL_KWH, -can_give, must_take)


def baseline_power(bat: Batteries, energy: Array, step_s: float) -> Array:
    """Plain charging: full power toward the target until it is reached, then nothing."""
    need = bat.target_soc * bat.capacity_kwh - energy
    rate = need / (bat.charge_efficiency * step_s / 3600.0)
    return np.minimum(np.maximum(rate, 0.0), bat.max_charge_kw)  # np.clip, at half the cost


def baseline_energy(bat: Batteries, energy: Array, elapsed_s: Array) -> Array:
    """Stored energy after ``elapsed_s`` of plain charging from ``energy``: full power toward
    the target until it is reached, then nothing (a car above its target stays put)."""
    gained = (
        energy + bat.max_charge_kw * bat.charge_efficiency * np.maximum(elapsed_s, 0.0) / 3600.0
    )
    reached = np.minimum(np.minimum(bat.target_soc, 1.0) * bat.capacity_kwh, gained)
    return np.maximum(energy, reached)


def protect(
    bat: Batteries, energy: Array, departure: Array, now: float, step_s: float, wanted: Array
) -> Array:
    """The power each vehicle will actually hold for the next step, given what it is asked.

    A vehicle never goes beyond its own limits: it clips ``wanted`` to its feasible range
    for the step, and one already below its floor charges flat out whatever it is asked.
    """
    p_lo, p_hi, below = _range(bat, energy, departure, now, step_s)
    return np.where(below, p_hi, np.minimum(np.maximum(wanted, p_lo), p_hi))


def step_energy(bat: Batteries, energy: Array, power: Array, step_s: float) -> Array:
    """Stored energy after holding ``power`` for ``step_s``: charging stores P·h·eta_ch,
    discharging takes P·h/eta_dis."""
    h = step_s / 3600.0
    delta = np.where(
        power >= 0.0, power * h * bat.charge_efficiency, power * h / bat.discharge_efficiency
    )
    return np.minimum(np.maximum(energy + delta, 0.0), bat.capacity_kwh)
