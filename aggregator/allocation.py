"""Splitting a fleet power target across vehicles, in proportion to their headroom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.physics import Array


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


def allocate_cost(
    target_kw: float, lo: Array, hi: Array, weight: Array, *, iterations: int = 60
) -> Allocation:
    """Split ``target_kw`` at least cost: minimise ``sum(weight * p**2) / 2`` over
    ``lo <= p <= hi`` with the sum at the target (or the nearest bound).

    A vehicle's weight is what cycling it costs (throughput cost per kWh, raised for a
    vehicle that has already cycled a lot), so the split leans on cheap, little-used
    batteries and spreads wear instead of piling it on one. The optimum is
    ``p = clip(level / weight, lo, hi)`` for one water level, found by bisection: a few
    dozen vectorised passes, no solver.
    """
    if not np.isfinite(target_kw):
        raise ValueError(f"target must be finite, got {target_kw}")
    if np.any(~(weight > 0)):
        raise ValueError("every weight must be positive and finite")
    lo_sum, hi_sum = float(lo.sum()), float(hi.sum())
    reachable = min(max(target_kw, lo_sum), hi_sum)
    inv = 1.0 / weight
    # The level that puts every vehicle at its low (high) bound brackets the answer.
    a = float(np.min(lo * weight)) if lo.size else 0.0
    b = float(np.max(hi * weight)) if hi.size else 0.0
    for _ in range(iterations):
        mid = 0.5 * (a + b)
        if float(np.clip(mid * inv, lo, hi).sum()) < reachable:
            a = mid
        else:
            b = mid
    power = np.clip(0.5 * (a + b) * inv, lo, hi)
    # Bisection leaves a sliver: give it to the vehicles with room, in proportion.
    gap = reachable - float(power.sum())
    room = (hi - power) if gap > 0 else (power - lo)
    total_room = float(room.sum())
    if total_room > 0 and gap != 0:
        power = np.clip(power + np.sign(gap) * room * min(1.0, abs(gap) / total_room), lo, hi)
    return Allocation(power, float(reachable), abs(target_kw - reachable))


def jain_index(x: Array) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2) of e.g. energy cycled per vehicle: 1
    when all are equal, 1/n when one takes everything (1 for none, or all zero)."""
    x = np.asarray(x, dtype=np.float64)
    sq = float(np.dot(x, x))
    if x.size == 0 or sq <= 0.0:
        return 1.0
    s = float(x.sum())
    return s * s / (x.size * sq)
