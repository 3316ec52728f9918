"""The capability envelope as a linear programme: the range of fleet net power the fleet
can hold constant for a whole window, with every car's departure (and announced arrival)
inside it taken into account and every driver's floor kept at every step.

Why not the sum of each car's constant-power range (aggregator/capability.py before issue
14)? A car that leaves inside the window contributes only until it leaves: its
must-charge and its discharge both go with it. The fleet's net power must stay the same
after it has gone, so the others must be able to hold it alone, and before it goes a
leaving car can charge harder (it has less time to fill) while a staying one can spend
energy early and win it back later. Summing ranges is too strict on one side and too
generous on the other exactly when many cars come and go.

The window is cut into ``K`` equal steps (at most 16, none shorter than the control
step). A **unit** (one vehicle in the reference, a cohort in production) is present from
the step its announced arrival falls in (rounded up) to the step it leaves in. Per
present step a unit charges ``x`` and discharges ``y`` (kW), and its energy after the
step, ``e``, is ``e_prev + eta_ch·x·h − y·h/eta_dis``, within [floor, ceiling] at the
step's end. The floor is the driver's E_min(τ) (DESIGN.md), capped at what charging
flat out reaches, so a car under its floor charges flat out and keeps the programme
feasible; at the boundary after its last step a leaving car must be on its departure
floor. At every step the units present sum to the same P; the envelope is
[min P, max P].

A car that leaves part-way through a step would count for the whole step if it had a
say in it, and the others could lean on it after it has gone. So it has none: if it can
be on its departure floor by the step's start it idles there (it counts as gone), and
if it must charge flat out until it leaves, that charge is a fixed load on the step,
counted whole toward the least P and not at all toward the most. Against a programme on
5-s control steps this only narrows the envelope, by well under 1% (bench/envelope.py).

- :func:`reference`: one unit per vehicle; exact on the step grid, for tests and the
  bench (it is too big for a control loop at 100k vehicles).
- :func:`window`: the production computation. Under ``EXACT_BELOW`` vehicles it is the
  reference; above, vehicles are pooled into cohorts by the steps they arrive and leave
  in. A car whose energy bounds cannot bind in the window (``Units.free``: charging or
  discharging flat out all the time it is there keeps it within them) has a box of
  feasible powers, step by step, and a sum of boxes is the box of the sums: loose cars
  pool exactly, whatever else they are like, into cohorts without energy bounds. The
  others (a car that fills up, runs out or must charge) never share a cohort with a
  loose one, whose slack would cover their floors and ceilings (issue 14: up to 2% too
  generous on the least import). While they are fewer than ``EXACT_BELOW`` each is its
  own unit, so the envelope is the reference's; above, they are pooled by
  :func:`kinds`, as aggregator/schedule.py pools them. Pooling alone would let one
  car's room cover another's charger (a full car and an empty one pooled charge at
  both chargers' power), so each cohort's per-step charge and discharge limits are the
  sums of its vehicles' own per-step limits, each already cut by what that car's energy
  allows in that step (the least and most energy it can have at the step's start,
  against its capacity and its floor at the step's end); a car's forced charge is
  booked at its own efficiency. The property tests hold it to :func:`reference` within
  1% on random fleets with departures and arrivals (exact on fleets with few bound
  cars), and bench/envelope.py on simulated fleets of 300 and 2,000 vehicles.
- :func:`steer`: the first step of a plan that holds a committed power to the end of its
  window, for the dispatcher to follow each control step.

When no constant power can be held (a car under its floor must charge flat out and
leaves mid-window, and the rest cannot make up for it afterwards), the envelope is the
single power that comes closest, and ``feasible`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import linprog

from aggregator.allocation import allocate
from core.physics import ENERGY_TOL_KWH, Array, Batteries, energy_floor

# A unit-per-kWh cost of energy cycled, against 1 per kW of P: breaks ties toward
# solutions without pointless cycling (and without charging and discharging a cohort at
# once), far too small to move P.
CYCLE_COST = 1e-7
# Steps the production window is cut into, at most; never shorter than MIN_STEP_S.
MAX_STEPS = 16
MIN_STEP_S = 5.0
# A fleet smaller than this is solved one unit per vehicle (exact, and still small).
EXACT_BELOW = 64
# Cohorts split alike vehicles into this many buckets per trait (see kinds).
KIND_BUCKETS = 3
ENERGY_EPS_KWH = 1e-9
# A plan's cost per kW it moves a unit from its power now (against h per kWh cycled):
# plans are sticky, so a steady request does not reshuffle the fleet every step.
STICKY = 1.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """The range of fleet net power that can be held constant for the whole window."""

    duration_s: float
    min_power_kw: float
    max_power_kw: float
    feasible: bool = True  # False: no constant power holds; min = max = the closest one
    units: int = 0  # vehicles (reference) or cohorts (production) in the programme
    steps: int = 0


@dataclass(frozen=True, slots=True)
class Units:
    """What the programme sees: per unit, when it is present and its per-step limits.

    Steps k = 0..K-1; boundaries b = 0..K. A unit is present in steps [first, last). The
    per-step powers are averages over the step."""

    step_s: float
    first: NDArray[np.intp]  # (m,)
    last: NDArray[np.intp]  # (m,)
    energy: Array  # (m,) at the start of step ``first``
    capacity: Array  # (m,)
    eta_ch: Array  # (m, K): of charge above x_min, in each step
    eta_dis: Array  # (m, K)
    forced_kwh: Array  # (m, K): what charging x_min stores in each step
    floor: Array  # (m, K + 1): the least energy at each boundary
    ceiling: Array  # (m, K + 1): the most energy at each boundary
    x_max: Array  # (m, K): the most it can charge in each step (kW)
    x_min: Array  # (m, K): the least it must charge
    y_max: Array  # (m, K): the most it can discharge
    frac: Array  # (m,): the share of its last step a unit is there for (1: all of it)
    # (K,): what cars charging flat out until they leave, part-way through a step, add to
    # the fleet's power in it: all of their power (while there) and its step average.
    load_full: Array
    load_avg: Array
    # (m,): its energy bounds cannot bind in the window (see vehicle_units): its feasible
    # powers are a box, step by step, and a cohort of such units has no energy bounds.
    free: NDArray[np.bool_]

    @property
    def size(self) -> int:
        return int(self.first.shape[0])

    @property
    def steps(self) -> int:
        return int(self.x_max.shape[1])


def grid(window_s: float, max_steps: int = MAX_STEPS, min_step_s: float = MIN_STEP_S) -> int:
    """How many equal steps a window is cut into: as many as allowed, none shorter than
    ``min_step_s``."""
    return max(1, min(max_steps, math.floor(window_s / min_step_s + 1e-9)))


def scaled(bat: Batteries, energy: Array, ratio: Array | None) -> tuple[Batteries, Array]:
    """A fleet whose vehicle i is ``ratio[i]`` times itself: every limit a car has is
    proportional to its size, so this scales its feasible power set by exactly the ratio
    (a car that delivers half its setpoints counts as half a car)."""
    if ratio is None:
        return bat, energy
    r = np.maximum(ratio, 0.0)
    sized = replace(
        bat,
        capacity_kwh=bat.capacity_kwh * r,
        max_charge_kw=bat.max_charge_kw * r,
        max_discharge_kw=bat.max_discharge_kw * r,
    )
    return sized, energy * r


def vehicle_units(
    bat: Batteries,
    energy: Array,
    departure: Array,
    now: float,
    window_s: float,
    steps: int,
    arrival: Array | None = None,
) -> Units:
    """One unit per vehicle (``energy`` is at arrival for a car not there yet; ``arrival``
    NaN or <= now: plugged in now; ``departure`` NaN: unknown, it stays)."""
    n = energy.shape[0]
    k_steps = steps
    step_s = window_s / k_steps
    arr = np.full(n, now) if arrival is None else np.where(np.isnan(arrival), now, arrival)
    arr = np.maximum(arr, now)
    first = np.clip(np.ceil((arr - now) / step_s - 1e-6), 0, k_steps).astype(np.intp)
    # A car is present up to the step it leaves in, for the part of it before it leaves.
    dep_at = (departure - now) / step_s
    dep_steps = np.ceil(dep_at - 1e-6)
    last = np.where(np.isnan(departure), k_steps, np.clip(dep_steps, 0, k_steps)).astype(np.intp)
    last = np.maximum(last, first)
    dt_h: Array = np.arange(k_steps + 1, dtype=np.float64) * (step_s / 3600.0)  # (K + 1,) h
    # Hours each unit has been in its programme at each boundary (all of them for the
    # cars plugged in now: one row, broadcast).
    if arrival is None:
        since_h: Array = dt_h[None, :]
    else:
        since_h = np.maximum(dt_h[None, :] - (first * (step_s / 3600.0))[:, None], 0.0)
    cap = bat.capacity_kwh[:, None]
    e0 = energy[:, None]
    # The driver's floor at each boundary (energy_floor, written out to spend one pass per
    # operation on the (n, K + 1) arrays, which dominate the cost at 100k vehicles).
    rate = (bat.max_charge_kw * bat.charge_efficiency)[:, None]
    to_go = (departure - now)[:, None] / 3600.0 - dt_h[None, :]
    np.maximum(to_go, 0.0, out=to_go)
    to_go *= rate
    floor = np.subtract((bat.target_soc * bat.capacity_kwh)[:, None], to_go, out=to_go)
    np.fmax(floor, (bat.min_soc * bat.capacity_kwh)[:, None], out=floor)
    # A car that leaves inside the window must be on its departure floor when it leaves:
    # the boundary after its last step stands for its departure (and what it can reach
    # by then), and in that step it is there for ``frac`` of the time.
    leaves = np.flatnonzero((last > first) & (dep_at < k_steps - 1e-6))
    lk = last[leaves]
    frac = np.ones(n)
    frac[leaves] = np.clip(dep_at[leaves] - (lk - 1), 1e-6, 1.0)
    lb = bat.take(leaves)
    floor[leaves, lk] = energy_floor(lb, departure[leaves], departure[leaves])
    high = rate * since_h
    high += e0
    if leaves.size:
        gone_h = (departure[leaves] - now) / 3600.0 - (first[leaves] * step_s / 3600.0)
        high[leaves, lk] = energy[leaves] + rate[leaves, 0] * gone_h
    # A car is free (loose) if charging flat out from its arrival to its departure (or
    # the window's end) never fills it and discharging flat out never takes it under its
    # floor: whatever it does within its per-step limits then keeps it within its
    # energy bounds (every limit below is cut from these two extremes), so its feasible
    # powers are a box, step by step, and a sum of boxes is the box of the sums.
    rows = np.arange(n)
    free = high[rows, last] <= bat.capacity_kwh + ENERGY_EPS_KWH
    np.minimum(high, cap, out=high)
    # Capped at what charging flat out reaches: a car under its floor charges flat out.
    np.minimum(floor, high, out=floor)
    np.maximum(floor, 0.0, out=floor)
    low = (bat.max_discharge_kw / bat.discharge_efficiency)[:, None] * since_h
    if leaves.size:
        low[leaves, lk] = (bat.max_discharge_kw / bat.discharge_efficiency)[leaves] * gone_h
    np.subtract(e0, low, out=low)
    bounds = np.arange(k_steps + 1)
    there = (bounds[None, :] > first[:, None]) & (bounds[None, :] <= last[:, None])
    short = np.less(low, floor)
    short &= there
    free &= ~short.any(axis=1)
    # So is one that must charge flat out all along (its floor is its ceiling): its
    # box is a point.
    slack = np.less(floor, high - ENERGY_EPS_KWH)
    slack &= there
    free |= ~slack.any(axis=1)
    np.maximum(low, floor, out=low)
    np.minimum(low, high, out=low)
    h = step_s / 3600.0
    eta_ch = bat.charge_efficiency[:, None]
    eta_dis = bat.discharge_efficiency[:, None]
    x_max = np.subtract(cap, low[:, :-1])
    np.maximum(x_max, 0.0, out=x_max)
    x_max /= eta_ch * h
    np.minimum(x_max, bat.max_charge_kw[:, None], out=x_max)
    y_max = np.subtract(high[:, :-1], floor[:, 1:])
    np.maximum(y_max, 0.0, out=y_max)
    y_max *= eta_dis / h
    np.minimum(y_max, bat.max_discharge_kw[:, None], out=y_max)
    x_min = np.subtract(floor[:, 1:], high[:, :-1])
    np.maximum(x_min, 0.0, out=x_min)
    x_min /= eta_ch * h
    np.minimum(x_min, x_max, out=x_min)
    # A car already under its floor charges flat out on its own (core.physics.protect),
    # whatever it is asked: in the first step that is all it can be counted on for, as
    # feasible_range says, or the envelope would promise power the fleet cannot give now.
    under = np.flatnonzero(
        (first == 0) & (energy < energy_floor(bat, departure, now) - ENERGY_TOL_KWH)
    )
    if under.size:
        x_min[under, 0] = x_max[under, 0]
        y_max[under, 0] = 0.0
    # The step a car leaves in part-way: its power would count for the whole step, but it
    # is there for only part of it, so it gets no say in it. A car that can be on its
    # departure floor by the step's start is held there and idles (it counts as gone);
    # one that cannot charges flat out until it leaves, which the fleet's power includes
    # while it is there and not after: the envelope counts it whole toward its least
    # import and not at all toward its most (and a plan, on average).
    part = leaves[frac[leaves] < 1.0 - 1e-9]
    load_full = np.zeros(k_steps)
    load_avg = np.zeros(k_steps)
    if part.size:
        pk = last[part] - 1
        need = floor[part, pk + 1] - high[part, pk]
        flat_out = need > ENERGY_EPS_KWH
        pb = bat.take(part)
        x_min[part, pk] = x_max[part, pk] = y_max[part, pk] = 0.0
        idle, ik = part[~flat_out], pk[~flat_out]
        low[idle, ik] = np.maximum(low[idle, ik], floor[idle, ik + 1])
        f_rows, f_k = part[flat_out], pk[flat_out]
        np.add.at(load_full, f_k, pb.max_charge_kw[flat_out])
        avg = need[flat_out] / (pb.charge_efficiency[flat_out] * h)
        np.add.at(load_avg, f_k, avg)
        forced_kwh = (eta_ch * h) * x_min
        forced_kwh[f_rows, f_k] = need[flat_out]
    else:
        forced_kwh = (eta_ch * h) * x_min
    return Units(
        step_s=step_s,
        first=first,
        last=last,
        energy=energy.astype(np.float64),
        capacity=bat.capacity_kwh.astype(np.float64),
        eta_ch=np.broadcast_to(eta_ch, x_max.shape),
        eta_dis=np.broadcast_to(eta_dis, x_max.shape),
        forced_kwh=forced_kwh,
        floor=low,
        ceiling=high,
        x_max=x_max,
        x_min=x_min,
        y_max=y_max,
        frac=frac,
        load_full=load_full,
        load_avg=load_avg,
        free=free,
    )


def cohort_of(
    u: Units, kind: NDArray[np.intp] | None = None
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(cohort keys, each unit's cohort): the units that arrive and leave in the same
    steps and are of the same ``kind``."""
    k_steps = u.steps
    key = u.first * (k_steps + 1) + u.last
    if kind is not None:
        key = key + (k_steps + 1) ** 2 * kind
    keys, idx = np.unique(key, return_inverse=True)
    return keys, idx.astype(np.intp)


def pool(u: Units, cohorts: tuple[NDArray[np.intp], NDArray[np.intp]]) -> Units:
    """The units of each cohort (from :func:`cohort_of`), summed. Efficiencies are
    weighted by charger power (harmonic for discharge), as in the schedule. A cohort of
    units all free (``Units.free``) has no energy bounds: its units' cannot bind, so it
    is its units' boxes summed, exactly."""
    k_steps = u.steps
    keys, idx = cohorts
    m = keys.shape[0]
    n = idx.shape[0]
    # Cohort-by-unit ones: one sparse product sums a per-unit column or row (every step
    # or boundary at once), in one pass over it.
    member = sp.csr_matrix((np.ones(n), (idx, np.arange(n))), shape=(m, n))
    # Only the bound units' energy matters: a cohort of free ones has no energy bounds.
    # These sums read the bound units' rows alone.
    bound = np.flatnonzero(~u.free)
    of_bound = sp.csr_matrix(
        (np.ones(bound.size), (idx[bound], np.arange(bound.size))), shape=(m, bound.size)
    )

    def total(x: Array) -> Array:
        """Per cohort: sums of a per-unit column, or of a per-step or per-boundary row."""
        return np.asarray(member @ x, dtype=np.float64)

    def bound_total(x: Array) -> Array:
        """The same over the bound units, from their rows alone (``x[bound]``)."""
        return np.asarray(of_bound @ x, dtype=np.float64)

    boxed = np.bincount(idx, weights=~u.free, minlength=m) == 0
    x_min = total(u.x_min)
    # Forced charge is booked at each car's own efficiency; what is free to choose is
    # weighted by how much of it each car has, step by step.
    room = u.x_max[bound] - u.x_min[bound] + 1e-12
    yw = u.y_max[bound] + 1e-12
    some = np.broadcast_to(~boxed[:, None], (m, k_steps))

    def ratio(a: Array, b: Array) -> Array:
        """a / b per bound cohort, 1 for a free one (its energy is unbounded)."""
        return np.divide(a, b, out=np.ones((m, k_steps)), where=some)

    eta_ch = ratio(bound_total(room * u.eta_ch[bound]), bound_total(room))
    eta_dis = ratio(bound_total(yw), bound_total(yw / u.eta_dis[bound]))
    floor, ceiling = bound_total(u.floor[bound]), bound_total(u.ceiling[bound])
    floor[boxed], ceiling[boxed] = -np.inf, np.inf
    # A free cohort's energy is unbounded: what its forced charge stores only has to
    # match its efficiency (the programme books it so).
    forced_kwh = np.where(boxed[:, None], (u.step_s / 3600.0) * x_min, 0.0)
    forced_kwh += bound_total(u.forced_kwh[bound])
    return Units(
        step_s=u.step_s,
        first=((keys // (k_steps + 1)) % (k_steps + 1)).astype(np.intp),
        last=(keys % (k_steps + 1)).astype(np.intp),
        energy=total(u.energy),
        capacity=total(u.capacity),
        eta_ch=eta_ch,
        eta_dis=eta_dis,
        forced_kwh=forced_kwh,
        floor=floor,
        ceiling=ceiling,
        x_max=total(u.x_max),
        x_min=x_min,
        y_max=total(u.y_max),
        frac=np.ones(m),
        load_full=u.load_full,
        load_avg=u.load_avg,
        free=boxed,
    )


@dataclass(frozen=True, slots=True)
class _Programme:
    """The part every envelope LP shares: per present (unit, step), variables x, y, e."""

    ui: NDArray[np.intp]
    ki: NDArray[np.intp]
    dynamics: sp.csr_matrix  # (v, 3v): e_k - e_(k-1) - eta_ch h x + h / eta_dis y
    rhs: Array  # (v,)
    lower: Array  # (3v,)
    upper: Array  # (3v,)

    @property
    def size(self) -> int:
        return int(self.ui.shape[0])

    def fleet_sum(self, steps: int, width: int) -> sp.csr_matrix:
        """(steps, width): row k is the fleet's net power in step k, Σ (x - y)."""
        v = self.size
        return sp.csr_matrix(
            (
                np.concatenate([np.ones(v), -np.ones(v)]),
                (
                    np.concatenate([self.ki, self.ki]),
                    np.concatenate([np.arange(v), v + np.arange(v)]),
                ),
            ),
            shape=(steps, width),
        )


def _programme(u: Units) -> _Programme:
    h = u.step_s / 3600.0
    steps = np.arange(u.steps)
    ui, ki = np.nonzero((steps[None, :] >= u.first[:, None]) & (steps[None, :] < u.last[:, None]))
    v = ui.shape[0]
    rows = np.arange(v)
    starts = ki == u.first[ui]
    later = np.flatnonzero(~starts)
    eta_ch, eta_dis = u.eta_ch[ui, ki], u.eta_dis[ui, ki]
    x_hi = u.x_max[ui, ki]
    x_lo = np.minimum(u.x_min[ui, ki], x_hi)
    dynamics = sp.csr_matrix(
        (
            np.concatenate([np.ones(v), -eta_ch * h, h / eta_dis, -np.ones(later.shape[0])]),
            (
                np.concatenate([rows, rows, rows, later]),
                np.concatenate([2 * v + rows, rows, v + rows, 2 * v + later - 1]),
            ),
        ),
        shape=(v, 3 * v),
    )
    # The forced charge x_min stores forced_kwh (at each car's own efficiency); only what
    # is charged above it goes at the unit's efficiency.
    rhs = np.where(starts, u.energy[ui], 0.0) + u.forced_kwh[ui, ki] - eta_ch * x_lo * h
    e_hi = u.ceiling[ui, ki + 1]
    e_lo = np.minimum(u.floor[ui, ki + 1], e_hi)
    return _Programme(
        ui=ui,
        ki=ki,
        dynamics=dynamics,
        rhs=rhs,
        lower=np.concatenate([x_lo, np.zeros(v), e_lo]),
        upper=np.concatenate([x_hi, u.y_max[ui, ki], e_hi]),
    )


def _linprog(
    cost: Array,
    a_eq: sp.csr_matrix,
    b_eq: Array,
    lower: Array,
    upper: Array,
    a_ub: sp.csr_matrix | None = None,
    b_ub: Array | None = None,
) -> Any:
    return linprog(  # type: ignore[call-overload]  # the stubs know no sparse matrices
        cost,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=np.column_stack([lower, upper]),
        method="highs",
    )


def solve(u: Units, window_s: float) -> Envelope:
    """The envelope of these units: max and min of the P every step's units sum to."""
    k_steps = u.steps
    pr = _programme(u)
    v = pr.size
    if v == 0 or np.any(np.bincount(pr.ki, minlength=k_steps) == 0):
        # Some step has no unit present: the fleet holds 0 kW then, so 0 kW or nothing.
        return Envelope(window_s, 0.0, 0.0, holds(u, 0.0), u.size, k_steps)
    # Variables: x, y, e, then P; per step Σ (x - y) - P = 0.
    width = 3 * v + 1
    p_col = sp.csr_matrix(
        (-np.ones(k_steps), (np.arange(k_steps), np.full(k_steps, 3 * v))), shape=(k_steps, width)
    )
    a_eq = sp.vstack(
        [sp.hstack([pr.dynamics, sp.csr_matrix((v, 1))]), pr.fleet_sum(k_steps, width) + p_col]
    ).tocsr()
    big = float(u.x_max.sum() + u.y_max.sum() + u.load_full.sum()) + 1.0
    lower = np.concatenate([pr.lower, [-big]])
    upper = np.concatenate([pr.upper, [big]])
    h = u.step_s / 3600.0
    cost = np.concatenate([np.full(2 * v, CYCLE_COST * h), np.zeros(v), [0.0]])
    got: list[float] = []
    # Σ (x - y) + load - P = 0: the load of cars leaving part-way through a step counts
    # whole toward the least P, not at all toward the most (see vehicle_units).
    for sign, load in ((1.0, u.load_full), (-1.0, np.zeros(k_steps))):
        cost[-1] = sign
        b_eq = np.concatenate([pr.rhs, -load])
        res = _linprog(cost, a_eq, b_eq, lower, upper)
        if res.status == 2:  # infeasible: no constant power holds
            return _closest(u, pr, window_s)
        if res.status != 0:  # pragma: no cover - bounded, so only numerical trouble
            raise RuntimeError(f"the envelope LP failed: {res.message}")
        got.append(float(res.x[-1]))
    return Envelope(window_s, got[0], got[1], True, u.size, k_steps)


def holds(u: Units, power_kw: float) -> bool:
    """Can these units hold ``power_kw`` in every step (0 kW in a step nobody is in)?"""
    k_steps = u.steps
    pr = _programme(u)
    v = pr.size
    if v == 0:
        return True
    live = np.bincount(pr.ki, minlength=k_steps) > 0
    sums = pr.fleet_sum(k_steps, 3 * v)[np.flatnonzero(live)]
    a_eq = sp.vstack([pr.dynamics, sums]).tocsr()
    b_eq = np.concatenate([pr.rhs, power_kw - u.load_avg[live]])
    res = _linprog(np.zeros(3 * v), a_eq, b_eq, pr.lower, pr.upper)
    return bool(res.status == 0)


def _closest(u: Units, pr: _Programme, window_s: float) -> Envelope:
    """No constant power holds: the one the fleet comes closest to (least worst miss)."""
    p = float(_closest_plan(u, pr)[-2])
    return Envelope(window_s, p, p, False, u.size, u.steps)


def _closest_plan(u: Units, pr: _Programme) -> Array:
    """The plan (x, y, e, then P and the worst miss) closest to holding one power."""
    k_steps = u.steps
    v = pr.size
    # Variables: x, y, e, then P and the worst miss w; per step |Σ(x - y) - P| <= w.
    width = 3 * v + 2
    sums = pr.fleet_sum(k_steps, width)
    r = np.arange(k_steps)
    p_col = sp.csr_matrix((np.ones(k_steps), (r, np.full(k_steps, 3 * v))), shape=(k_steps, width))
    w_col = sp.csr_matrix(
        (np.ones(k_steps), (r, np.full(k_steps, 3 * v + 1))), shape=(k_steps, width)
    )
    a_ub = sp.vstack([sums - p_col - w_col, -sums + p_col - w_col]).tocsr()
    a_eq = sp.hstack([pr.dynamics, sp.csr_matrix((v, 2))]).tocsr()
    big = float(u.x_max.sum() + u.y_max.sum()) + 1.0
    cost = np.zeros(width)
    cost[-1] = 1.0
    lower = np.concatenate([pr.lower, [-big, 0.0]])
    upper = np.concatenate([pr.upper, [big, big]])
    b_ub = np.concatenate([-u.load_avg, u.load_avg])
    res = _linprog(cost, a_eq, pr.rhs, lower, upper, a_ub, b_ub)
    if res.status == 2:
        # Pooled, a cohort's energies may not fit its cars' summed bounds (one efficiency
        # for cars of several): the closest plan without them. Never empty: charge only
        # what is forced, discharge nothing, and the energy only rises from >= 0.
        lower[2 * v : 3 * v], upper[2 * v : 3 * v] = 0.0, np.inf
        res = _linprog(cost, a_eq, pr.rhs, lower, upper, a_ub, b_ub)
    if res.status != 0:  # pragma: no cover - see above: always feasible
        raise RuntimeError(f"the envelope LP failed: {res.message}")
    x: Array = res.x
    return x


def reference(
    bat: Batteries,
    energy: Array,
    departure: Array,
    now: float,
    window_s: float,
    steps: int,
    arrival: Array | None = None,
) -> Envelope:
    """The exact envelope on a grid of ``steps`` equal steps: one unit per vehicle."""
    return solve(vehicle_units(bat, energy, departure, now, window_s, steps, arrival), window_s)


def kinds(
    u: Units,
    window_s: float,
    buckets: int = KIND_BUCKETS,
    rows: NDArray[np.intp] | None = None,
) -> NDArray[np.intp]:
    """Which vehicles pool well together: pooling lets one car's room, slack or charger
    cover another's, which is harmless only between cars alike in how soon they fill up
    (room over what their charger adds in the window), how soon they run out of slack
    (energy above their departure floor over what their discharger takes), and when
    their floor catches up with them (never, or in which part of the window). Of the
    units ``rows`` only, if given."""
    k_steps = u.steps
    h = window_s / 3600.0
    r = np.arange(u.size) if rows is None else rows
    floor, energy, capacity = u.floor[r], u.energy[r], u.capacity[r]
    end = floor[np.arange(r.size), u.last[r]]
    mc = u.x_max[r].max(axis=1, initial=0.0) + 1e-9
    md = u.y_max[r].max(axis=1, initial=0.0) + 1e-9
    fill = (capacity - energy) / (mc * u.eta_ch[r, 0] * h)
    empty = np.maximum(energy - end, 0.0) * u.eta_dis[r, 0] / (md * h)
    above = floor > energy[:, None] + ENERGY_EPS_KWH
    caught = np.where(above.any(axis=1), above.argmax(axis=1), k_steps + 1)

    def bucket(x: Array) -> NDArray[np.intp]:
        return np.clip(np.floor(x * buckets), 0, buckets - 1).astype(np.intp)

    when = np.minimum(np.floor(caught / (k_steps + 1) * buckets), buckets).astype(np.intp)
    return (when * buckets + bucket(fill)) * buckets + bucket(empty)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A fleet made ready for one window's programmes: its batteries and energy (each car
    counted for its ratio of itself), its units, and the cohorts they pool into (each
    unit its own cohort for a small fleet). The envelope and a plan for the same fleet,
    time and window share it."""

    batteries: Batteries
    energy: Array
    units: Units
    cohorts: tuple[NDArray[np.intp], NDArray[np.intp]]
    pooled: Units


def prepare(
    bat: Batteries,
    energy: Array,
    departure: Array,
    now: float,
    window_s: float,
    *,
    steps: int | None = None,
    arrival: Array | None = None,
    ratio: Array | None = None,
    exact_below: int = EXACT_BELOW,
    exact_bound_below: int = EXACT_BELOW,
    min_step_s: float = MIN_STEP_S,
) -> Prepared:
    """The fleet's units for the window (each car counted for ``ratio`` of itself, on
    ``steps`` steps or as many as :func:`grid` allows) and their cohorts: what
    :func:`window` and :func:`steer` solve over."""
    bat, energy = scaled(bat, energy, ratio)
    n = energy.shape[0]
    k_steps = grid(window_s, min_step_s=min_step_s) if steps is None else steps
    units = vehicle_units(bat, energy, departure, now, window_s, k_steps, arrival)
    if n < exact_below:
        each = np.arange(n, dtype=np.intp)
        return Prepared(bat, energy, units, (each, each), units)
    # Units whose energy cannot bind pool exactly whatever else they are like (one
    # cohort per arrival and departure step). Pooling the others lets one car's slack
    # cover another's floor, and a loose car has slack to spare, so they never share a
    # cohort: the others are each on their own while they are few, else pooled by kind.
    bound = np.flatnonzero(~units.free)
    kind = np.zeros(n, dtype=np.intp)
    if bound.size < exact_bound_below:
        kind[bound] = 1 + np.arange(bound.size)
    else:
        kind[bound] = 1 + kinds(units, window_s, rows=bound)
    cohorts = cohort_of(units, kind)
    return Prepared(bat, energy, units, cohorts, pool(units, cohorts))


def window(
    bat: Batteries,
    energy: Array,
    departure: Array,
    now: float,
    window_s: float,
    *,
    steps: int | None = None,
    arrival: Array | None = None,
    ratio: Array | None = None,
    exact_below: int = EXACT_BELOW,
    exact_bound_below: int = EXACT_BELOW,
    min_step_s: float = MIN_STEP_S,
    prepared: Prepared | None = None,
) -> Envelope:
    """The production envelope for one window: the same programme, one unit per vehicle
    for a fleet under ``exact_below`` vehicles, over cohorts of alike vehicles above.

    ``ratio`` (per vehicle) is the share of its setpoints each car is measured to
    deliver; a car counts for that share of itself. Cars whose energy bounds can bind
    are each their own unit while fewer than ``exact_bound_below`` (see :func:`prepare`). ``prepared`` (from :func:`prepare`,
    with the same arguments) saves doing that again."""
    if prepared is None:
        prepared = prepare(
            bat,
            energy,
            departure,
            now,
            window_s,
            steps=steps,
            arrival=arrival,
            ratio=ratio,
            exact_below=exact_below,
            exact_bound_below=exact_bound_below,
            min_step_s=min_step_s,
        )
    if prepared.units.size == 0:
        return Envelope(window_s, 0.0, 0.0, True, 0, prepared.units.steps)
    return solve(prepared.pooled, window_s)


@dataclass(frozen=True, slots=True)
class Steering:
    """The first step of a plan that holds a fleet power for the rest of a window."""

    power_kw: Array  # per vehicle: what to deliver now (kW, + charge)
    lo_kw: Array  # per vehicle: the range it can deliver now, floors kept
    hi_kw: Array
    holds: bool  # the plan holds the power in every step (else: as close as it can)


def steer(
    bat: Batteries,
    energy: Array,
    departure: Array,
    now: float,
    window_s: float,
    power_kw: float,
    *,
    ratio: Array | None = None,
    weight: Array | None = None,
    ref: Array | None = None,
    exact_below: int = EXACT_BELOW,
    min_step_s: float = MIN_STEP_S,
    prepared: Prepared | None = None,
) -> Steering:
    """What each vehicle should deliver now so that the fleet holds ``power_kw`` for the
    rest of the window: the first step of the plan that moves least, in that step, from
    the fast allocation (``power_kw`` split from ``ref``, what each car was told in
    delivered kW, in proportion to room: spread over the fleet, so a car whose follow
    ratio is not yet known carries no more than its share), then cycles least. Per
    vehicle for a small fleet; per cohort above, each cohort's power shared by its
    vehicles from where they are, in proportion to their room this step (or at least
    cost with ``weight``). A commitment made from the envelope is held by following
    this every control step, the plan solved afresh for what is left."""
    # The plan's first step is held for a whole control step: none may be shorter.
    if prepared is None:
        prepared = prepare(
            bat,
            energy,
            departure,
            now,
            window_s,
            ratio=ratio,
            exact_below=exact_below,
            min_step_s=min_step_s,
        )
    bat, energy, units = prepared.batteries, prepared.energy, prepared.units
    n = energy.shape[0]
    lo = np.where(units.x_min[:, 0] > 0.0, units.x_min[:, 0], -units.y_max[:, 0])
    hi = units.x_max[:, 0].copy()
    # A car leaving part-way through the first step that must charge flat out until then
    # does so now, whatever the plan (which counts its average over the step).
    flat_now = (units.last == 1) & (units.frac < 1.0 - 1e-9) & (units.forced_kwh[:, 0] > 0.0)
    # So does a car under its floor now (core.physics.protect): it reaches it faster
    # than the plan's average over the step, then the plan takes over.
    flat_now |= energy < energy_floor(bat, departure, now) - ENERGY_TOL_KWH
    lo[flat_now] = hi[flat_now] = bat.max_charge_kw[flat_now]
    if n == 0:
        return Steering(np.zeros(0), lo, hi, True)
    cohorts, pooled = prepared.cohorts, prepared.pooled
    idx = cohorts[1]
    planned = ~flat_now  # their power now is not the plan's to choose
    m = pooled.size

    def per_cohort(x: Array) -> Array:
        return np.bincount(idx, weights=x, minlength=m).astype(np.float64)

    lo_c, hi_c = per_cohort(np.where(planned, lo, 0.0)), per_cohort(np.where(planned, hi, 0.0))
    # Sticky: the plan moves least from the fast split of the target, itself made from
    # what each car was last told, so a steady request does not reshuffle the fleet.
    was = np.clip(np.zeros(n) if ref is None else ref, lo, hi)
    fixed = np.where(flat_now, lo, 0.0)
    was[planned] = allocate(power_kw - fixed.sum(), lo[planned], hi[planned], was[planned]).power
    first, ok = _first_step(pooled, power_kw, per_cohort(was))
    # What each cohort's other cars are to give, beside its cars charging flat out now.
    goal = first - per_cohort(fixed)
    if weight is not None:
        power = _least_cost(goal, lo, hi, weight, idx, planned, m)
        power[flat_now] = lo[flat_now]
        return Steering(power, lo, hi, ok)
    was_c = per_cohort(np.where(planned, was, 0.0))
    goal = np.clip(goal, lo_c, hi_c)
    up = goal >= was_c
    room = np.where(up, hi_c - was_c, was_c - lo_c)
    alpha = np.divide(np.abs(goal - was_c), room, out=np.zeros(m), where=room > 1e-12)
    alpha = np.clip(alpha, 0.0, 1.0)[idx]
    power = np.where(up[idx], was + alpha * (hi - was), was - alpha * (was - lo))
    return Steering(power, lo, hi, ok)


def _least_cost(
    want: Array,
    lo: Array,
    hi: Array,
    weight: Array,
    idx: NDArray[np.intp],
    planned: NDArray[np.bool_],
    m: int,
    iterations: int = 50,
) -> Array:
    """Share each cohort's power ``want`` over its vehicles at least cost (minimise
    Σ weight·p²/2 within [lo, hi]), as allocation.allocate_cost does for the fleet: one
    water level per cohort, found by bisection for all cohorts at once."""
    w = np.maximum(weight, 1e-9)
    lo_p, hi_p = np.where(planned, lo, 0.0), np.where(planned, hi, 0.0)
    goal = np.clip(
        want,
        np.bincount(idx, weights=lo_p, minlength=m),
        np.bincount(idx, weights=hi_p, minlength=m),
    )
    a = np.full(m, np.inf)
    b = np.full(m, -np.inf)
    np.minimum.at(a, idx, lo_p * w)
    np.maximum.at(b, idx, hi_p * w)
    for _ in range(iterations):
        mid = 0.5 * (a + b)
        got = np.bincount(idx, weights=np.clip(mid[idx] / w, lo_p, hi_p), minlength=m)
        low = got < goal
        a = np.where(low, mid, a)
        b = np.where(low, b, mid)
    power: Array = np.clip(0.5 * (a + b)[idx] / w, lo_p, hi_p)
    return power


def _first_step(u: Units, power_kw: float, was: Array) -> tuple[Array, bool]:
    """Each unit's net power in step 0 of a plan holding ``power_kw`` in every step
    someone is present (or, if none holds, of the closest plan): the plan that moves
    least from ``was`` (each unit's power now) in step 0, then cycles least."""
    k_steps = u.steps
    pr = _programme(u)
    v = pr.size
    if v == 0:
        return np.zeros(u.size), True
    h = u.step_s / 3600.0
    live = np.bincount(pr.ki, minlength=k_steps) > 0
    # Step 0's move from ``was``, as slack pairs: (x - y) - up + down = was.
    at0 = np.flatnonzero(pr.ki == 0)
    z = at0.shape[0]
    width = 3 * v + 2 * z
    r = np.arange(z)
    moves = sp.csr_matrix(
        (
            np.concatenate([np.ones(z), -np.ones(z), -np.ones(z), np.ones(z)]),
            (np.tile(r, 4), np.concatenate([at0, v + at0, 3 * v + r, 3 * v + z + r])),
        ),
        shape=(z, width),
    )
    sums = pr.fleet_sum(k_steps, width)[np.flatnonzero(live)]
    dyn = sp.hstack([pr.dynamics, sp.csr_matrix((v, 2 * z))])
    a_eq = sp.vstack([dyn, sums, moves]).tocsr()
    lower = np.concatenate([pr.lower, np.zeros(2 * z)])
    upper = np.concatenate([pr.upper, np.full(2 * z, np.inf)])
    cost = np.concatenate([np.full(2 * v, h), np.zeros(v), np.full(2 * z, STICKY)])
    # Cars charging flat out until they leave part-way through a step are all there now:
    # in step 0 the others make room for their whole power. Later, as the envelope
    # counts them (whole toward the least import, not at all toward the most), the
    # first of the two that holds.
    after = np.zeros(k_steps)
    after[0] = u.load_full[0]
    res = None
    for load in (u.load_full, after):
        b_eq = np.concatenate([pr.rhs, power_kw - load[live], was[pr.ui[at0]]])
        res = _linprog(cost, a_eq, b_eq, lower, upper)
        if res.status == 0:
            break
    ok = res is not None and res.status == 0
    x: Array = res.x if res is not None and ok else _closest_plan(u, pr)
    net = x[:v] - x[v : 2 * v]
    at0 = pr.ki == 0
    out = np.zeros(u.size)
    out[pr.ui[at0]] = net[at0]
    return out, bool(ok)
