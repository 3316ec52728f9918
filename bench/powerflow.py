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

With ``--ev2gym``, EV2Gym 2.x's own grid mode beside ours, in the same run (in its venv,
``bench/.venv-ev2gym``, as ``bench.ev2gym_compare`` sets it up). EV2Gym's grid mode is
``simulate_grid: True`` (its ``V2Ggrid.yaml``): 15-minute steps only (it asserts
``timescale == 15``), one power flow per step (``PowerGrid.step``), on a 34-node feeder
(``network_info``: ``data/network_data/node_34``) solved by its ``pf_solver: Laurent``
(``GridTensor.run_pf``, a tensor fixed-point flow, numba on), with every non-slack node's
load + EV power changing each step, its load profiles drawn from ``data/augmentor.pkl``.

* First the mode as shipped is built (V2Ggrid.yaml): if it runs, a simulated step and a
  flow are timed; if it does not, the exact reason is recorded (the ev2gym 2.0.0 wheel
  ships neither ``data/network_data/node_34/*.csv`` nor ``data/augmentor.pkl``).
* Then the same code path on a feeder of the same size that the wheel can build: EV2Gym's
  own ``GridTensor.generate_from_graph(nodes=34)`` radial feeder, driven through its
  ``PowerGrid.step`` (its flow plus its per-step bookkeeping) with 33 nodes' powers
  redrawn each step: per simulated step and per flow.
* Ours on a feeder of that size, in the same run: pandapower's ``case33bw`` (33 buses,
  the Baran-Wu distribution feeder), a grid node on each of its 32 load buses, all redrawn
  each step, one flow a step through ``v2g.powerflow.Feeder`` (ratio ours / EV2Gym).

Both sides are bounded by ``--flows`` and ``--budget-s``.

    .venv/bin/python -m bench.powerflow [--flows 30] [--ev2gym] [--budget-s 60]
        [--out bench/results/powerflow.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from typing import Any

import numpy as np

from aggregator.grid import parse_grid
from aggregator.grid_alloc import allocate_nested
from bench.common import RESULTS, Row, print_table, provenance, row, start, write_results
from bench.ev2gym_compare import VENV, ensure_ev2gym, ev2gym_version
from v2g.powerflow import Feeder, load_network

NETWORKS = ("kerber_landnetz_kabel_1", "cigre_lv", "kerber_vorstadtnetz_kabel_1")
NODES = 8
EV2GYM_EVERY = 15  # 15-min power flows under 1-min control steps
SAME_SIZE = "case33bw"  # pandapower's 33-bus feeder: the size of EV2Gym's 34-node one

# Runs inside bench/.venv-ev2gym: EV2Gym's grid mode as shipped, then its grid step on a
# 34-node feeder of its own making; prints one line of JSON.
EV2GYM_GRID = r"""
import json, os, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, yaml, ev2gym

flows, budget = int(sys.argv[1]), float(sys.argv[2])
pkg = os.path.dirname(ev2gym.__file__)
site = os.path.dirname(pkg)
out = {}

def timed_flows(net):
    # Wrap the solver so each flow's own time is kept apart from the step around it.
    spent, run_pf = [], net.run_pf
    def run(*a, **k):
        t = time.perf_counter()
        r = run_pf(*a, **k)
        spent.append(time.perf_counter() - t)
        return r
    net.run_pf = run
    return spent

# 1. The grid mode as shipped: V2Ggrid.yaml, its paths made absolute.
with open(os.path.join(pkg, "example_config_files", "V2Ggrid.yaml")) as fh:
    cfg = yaml.safe_load(fh)
ni = cfg["network_info"]
for key in ("bus_info_file", "branch_info_file"):
    ni[key] = os.path.join(site, ni[key].removeprefix("./"))
cfg["ev_specs_file"] = os.path.join(site, cfg["ev_specs_file"].removeprefix("./"))
cfg["random_day"] = False
needed = [ni["bus_info_file"], ni["branch_info_file"], os.path.join(pkg, "data", "augmentor.pkl")]
mode = {"config": "V2Ggrid.yaml", "simulate_grid": cfg["simulate_grid"],
        "pf_solver": cfg["pf_solver"], "timescale_min": cfg["timescale"],
        "charging_stations": cfg["number_of_charging_stations"],
        "network": os.path.relpath(ni["bus_info_file"], site),
        "missing": [os.path.relpath(f, site) for f in needed if not os.path.exists(f)]}
try:
    from ev2gym.models.ev2gym_env import EV2Gym
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(cfg, fh)
    env = EV2Gym(config_file=fh.name, seed=42, save_replay=False, save_plots=False)
    env.reset(seed=42)
    spent = timed_flows(env.grid.net)
    steps, end, k, done = [], time.perf_counter() + budget / 2, 0, False
    while not done and k < flows and time.perf_counter() < end:
        t = time.perf_counter()
        _, _, done, _, _ = env.step(np.zeros(env.action_space.shape[0]))
        steps.append(time.perf_counter() - t)
        k += 1
    mode.update(buses=int(env.grid.node_num), step_ms=[1e3 * x for x in steps],
                flow_ms=[1e3 * x for x in spent])
except Exception as e:
    mode["error"] = f"{type(e).__name__}: {e}".replace(site + os.sep, "")[:300]
out["grid_mode"] = mode

# 2. Its grid step on a 34-node feeder it generates itself (the shipped one being absent).
from ev2gym.models.grid import PowerGrid
from ev2gym.models.grid_utility.grid_tensor import GridTensor
rng = np.random.default_rng(1)
net = GridTensor.generate_from_graph(nodes=34, child=2, plot_graph=False)
grid = PowerGrid.__new__(PowerGrid)  # its step without its __init__'s data files
grid.net, grid.node_num, grid.current_step = net, net.nb, 0
grid.load_data = rng.uniform(0.0, 1.0, (flows + 2, net.nb)) * net.p_values
grid.pv_data = np.zeros((flows + 2, net.nb))
grid.active_power = grid.load_data[0, 1:].reshape(1, -1)
grid.reactive_power = grid.active_power * net.pf
spent = timed_flows(net)
steps, end = [], time.perf_counter() + budget / 2
for _ in range(flows + 1):  # the first (numba's compile) reported apart
    ev_kw = rng.uniform(-20.0, 30.0, net.nb - 1)
    t = time.perf_counter()
    _, _, vm = grid.step(ev_kw)
    steps.append(time.perf_counter() - t)
    if time.perf_counter() > end:
        break
out["own_feeder"] = {"buses": int(net.nb), "step_ms": [1e3 * x for x in steps],
                     "flow_ms": [1e3 * x for x in spent], "vm_min": float(vm.min()),
                     "converged": bool(grid.solution["convergence"])}
print(json.dumps(out))
"""


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


def run_ev2gym_grid(flows: int, budget_s: float) -> dict[str, Any]:
    """EV2Gym's grid mode and its grid step, timed in its own venv (see EV2GYM_GRID)."""
    py = ensure_ev2gym()
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    try:
        proc = subprocess.run(
            [str(py), "-c", EV2GYM_GRID, str(flows), str(budget_s)],
            capture_output=True,
            text=True,
            timeout=budget_s + 120.0,  # + imports and numba's compiles
            cwd=str(VENV),
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {budget_s + 120.0:.0f} s"}
    if proc.returncode != 0:
        return {"error": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["version"] = ev2gym_version(py)
    return doc


def ours_same_size(flows: int, budget_s: float, seed: int = 1) -> dict[str, Any]:
    """Our flow on case33bw, a grid node on each load bus, all redrawn every step."""
    import pandapower.networks as pn

    net = pn.case33bw()
    buses = sorted(dict.fromkeys(int(b) for b in net.load["bus"]))
    grid = grid_of(len(buses))
    feeder = Feeder(net, grid, list(range(1, len(buses) + 1)), {})
    rng = np.random.default_rng(seed)
    times, end = [], time.perf_counter() + budget_s
    for _ in range(flows + 1):
        kw = np.zeros(len(grid))
        kw[1:] = rng.uniform(-20.0, 30.0, len(buses))
        t = time.perf_counter()
        v_min = feeder.flow(kw)[0]
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() > end:
            break
    return {"buses": len(net.bus), "nodes": len(buses), "flow_ms": times, "v_min": v_min}


def same_size_rows(theirs: dict[str, Any], ours: dict[str, Any]) -> list[Row]:
    """Ours per 15-min step (one flow) against EV2Gym's grid step and flow on its feeder."""
    warm = np.array(ours["flow_ms"][1:])
    med, p95 = float(np.median(warm)), float(np.percentile(warm, 95))
    label = f"ours, pandapower {SAME_SIZE} ({ours['buses']} buses, {ours['nodes']} nodes)"
    out = [row(f"{label}, flow, first (cold)", 0, ours["flow_ms"][0], unit="ms")]
    out.append(row(f"{label}, flow, p95", 0, p95, unit="ms"))
    mode = theirs.get("grid_mode", {})
    if mode.get("step_ms"):
        ms = float(np.median(mode["step_ms"][1:] or mode["step_ms"]))
        out.append(
            row(
                f"{label}, a flow per 15-min step",
                0,
                med,
                ms,
                "ms",
                f"EV2Gym V2Ggrid.yaml step ({mode.get('buses')} nodes), whole step",
            )
        )
    own = theirs.get("own_feeder")
    if own:
        name = f"EV2Gym {theirs.get('version', '')} PowerGrid ({own['buses']}-node own feeder)"
        step_ms = float(np.median(own["step_ms"][1:]))
        flow_ms = float(np.median(own["flow_ms"][1:]))
        out += [
            row(
                f"EV2Gym grid step, first (cold), {own['buses']} nodes",
                0,
                own["step_ms"][0],
                unit="ms",
            ),
            row(
                f"{label}, a flow per 15-min step",
                0,
                med,
                step_ms,
                "ms",
                f"{name}: grid step (Laurent flow + bookkeeping)",
            ),
            row(f"{label}, per flow", 0, med, flow_ms, "ms", f"{name}: Laurent flow"),
        ]
    else:
        out.append(row(f"{label}, a flow per 15-min step", 0, med, unit="ms"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--flows", type=int, default=30, help="flows per network (bounded)")
    ap.add_argument(
        "--ev2gym", action="store_true", help="also time EV2Gym's grid mode (its own venv)"
    )
    ap.add_argument(
        "--budget-s", type=float, default=60.0, help="wall-time cap of each side's timed loop"
    )
    ap.add_argument("--out", default=str(RESULTS / "powerflow.json"))
    args = ap.parse_args()
    started = start()
    flows = max(2, min(args.flows, 500))
    rows: list[Row] = []
    for name in NETWORKS:
        rows.extend(bench(name, flows))
    theirs: dict[str, Any] | None = None
    if args.ev2gym:
        theirs = run_ev2gym_grid(flows, args.budget_s)
        rows.extend(same_size_rows(theirs, ours_same_size(flows, args.budget_s)))
    stamp = provenance(started)
    print_table(rows, stamp)
    if theirs is not None:
        mode = theirs.get("grid_mode", {})
        if "error" in theirs or "error" in mode:
            print(
                f"EV2Gym {theirs.get('version', '')} grid mode ({mode.get('config', '?')},"
                f" missing: {', '.join(mode.get('missing', [])) or 'nothing'}):"
                f" {theirs.get('error') or mode.get('error')}"
            )
    write_results(rows, args.out, stamp, nodes=NODES, ev2gym_every=EV2GYM_EVERY, ev2gym_grid=theirs)


if __name__ == "__main__":
    main()
