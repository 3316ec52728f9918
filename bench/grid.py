"""How long the nested grid limits take per control step: 100k vehicles under 1,000 nodes
(and 10k under 100 for reference).

A tree of depth 4 (a substation, feeders, transformers, sites), vehicles spread over the
transformers and sites, limits set to bind (every site's import limit at 60% of what its
cars can draw, each level above at 80% of the sum below it, some sites with solar behind
an export limit), meters drawn at random, and a step where every car wants to charge
flat out (the 08:30 car park), then one where every car is asked to discharge. Measured:
:func:`aggregator.grid_alloc.allocate_nested` (the water-filling), the limits and meters
in force, and, side by side in the same run, the fleet-wide split without a grid
(:func:`aggregator.allocation.allocate`) as the reference, and the same problem as a
linear programme (HiGHS, least total |p - wanted|) at the sizes given to ``--lp``; and
every node's capability windows (aggregator/grid_capability.py) against one window of the
fleet's envelope.

Prints a table and writes JSON to bench/results/grid.json, with the run's provenance.

    .venv/bin/python -m bench.grid [--sizes 10000:100,100000:1000] [--lp 10000:100]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_matrix, hstack, identity, vstack

from aggregator.allocation import allocate
from aggregator.grid import GridTopology, parse_grid
from aggregator.grid_alloc import allocate_nested
from aggregator.grid_limits import compile_limits, limits_in_force, meters_in_force
from bench.common import RESULTS, Row, best_of, print_table, provenance, row, start, write_results
from broker.models import GridLimits

STEP_BUDGET_MS = 100.0  # a fifth of a 0.5 s control step, whatever else the step does
T_NOW = 1_795_651_200.0


def build(n_vehicles: int, n_nodes: int, seed: int = 1) -> dict[str, Any]:
    """A depth-4 tree of ``n_nodes`` nodes and a fleet under it, limits that bind."""
    rng = np.random.default_rng(seed)
    feeders = max(1, round(n_nodes ** (1 / 3)))
    transformers = max(feeders, round(n_nodes / 10))
    sites = n_nodes - 1 - feeders - transformers
    nodes: list[dict[str, Any]] = [{"id": "sub", "kind": "substation"}]
    nodes += [{"id": f"f{k}", "parent": "sub", "kind": "feeder"} for k in range(feeders)]
    nodes += [
        {"id": f"t{k}", "parent": f"f{k % feeders}", "kind": "transformer"}
        for k in range(transformers)
    ]
    nodes += [
        {"id": f"s{k}", "parent": f"t{k % transformers}", "kind": "site"} for k in range(sites)
    ]
    grid = parse_grid({"nodes": nodes})
    # Vehicles: 90% on sites, 10% on transformers (street chargers).
    site_idx = np.array([grid.index[f"s{k}"] for k in range(sites)])
    tx_idx = np.array([grid.index[f"t{k}"] for k in range(transformers)])
    on_site = rng.random(n_vehicles) < 0.9
    node = np.where(
        on_site,
        site_idx[rng.integers(0, sites, n_vehicles)],
        tx_idx[rng.integers(0, transformers, n_vehicles)],
    ).astype(np.intp)
    p_max = rng.choice([7.4, 11.0, 22.0], n_vehicles)
    must = rng.random(n_vehicles) < 0.1  # a tenth must charge (below their floor)
    p_min = np.where(must, 0.5 * p_max, -rng.choice([0.0, 7.4, 11.0], n_vehicles))
    # Limits that bind: bottom-up, each level a share of what is under it.
    draw = np.bincount(node, weights=p_max, minlength=len(grid))
    imp = np.full(len(grid), np.inf)
    exp = np.full(len(grid), np.inf)
    meter = np.full(len(grid), np.nan)
    sub_sum = np.zeros(len(grid))
    for level in reversed(grid.levels):
        total = draw[level] + sub_sum[level]
        imp[level] = np.round(0.6 * total if level[0] in site_idx else 0.8 * total, 1)
        if level[0] != 0:
            np.add.at(sub_sum, grid.parent[level], imp[level])
    solar = site_idx[rng.random(sites) < 0.2]
    meter[solar] = -rng.uniform(50, 300, solar.size)  # PV behind the meter
    exp[solar] = np.round(0.5 * -meter[solar], 1)
    loads = site_idx[rng.random(sites) < 0.5]
    meter[loads] = rng.uniform(0, 40, loads.size)
    return {
        "grid": grid,
        "node": node,
        "p_min": p_min,
        "p_max": p_max,
        "meter": meter,
        "imp": imp,
        "exp": exp,
    }


def _lp(case: dict[str, Any], desired: np.ndarray) -> tuple[float, float]:
    """min sum |p - desired| under the nested limits (HiGHS); (seconds, objective)."""
    grid: GridTopology = case["grid"]
    node = case["node"]
    v = node.shape[0]
    meter0 = np.nan_to_num(case["meter"], nan=0.0)
    hard_min = np.minimum(case["p_min"], 0.0)
    # Vehicle i is under node j iff j <= node[i] < end[j]: walk each vehicle's ancestors.
    anc = node.copy()
    member_rows: list[np.ndarray] = []
    member_cols: list[np.ndarray] = []
    while True:
        ok = anc >= 0
        if not ok.any():
            break
        member_rows.append(anc[ok])
        member_cols.append(np.flatnonzero(ok))
        anc = np.where(ok, grid.parent[np.maximum(anc, 0)], -1)
    m = csr_matrix(
        (
            np.ones(sum(a.size for a in member_rows)),
            (np.concatenate(member_rows), np.concatenate(member_cols)),
        ),
        shape=(len(grid), v),
    )
    hi_rows = np.flatnonzero(np.isfinite(case["imp"]))
    lo_rows = np.flatnonzero(np.isfinite(case["exp"]))
    # Variables [p, u]: u >= |p - desired|.
    eye = identity(v, format="csr")
    a_ub = vstack(
        [
            hstack([m[hi_rows], csr_matrix((hi_rows.size, v))]),
            hstack([-m[lo_rows], csr_matrix((lo_rows.size, v))]),
            hstack([eye, -eye]),
            hstack([-eye, -eye]),
        ],
        format="csr",
    )
    b_ub = np.concatenate(
        [
            case["imp"][hi_rows] - meter0[hi_rows],
            case["exp"][lo_rows] + meter0[lo_rows],
            desired,
            -desired,
        ]
    )
    cost = np.concatenate([np.zeros(v), np.ones(v)])
    bounds = np.column_stack(
        [
            np.concatenate([hard_min, np.zeros(v)]),
            np.concatenate([case["p_max"], np.full(v, np.inf)]),
        ]
    )
    t = time.perf_counter()
    res = linprog(  # type: ignore[call-overload]  # the stubs know no sparse matrices
        cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs"
    )
    took = time.perf_counter() - t
    return took, float(res.fun) if res.status == 0 else float("nan")


def bench(n: int, nodes: int, with_lp: bool) -> list[Row]:
    case = build(n, nodes)
    grid = case["grid"]
    out: list[Row] = []
    for label, desired in (
        ("all charge flat out", case["p_max"].copy()),
        ("all asked to discharge", np.minimum(case["p_min"], 0.0)),
    ):

        def step(desired: np.ndarray = desired) -> Any:
            return allocate_nested(
                grid,
                case["node"],
                case["p_min"],
                case["p_max"],
                desired,
                case["meter"],
                case["imp"],
                case["exp"],
            )

        took = best_of(step, 5)

        def fleet_wide(desired: np.ndarray = desired) -> Any:
            return allocate(float(desired.sum()), case["p_min"], case["p_max"])

        ref = best_of(fleet_wide, 5)
        r = step()
        want = np.clip(desired, case["p_min"], case["p_max"])
        dev = float(np.abs(r.power_kw - want).sum())
        print(
            f"N={n} nodes={len(grid)} ({label}): {took * 1e3:.1f} ms;"
            f" over limit {r.over_limit_kw.sum():.1f} kW at {(r.over_limit_kw > 1e-6).sum()}"
            f" nodes; {int(r.conflicts.sum())} conflicts; sum|p - wanted| {dev:.0f} kW",
            file=sys.stderr,
        )
        out.append(
            row(
                f"nested limits step, {len(grid)} nodes ({label})",
                n,
                took * 1e3,
                ref * 1e3,
                "ms",
                "fleet-wide split, no grid",
                STEP_BUDGET_MS,
                lower_is_better=True,
            )
        )
        if with_lp:
            lp_s, lp_obj = _lp(case, want)
            print(
                f"  LP (HiGHS) {lp_s * 1e3:.0f} ms, least sum|p - wanted| {lp_obj:.0f} kW"
                f" (water-filling {dev:.0f} kW)",
                file=sys.stderr,
            )
            out.append(
                row(
                    f"same step as an LP (HiGHS), {len(grid)} nodes ({label})",
                    n,
                    lp_s * 1e3,
                    took * 1e3,
                    "ms",
                    "water-filling",
                )
            )
            out.append(
                row(
                    f"sum|p - wanted|, water-filling vs LP optimum ({label})",
                    n,
                    dev,
                    lp_obj,
                    "kW",
                    "LP optimum (L1)",
                )
            )
    # What holds at each node at t: dynamic limits on every site, meters.
    sites = [j for j, k in enumerate(grid.kinds) if k == "site"]
    msg = GridLimits.model_validate_json(
        '{"ts":"2026-11-26T00:00:00Z","intervals":['
        + ",".join(
            f'{{"start":"2026-11-26T{h:02d}:00:00Z","duration_s":3600,"import_kw":{50 + h}}}'
            for h in range(24)
        )
        + '],"safe_import_kw":40}'
    )
    dyn = compile_limits(len(grid), dict.fromkeys(sites, msg))
    at = np.where(np.isnan(case["meter"]), np.nan, T_NOW - 5.0)
    in_force = best_of(
        lambda: (
            limits_in_force(grid, dyn, T_NOW),
            meters_in_force(grid, case["meter"], at, T_NOW, 15.0),
        ),
        5,
    )
    out.append(
        row(
            f"limits and meters in force, {len(grid)} nodes ({len(sites) * 24} intervals)",
            n,
            in_force * 1e3,
            unit="ms",
            target=STEP_BUDGET_MS / 10,
            lower_is_better=True,
        )
    )
    return out


def _limited(case: dict[str, Any]) -> GridTopology:
    """The case's tree with its limits written into the topology (static limits)."""
    grid: GridTopology = case["grid"]
    return parse_grid(
        {
            "nodes": [
                {
                    "id": grid.ids[j],
                    "kind": grid.kinds[j],
                    **({"parent": grid.ids[int(grid.parent[j])]} if grid.parent[j] >= 0 else {}),
                    **({"import_kw": float(case["imp"][j])} if np.isfinite(case["imp"][j]) else {}),
                    **({"export_kw": float(case["exp"][j])} if np.isfinite(case["exp"][j]) else {}),
                }
                for j in range(len(grid))
            ]
        }
    )


def node_capability(n: int, nodes: int) -> list[Row]:
    """Every node's capability windows (aggregator/grid_capability.py: the vectorised
    per-node bound over the five windows, and the models), against one window of the
    fleet's own envelope (the LP the control step solves each step at this size)."""
    from agents.fleet import SimFleet
    from agents.profiles import generate_fleet
    from agents.telemetry import _reports
    from aggregator.capability import WINDOWS_S, window
    from aggregator.fleet_state import FleetState
    from aggregator.grid_capability import node_capabilities
    from aggregator.grid_state import GridState

    case = build(n, nodes)
    grid: GridTopology = case["grid"]
    fleet = SimFleet(generate_fleet(n, 3), T_NOW, step_s=5.0)
    fleet.place([grid.ids[j] for j in case["node"].tolist()])
    state = FleetState()
    state.apply_arrays(_reports(fleet, T_NOW, None))
    held = GridState(_limited(case), telemetry_interval_s=5.0)
    view = state.view(T_NOW, 15.0)
    g = held.in_force(T_NOW)

    def caps() -> Any:
        return node_capabilities(held.grid, held.vehicle_nodes(view), view, T_NOW, WINDOWS_S, g)

    took = best_of(caps, 3)
    ref = best_of(lambda: window(view, T_NOW, WINDOWS_S[0]), 3)
    published = len(caps())
    print(
        f"N={n} nodes={len(grid)} node capabilities: {took * 1e3:.1f} ms for {published}"
        f" nodes x {len(WINDOWS_S)} windows; one fleet envelope window {ref * 1e3:.1f} ms",
        file=sys.stderr,
    )
    return [
        row(
            f"every node's capability, {published} nodes x {len(WINDOWS_S)} windows",
            n,
            took * 1e3,
            ref * 1e3,
            "ms",
            "one window of the fleet envelope (LP)",
            STEP_BUDGET_MS,
            lower_is_better=True,
        )
    ]


def control_step(n: int, nodes: int) -> list[Row]:
    """The dispatcher's whole control step (aggregator/dispatch) with the grid under the
    fleet, against the same step without a grid: plain charging (no request; the limits
    alone send setpoints) and one fleet-wide request. Median of the steps after the first
    (the first pays for the fleet's first ranges)."""
    from agents.fleet import SimFleet
    from agents.profiles import generate_fleet
    from agents.telemetry import _reports
    from aggregator.dispatch import Dispatcher
    from aggregator.fleet_state import FleetState
    from aggregator.grid_state import GridState
    from broker.models import DispatchRequest

    case = build(n, nodes)
    grid: GridTopology = case["grid"]
    step_s = 5.0
    fleet = SimFleet(generate_fleet(n, 3), T_NOW, step_s=step_s)
    fleet.place([grid.ids[j] for j in case["node"].tolist()])
    limited = _limited(case)

    def run(with_grid: bool, request: bool) -> float:
        state = FleetState()
        state.apply_arrays(_reports(fleet, T_NOW, None))
        held = GridState(limited, telemetry_interval_s=step_s) if with_grid else None
        d = Dispatcher(control_step_s=step_s, grid=held)
        t = T_NOW
        if request:
            ask = DispatchRequest(request_id="bench", power_kw=-2000.0, duration_s=3600.0)
            d.submit(ask, t, state.view(t, 3 * step_s))
        took = []
        for _ in range(5):
            view = state.view(t, 3 * step_s)
            w = time.perf_counter()
            d.step(t, view, len(state))
            took.append(time.perf_counter() - w)
            t += step_s
        return float(np.median(took[1:])) * 1e3

    out: list[Row] = []
    for label, request in (("plain charging", False), ("one fleet-wide request", True)):
        with_grid, without = run(True, request), run(False, request)
        print(
            f"N={n} nodes={len(grid)} dispatcher step ({label}): {with_grid:.1f} ms with the"
            f" grid, {without:.1f} ms without",
            file=sys.stderr,
        )
        out.append(
            row(
                f"dispatcher control step with the grid, {len(grid)} nodes ({label})",
                n,
                with_grid,
                without,
                "ms",
                "the same step without a grid",
            )
        )
    return out


def _pairs(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (p.split(":") for p in text.split(",") if p)]


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: 10k/100 only)."""
    out: list[Row] = []
    for n, nodes in ((10_000, 100),) if quick else ((10_000, 100), (100_000, 1000)):
        out.extend(bench(n, nodes, with_lp=n <= 10_000))
        out.extend(control_step(n, nodes))
        out.extend(node_capability(n, nodes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000:100,100000:1000", help="vehicles:nodes,...")
    ap.add_argument("--lp", default="10000:100", help="sizes also solved as an LP")
    ap.add_argument("--out", default=str(RESULTS / "grid.json"))
    args = ap.parse_args()
    started = start()
    lp = set(_pairs(args.lp))
    result: list[Row] = []
    for n, nodes in _pairs(args.sizes):
        result.extend(bench(n, nodes, with_lp=(n, nodes) in lp))
        result.extend(control_step(n, nodes))
        result.extend(node_capability(n, nodes))
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
