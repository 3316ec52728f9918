"""The cost of a power flow beside the simulation, per step and at EV2Gym's cadence.

``v2g simulate --powerflow-every N`` puts the grid nodes' powers on a pandapower network
and runs an AC power flow (Newton-Raphson, pandapower ``runpp``, numba off, each flow
started from the last one's solution) every N steps. This measures, on three standard
low-voltage networks of ``pandapower.networks`` (Kerber Landnetz cable 1: 18 buses;
CIGRE LV: 44; Kerber Vorstadtnetz cable 1: 294), with 8 grid nodes mapped onto load buses
and their powers redrawn every step:

* the cost of one flow (median and p95 over the flows, ms), the first (cold) one apart;
* the cost per simulated step at one flow a step (N=1), and at EV2Gym's cadence: EV2Gym
  runs its grid's power flow once per 15-minute step, so a 1-minute control step with a
  flow every 15 steps pays 1/15 of a flow per step;
* the reference, in the same run: the platform's nested-limits allocation over the same
  grid nodes for 1,000 vehicles (``allocate_nested``), per step.

EV2Gym itself is not run here (its grid mode is a different solver, a tensor power flow
on its own networks); the comparison is of the cadence on the same feeder sizes.

    .venv/bin/python -m bench.powerflow [--flows 30] [--out bench/results/powerflow.json]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from aggregator.grid import parse_grid
from aggregator.grid_alloc import allocate_nested
from bench.common import RESULTS, Row, print_table, provenance, row, start, write_results
from v2g.powerflow import Feeder, load_network

NETWORKS = ("kerber_landnetz_kabel_1", "cigre_lv", "kerber_vorstadtnetz_kabel_1")
NODES = 8
EV2GYM_EVERY = 15  # 15-min power flows under 1-min control steps


def grid_of(n: int) -> Any:
    nodes: list[dict[str, Any]] = [{"id": "root", "kind": "substation", "import_kw": 400.0}]
    nodes += [
        {"id": f"site-{k}", "parent": "root", "kind": "site", "import_kw": 60.0, "export_kw": 40.0}
        for k in range(n)
    ]
    return parse_grid({"nodes": nodes})


def allocation_ms(grid: Any, vehicles: int, reps: int, seed: int = 1) -> float:
    """Median ms of one nested allocation of ``vehicles`` spread over the grid's sites."""
    rng = np.random.default_rng(seed)
    vn = rng.integers(1, len(grid), vehicles).astype(np.intp)
    lo, hi = -rng.uniform(0, 11, vehicles), rng.uniform(3, 11, vehicles)
    times = []
    for _ in range(reps):
        meter = rng.uniform(-80, 40, len(grid))
        want = rng.uniform(lo, hi)
        t = time.perf_counter()
        allocate_nested(grid, vn, lo, hi, want, meter, grid.import_kw, grid.export_kw)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def bench(name: str, flows: int, seed: int = 1) -> list[Row]:
    grid = grid_of(NODES)
    net = load_network(name)
    feeder = Feeder(net, grid, list(range(1, NODES + 1)), {})
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(flows + 1):
        kw = np.zeros(len(grid))
        kw[1:] = rng.uniform(-20.0, 30.0, NODES)  # kW per node: small enough to converge
        t = time.perf_counter()
        feeder.flow(kw)
        times.append((time.perf_counter() - t) * 1e3)
    cold, warm = times[0], np.array(times[1:])
    med, p95 = float(np.median(warm)), float(np.percentile(warm, 95))
    ref = allocation_ms(grid, 1000, flows)
    buses = len(net.bus)
    label = f"{name} ({buses} buses)"
    return [
        row(f"flow, first (cold), {label}", 0, cold, unit="ms"),
        row(f"flow, p95, {label}", 0, p95, unit="ms"),
        row(
            f"per step, a flow every step, {label}",
            0,
            med,
            ref,
            "ms",
            "nested allocation, 1,000 cars",
        ),
        row(
            f"per step, a flow every {EV2GYM_EVERY} (EV2Gym's 15 min), {label}",
            0,
            med / EV2GYM_EVERY,
            ref,
            "ms",
            "nested allocation, 1,000 cars",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--flows", type=int, default=30, help="flows per network (bounded)")
    ap.add_argument("--out", default=str(RESULTS / "powerflow.json"))
    args = ap.parse_args()
    started = start()
    rows: list[Row] = []
    for name in NETWORKS:
        rows.extend(bench(name, max(2, min(args.flows, 500))))
    stamp = provenance(started)
    print_table(rows, stamp)
    write_results(rows, args.out, stamp, nodes=NODES, ev2gym_every=EV2GYM_EVERY)


if __name__ == "__main__":
    main()
