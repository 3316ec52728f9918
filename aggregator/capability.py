"""The capability envelope: what fleet net power the fleet can hold, and for how long."""

from __future__ import annotations

from aggregator.fleet_state import FleetView
from broker.models import CapabilityWindow
from core.physics import Array, feasible_range

WINDOWS_S: tuple[float, ...] = (900.0, 1800.0, 3600.0, 7200.0, 14400.0)


def vehicle_ranges(view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
    """Each active vehicle's feasible power range [p_lo, p_hi] for the window from ``now``."""
    return feasible_range(view.batteries, view.energy, view.departure, now, window_s)


def window(
    view: FleetView, now: float, window_s: float, scale: Array | None = None
) -> CapabilityWindow:
    """The fleet's range [Σ p_lo, Σ p_hi] for one window; ``scale`` (per vehicle, e.g. the
    share of its setpoints a vehicle is measured to deliver) shrinks each range first."""
    lo, hi = vehicle_ranges(view, now, window_s)
    if scale is not None:
        lo, hi = scale * lo, scale * hi
    return CapabilityWindow(
        duration_s=window_s,
        min_power_kw=round(float(lo.sum()), 3),
        max_power_kw=round(float(hi.sum()), 3),
    )


def envelope(
    view: FleetView,
    now: float,
    windows: tuple[float, ...] = WINDOWS_S,
    scale: Array | None = None,
) -> list[CapabilityWindow]:
    """The envelope over the standard windows (900 s to 4 h)."""
    return [window(view, now, w, scale) for w in windows]
