"""The grid under a simulated fleet: nested limits at every step, and what each node saw.

A scenario with ``grid:`` puts its fleet under a topology (aggregator/grid.py), spread
over its nodes by ``fleet.nodes``. At each step, once the vehicles have taken their
setpoints (requests and plain charging alike), :class:`GridStep` applies
``allocate_nested`` with the meters and limits in force and records, per node, its
vehicles' power, its meter, its limits, how far it is over them and its conflicts (cars
held below their floor by a limit). With ``enforce=False`` it only records: the same
fleet on plain charging without the platform, for comparison.

Meters per node come from a CSV (``time_s,node,power_kw``, s from the scenario start,
each row held until the next one for that node) and from built-in solar profiles
(``pv:``, v2g/solar.py), summed where both name a node; a node without one counts its
children's (grid_limits.meters_in_force).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agents.fleet import SimFleet
from aggregator.grid import GridError, GridTopology, load_grid, parse_grid
from aggregator.grid_alloc import allocate_nested, firming_band, subtree_sums
from aggregator.grid_limits import DynamicLimits, limits_in_force, meters_in_force
from core.physics import Array
from v2g.powerflow import Feeder, FlowSeries, load_network, run_flows
from v2g.scenario import PowerflowSpec, Scenario, ScenarioError
from v2g.simcore import Simulation
from v2g.solar import pv_ac_kw

Floats = NDArray[np.float64]
Ints = NDArray[np.intp]


def resolve_grid(scenario: Scenario) -> GridTopology:
    """The scenario's grid, every node it names checked against it."""
    spec = scenario.grid
    if spec is None:
        raise ScenarioError("this scenario has no grid:")
    try:
        grid = load_grid(Path(spec)) if isinstance(spec, str) else parse_grid(spec, "grid")
    except GridError as err:
        raise ScenarioError(f"grid: {err}") from None
    named = [("fleet.nodes", n) for n in scenario.fleet.nodes]
    named += [(f"pv.{k}.node", p.node) for k, p in enumerate(scenario.pv)]
    named += [(f"limits.{k}.node", x.node) for k, x in enumerate(scenario.limits)]
    named += [(f"firming.{k}.node", x.node) for k, x in enumerate(scenario.firming)]
    if scenario.powerflow is not None:
        named += [("powerflow.buses", n) for n in scenario.powerflow.buses]
    for where, node in named:
        if node not in grid.index:
            raise ScenarioError(
                f"{where}: node {node!r} is not in the grid (nodes: {', '.join(grid.ids)})"
            )
    if scenario.fleet.nodes and sum(scenario.fleet.nodes.values()) <= 0.0:
        raise ScenarioError("fleet.nodes: needs at least one node with a share > 0")
    return grid


def vehicle_nodes(scenario: Scenario, grid: GridTopology, n: int) -> Ints:
    """Each vehicle's node: consecutive blocks in proportion to ``fleet.nodes`` (the
    fleet's vehicles are drawn at random already, so blocks are a fair and exact split);
    no spread: all under the root."""
    shares = scenario.fleet.nodes
    if not shares:
        return np.zeros(n, dtype=np.intp)
    idx = np.array([grid.index[k] for k in shares], dtype=np.intp)
    w = np.array(list(shares.values()), dtype=np.float64)
    cuts = np.rint(np.cumsum(w) / w.sum() * n).astype(np.intp)
    return np.asarray(np.repeat(idx, np.diff(np.concatenate(([0], cuts)))), dtype=np.intp)


def read_meter_csv(path: Path, grid: GridTopology, t0: float, times: Array) -> Floats:
    """Own meters per step and node from ``time_s,node,power_kw`` (NaN: none yet)."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise ScenarioError(f"meters: cannot read {path}: {err.strerror or err}") from None
    need = {"time_s", "node", "power_kw"}
    if not rows or not need <= set(rows[0]):
        raise ScenarioError(f"meters: {path} needs a header time_s,node,power_kw and rows")
    by_node: dict[int, list[tuple[float, float]]] = {}
    for line, row in enumerate(rows, start=2):
        node = row["node"]
        if node not in grid.index:
            raise ScenarioError(f"meters: {path} line {line}: node {node!r} is not in the grid")
        try:
            at, kw = float(row["time_s"]), float(row["power_kw"])
        except ValueError as err:
            raise ScenarioError(f"meters: {path} line {line}: {err}") from None
        if not (np.isfinite(at) and np.isfinite(kw)):
            raise ScenarioError(f"meters: {path} line {line}: time_s and power_kw must be finite")
        by_node.setdefault(grid.index[node], []).append((t0 + at, kw))
    out = np.full((times.shape[0], len(grid)), np.nan)
    for j, pts in by_node.items():
        pts.sort()
        at_arr = np.array([p[0] for p in pts])
        kw_arr = np.array([p[1] for p in pts])
        k = np.searchsorted(at_arr, times + 1e-9, side="right") - 1
        out[:, j] = np.where(k >= 0, kw_arr[np.maximum(k, 0)], np.nan)
    return out


def own_meters(scenario: Scenario, grid: GridTopology, times: Array) -> Floats:
    """Each node's own meter at each step (steps x nodes; NaN: none), CSV plus solar."""
    own = np.full((times.shape[0], len(grid)), np.nan)
    if scenario.meters is not None:
        own = read_meter_csv(Path(scenario.meters), grid, scenario.t0, times)
    for pv in scenario.pv:
        j = grid.index[pv.node]
        kw = pv.load_kw - pv_ac_kw(
            times, pv.ac_kw, tilt_deg=pv.tilt_deg, azimuth_deg=pv.azimuth_deg
        )
        own[:, j] = np.where(np.isnan(own[:, j]), 0.0, own[:, j]) + kw
    return own


def dynamic_limits(scenario: Scenario, grid: GridTopology) -> DynamicLimits:
    """The scenario's ``limits:`` as the aggregator keeps dynamic limits (no safe values:
    outside its intervals a node has its static limits)."""
    n = len(grid)
    lims = scenario.limits
    start = np.array([scenario.at(x.start) for x in lims], dtype=np.float64)
    return DynamicLimits(
        node=np.array([grid.index[x.node] for x in lims], dtype=np.intp),
        start=start,
        end=start + np.array([x.duration for x in lims], dtype=np.float64),
        import_kw=np.array(
            [np.inf if x.import_kw is None else x.import_kw for x in lims], dtype=np.float64
        ),
        export_kw=np.array(
            [np.inf if x.export_kw is None else x.export_kw for x in lims], dtype=np.float64
        ),
        has_message=np.zeros(n, dtype=np.bool_),
        safe_import_kw=np.full(n, np.inf),
        safe_export_kw=np.full(n, np.inf),
    )


@dataclass(slots=True)
class NodeSeries:
    """Per step (rows) and node (columns): what each node saw."""

    node_kw: Floats  # its vehicles' net power, whole subtree
    own_kw: Floats  # the vehicles directly under it
    meter_kw: Floats  # meter in force (NaN: none)
    own_meter_kw: Floats  # its own meter minus its children's in force (for the buses)
    import_kw: Floats  # limits in force (inf: none)
    export_kw: Floats
    over_kw: Floats  # beyond a limit (>= 0)
    conflicts: NDArray[np.int64]  # vehicles under it held below their floor
    vehicles: NDArray[np.int64]  # plugged-in vehicles under it
    conflict_rows: set[int] = field(default_factory=set)

    @property
    def net_kw(self) -> Floats:
        """Meter + vehicles (a missing meter counts 0)."""
        return np.asarray(np.nan_to_num(self.meter_kw, nan=0.0) + self.node_kw)


class GridStep:
    """The per-step hook of :class:`v2g.simcore.Simulation` (``on_power``): nested limits
    on the power the vehicles took, and the record of every node."""

    def __init__(
        self,
        grid: GridTopology,
        vehicle_node: Ints,
        own_meter: Floats,
        dynamic: DynamicLimits,
        *,
        enforce: bool = True,
        firming: list[Firming] | None = None,
        step_s: float = 900.0,
    ) -> None:
        steps, n = own_meter.shape
        self.firming = firming or []
        self.step_s = step_s
        self.grid = grid
        self.vehicle_node = vehicle_node
        self.dynamic = dynamic
        self.enforce = enforce
        meter = np.full((steps, n), np.nan)
        for i in range(steps):  # steps, not vehicles: a walk up a small tree each
            at = np.where(np.isnan(own_meter[i]), np.nan, 0.0)
            meter[i] = meters_in_force(grid, own_meter[i], at, 0.0, np.inf)[0]
        # What each node's own meter adds beyond its children's (0 where it has none).
        child_sum = np.zeros((steps, n))
        kids = np.flatnonzero(grid.parent >= 0)
        np.add.at(child_sum.T, grid.parent[kids], np.nan_to_num(meter[:, kids], nan=0.0).T)
        own_part = np.where(np.isnan(own_meter), 0.0, np.nan_to_num(meter, nan=0.0) - child_sum)
        z = np.zeros((steps, n))
        self.series = NodeSeries(
            node_kw=z.copy(),
            own_kw=z.copy(),
            meter_kw=meter,
            own_meter_kw=own_part,
            import_kw=np.full((steps, n), np.inf),
            export_kw=np.full((steps, n), np.inf),
            over_kw=z.copy(),
            conflicts=np.zeros((steps, n), np.int64),
            vehicles=np.zeros((steps, n), np.int64),
        )

    def __call__(
        self, i: int, now: float, fleet: SimFleet, rows: Ints, p_lo: Array, p_hi: Array
    ) -> None:
        s, grid = self.series, self.grid
        vn = self.vehicle_node[rows]
        imp, exp = limits_in_force(grid, self.dynamic, now)
        meter = s.meter_kw[i]
        power = fleet.power[rows]
        if self.enforce and rows.shape[0]:
            band_lo, band_hi = self._bands(i, now)
            alloc = allocate_nested(
                grid,
                vn,
                p_lo,
                p_hi,
                power,
                meter,
                imp,
                exp,
                band_low_kw=band_lo,
                band_high_kw=band_hi,
            )
            power = alloc.power_kw
            fleet.power[rows] = power
            if alloc.conflicts.any():
                s.conflicts[i] = subtree_sums(grid, vn, alloc.conflicts.astype(np.float64))
                s.conflict_rows.update(rows[alloc.conflicts].tolist())
        s.node_kw[i] = subtree_sums(grid, vn, power)
        s.own_kw[i] = np.bincount(vn, weights=power, minlength=len(grid))
        s.vehicles[i] = np.rint(subtree_sums(grid, vn, np.ones(vn.shape[0]))).astype(np.int64)
        s.import_kw[i], s.export_kw[i] = imp, exp
        net = np.nan_to_num(meter, nan=0.0) + s.node_kw[i]
        s.over_kw[i] = np.maximum(0.0, np.maximum(net - imp, -exp - net))

    def _bands(self, i: int, now: float) -> tuple[Floats | None, Floats | None]:
        """The firming bands on each node's net power for step ``i`` (None: no service)."""
        live = [f for f in self.firming if f.start <= now + 1e-9 and now < f.end - 1e-9]
        if not live:
            return None, None
        n = len(self.grid)
        lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
        s = self.series
        for f in live:  # services, a handful: not vehicles
            j = f.node
            last = (
                float(np.nan_to_num(s.meter_kw[i - 1, j], nan=0.0) + s.node_kw[i - 1, j])
                if i and f.start < now - 1e-9
                else np.nan
            )
            b_lo, b_hi = firming_band(f.min_kw, f.max_kw, f.ramp_kw_per_min, last, self.step_s)
            lo[f.node], hi[f.node] = max(lo[f.node], b_lo), min(hi[f.node], b_hi)
        return lo, hi


@dataclass(frozen=True, slots=True)
class Firming:
    """A firming service compiled for the run: node index, epoch window, band, ramp."""

    node: int
    start: float
    end: float
    min_kw: float | None
    max_kw: float | None
    ramp_kw_per_min: float | None


def firming_of(scenario: Scenario, grid: GridTopology) -> list[Firming]:
    """The scenario's ``firming:`` services, compiled."""
    out = []
    for f in scenario.firming:
        start = scenario.at(f.start)
        out.append(
            Firming(
                grid.index[f.node], start, start + f.duration, f.min_kw, f.max_kw, f.ramp_kw_per_min
            )
        )
    return out


def firming_scores(f: Firming, net_kw: Floats, t: Array, step_s: float) -> dict[str, Any]:
    """One service scored on a node's net power series: the energy outside [min_kw,
    max_kw] (kWh), and the steps whose change from the last one is over the ramp limit
    (by more than 1% of it or 0.1 kW/min), inside its window."""
    inside = (t >= f.start - 1e-9) & (t < f.end - 1e-9)
    net = net_kw[:, f.node]
    lo = -np.inf if f.min_kw is None else f.min_kw
    hi = np.inf if f.max_kw is None else f.max_kw
    outside = np.maximum(0.0, np.maximum(net - hi, lo - net))[inside]
    out: dict[str, Any] = {"outside_band_kwh": round(float(outside.sum() * step_s / 3600.0), 3)}
    if f.ramp_kw_per_min is not None:
        rate = np.abs(np.diff(net)) / (step_s / 60.0)  # into step k+1, from step k
        judged = inside[1:] & inside[:-1]
        tol = max(0.01 * f.ramp_kw_per_min, 0.1)
        out["ramp_violations"] = int((rate[judged] > f.ramp_kw_per_min + tol).sum())
        out["max_ramp_kw_per_min"] = round(float(rate[judged].max()), 3) if judged.any() else 0.0
    return out


def tolerance_kw(limit_kw: Floats) -> Floats:
    """Issue 11's tolerance on a limit: 1% of it or 1 kW, whichever is larger."""
    return np.maximum(0.01 * np.where(np.isfinite(limit_kw), limit_kw, 0.0), 1.0)


def violations(series: NodeSeries, net_kw: Floats, step_s: float) -> dict[str, Floats]:
    """Per node: steps beyond a limit (past the tolerance), and the energy beyond it (kWh,
    all of it, tolerance included), split by import and export."""
    h = step_s / 3600.0
    over_imp = np.maximum(0.0, net_kw - series.import_kw)
    over_exp = np.maximum(0.0, -series.export_kw - net_kw)
    return {
        "import_steps": (over_imp > tolerance_kw(series.import_kw)).sum(axis=0),
        "import_kwh": over_imp.sum(axis=0) * h,
        "export_steps": (over_exp > tolerance_kw(series.export_kw)).sum(axis=0),
        "export_kwh": over_exp.sum(axis=0) * h,
    }


# -- the run beside the platform's: plain charging, no limits ------------------------------


@dataclass(slots=True)
class GridRun:
    """What the grid saw with the platform and with the same fleet on plain charging."""

    grid: GridTopology
    step_s: float
    platform: NodeSeries
    plain: NodeSeries
    flows: dict[str, FlowSeries] = field(default_factory=dict)  # "platform", "plain"
    firming: list[Firming] = field(default_factory=list)
    t: Array = field(default_factory=lambda: np.zeros(0))


def make_step(scenario: Scenario, n_vehicles: int, *, enforce: bool) -> GridStep:
    """The hook for a run of ``scenario`` over ``n_vehicles``."""
    grid = resolve_grid(scenario)
    times = scenario.t0 + scenario.step_s * np.arange(scenario.n_steps, dtype=np.float64)
    return GridStep(
        grid,
        vehicle_nodes(scenario, grid, n_vehicles),
        own_meters(scenario, grid, times),
        dynamic_limits(scenario, grid),
        enforce=enforce,
        firming=firming_of(scenario, grid),
        step_s=scenario.step_s,
    )


def plain_run(sim: Simulation, scenario: Scenario) -> GridStep:
    """The same fleet and clock on plain charging (no requests, no limits), recorded."""
    hook = make_step(scenario, len(sim.profile.ids), enforce=False)
    Simulation(
        sim.profile, start=sim.start, step_s=sim.step_s, steps=sim.steps, on_power=hook
    ).run()
    return hook


def injections(s: NodeSeries) -> Floats:
    """Per step and node, the power the node itself puts on its bus (+ import): its own
    meter beyond its children's, and its own vehicles."""
    return np.asarray(s.own_meter_kw + s.own_kw)


def attach_flows(run: GridRun, scenario: Scenario, every: int) -> None:
    """Power flows on the scenario's network, for both runs (each on a fresh copy)."""
    spec = scenario.powerflow or PowerflowSpec()
    both = {"platform": injections(run.platform), "plain": injections(run.plain)}
    active = [
        int(j) for j in np.flatnonzero(np.any([np.any(v != 0.0, 0) for v in both.values()], 0))
    ]
    for key, kw in both.items():
        feeder = Feeder(
            load_network(spec.network), run.grid, active, spec.buses, keep_loads=spec.keep_loads
        )
        run.flows[key] = run_flows(feeder, kw, every)


def _kw(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 3)


def grid_summary(run: GridRun) -> dict[str, Any]:
    """Limits held (violations, count and kWh, with the platform and without), the
    curtailment avoided at each export-limited node, conflicts, and the power flows."""
    grid, h = run.grid, run.step_s / 3600.0
    plat, plain = run.platform, run.plain
    v_plat = violations(plat, plat.net_kw, run.step_s)
    v_plain = violations(plat, plain.net_kw, run.step_s)  # judged on the same limits
    meter = np.nan_to_num(plat.meter_kw, nan=0.0)
    v_none = violations(plat, meter, run.step_s)

    def totals(v: dict[str, Floats]) -> dict[str, Any]:
        return {
            "violations": int(v["import_steps"].sum() + v["export_steps"].sum()),
            "violation_kwh": round(float(v["import_kwh"].sum() + v["export_kwh"].sum()), 3),
            "import_violations": int(v["import_steps"].sum()),
            "export_violations": int(v["export_steps"].sum()),
        }

    nodes = []
    curtail = []
    for j, nid in enumerate(grid.ids):
        nodes.append(
            {
                "node": nid,
                "kind": grid.kinds[j],
                "import_limit_kw": _kw(grid.import_kw[j]),
                "export_limit_kw": _kw(grid.export_kw[j]),
                "max_net_kw": {
                    "platform": round(float(plat.net_kw[:, j].max()), 3),
                    "plain_charging": round(float(plain.net_kw[:, j].max()), 3),
                },
                "min_net_kw": {
                    "platform": round(float(plat.net_kw[:, j].min()), 3),
                    "plain_charging": round(float(plain.net_kw[:, j].min()), 3),
                },
                "violations": {
                    "platform": int(v_plat["import_steps"][j] + v_plat["export_steps"][j]),
                    "plain_charging": int(v_plain["import_steps"][j] + v_plain["export_steps"][j]),
                },
                "violation_kwh": {
                    "platform": round(float(v_plat["import_kwh"][j] + v_plat["export_kwh"][j]), 3),
                    "plain_charging": round(
                        float(v_plain["import_kwh"][j] + v_plain["export_kwh"][j]), 3
                    ),
                },
                "over_limit_kwh": round(float(plat.over_kw[:, j].sum() * h), 3),
                "conflict_vehicle_steps": int(plat.conflicts[:, j].sum()),
            }
        )
        if np.isfinite(plat.export_kw[:, j]).any() and v_none["export_kwh"][j] > 0.0:
            none, plain_kwh, plat_kwh = (
                float(v_none["export_kwh"][j]),
                float(v_plain["export_kwh"][j]),
                float(v_plat["export_kwh"][j]),
            )
            curtail.append(
                {
                    "node": nid,
                    "definition": "energy the node would export above its export limit (the"
                    " plant would have to curtail it), kWh",
                    "without_cars_kwh": round(none, 3),
                    "plain_charging_kwh": round(plain_kwh, 3),
                    "platform_kwh": round(plat_kwh, 3),
                    "avoided_kwh": round(none - plat_kwh, 3),
                    "avoided_share": round((none - plat_kwh) / none, 4),
                }
            )
    out: dict[str, Any] = {
        "nodes": nodes,
        "platform": totals(v_plat),
        "plain_charging": totals(v_plain),
        "without_cars": totals(v_none),
        "tolerance": "1% of the limit or 1 kW, whichever is larger (issue 11)",
        "curtailment": curtail,
        "conflicts": {
            "vehicle_steps": int(plat.conflicts[:, 0].sum()),
            "vehicles": len(plat.conflict_rows),
        },
    }
    if run.firming:
        out["firming"] = [
            {
                "node": grid.ids[f.node],
                "min_kw": f.min_kw,
                "max_kw": f.max_kw,
                "ramp_kw_per_min": f.ramp_kw_per_min,
                "platform": firming_scores(f, plat.net_kw, run.t, run.step_s),
                "plain_charging": firming_scores(f, plain.net_kw, run.t, run.step_s),
            }
            for f in run.firming
        ]
    if run.flows:
        first = next(iter(run.flows.values()))
        out["powerflow"] = {
            "buses": first.buses,
            **{k: f.summary() for k, f in run.flows.items()},
        }
    return out


NODE_FIELDS = (
    "node_kw",
    "meter_kw",
    "net_kw",
    "import_kw",
    "export_kw",
    "over_kw",
    "conflicts",
    "vehicles",
)


def node_columns(run: GridRun, t: Array) -> dict[str, list[Any]]:
    """nodes.csv in long form: one row per step and node, with the platform and on plain
    charging (``plain_net_kw``)."""
    steps, n = run.platform.node_kw.shape
    s = run.platform
    cols: dict[str, Any] = {
        "t_s": np.repeat(t, n),
        "node": [run.grid.ids[j] for _ in range(steps) for j in range(n)],
        "node_kw": s.node_kw.ravel(),
        "meter_kw": s.meter_kw.ravel(),
        "net_kw": s.net_kw.ravel(),
        "plain_net_kw": run.plain.net_kw.ravel(),
        "import_limit_kw": np.where(np.isfinite(s.import_kw), s.import_kw, np.nan).ravel(),
        "export_limit_kw": np.where(np.isfinite(s.export_kw), s.export_kw, np.nan).ravel(),
        "over_limit_kw": s.over_kw.ravel(),
        "conflicts": s.conflicts.ravel(),
        "vehicles": s.vehicles.ravel(),
    }
    return {
        k: (v if isinstance(v, list) else np.round(np.asarray(v, dtype=np.float64), 3).tolist())
        for k, v in cols.items()
    }


def draw_grid(run: GridRun, t: Array, title: str, path: Path) -> None:
    """Per limited node, net power with the platform and on plain charging against its
    limits; and the power flows' voltages and loadings when they ran."""
    from matplotlib.figure import Figure

    grid = run.grid
    hours = (t - t[0]) / 3600.0
    edges = np.append(hours, hours[-1] + run.step_s / 3600.0)
    limited = [
        j
        for j in range(len(grid))
        if np.isfinite(run.platform.import_kw[:, j]).any()
        or np.isfinite(run.platform.export_kw[:, j]).any()
    ][:4]
    rows = len(limited) + (2 if run.flows else 0)
    fig = Figure(figsize=(11, 2.6 * max(rows, 1) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(max(rows, 1), 1, sharex=True))
    for ax, j in zip(axes, limited, strict=False):
        ax.stairs(run.platform.net_kw[:, j], edges, label="with the platform", lw=1.8)
        ax.stairs(run.plain.net_kw[:, j], edges, label="plain charging", ls="--", color="gray")
        meter = np.nan_to_num(run.platform.meter_kw[:, j], nan=0.0)
        ax.stairs(meter, edges, label="meter (no cars)", color="tab:orange", lw=1.0)
        imp = np.where(
            np.isfinite(run.platform.import_kw[:, j]), run.platform.import_kw[:, j], np.nan
        )
        exp = np.where(
            np.isfinite(run.platform.export_kw[:, j]), -run.platform.export_kw[:, j], np.nan
        )
        ax.stairs(imp, edges, color="tab:red", lw=1.0, label="import limit")
        ax.stairs(exp, edges, color="tab:purple", lw=1.0, label="export limit")
        for fs in (x for x in run.firming if x.node == j):
            x0, x1 = (fs.start - t[0]) / 3600.0, (fs.end - t[0]) / 3600.0
            for y in (fs.min_kw, fs.max_kw):
                if y is not None:
                    ax.hlines(y, x0, x1, color="tab:green", ls=":", lw=1.2, label="firming band")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_ylabel(f"{grid.ids[j]}, kW")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    if run.flows:
        v_ax, l_ax = axes[len(limited)], axes[len(limited) + 1]
        for key, f in run.flows.items():
            ran = ~np.isnan(f.v_min_pu)
            style = "-" if key == "platform" else "--"
            v_ax.plot(hours[ran], f.v_min_pu[ran], style, label=f"min V, {key}")
            v_ax.plot(hours[ran], f.v_max_pu[ran], style, label=f"max V, {key}")
            l_ax.plot(hours[ran], f.line_max_pct[ran], style, label=f"max line, {key}")
            l_ax.plot(hours[ran], f.trafo_max_pct[ran], style, label=f"max trafo, {key}")
        v_ax.set_ylabel("bus voltage, pu")
        l_ax.set_ylabel("loading, %")
        for ax in (v_ax, l_ax):
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="x-small")
    axes[0].set_title(title)
    axes[-1].set_xlabel("hours from the start")
    fig.savefig(path, dpi=100)
