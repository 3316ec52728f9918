"""``v2g simulate``: run a scenario headless, as fast as the CPU allows, and write results.

The loop itself is :mod:`v2g.simcore` (pure numpy); this module builds it from a
:class:`~v2g.scenario.Scenario`, shows progress, and writes the output directory:

- ``intervals.csv``: one row per step (time, plugged-in count, fleet and baseline kW,
  the active request's requested and allocated kW, the regulation signal, the tracking
  error, stored energy and metered energy);
- ``requests.csv``: one row per request (admission, final status, requested vs
  delivered kWh, delivered against the baseline);
- ``vehicles.csv`` (fleets up to 100,000 vehicles): energy cycled per vehicle;
- ``summary.json``: everything else, including drivers left short and Jain's fairness
  index of the energy cycled;
- ``*.parquet`` of the tables above when pyarrow is importable (optional);
- ``plot.png`` (matplotlib) unless ``plot=False``;
- with a ``grid:`` (v2g/simgrid.py): ``nodes.csv`` (per step and node: vehicles, meter,
  net power with the platform and on plain charging, limits, over-limit kW, conflicts),
  a ``grid`` section in the summary, ``grid.png``, and power flows when asked for.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.profiles import generate_fleet
from aggregator.allocation import jain_index
from broker.models import DispatchRequest, from_epoch
from v2g import simgrid
from v2g.scenario import Scenario, ScenarioError, csv_signal, regd_signal
from v2g.simcore import Regulation, RequestRecord, SimResult, Simulation

# Per-vehicle rows are written as CSV up to this fleet size (Parquet has no limit).
VEHICLE_CSV_LIMIT = 100_000
# A request "delivered" when its energy is within this of what was asked (see README).
DELIVERY_TOL = 0.02


@dataclass(slots=True)
class Outcome:
    """A finished run: the raw result, its summary and the files written."""

    result: SimResult
    summary: dict[str, Any]
    files: list[Path]


def build(scenario: Scenario) -> Simulation:
    """The simulation a scenario describes (the fleet is generated here: seeded)."""
    fleet = scenario.fleet
    profile = generate_fleet(
        fleet.vehicles, fleet.seed, mix=fleet.weights(), id_prefix=fleet.id_prefix
    )
    t0, step, steps = scenario.t0, scenario.step_s, scenario.n_steps
    requests = [
        DispatchRequest(
            request_id=r.id,
            service=r.service,
            power_kw=r.power_kw,
            start=from_epoch(scenario.at(r.start)),
            duration_s=r.duration,
        )
        for r in scenario.requests
    ]
    regulation = None
    reg = scenario.regulation
    if reg is not None:
        r_start = scenario.at(reg.start)
        times = t0 + step * np.arange(steps, dtype=np.float64)
        inside = (times >= r_start - 1e-9) & (times < r_start + reg.duration - 1e-9)
        values = np.full(steps, np.nan)
        if reg.signal == "regd":
            values[inside] = regd_signal(int(inside.sum()), step, reg.seed)
        else:
            values[inside] = csv_signal(Path(reg.signal), r_start, times[inside])
        regulation = Regulation(
            start=r_start,
            end=r_start + reg.duration,
            capacity_kw=reg.capacity_kw,
            values=values,
            id_prefix=reg.id_prefix,
        )
    on_power = None
    if scenario.grid is not None:
        on_power = simgrid.make_step(scenario, len(profile.ids), enforce=True)
    return Simulation(
        profile,
        start=t0,
        step_s=step,
        steps=steps,
        requests=requests,
        regulation=regulation,
        on_power=on_power,
    )


def run(
    scenario: Scenario,
    out_dir: Path,
    *,
    plot: bool = True,
    on_step: Callable[[int], None] | None = None,
    powerflow_every: int | None = None,
) -> Outcome:
    """Build, run, and write every output file of ``scenario`` into ``out_dir``.

    ``powerflow_every``: run a power flow every N steps (overrides the scenario's
    ``powerflow.every``; needs a grid)."""
    if powerflow_every is not None and scenario.grid is None:
        raise ScenarioError("--powerflow-every needs a scenario with a grid:")
    wall0 = time.perf_counter()
    sim = build(scenario)
    setup_s = time.perf_counter() - wall0
    t = time.perf_counter()
    result = sim.run(on_step)
    loop_s = time.perf_counter() - t
    summary = summarize(scenario, result, setup_s=setup_s, loop_s=loop_s)
    files = write_outputs(scenario, result, summary, out_dir, plot=plot)
    hook = sim.on_power
    if isinstance(hook, simgrid.GridStep):
        files += grid_outputs(scenario, sim, hook, result, summary, out_dir, plot, powerflow_every)

    summary["wall_s"] = round(time.perf_counter() - wall0, 3)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Outcome(result, summary, files)


def grid_outputs(
    scenario: Scenario,
    sim: Simulation,
    hook: simgrid.GridStep,
    result: SimResult,
    summary: dict[str, Any],
    out_dir: Path,
    plot: bool,
    powerflow_every: int | None,
) -> list[Path]:
    """The grid's share of a run: the same fleet again on plain charging without limits,
    the power flows, ``nodes.csv``, the summary's ``grid`` section and ``grid.png``."""
    t = time.perf_counter()
    run_ = simgrid.GridRun(
        hook.grid,
        result.step_s,
        hook.series,
        simgrid.plain_run(sim, scenario).series,
        firming=hook.firming,
        t=result.t,
    )
    every = powerflow_every or (scenario.powerflow.every if scenario.powerflow else None)
    if every is not None:
        simgrid.attach_flows(run_, scenario, every)
    summary["grid"] = simgrid.grid_summary(run_)
    summary["grid"]["wall_s"] = round(time.perf_counter() - t, 3)
    write_csv(out_dir / "nodes.csv", simgrid.node_columns(run_, result.t))
    files = [out_dir / "nodes.csv"]
    if plot:
        simgrid.draw_grid(run_, result.t, f"{scenario.name}: the grid", out_dir / "grid.png")
        files.append(out_dir / "grid.png")
    summary["files"] += [p.name for p in files]
    return files


# -- summary -----------------------------------------------------------------------------


def request_rows(result: SimResult) -> list[dict[str, Any]]:
    """One plain row per request, for CSV, Parquet and the summary."""
    rows = []
    for rec in result.requests:
        rows.append(_request_row(rec))
    return rows


def _request_row(rec: RequestRecord) -> dict[str, Any]:
    req, adm, fin = rec.request, rec.admission, rec.final
    requested = fin.requested_kwh if fin is not None else None
    delivered = fin.delivered_kwh if fin is not None else None
    baseline = fin.baseline_kwh if fin is not None else None
    status = fin.status if fin is not None else ("not_started" if adm is None else adm.status)
    ratio = (
        delivered / requested
        if delivered is not None and requested is not None and abs(requested) > 1e-9
        else None
    )
    reason = (fin.reason if fin is not None and fin.reason else None) or (
        adm.reason if adm is not None and adm.status != "accepted" else None
    )
    return {
        "request_id": req.request_id,
        "service": req.service.value,
        "start": from_epoch(rec.start).isoformat(),
        "duration_s": req.duration_s,
        "power_kw": req.power_kw,
        "admission": None if adm is None else adm.status,
        "allocated_kw": None if adm is None else adm.allocated_kw,
        "shortfall_kw": None if adm is None else adm.shortfall_kw,
        "status": status,
        "requested_kwh": requested,
        "delivered_kwh": delivered,
        "baseline_kwh": baseline,
        "delivered_vs_baseline_kwh": (
            None if delivered is None or baseline is None else round(delivered - baseline, 4)
        ),
        "delivered_ratio": None if ratio is None else round(ratio, 4),
        "vehicles": None if fin is None else fin.vehicles,
        "note": "; ".join(x for x in (rec.note, reason or "") if x),
    }


def summarize(
    scenario: Scenario, result: SimResult, *, setup_s: float = 0.0, loop_s: float = 0.0
) -> dict[str, Any]:
    """The run in numbers: requests, drivers, energy cycled and its fairness, speed."""
    rows = request_rows(result)
    reg_prefix = scenario.regulation.id_prefix + "-" if scenario.regulation else None
    fixed = [r for r in rows if not (reg_prefix and r["request_id"].startswith(reg_prefix))]
    done = [r for r in fixed if r["requested_kwh"] is not None]
    accepted = [r for r in done if r["admission"] == "accepted"]
    on_target = [
        r
        for r in accepted
        if abs(r["delivered_kwh"] - r["requested_kwh"])
        <= DELIVERY_TOL * abs(r["requested_kwh"]) + 0.01
    ]
    part = result.ever_plugged
    cyc, dis = result.throughput_kwh[part], result.discharged_kwh[part]
    efc = cyc / (2.0 * result.capacity_kwh[part])
    vs = result.vehicles * result.steps
    out: dict[str, Any] = {
        "scenario": scenario.name,
        "start": scenario.start.isoformat(),
        "step_s": scenario.step_s,
        "steps": result.steps,
        "vehicles": result.vehicles,
        "seed": scenario.fleet.seed,
        "mix": scenario.fleet.weights(),
        "requests": {
            "total": len(fixed),
            "by_status": _count(r["status"] for r in fixed),
            "by_admission": _count(str(r["admission"]) for r in fixed),
            "requested_kwh": round(sum(r["requested_kwh"] for r in done), 3),
            "delivered_kwh": round(sum(r["delivered_kwh"] for r in done), 3),
            "accepted_within_tolerance": f"{len(on_target)}/{len(accepted)}",
            "tolerance": DELIVERY_TOL,
        },
        "drivers": {
            "departures": result.departed,
            "short": result.short_total,
            "short_ids": result.short_ids[:50],
        },
        "energy_cycled": {
            "definition": "energy through each vehicle's charger, sum |P| h, kWh; vehicles plugged in at least once",
            "vehicles": int(part.sum()),
            "mean_kwh": _r(cyc.mean()) if cyc.size else 0.0,
            "p50_kwh": _r(np.percentile(cyc, 50)) if cyc.size else 0.0,
            "p95_kwh": _r(np.percentile(cyc, 95)) if cyc.size else 0.0,
            "max_kwh": _r(cyc.max()) if cyc.size else 0.0,
            "mean_equivalent_full_cycles": _r(efc.mean()) if efc.size else 0.0,
            "jain_index": round(jain_index(cyc), 4),
            "discharged_mean_kwh": _r(dis.mean()) if dis.size else 0.0,
            "discharged_jain_index": round(jain_index(dis), 4),
        },
        "energy": {
            "through_chargers_kwh": _r(result.meter_kwh[-1]),
            "baseline_kwh": _r(result.baseline_kw.sum() * result.step_s / 3600.0),
        },
        "speed": {
            "setup_s": round(setup_s, 3),
            "loop_s": round(loop_s, 3),
            "vehicle_steps": vs,
            "vehicle_steps_per_s": round(vs / loop_s) if loop_s > 0 else None,
        },
    }
    reg = scenario.regulation
    if reg is not None:
        inside = ~np.isnan(result.signal)
        if inside.any():
            want = result.baseline_kw[inside] + result.signal[inside] * reg.capacity_kw
            err = result.fleet_kw[inside] - want
            rms = float(np.sqrt(np.mean(err * err)))
            out["regulation"] = {
                "steps": int(inside.sum()),
                "capacity_kw": reg.capacity_kw,
                "signal": reg.signal,
                "rms_error_kw": _r(rms),
                "rms_error_of_capacity": round(rms / reg.capacity_kw, 4),
                "requests_by_admission": _count(
                    str(r["admission"])
                    for r in rows
                    if reg_prefix and r["request_id"].startswith(reg_prefix)
                ),
            }
    return out


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _r(x: Any, nd: int = 3) -> float:
    return round(float(x), nd)


def summary_line(summary: dict[str, Any], out_dir: Path) -> str:
    """The one line printed at the end of a run."""
    req, drv, cyc, spd = (
        summary["requests"],
        summary["drivers"],
        summary["energy_cycled"],
        summary["speed"],
    )
    asked, got = req["requested_kwh"], req["delivered_kwh"]
    share = f" ({100.0 * got / asked:.1f}%)" if abs(asked) > 1e-9 else ""
    line = (
        f"{summary['scenario']}: {summary['vehicles']:,} vehicles x {summary['steps']} steps of"
        f" {summary['step_s']:g} s in {spd['loop_s']:.2f} s"
        f" ({(spd['vehicle_steps_per_s'] or 0):,.0f} vehicle-steps/s);"
    )
    if req["total"]:
        line += (
            f" {req['total']} requests {req['by_status']}, delivered {got:+,.1f} of"
            f" {asked:+,.1f} kWh{share};"
        )
    if "regulation" in summary:
        reg = summary["regulation"]
        line += (
            f" regulation over {reg['steps']} steps {reg['requests_by_admission']},"
            f" rms error {100 * reg['rms_error_of_capacity']:.1f}% of capacity;"
        )
    if "grid" in summary:
        g = summary["grid"]
        line += (
            f" grid limits broken {g['platform']['violations']} times"
            f" ({g['platform']['violation_kwh']:,.1f} kWh) with the platform,"
            f" {g['plain_charging']['violations']} ({g['plain_charging']['violation_kwh']:,.1f}"
            " kWh) on plain charging;"
        )
        for c in g["curtailment"]:
            line += (
                f" {c['node']} curtailment {c['without_cars_kwh']:,.1f} kWh without cars,"
                f" {c['platform_kwh']:,.1f} with the platform;"
            )
        for f in g.get("firming", []):
            pl, pc = f["platform"], f["plain_charging"]
            line += (
                f" firming {f['node']} outside its band {pl['outside_band_kwh']:,.1f} kWh"
                f" ({pc['outside_band_kwh']:,.1f} on plain charging)"
            )
            if "ramp_violations" in pl:
                line += f", ramp violations {pl['ramp_violations']} ({pc['ramp_violations']})"
            line += ";"
        for key, pf in g.get("powerflow", {}).items():
            if key != "buses" and pf["flows"]:
                line += (
                    f" power flow ({key}) V {pf['v_min_pu']:.3f}-{pf['v_max_pu']:.3f} pu,"
                    f" trafo {pf['trafo_max_loading_pct']:.0f}%, {pf['ms_per_flow_mean']:.1f} ms/flow;"
                )
    line += (
        f" drivers short {drv['short']} of {drv['departures']} departures;"
        f" Jain index of energy cycled {cyc['jain_index']:.3f}; results in {out_dir}"
    )
    return line


# -- files -------------------------------------------------------------------------------

INTERVAL_FIELDS = (
    "time",
    "t_s",
    "plugged",
    "fleet_kw",
    "baseline_kw",
    "request_id",
    "requested_kw",
    "allocated_kw",
    "delivered_kw",
    "error_kw",
    "signal",
    "energy_kwh",
    "interval_kwh",
    "meter_kwh",
    "departures",
    "short",
)


def interval_columns(result: SimResult) -> dict[str, list[Any]]:
    """The per-step table as columns (NaN where a field does not apply)."""
    active = ~np.isnan(result.requested_kw)
    delivered = np.where(active, result.fleet_kw, np.nan)
    return {
        "time": [from_epoch(float(t)).isoformat() for t in result.t],
        "t_s": result.t.tolist(),
        "plugged": result.plugged.tolist(),
        "fleet_kw": np.round(result.fleet_kw, 3).tolist(),
        "baseline_kw": np.round(result.baseline_kw, 3).tolist(),
        "request_id": list(result.request_id),
        "requested_kw": np.round(result.requested_kw, 3).tolist(),
        "allocated_kw": np.round(result.allocated_kw, 3).tolist(),
        "delivered_kw": np.round(delivered, 3).tolist(),
        "error_kw": np.round(delivered - result.requested_kw, 3).tolist(),
        "signal": np.round(result.signal, 4).tolist(),
        "energy_kwh": np.round(result.energy_kwh, 3).tolist(),
        "interval_kwh": np.round(result.fleet_kw * result.step_s / 3600.0, 4).tolist(),
        "meter_kwh": np.round(result.meter_kwh, 3).tolist(),
        "departures": result.departures.tolist(),
        "short": result.short.tolist(),
    }


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    names = list(columns)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for row in zip(*(columns[n] for n in names), strict=True):
            w.writerow([_csv_value(v) for v in row])


def write_parquet(path: Path, columns: dict[str, Any]) -> bool:
    """Write Parquet if pyarrow is importable (an optional extra); False if it is not."""
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        return False
    pq.write_table(pa.table(columns), path)
    return True


def write_outputs(
    scenario: Scenario,
    result: SimResult,
    summary: dict[str, Any],
    out_dir: Path,
    *,
    plot: bool = True,
) -> list[Path]:
    """Every output file of a run; returns their paths (summary.json is written by ``run``)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ScenarioError(f"cannot create output directory {out_dir}: {err.strerror}") from None
    files: list[Path] = []
    intervals = interval_columns(result)
    write_csv(out_dir / "intervals.csv", intervals)
    files.append(out_dir / "intervals.csv")
    rows = request_rows(result)
    req_cols: dict[str, list[Any]] = {
        k: [r[k] for r in rows] for k in (rows[0] if rows else _request_row_keys())
    }
    write_csv(out_dir / "requests.csv", req_cols)
    files.append(out_dir / "requests.csv")
    part = result.ever_plugged
    veh_cols: dict[str, Any] = {
        "row": np.flatnonzero(part),
        "throughput_kwh": np.round(result.throughput_kwh[part], 4),
        "discharged_kwh": np.round(result.discharged_kwh[part], 4),
    }
    if result.vehicles <= VEHICLE_CSV_LIMIT:
        write_csv(
            out_dir / "vehicles.csv", {k: np.asarray(v).tolist() for k, v in veh_cols.items()}
        )
        files.append(out_dir / "vehicles.csv")
    parquet = [
        ("intervals.parquet", intervals),
        ("requests.parquet", req_cols),
        ("vehicles.parquet", veh_cols),
    ]
    for name, cols in parquet:
        if write_parquet(out_dir / name, cols):
            files.append(out_dir / name)
    summary["files"] = [p.name for p in files] + ["summary.json"]
    if plot:
        draw(scenario, result, out_dir / "plot.png")
        files.append(out_dir / "plot.png")
        summary["files"].append("plot.png")
    return files


def _request_row_keys() -> list[str]:
    stub = RequestRecord(DispatchRequest(request_id="x", power_kw=0.0, duration_s=1.0), 0.0)
    return list(_request_row(stub))


def draw(scenario: Scenario, result: SimResult, path: Path) -> None:
    """Fleet power against baseline and request, and the plugged-in fleet, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    hours = (result.t - result.t[0]) / 3600.0
    edges = np.append(hours, hours[-1] + result.step_s / 3600.0)
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1.0])
    top.stairs(
        result.fleet_kw,
        edges,
        label="fleet net power",
        color="tab:blue",
        lw=1.8,
        zorder=3,
        baseline=None,
    )
    top.stairs(
        result.baseline_kw,
        edges,
        label="baseline (plain charging)",
        color="tab:gray",
        ls="--",
        baseline=None,
    )
    if not np.all(np.isnan(result.requested_kw)):
        top.stairs(
            result.requested_kw, edges, label="requested", color="tab:red", lw=1.2, baseline=None
        )
    top.axhline(0.0, color="black", lw=0.6)
    top.set_ylabel("kW (+ charging, − discharging)")
    top.set_title(
        f"{scenario.name}: {result.vehicles:,} vehicles, step {result.step_s:g} s, from"
        f" {scenario.start:%Y-%m-%d %H:%M} UTC"
    )
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    bottom.stairs(result.plugged.astype(float), edges, color="tab:green", label="plugged in")
    bottom.set_ylabel("vehicles plugged in")
    bottom.set_xlabel(f"hours from {scenario.start:%Y-%m-%d %H:%M} UTC")
    bottom.grid(alpha=0.3)
    twin = bottom.twinx()
    twin.plot(hours, result.energy_kwh / 1000.0, color="tab:orange", lw=1.2, label="stored energy")
    twin.set_ylabel("stored in plugged-in vehicles, MWh")
    fig.savefig(path, dpi=110)
