"""Splitting a fleet power target across vehicles, in proportion to their headroom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents.battery import Array


@dataclass(frozen=True, slots=True)
class Allocation:
    """Per-vehicle power and what the split adds up to."""

    power: Array
    total_kw: float
    shortfall_kw: float


def allocate(target_kw: float, lo: Array, hi: Array, ref: Array | None = None) -> Allocation:
    """Split ``target_kw`` of fleet net power over vehicles with ranges [lo, hi].

    Every vehicle starts from its reference clipped into its range: by default idle
    (0 kW), so a vehicle that must charge keeps charging and nobody cycles without need;
    in a running dispatch, what it was last told, so a steady request moves little. The gap to
    the target is then shared in proportion to each vehicle's headroom toward the bound
    in the target's direction: one multiply, never beyond a limit, and the sum is the
    target exactly when the fleet can reach it (else the nearest bound; the shortfall
    is the distance).
    """
    if not np.isfinite(target_kw):
        raise ValueError(f"target must be finite, got {target_kw}")
    ref = np.clip(0.0 if ref is None else ref, lo, hi)
    lo_sum, hi_sum, ref_sum = float(lo.sum()), float(hi.sum()), float(ref.sum())
    reachable = min(max(target_kw, lo_sum), hi_sum)
    if reachable >= ref_sum:
        room = hi_sum - ref_sum
        alpha = (reachable - ref_sum) / room if room > 0 else 0.0
        power = ref + alpha * (hi - ref)
    else:
        room = ref_sum - lo_sum
        alpha = (ref_sum - reachable) / room if room > 0 else 0.0
        power = ref - alpha * (ref - lo)
    power = np.clip(power, lo, hi)  # alpha may round past 1 by an ulp
    return Allocation(power, float(reachable), abs(target_kw - reachable))
