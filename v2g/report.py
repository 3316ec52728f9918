"""``v2g report REQUEST_ID``: a request's settlement from its ledger, per interval, as a
table, a CSV and a PNG (requested vs baseline vs delivered)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.ledger import Entry
from broker.models import DispatchResult


@dataclass(frozen=True, slots=True)
class Steps:
    """The ``step`` entries of a request as columns, in time order."""

    t: np.ndarray
    requested_kw: np.ndarray
    allocated_kw: np.ndarray
    delivered_kw: np.ndarray
    baseline_kw: np.ndarray
    requested_kwh: np.ndarray
    delivered_kwh: np.ndarray
    vehicles: np.ndarray
    setpoints: np.ndarray


@dataclass(frozen=True, slots=True)
class Interval:
    start: float
    end: float
    requested_kw: float
    baseline_kw: float
    delivered_kw: float
    requested_kwh: float
    delivered_kwh: float
    baseline_kwh: float


@dataclass(frozen=True, slots=True)
class VehicleTotals:
    """Each vehicle's metered and baseline kWh over the request (its settlement
    intervals summed), and the drivers who unplugged while it ran."""

    vehicle_ids: list[str]
    metered_kwh: np.ndarray
    baseline_kwh: np.ndarray
    intervals: int
    departures: list[Entry]

    @property
    def short(self) -> list[Entry]:
        """Drivers who left short of their target at or after their announced time."""
        return [d for d in self.departures if d.get("short") == "1"]


@dataclass(frozen=True, slots=True)
class Report:
    request_id: str
    answers: list[DispatchResult]
    steps: Steps
    vehicles: VehicleTotals

    @property
    def final(self) -> DispatchResult | None:
        done = [a for a in self.answers if a.status in ("completed", "cancelled", "rejected")]
        return done[-1] if done else None


def parse(request_id: str, entries: list[Entry]) -> Report:
    """Ledger entries → a report; entries of an unknown kind are skipped."""
    answers = [
        DispatchResult.model_validate_json(e["json"]) for e in entries if e.get("kind") == "answer"
    ]
    rows = [e for e in entries if e.get("kind") == "step"]
    rows.sort(key=lambda e: float(e["ts"]))

    def col(name: str) -> np.ndarray:
        return np.array([float(e[name]) for e in rows], dtype=np.float64)

    steps = Steps(
        t=col("ts"),
        requested_kw=col("requested_kw"),
        allocated_kw=col("allocated_kw"),
        delivered_kw=col("delivered_kw"),
        baseline_kw=col("baseline_kw"),
        requested_kwh=col("requested_kwh"),
        delivered_kwh=col("delivered_kwh"),
        vehicles=col("vehicles"),
        setpoints=col("setpoints"),
    )
    return Report(request_id, answers, steps, vehicle_totals(entries))


def vehicle_totals(entries: list[Entry]) -> VehicleTotals:
    """Sum the ``vehicles`` entries (one per settlement interval) per vehicle."""
    metered: dict[str, float] = {}
    baseline: dict[str, float] = {}
    n = 0
    for e in entries:
        if e.get("kind") != "vehicles":
            continue
        n += 1
        cols = json.loads(e["json"])
        for vid, m, b in zip(cols["vehicle_id"], cols["metered_kwh"], cols["baseline_kwh"],
                             strict=True):  # fmt: skip
            metered[vid] = metered.get(vid, 0.0) + m
            baseline[vid] = baseline.get(vid, 0.0) + b
    ids = sorted(metered)
    return VehicleTotals(
        vehicle_ids=ids,
        metered_kwh=np.array([metered[v] for v in ids]),
        baseline_kwh=np.array([baseline[v] for v in ids]),
        intervals=n,
        departures=[e for e in entries if e.get("kind") == "departure"],
    )


def write_vehicles_csv(v: VehicleTotals, path: Path) -> None:
    """Per vehicle: metered, baseline and their difference (what it gave the request)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["vehicle_id", "metered_kwh", "baseline_kwh", "vs_baseline_kwh"])
        for vid, m, b in zip(v.vehicle_ids, v.metered_kwh, v.baseline_kwh, strict=True):
            w.writerow([vid, f"{m:.4f}", f"{b:.4f}", f"{m - b:.4f}"])


def intervals(r: Report, interval_s: float) -> list[Interval]:
    """Steps grouped into intervals of ``interval_s`` from the first: mean kW, and the
    energy in each (requested and delivered from the books, baseline by the mean)."""
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    s = r.steps
    if s.t.size == 0:
        return []
    t0 = float(s.t[0])
    which = np.floor((s.t - t0) / interval_s).astype(np.intp)
    out: list[Interval] = []
    prev_req = prev_del = 0.0
    for k in range(int(which.max()) + 1):
        m = which == k
        if not m.any():
            continue
        start, end = t0 + k * interval_s, min(t0 + (k + 1) * interval_s, float(s.t[m][-1]))
        req_kwh = float(s.requested_kwh[m][-1])
        del_kwh = float(s.delivered_kwh[m][-1])
        base_kw = float(s.baseline_kw[m].mean())
        out.append(
            Interval(
                start=start,
                end=end,
                requested_kw=float(s.requested_kw[m].mean()),
                baseline_kw=base_kw,
                delivered_kw=float(s.delivered_kw[m].mean()),
                requested_kwh=req_kwh - prev_req,
                delivered_kwh=del_kwh - prev_del,
                baseline_kwh=base_kw * max(end - start, 0.0) / 3600.0,
            )
        )
        prev_req, prev_del = req_kwh, del_kwh
    return out


def write_csv(rows: list[Interval], path: Path) -> None:
    fields = [
        "start",
        "end",
        "requested_kw",
        "baseline_kw",
        "delivered_kw",
        "requested_kwh",
        "delivered_kwh",
        "baseline_kwh",
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for r in rows:
            w.writerow([f"{getattr(r, f):.4f}" for f in fields])


def plot(r: Report, path: Path) -> None:
    """Requested, baseline and delivered fleet kW over the request, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r.steps
    minutes = (s.t - s.t[0]) / 60.0 if s.t.size else s.t
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    ax.plot(minutes, s.requested_kw, label="requested", color="black", linestyle="--")
    ax.plot(minutes, s.baseline_kw, label="baseline (plain charging)", color="grey")
    ax.plot(minutes, s.delivered_kw, label="delivered", color="tab:blue")
    ax.axhline(0.0, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("minutes from the first step")
    ax.set_ylabel("fleet net power, kW (+ import, - export)")
    final = r.final
    title = f"{r.request_id}" + (f": {final.status}" if final else "")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(r: Report) -> dict[str, float | str | None]:
    """The totals a settlement reads: energies, the error, and the final status."""
    s = r.steps
    final = r.final
    requested = float(s.requested_kwh[-1]) if s.t.size else 0.0
    delivered = float(s.delivered_kwh[-1]) if s.t.size else 0.0
    if final is not None and final.delivered_kwh is not None:
        delivered = final.delivered_kwh
        requested = final.requested_kwh if final.requested_kwh is not None else requested
    error = abs(delivered - requested) / abs(requested) if requested else math.nan
    return {
        "status": final.status if final else (r.answers[-1].status if r.answers else None),
        "requested_kwh": round(requested, 4),
        "delivered_kwh": round(delivered, 4),
        "baseline_kwh": None if final is None else final.baseline_kwh,
        "error_pct": None if math.isnan(error) else round(100 * error, 2),
        "steps": int(s.t.size),
        "score": final.score if final else None,
        "fcr_share": final.fcr_share if final else None,
        "vehicles": len(r.vehicles.vehicle_ids),
        "drivers_unplugged": len(r.vehicles.departures),
        "drivers_short": len(r.vehicles.short),
    }
