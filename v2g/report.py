"""``v2g report REQUEST_ID``: a request's settlement from its ledger, per interval, as a
table, a CSV and a PNG (requested vs baseline vs delivered); for a firming request, its
node's energy outside the band and ramp violations per settlement interval, with the
fleet and on plain charging."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aggregator.firming import FirmingInterval
from aggregator.ledger import Entry, firming_of
from broker.models import DispatchResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True, slots=True)
class Steps:
    """The ``step`` entries of a request as columns, in time order (``baseline_kwh`` is
    NaN in ledgers written before steps carried it)."""

    t: np.ndarray
    requested_kw: np.ndarray
    allocated_kw: np.ndarray
    delivered_kw: np.ndarray
    baseline_kw: np.ndarray
    requested_kwh: np.ndarray
    delivered_kwh: np.ndarray
    baseline_kwh: np.ndarray
    vehicles: np.ndarray
    setpoints: np.ndarray


@dataclass(frozen=True, slots=True)
class Interval:
    """One row of the report: the books between two of its points (``start`` is the end of
    the row before, or the opening of the delivery window); kW are the energies over the
    row's span, so an amended request shows the power asked in each row."""

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


def firming_rows(entries: list[Entry]) -> list[FirmingInterval]:
    """The ``firming`` entries, in time order."""
    rows = [firming_of(e) for e in entries if e.get("kind") == "firming"]
    return sorted(rows, key=lambda r: r.start)


@dataclass(frozen=True, slots=True)
class Report:
    request_id: str
    answers: list[DispatchResult]
    steps: Steps
    vehicles: VehicleTotals
    # Per step, when the delivery window opened as that step saw it (NaN if not recorded).
    steps_delivery_start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    firming: list[FirmingInterval] = field(default_factory=list)

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
        return np.array([float(e.get(name, "nan")) for e in rows], dtype=np.float64)

    steps = Steps(
        t=col("ts"),
        requested_kw=col("requested_kw"),
        allocated_kw=col("allocated_kw"),
        delivered_kw=col("delivered_kw"),
        baseline_kw=col("baseline_kw"),
        requested_kwh=col("requested_kwh"),
        delivered_kwh=col("delivered_kwh"),
        baseline_kwh=col("baseline_kwh"),
        vehicles=col("vehicles"),
        setpoints=col("setpoints"),
    )
    return Report(
        request_id,
        answers,
        steps,
        vehicle_totals(entries),
        col("delivery_start"),
        firming_rows(entries),
    )


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


def iso(t: float) -> str:
    """A platform time as the report writes every time: ISO 8601, UTC, to the millisecond."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def window_start(r: Report) -> float | None:
    """When the request's delivery window opened (its first setpoints in force), else
    when it was accepted (ledgers from before the window was recorded)."""
    for a in reversed(r.answers):
        if a.delivery_start is not None:
            return a.delivery_start.timestamp()
    opened = [float(e) for e in r.steps_delivery_start if math.isfinite(e)]
    if opened:
        return opened[0]
    for a in r.answers:
        if a.status in ("accepted", "partial"):
            return a.ts.timestamp()
    return None


def _points(r: Report) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The books as cumulative points (t, requested, delivered, baseline kWh): the window
    opening at zero, every step, and the final answer's totals (the last piece of the
    window is booked when the request closes, in no step)."""
    s = r.steps
    t: list[float] = s.t.tolist()
    req: list[float] = s.requested_kwh.tolist()
    dlv: list[float] = s.delivered_kwh.tolist()
    base: list[float] = s.baseline_kwh.tolist()
    start = window_start(r)
    if start is not None and (not t or start < t[0]):
        t, req, dlv, base = [start, *t], [0.0, *req], [0.0, *dlv], [0.0, *base]
    final = r.final
    if final is not None and final.delivered_kwh is not None and final.requested_kwh is not None:
        last = final.baseline_kwh if final.baseline_kwh is not None else math.nan
        if t and final.ts.timestamp() <= t[-1]:  # closed on its last step: same point
            req[-1], dlv[-1], base[-1] = final.requested_kwh, final.delivered_kwh, last
        else:
            t.append(final.ts.timestamp())
            req.append(final.requested_kwh)
            dlv.append(final.delivered_kwh)
            base.append(last)
    return np.array(t), np.array(req), np.array(dlv), np.array(base)


def intervals(r: Report, interval_s: float) -> list[Interval]:
    """The books in rows of ``interval_s`` from the opening of the delivery window, split
    where the request was amended, up to its close: energies are the differences of the
    books at the rows' ends (so the rows add up to the totals), kW those energies over
    each row's span (an amended request's rows each show the power asked then)."""
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    t, req, dlv, base = _points(r)
    if t.size < 2:
        return []
    # Row k holds the points in (t0 + k·interval, t0 + (k+1)·interval]; each amendment
    # (answered at a step, on the terms before it up to that step) starts a new row.
    which = np.ceil((t[1:] - t[0]) / interval_s - 1e-9).astype(np.intp)
    amended = sorted(
        a.ts.timestamp() for a in r.answers if a.reason and a.reason.startswith("amended")
    )
    which = which * (len(amended) + 1) + np.searchsorted(amended, t[1:] - 1e-6)
    if np.isnan(base).any():  # an older ledger: the baseline by its mean kW, step by step
        kw = np.interp(t, r.steps.t, r.steps.baseline_kw) if r.steps.t.size else 0.0 * t
        base = np.concatenate([[0.0], np.cumsum(0.5 * (kw[1:] + kw[:-1]) * np.diff(t) / 3600.0)])
    out: list[Interval] = []
    prev = 0
    for k in np.unique(which):
        last = int(np.flatnonzero(which == k)[-1]) + 1  # index into t
        span_h = (t[last] - t[prev]) / 3600.0
        energies = [float(x[last] - x[prev]) for x in (req, dlv, base)]
        kw = [e / span_h if span_h > 0 else math.nan for e in energies]
        out.append(
            Interval(
                start=float(t[prev]),
                end=float(t[last]),
                requested_kw=kw[0],
                baseline_kw=kw[2],
                delivered_kw=kw[1],
                requested_kwh=energies[0],
                delivered_kwh=energies[1],
                baseline_kwh=energies[2],
            )
        )
        prev = last
    return out


def write_csv(rows: list[Interval], path: Path) -> None:
    fields = [
        "requested_kw",
        "baseline_kw",
        "delivered_kw",
        "requested_kwh",
        "delivered_kwh",
        "baseline_kwh",
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["start", "end", *fields])
        for r in rows:
            w.writerow([iso(r.start), iso(r.end), *(f"{getattr(r, f):.4f}" for f in fields)])


def table(r: Report, rows: list[Interval]) -> list[str]:
    """The report as printed: a row per interval, the totals, any driver left short."""
    lines = [
        f"{'start (UTC)':<24} {'end (UTC)':<24} {'requested kW':>12} {'baseline kW':>12}"
        f" {'delivered kW':>12} {'req kWh':>9} {'del kWh':>9} {'base kWh':>9}"
    ]
    lines += [
        f"{iso(row.start):<24} {iso(row.end):<24} {row.requested_kw:>12.1f}"
        f" {row.baseline_kw:>12.1f} {row.delivered_kw:>12.1f} {row.requested_kwh:>9.3f}"
        f" {row.delivered_kwh:>9.3f} {row.baseline_kwh:>9.3f}"
        for row in rows
    ]
    lines += firming_table(r.firming)
    totals = summary(r)
    lines.append(" ".join(f"{k}={v}" for k, v in totals.items()))
    lines += [
        f"driver left short: {d['vehicle_id']} at {iso(float(d['ts']))},"
        f" {float(d['short_kwh']):.2f} kWh under target"
        for d in r.vehicles.short
    ]
    return lines


def firming_table(rows: list[FirmingInterval]) -> list[str]:
    """A firming request's settlement intervals: outside the band (kWh) and ramp
    violations with the fleet, then on plain charging (none: no lines)."""
    if not rows:
        return []
    lines = [
        f"firming on node {rows[0].node}: per settlement interval, with the fleet and on"
        " plain charging (the baseline)",
        f"{'start (UTC)':<24} {'end (UTC)':<24} {'outside kWh':>11} {'ramp viol':>9}"
        f" {'base out kWh':>12} {'base ramp':>9}",
    ]
    lines += [
        f"{iso(row.start):<24} {iso(row.end):<24} {row.outside_band_kwh:>11.3f}"
        f" {row.ramp_violations:>9d} {row.baseline_outside_band_kwh:>12.3f}"
        f" {row.baseline_ramp_violations:>9d}"
        for row in rows
    ]
    return lines


def _with_gaps(t: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """Break the lines where steps are missing (an outage): a NaN point after each gap of
    more than 1.5 usual steps, so no line spans it."""
    if t.size < 3:
        return (t, *ys)
    dt = np.diff(t)
    gap = np.flatnonzero(dt > 1.5 * float(np.median(dt)))
    if gap.size == 0:
        return (t, *ys)
    at = gap + 1
    t = np.insert(t, at, t[gap] + 0.5 * dt[gap])
    return (t, *(np.insert(y, at, np.nan) for y in ys))


def plot(r: Report, path: Path) -> None:
    """:func:`figure` as a PNG."""
    figure(r).savefig(path)


def figure(r: Report) -> Figure:
    """Requested, allocated, baseline and delivered fleet kW over the request, as steps
    (a step's setpoints hold from it to the next; what it measured, over the step before);
    gaps in the steps stay gaps. The title carries the totals and the error."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    s = r.steps
    t0 = window_start(r)
    t0 = float(s.t[0]) if t0 is None and s.t.size else (t0 or 0.0)
    t, req, alloc, dlv, base = _with_gaps(
        s.t, s.requested_kw, s.allocated_kw, s.delivered_kw, s.baseline_kw
    )
    minutes = (t - t0) / 60.0
    fig = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(minutes, req, label="requested", color="black", ls="--", drawstyle="steps-post")
    ax.plot(minutes, alloc, label="allocated", color="tab:orange", drawstyle="steps-post")
    ax.plot(minutes, base, label="baseline (plain charging)", color="grey", drawstyle="steps-pre")
    ax.plot(minutes, dlv, label="delivered", color="tab:blue", drawstyle="steps-pre")
    ax.axhline(0.0, color="lightgrey", linewidth=0.8)
    ax.set_xlabel(f"minutes from {iso(t0)}")
    ax.set_ylabel("fleet net power, kW (+ import, - export)")
    ax.set_title(title(r), fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return fig


def title(r: Report) -> str:
    """The plot's title: the request, its status, the energies and the error."""
    totals = summary(r)
    text = f"{r.request_id}: {totals['status']}"
    text += f", requested {totals['requested_kwh']:+.3f} kWh, delivered {totals['delivered_kwh']:+.3f} kWh"
    if totals["error_pct"] is not None:
        text += f", error {totals['error_pct']:.2f}%"
    return text


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
    baseline = final.baseline_kwh if final is not None else None
    if baseline is None and s.t.size and math.isfinite(s.baseline_kwh[-1]):
        baseline = round(float(s.baseline_kwh[-1]), 4)
    start = window_start(r)
    return {
        "status": final.status if final else (r.answers[-1].status if r.answers else None),
        "delivery_start": None if start is None else iso(start),
        "requested_kwh": round(requested, 4),
        "delivered_kwh": round(delivered, 4),
        "baseline_kwh": baseline,
        "error_pct": None if math.isnan(error) else round(100 * error, 2),
        "steps": int(s.t.size),
        "score": final.score if final else None,
        "fcr_share": final.fcr_share if final else None,
        "vehicles": len(r.vehicles.vehicle_ids),
        "drivers_unplugged": len(r.vehicles.departures),
        "drivers_short": len(r.vehicles.short),
        **firming_totals(r.firming),
    }


def firming_totals(rows: list[FirmingInterval]) -> dict[str, float | str | None]:
    """A firming request's totals over its intervals (none: empty)."""
    if not rows:
        return {}
    return {
        "outside_band_kwh": round(sum(x.outside_band_kwh for x in rows), 4),
        "ramp_violations": sum(x.ramp_violations for x in rows),
        "baseline_outside_band_kwh": round(sum(x.baseline_outside_band_kwh for x in rows), 4),
        "baseline_ramp_violations": sum(x.baseline_ramp_violations for x in rows),
    }
