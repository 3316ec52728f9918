"""Nested grid limits on the fleet's setpoints: a water-filling over the tree (pure).

Given each vehicle's range [p_min, p_max] (its driver's floor already in p_min), the
setpoint the dispatcher wants for it, the node it is under, and each node's meter and
limits in force, :func:`allocate_nested` returns setpoints such that for every node
``meter + (the vehicles under it) ∈ [-export_kw, +import_kw]``, of that node and of every
ancestor, whenever the vehicles can make it so. In order of precedence:

1. the limits: a node's limits hold whenever its vehicles can hold them with its
   descendants' limits held (descendants first, then the node; the DSO's limits are
   hard constraints);
2. the drivers' floors: a vehicle goes below ``p_min`` only as far as a limit needs, and
   never below ``hard_min`` (by default the floor or 0, the lower: a limit may stop a car
   that must charge, not make it discharge); such cars are the *conflicts*;
3. the bands a service asks of a node's net power (firming: :func:`firming_band`), where
   the limits and floors leave room (``band_miss_kw`` reports what they do not);
4. the fleet's total: as close to the sum of the wanted setpoints as 1.-3. allow;
5. each vehicle: as close to its wanted setpoint as the rest allows, every subtree moved
   by the same kW per vehicle where its own limits do not bind.

When a node's limit cannot be held (the meter alone breaks it, or the surplus is more
than its cars can take), its cars do the most they can toward it and ``over_limit_kw``
reports the excess: exactly the distance from the node's net power to its limits.

How: one pass up the tree computes, per node and per tier (the limits, the floors, the
bands), the range of subtree totals its vehicles can reach with that tier's bounds below
it held, inside the range of the tier around it; one pass down splits each node's total over its children and its
own vehicles by one water level per node (``clip(x + w·λ, l, u)`` summing to the total,
the weight ``w`` being a child's vehicle count). Both passes are a few numpy calls per
depth level, never per node or vehicle: a tree of depth 4 costs the same whether it has
10 nodes or 10,000. A linear programme (HiGHS) solves the same problem exactly but takes
two orders of magnitude longer at 100k vehicles (bench/grid.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aggregator.grid import GridTopology

Floats = NDArray[np.float64]
Ints = NDArray[np.intp]

FLOOR_TOL_KW = 1e-6
"""A setpoint this far below its floor is below it (a conflict), not float noise."""


@dataclass(frozen=True, slots=True)
class NestedAllocation:
    """Setpoints under nested limits, and what each node gets."""

    power_kw: Floats  # per vehicle
    node_power_kw: Floats  # per node: its vehicles' net power, the whole subtree
    over_limit_kw: Floats  # per node: how far meter + node_power is beyond a limit (>= 0)
    conflicts: NDArray[np.bool_]  # per vehicle: held below its floor by a limit
    vehicle_node: Ints  # per vehicle: the node it is counted under (unknown: the root)
    band_miss_kw: Floats  # per node: how far meter + node_power is outside its band (>= 0)


def subtree_sums(grid: GridTopology, vehicle_node: Ints, values: Floats) -> Floats:
    """Per node, the sum of ``values`` over the vehicles in its subtree (preorder:
    a subtree is a contiguous range of nodes, so this is a difference of prefix sums)."""
    own = np.bincount(vehicle_node, weights=values, minlength=len(grid))
    prefix = np.concatenate(([0.0], np.cumsum(own)))
    return prefix[grid.end] - prefix[np.arange(len(grid))]


def over_limit(
    meter_kw: Floats, node_power_kw: Floats, import_kw: Floats, export_kw: Floats
) -> Floats:
    """Per node, how far ``meter + node_power`` is above ``import_kw`` or below
    ``-export_kw`` (0 when within; a NaN meter counts as 0)."""
    net = np.nan_to_num(meter_kw, nan=0.0) + node_power_kw
    return np.maximum(0.0, np.maximum(net - import_kw, -export_kw - net))


def _waterfill(group: Ints, x: Floats, lo: Floats, hi: Floats, w: Floats, target: Floats) -> Floats:
    """Per group g, the level λ with ``sum(clip(x + w·λ, lo, hi)) == target[g]`` over the
    group's items (the nearest bound's level when the target is out of reach).

    ``sum(clip(...))`` is piecewise linear and nondecreasing in λ, with a kink where each
    item reaches a bound: the kinks of all groups are sorted once (by level, then group)
    and the segment holding each target is found with cumulative sums."""
    n_groups = target.shape[0]
    lam = np.zeros(n_groups)
    base = np.bincount(group, weights=lo, minlength=n_groups)  # every item at its low bound
    free = hi > lo
    if not free.any():
        return lam
    g, xf, lf, hf, wf = group[free], x[free], lo[free], hi[free], w[free]
    # Two kinks per free item: at (lo - x)/w it leaves its low bound (slope +w, the
    # constant part goes from lo to x), at (hi - x)/w it reaches its high one (slope -w,
    # from x to hi).
    kink = np.concatenate(((lf - xf) / wf, (hf - xf) / wf))
    dslope = np.concatenate((wf, -wf))
    dconst = np.concatenate((xf - lf, hf - xf))
    kg = np.concatenate((g, g))
    # By group, then by level: one sort of group + the level scaled into [0, 0.5] (two
    # levels closer than 1e-13 of their spread may swap: the sum between them is flat).
    k_lo, k_hi = float(kink.min()), float(kink.max())
    order = np.argsort(kg + 0.5 * (kink - k_lo) / max(k_hi - k_lo, 1e-300))
    kink, dslope, dconst, kg = kink[order], dslope[order], dconst[order], kg[order]
    count = np.bincount(kg, minlength=n_groups)
    first = np.concatenate(([0], np.cumsum(count)[:-1]))
    cs = np.cumsum(dslope)
    cc = np.cumsum(dconst)
    # Cumulative sums restarted at each group's first kink.
    slope_before = cs - dslope
    const_before = cc - dconst
    start = first[kg]
    slope = cs - slope_before[start]
    const = cc - const_before[start] + base[kg]
    value = const + slope * kink  # sum(clip) at each kink (continuous)
    goal = target[kg]
    below = value < goal - 1e-9 * (1.0 + np.abs(goal))
    n_below = np.bincount(kg[below], minlength=n_groups)  # a prefix of each group's kinks
    has = count > 0
    # The segment that holds the target starts at the last kink below it.
    at = first + n_below  # the first kink at or above the target
    lam[has] = kink[np.minimum(at[has], first[has] + count[has] - 1)]
    inner = has & (n_below > 0) & (n_below < count)
    k = at[inner] - 1
    s = slope[k]
    pos = s > 0
    lam_inner = kink[k].copy()
    lam_inner[pos] = (target[inner][pos] - const[k][pos]) / s[pos]
    lam[inner] = lam_inner
    return lam


def firming_band(
    min_kw: float | None,
    max_kw: float | None,
    ramp_kw_per_min: float | None,
    last_net_kw: float,
    step_s: float,
) -> tuple[float, float]:
    """The band on a node's net power for the next step of a firming request: [min_kw,
    max_kw] (None: open), within ``ramp_kw_per_min`` of the last net power (NaN: no
    ramp yet). When the last net power is outside the band by more than the ramp allows
    in one step, the band is the one point nearest it that the ramp reaches."""
    lo = -np.inf if min_kw is None else min_kw
    hi = np.inf if max_kw is None else max_kw
    if ramp_kw_per_min is None or not np.isfinite(last_net_kw):
        return lo, hi
    reach = ramp_kw_per_min * step_s / 60.0
    r_lo, r_hi = last_net_kw - reach, last_net_kw + reach
    if r_hi < lo or r_lo > hi:
        point = min(max(lo if r_hi < lo else hi, r_lo), r_hi)
        return point, point
    return max(lo, r_lo), min(hi, r_hi)


def allocate_nested(
    grid: GridTopology,
    vehicle_node: Ints,
    p_min: Floats,
    p_max: Floats,
    desired: Floats,
    meter_kw: Floats,
    import_kw: Floats,
    export_kw: Floats,
    hard_min: Floats | None = None,
    band_low_kw: Floats | None = None,
    band_high_kw: Floats | None = None,
) -> NestedAllocation:
    """Setpoints near ``desired`` that keep every node within its limits (see the module).

    ``vehicle_node``: each vehicle's node index (-1, not in the grid: the root);
    ``p_min <= p_max`` per vehicle; ``meter_kw`` per node (NaN: none, counted as 0);
    ``import_kw``/``export_kw`` per node, magnitudes (inf: none); ``hard_min`` per
    vehicle, how far a limit may push a car below its floor (default ``min(p_min, 0)``).
    ``band_low_kw``/``band_high_kw`` per node (-inf/inf: open): a band on the node's net
    power (meter + vehicles) that a service asks for (firming: [min_kw, max_kw], the ramp
    as a band around the last net power); it yields to the limits and to the floors, and
    ``band_miss_kw`` says how far each node ends outside it.
    """
    n = len(grid)
    vn = np.where(vehicle_node < 0, 0, vehicle_node).astype(np.intp)
    hmin = np.minimum(p_min, 0.0) if hard_min is None else np.minimum(hard_min, p_min)
    want = np.clip(desired, p_min, p_max)
    meter0 = np.nan_to_num(meter_kw, nan=0.0)
    parent = grid.parent
    has_band = band_low_kw is not None or band_high_kw is not None
    band_lo = np.full(n, -np.inf) if band_low_kw is None else band_low_kw
    band_hi = np.full(n, np.inf) if band_high_kw is None else band_high_kw
    open_ = np.full(n, np.inf)
    # Tiers, outermost first: (each car's range, each node's bound on its subtree's
    # vehicle total). The limits; the floors (no node bound of their own); the bands.
    tiers: list[tuple[Floats, Floats, Floats, Floats]] = [
        (hmin, p_max, -export_kw - meter0, import_kw - meter0),
        (p_min, p_max, -open_, open_),
    ]
    if has_band:
        tiers.append((p_min, p_max, band_lo - meter0, band_hi - meter0))
    n_tiers = len(tiers)
    count = subtree_sums(grid, vn, np.ones(vn.shape[0]))
    wanted = subtree_sums(grid, vn, want)

    # Up: per tier, the reachable range [lo, hi] of each subtree's total with that tier's
    # bounds below it held (descendants first: where a node's bound cannot be met, the
    # extreme nearest it), inside the range of the tier around it. ``raw`` keeps the sums
    # of the items' ranges (the children's and the node's own cars') before the node's
    # own bound.
    own = [
        (np.bincount(vn, weights=lo, minlength=n), np.bincount(vn, weights=hi, minlength=n))
        for lo, hi, _, _ in tiers
    ]
    rng_lo = [np.zeros(n) for _ in range(n_tiers)]
    rng_hi = [np.zeros(n) for _ in range(n_tiers)]
    raw_lo = [np.zeros(n) for _ in range(n_tiers)]
    raw_hi = [np.zeros(n) for _ in range(n_tiers)]
    for level in reversed(grid.levels):
        out_lo = np.full(level.shape[0], -np.inf)
        out_hi = np.full(level.shape[0], np.inf)
        for k, (_, _, bound_lo, bound_hi) in enumerate(tiers):
            r_lo = raw_lo[k][level] + own[k][0][level]
            r_hi = raw_hi[k][level] + own[k][1][level]
            raw_lo[k][level], raw_hi[k][level] = r_lo, r_hi
            lo_l = np.clip(np.minimum(np.maximum(r_lo, bound_lo[level]), r_hi), out_lo, out_hi)
            hi_l = np.clip(np.maximum(np.minimum(r_hi, bound_hi[level]), r_lo), out_lo, out_hi)
            rng_lo[k][level], rng_hi[k][level] = lo_l, hi_l
            out_lo, out_hi = lo_l, hi_l
            up = parent[level]
            if up[0] >= 0:
                np.add.at(raw_lo[k], up, lo_l)
                np.add.at(raw_hi[k], up, hi_l)

    # Down: each node's total split over its children and its own vehicles.
    inner = n_tiers - 1
    total = np.zeros(n)
    total[0] = min(max(float(wanted[0]), rng_lo[inner][0]), rng_hi[inner][0])
    power = np.empty(vn.shape[0])
    by_depth = np.argsort(grid.depth[vn], kind="stable")
    vdepth = grid.depth[vn][by_depth]
    cuts = np.searchsorted(vdepth, np.arange(len(grid.levels) + 1))
    n_levels = len(grid.levels)
    for d, level in enumerate(grid.levels):
        # The group of an item is its node's position in this level.
        slot = np.full(n, -1, dtype=np.intp)
        slot[level] = np.arange(level.shape[0])
        goal = total[level]
        kids = grid.levels[d + 1] if d + 1 < n_levels else np.zeros(0, dtype=np.intp)
        cars = by_depth[cuts[d] : cuts[d + 1]]
        # Items: the children (as their subtrees), then the vehicles at this level.
        group = np.concatenate((slot[parent[kids]], slot[vn[cars]]))
        item_lo = [np.concatenate((rng_lo[k][kids], t[0][cars])) for k, t in enumerate(tiers)]
        item_hi = [np.concatenate((rng_hi[k][kids], t[1][cars])) for k, t in enumerate(tiers)]
        # A child's wanted total, not clipped into its range: as the parent lowers
        # everyone, a child capped by its own bound is capped until the shift reaches
        # it, then moves with the rest (as the exact optimum's dual shifts do).
        x = np.concatenate((wanted[kids], want[cars]))
        lo, hi = item_lo[inner].copy(), item_hi[inner].copy()
        # Per group: inside the innermost tier's sums, water-fill from the wanted values
        # within it. Below them, the first tier out whose sums reach the goal: everyone
        # lowered from the tier inside it toward that tier's low end (floors give to a
        # limit, a band to the floors). Above them, the same upward.
        decided = (raw_lo[inner][level] <= goal) & (goal <= raw_hi[inner][level])
        for k in range(inner - 1, -1, -1):
            down = (
                ~decided & ((raw_lo[k][level] <= goal) | (k == 0)) & (goal < raw_lo[k + 1][level])
            )
            rise = (
                ~decided & ((goal <= raw_hi[k][level]) | (k == 0)) & (goal > raw_hi[k + 1][level])
            )
            dn, ug = down[group], rise[group]
            x = np.where(dn, item_lo[k + 1], np.where(ug, item_hi[k + 1], x))
            lo = np.where(dn, item_lo[k], np.where(ug, item_hi[k + 1], lo))
            hi = np.where(dn, item_lo[k + 1], np.where(ug, item_hi[k], hi))
            decided |= down | rise
        w = np.concatenate((np.maximum(count[kids], 1.0), np.ones(cars.shape[0])))
        lam = _waterfill(group, x, lo, hi, w, goal)
        value = np.clip(x + w * lam[group], lo, hi)
        nk = kids.shape[0]
        total[kids] = value[:nk]
        power[cars] = value[nk:]

    node_power = subtree_sums(grid, vn, power)
    net = meter0 + node_power
    return NestedAllocation(
        power_kw=power,
        node_power_kw=node_power,
        over_limit_kw=over_limit(meter_kw, node_power, import_kw, export_kw),
        conflicts=power < p_min - FLOOR_TOL_KW,
        vehicle_node=vn,
        band_miss_kw=np.maximum(0.0, np.maximum(net - band_hi, band_lo - net)),
    )
