"""The capability envelope: what fleet net power the fleet can hold, and for how long."""

from __future__ import annotations

from agents.battery import Array, feasible_range
from aggregator.fleet_state import FleetView
from broker.models import CapabilityWindow

WINDOWS_S: tuple[float, ...] = (900.0, 1800.0, 3600.0, 7200.0, 14400.0)


def vehicle_ranges(view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
    """Each active vehicle's feasible power range [p_lo, p_hi] for the window from ``now``."""
    return feasible_range(view.batteries, view.energy, view.departure, now, window_s)


def window(view: FleetView, now: float, window_s: float) -> CapabilityWindow:
    """The fleet's range [Σ p_lo, Σ p_hi] for one window."""
    lo, hi = vehicle_ranges(view, now, window_s)
    return CapabilityWindow(
        duration_s=window_s,
        min_power_kw=round(float(lo.sum()), 3),
        max_power_kw=round(float(hi.sum()), 3),
    )


def envelope(
    view: FleetView, now: float, windows: tuple[float, ...] = WINDOWS_S
) -> list[CapabilityWindow]:
    """The envelope over the standard windows (900 s to 4 h)."""
    return [window(view, now, w) for w in windows]
