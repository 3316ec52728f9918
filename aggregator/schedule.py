"""Multi-interval scheduling of energy services over a horizon (e.g. 24 h in 15-min steps),
as a linear programme solved by HiGHS (through scipy).

An LP over every vehicle and every interval does not fit a control loop (PERF-NOTES), so
vehicles are pooled into **cohorts** by the interval they leave in. A cohort has the sum of
its vehicles' energy, capacity and charger limits, and a floor trajectory: the sum, at
every interval boundary, of its vehicles' driver floors E_min(τ) (DESIGN.md), each capped
at what charging flat out from now can reach, so a car that arrived low keeps the
programme feasible by charging. The floors of one cohort rise by at most what its
chargers can add in an interval, so staying above them at every boundary is enough to
reach every target at departure. Pooling relaxes one thing: within a cohort, one car's
headroom can cover another's; the live dispatcher splits each step's fleet power across
the real vehicles and corrects what that costs.

Requests are **blocks** of fleet net power over whole intervals. Blocks already accepted
are reserved: hard equalities, so a new request can never take their energy. A new
block is soft: the programme minimises its shortfall (kWh), then energy cycled (a small
throughput cost per kWh, the degradation proxy). Admission reads the answer per interval.

Services that follow a signal (regulation, containment) hold **headroom** rather than a
power: in the intervals they cover, the fleet power must stay far enough inside the
cohorts' charger limits to move by their capacity both ways.

Only vehicles plugged in now are planned (causal: announced departures, no arrivals), so
the plan is conservative about the future.

The intervals need not be equal: :func:`grid` puts the bounds on the quarter hours markets
settle on and on each request's own start and end, so a request for 10:07-10:37 is
planned as 10:07-10:15, 10:15-10:30, 10:30-10:37.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import linprog

from core.physics import Array, Batteries, energy_floor

THROUGHPUT_COST = 1e-3  # per kWh cycled, against 1 per kWh of shortfall
TOL_KWH = 1e-6
# Bounds closer than this (s) are one bound: no interval of a few microseconds.
BOUND_TOL_S = 1e-3


def grid(t0: float, t_end: float, *, step_s: float = 900.0, cuts: Iterable[float] = ()) -> Array:
    """Interval bounds from ``t0`` to ``t_end`` (epoch s): on the clock's multiples of
    ``step_s`` (900: the quarter hours markets settle on) and at each of ``cuts`` (the
    requests' own starts and ends) that falls inside."""
    if not t_end > t0 or step_s <= 0:
        raise ValueError(f"need t_end > t0 and step_s > 0, got {t0}, {t_end}, {step_s}")
    first = math.floor(t0 / step_s) * step_s + step_s
    inside = [c for c in cuts if t0 < c < t_end]
    pts = np.unique(np.concatenate([[t0], np.arange(first, t_end, step_s), inside]))
    kept = [t0]
    for p in pts[1:].tolist():
        if p - kept[-1] > BOUND_TOL_S and t_end - p > BOUND_TOL_S:
            kept.append(p)
    kept.append(t_end)
    return np.asarray(kept, dtype=np.float64)


def index_of(bounds: Array, t: float) -> int:
    """The index of the bound at ``t`` (or the first after it)."""
    return int(np.searchsorted(bounds, t - BOUND_TOL_S))


@dataclass(frozen=True, slots=True)
class Cohorts:
    """Vehicles pooled by the interval they leave in; energies in kWh, powers in kW."""

    t0: float
    step_s: float  # the nominal interval; bounds has the real ones
    horizon: int  # intervals planned
    leave: NDArray[np.intp]  # (m,) first interval the cohort is gone for (horizon: stays)
    energy: Array  # (m,) now
    capacity: Array
    charge_kw: Array
    discharge_kw: Array
    eta_ch: Array  # the cohort's efficiencies, weighted by charger power
    eta_dis: Array
    floor: Array  # (m, horizon + 1): the least energy at each boundary (nan once gone)
    vehicles: NDArray[np.intp]
    bounds: Array  # (horizon + 1,) epoch s of the interval bounds, t0 first

    @property
    def size(self) -> int:
        return int(self.leave.shape[0])

    @property
    def hours(self) -> Array:
        """(horizon,) each interval's length in hours."""
        h: Array = np.diff(self.bounds) / 3600.0
        return h


@dataclass(frozen=True, slots=True)
class Block:
    """Fleet net power ``power_kw`` (+ import) held over intervals [start, end)."""

    start: int
    end: int
    power_kw: float

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end) or not math.isfinite(self.power_kw):
            raise ValueError(f"a block needs 0 <= start < end and a finite power: {self}")


@dataclass(frozen=True, slots=True)
class Plan:
    power_kw: Array  # (horizon,) fleet net power of the plan
    charge_kw: Array  # (m, horizon) per cohort
    discharge_kw: Array
    energy: Array  # (m, horizon + 1) per cohort, nan once gone
    reserved_ok: bool  # every reserved block is met
    shortfall_kwh: float  # of the new block (0 without one)
    cycled_kwh: float  # charge plus discharge energy over the horizon
    solve_s: float

    def deliverable_kw(self, block: Block) -> Array:
        """What the plan delivers of ``block`` in each of its intervals."""
        return self.power_kw[block.start : block.end].copy()


def cohorts(
    bat: Batteries,
    energy: Array,
    departure: Array,
    t0: float,
    *,
    step_s: float = 900.0,
    horizon: int = 96,
    bounds: Array | None = None,
) -> Cohorts:
    """Pool the vehicles plugged in now (dense arrays, as in a FleetView), on ``horizon``
    intervals of ``step_s`` from ``t0``, or on the intervals between ``bounds`` (from
    :func:`grid`; ``bounds[0]`` is ``t0``)."""
    if bounds is None:
        if step_s <= 0 or horizon <= 0:
            raise ValueError(f"need step_s > 0 and horizon > 0, got {step_s}, {horizon}")
        bounds = t0 + step_s * np.arange(horizon + 1, dtype=np.float64)
    else:
        bounds = np.asarray(bounds, dtype=np.float64)
        horizon = bounds.shape[0] - 1
        if horizon <= 0 or not np.all(np.diff(bounds) > 0) or bounds[0] != t0:
            raise ValueError("bounds must rise from t0, with at least one interval")
    n = energy.shape[0]
    # The first interval a vehicle is gone for: the one its departure falls in.
    gone = np.clip(np.searchsorted(bounds, np.nan_to_num(departure), side="right") - 1, 0, horizon)
    leave = np.where(np.isnan(departure), horizon, gone)
    key, idx = np.unique(leave.astype(np.intp), return_inverse=True)
    m = key.shape[0]

    def total(x: Array) -> Array:
        out: Array = np.bincount(idx, weights=x, minlength=m).astype(np.float64)
        return out

    cap = total(bat.capacity_kwh)
    ch, dis = total(bat.max_charge_kw), total(bat.max_discharge_kw)
    safe_ch = np.maximum(ch, 1e-12)  # a cohort that cannot charge gets efficiency 1
    floor = np.full((m, horizon + 1), np.nan)
    reach_rate = bat.max_charge_kw * bat.charge_efficiency / 3600.0
    for b in range(horizon + 1):
        tau = float(bounds[b])
        # Capped at what flat-out charging reaches: a car under its floor only charges.
        f = np.minimum(
            energy_floor(bat, departure, tau),
            np.minimum(energy + reach_rate * (tau - t0), bat.capacity_kwh),
        )
        col = total(np.maximum(f, 0.0)) if n else np.zeros(m)
        floor[:, b] = np.where(b <= key, col, np.nan)
    return Cohorts(
        t0=t0,
        step_s=step_s,
        horizon=horizon,
        leave=key,
        energy=total(energy),
        capacity=cap,
        charge_kw=ch,
        discharge_kw=dis,
        # Weighted by charger power, so that the cohort flat out stores (and, harmonic for
        # discharge, takes) exactly what its vehicles flat out would.
        eta_ch=np.where(ch > 0, total(bat.max_charge_kw * bat.charge_efficiency) / safe_ch, 1.0),
        eta_dis=np.where(
            dis > 0,
            dis / np.maximum(total(bat.max_discharge_kw / bat.discharge_efficiency), 1e-12),
            1.0,
        ),
        floor=floor,
        vehicles=np.bincount(idx, minlength=m).astype(np.intp),
        bounds=bounds,
    )


def _check_blocks(c: Cohorts, blocks: Sequence[Block]) -> None:
    taken = np.zeros(c.horizon, dtype=bool)
    for b in blocks:
        if b.end > c.horizon:
            raise ValueError(f"{b} ends after the horizon of {c.horizon} intervals")
        if taken[b.start : b.end].any():
            raise ValueError(f"{b} overlaps another block: one fleet power per interval")
        taken[b.start : b.end] = True


def plan(
    c: Cohorts,
    reserved: Sequence[Block] = (),
    new: Block | None = None,
    *,
    swing_kw: Array | None = None,
    throughput_cost: float = THROUGHPUT_COST,
) -> Plan:
    """Solve the schedule: reserved blocks met exactly, the new one as closely as the
    fleet allows, then the least energy cycled. ``swing_kw`` (per interval) is headroom
    held both ways for signal services. If even the reserved blocks cannot all be met
    any more (the fleet changed), they are solved as soft too, weighing far more than
    the new one, and ``reserved_ok`` is False; headroom is dropped last."""
    _check_blocks(c, [*reserved, *([new] if new else [])])
    swing = None if swing_kw is None or not np.any(swing_kw > 0) else swing_kw
    out = _solve(c, reserved, new, throughput_cost, hard=True, swing=swing)
    if out is None:
        out = _solve(c, reserved, new, throughput_cost, hard=False, swing=swing)
    if out is None and swing is not None:
        out = _solve(c, reserved, new, throughput_cost, hard=False, swing=None)
    if out is None:  # pragma: no cover - with every block soft the LP is always feasible
        raise RuntimeError("the schedule LP failed even with every block soft")
    return out


RESERVED_WEIGHT = 1e3  # a reserved block's shortfall against the new one's, when soft


def _solve(
    c: Cohorts,
    reserved: Sequence[Block],
    new: Block | None,
    throughput_cost: float,
    *,
    hard: bool,
    swing: Array | None = None,
) -> Plan | None:
    t_start = time.perf_counter()
    m, hz = c.size, c.horizon
    hours = c.hours
    ci, ti = np.nonzero(np.arange(hz)[None, :] < c.leave[:, None])  # cohort c acts in t
    k = ci.shape[0]
    # Variables: charge x [0, k), discharge y [k, 2k), energy after the interval e
    # [2k, 3k) (in cohort, interval order), then a slack pair per soft block interval.
    rows = np.arange(k)
    first = ti == 0
    later = np.flatnonzero(~first)
    # e_j - e_(j-1) - eta_ch h x_j + h / eta_dis y_j = E_now (first interval) or 0
    r_idx = [rows, rows, rows, later]
    c_idx = [2 * k + rows, rows, k + rows, 2 * k + later - 1]
    hv = hours[ti]  # each variable's interval, in hours
    vals = [np.ones(k), -c.eta_ch[ci] * hv, hv / c.eta_dis[ci], -np.ones(later.shape[0])]
    b_eq = [np.where(first, c.energy[ci], 0.0)]
    targets: list[tuple[int, float, float]] = []  # (interval, kW, slack weight; 0 = hard)
    for blk in reserved:
        w = 0.0 if hard else RESERVED_WEIGHT
        targets += [(t, blk.power_kw, w) for t in range(blk.start, blk.end)]
    if new is not None:
        targets += [(t, new.power_kw, 1.0) for t in range(new.start, new.end)]
    n_slack = 2 * sum(1 for _, _, w in targets if w > 0)
    cost = np.zeros(3 * k + n_slack)
    cost[:k] = cost[k : 2 * k] = throughput_cost * hv
    col = 3 * k
    for i, (t, kw, w) in enumerate(targets):
        js = np.flatnonzero(ti == t)
        row = k + i
        r_idx += [np.full(2 * js.shape[0], row)]
        c_idx += [np.concatenate([js, k + js])]
        vals += [np.concatenate([np.ones(js.shape[0]), -np.ones(js.shape[0])])]
        if w > 0:  # fleet power - s+ + s- = target
            r_idx += [np.array([row, row])]
            c_idx += [np.array([col, col + 1])]
            vals += [np.array([-1.0, 1.0])]
            cost[col : col + 2] = w * hours[t]  # kWh of shortfall, weighted
            col += 2
        b_eq.append(np.array([kw]))
    a_eq = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))),
        shape=(k + len(targets), cost.shape[0]),
    )
    lb = np.concatenate([np.zeros(2 * k), c.floor[ci, ti + 1], np.zeros(n_slack)])
    ub = np.concatenate(
        [c.charge_kw[ci], c.discharge_kw[ci], c.capacity[ci], np.full(n_slack, np.inf)]
    )
    lb = np.minimum(lb, ub)  # a floor a hair above capacity must not make it infeasible
    a_ub, b_ub = None, None
    if swing is not None:
        # Headroom both ways in interval t: sum(x - y) <= sum(charge_kw) - swing, and
        # sum(y - x) <= sum(discharge_kw) - swing, over the cohorts still there.
        ts = np.flatnonzero(swing[:hz] > 0)
        r_ub: list[NDArray[np.int64]] = []
        c_ub: list[NDArray[np.int64]] = []
        v_ub: list[Array] = []
        b_list: list[float] = []
        for i, it in enumerate(ts.tolist()):
            js = np.flatnonzero(ti == it)
            for sign, limit in ((1.0, c.charge_kw), (-1.0, c.discharge_kw)):
                row = 2 * i + (0 if sign > 0 else 1)
                r_ub += [np.full(2 * js.shape[0], row)]
                c_ub += [np.concatenate([js, k + js])]
                v_ub += [np.concatenate([np.full(js.shape[0], sign), np.full(js.shape[0], -sign)])]
                b_list.append(float(limit[ci[js]].sum()) - float(swing[it]))
        if ts.size:
            a_ub = sp.csr_matrix(
                (np.concatenate(v_ub), (np.concatenate(r_ub), np.concatenate(c_ub))),
                shape=(2 * ts.shape[0], cost.shape[0]),
            )
            b_ub = np.array(b_list)
    res = linprog(  # type: ignore[call-overload]  # the stubs know no sparse A_eq
        cost,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=np.concatenate(b_eq),
        bounds=np.column_stack([lb, ub]),
        method="highs",
    )
    if res.status != 0:
        return None
    x = res.x
    charge = np.zeros((m, hz))
    dis = np.zeros((m, hz))
    charge[ci, ti] = x[:k]
    dis[ci, ti] = x[k : 2 * k]
    energy = np.full((m, hz + 1), np.nan)
    energy[:, 0] = c.energy
    energy[ci, ti + 1] = x[2 * k : 3 * k]
    power = charge.sum(axis=0) - dis.sum(axis=0)
    short = 0.0
    if new is not None:
        miss = np.abs(power[new.start : new.end] - new.power_kw)
        short = float((miss * hours[new.start : new.end]).sum())
    return Plan(
        power_kw=power,
        charge_kw=charge,
        discharge_kw=dis,
        energy=energy,
        reserved_ok=hard or not reserved,
        shortfall_kwh=short,
        cycled_kwh=float(((charge + dis) * hours).sum()),
        solve_s=time.perf_counter() - t_start,
    )


def proportional(c: Cohorts, blocks: Sequence[Block]) -> Plan:
    """The fast path, interval by interval with no look-ahead: each block's power split
    across cohorts in proportion to the headroom they have in that interval (staying
    above the next floor, below full); outside blocks every cohort holds its least
    power (charging only what its floor demands). A reference for the LP."""
    _check_blocks(c, blocks)
    t_start = time.perf_counter()
    m, hz = c.size, c.horizon
    hours = c.hours
    target = np.full(hz, np.nan)
    for b in blocks:
        target[b.start : b.end] = b.power_kw
    e = c.energy.copy()
    energy = np.full((m, hz + 1), np.nan)
    energy[:, 0] = e
    charge = np.zeros((m, hz))
    dis = np.zeros((m, hz))
    short = 0.0
    for t in range(hz):
        h = float(hours[t])
        here = t < c.leave
        nxt = np.nan_to_num(c.floor[:, t + 1], nan=0.0)
        # Net power range over the interval from the energy bounds at its end.
        spare = e - nxt
        lo = np.where(
            spare >= 0,
            -np.minimum(c.discharge_kw, spare * c.eta_dis / h),
            np.minimum(c.charge_kw, -spare / (c.eta_ch * h)),
        )
        hi = np.maximum(lo, np.minimum(c.charge_kw, (c.capacity - e) / (c.eta_ch * h)))
        lo, hi = np.where(here, lo, 0.0), np.where(here, hi, 0.0)
        p = lo.copy()
        if not math.isnan(target[t]):
            want = target[t]
            base = lo.sum()
            room = hi - lo
            total = room.sum()
            share = 0.0 if total <= 0 else min(1.0, max(0.0, (want - base) / total))
            p = lo + share * room
            short += abs(float(p.sum()) - want) * h
        charge[:, t] = np.maximum(p, 0.0)
        dis[:, t] = np.maximum(-p, 0.0)
        e = np.where(here, e + charge[:, t] * c.eta_ch * h - dis[:, t] / c.eta_dis * h, e)
        energy[:, t + 1] = np.where(t + 1 <= c.leave, e, np.nan)
    return Plan(
        power_kw=charge.sum(axis=0) - dis.sum(axis=0),
        charge_kw=charge,
        discharge_kw=dis,
        energy=energy,
        reserved_ok=True,
        shortfall_kwh=short,
        cycled_kwh=float(((charge + dis) * hours).sum()),
        solve_s=time.perf_counter() - t_start,
    )
