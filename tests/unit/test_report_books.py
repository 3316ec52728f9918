"""``v2g report`` tells the books as they are: its rows add up to the totals, an amended
request shows the power asked in each row, every time is ISO 8601 UTC, and the plot
draws steps (gaps stay gaps) with the allocated power and the totals in its title."""

from __future__ import annotations

import csv
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from aggregator.ledger import Entry, answer_entry, departure_entry, step_entry
from aggregator.settlement import Departure
from broker.models import DispatchProgress, DispatchResult, from_epoch
from v2g import report

T0 = 1_780_000_000.0
STEP = 5.0
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def step(t: float, power: float, books: tuple[float, float, float]) -> Entry:
    req, dlv, base = books
    p = DispatchProgress(
        request_id="r1",
        ts=from_epoch(t),
        requested_kw=power,
        allocated_kw=power,
        delivered_kw=power,
        baseline_kw=50.0,
        requested_kwh=req,
        delivered_kwh=dlv,
        baseline_kwh=base,
        vehicles=10,
        elapsed_s=t - T0,
        remaining_s=0.0,
        delivery_start=from_epoch(T0 + 1.0),
    )
    return step_entry(p, setpoints=3)


def ledger(
    times: list[float], powers: list[float], *, amended_at: float | None = None, end: float
) -> list[Entry]:
    """A request whose window opened at T0 + 1, stepped at ``times`` with the fleet on the
    ``powers`` asked, amended at ``amended_at`` (if given), completed at ``end``."""
    start = T0 + 1.0
    out = [
        answer_entry(
            DispatchResult(
                request_id="r1", status="accepted", requested_kw=powers[0],
                allocated_kw=powers[0], ts=from_epoch(T0),
            )
        )
    ]  # fmt: skip
    req = dlv = base = 0.0
    prev = start
    for t, p in zip(times, powers, strict=True):
        # The books to t ran on the power in force before this step's (an amendment is
        # answered at a step and takes effect from it).
        before = powers[times.index(t) - 1] if t > times[0] else p
        h = (t - prev) / 3600.0
        req, dlv, base = req + before * h, dlv + before * 0.99 * h, base + 50.0 * h
        if amended_at is not None and t == amended_at:
            out.append(
                answer_entry(
                    DispatchResult(
                        request_id="r1", status="accepted", reason="amended",
                        requested_kw=p, allocated_kw=p, ts=from_epoch(t),
                    )
                )
            )  # fmt: skip
        out.append(step(t, p, (req, dlv, base)))
        prev = t
    h = (end - prev) / 3600.0
    last = powers[-1]
    done = DispatchResult(
        request_id="r1", status="completed", requested_kw=last, allocated_kw=last,
        requested_kwh=round(req + last * h, 4), delivered_kwh=round(dlv + last * 0.99 * h, 4),
        baseline_kwh=round(base + 50.0 * h, 4), delivery_start=from_epoch(start),
        ts=from_epoch(end),
    )  # fmt: skip
    out.append(answer_entry(done))
    return out


def test_the_rows_add_up_to_the_totals_the_last_piece_included() -> None:
    """Steps every 5 s from T0 + 5; the request ends (a step is timed there) at T0 + 598,
    2 s before the step after its last: that piece is booked in the final answer only."""
    times = [T0 + STEP * k for k in range(1, 120)]
    r = report.parse("r1", ledger(times, [-100.0] * len(times), end=T0 + 598.0))
    rows = report.intervals(r, 60.0)
    final = r.final
    assert final is not None
    assert final.requested_kwh == pytest.approx(-100.0 * 597.0 / 3600.0, abs=1e-4)
    assert sum(row.requested_kwh for row in rows) == pytest.approx(final.requested_kwh, abs=1e-9)
    assert sum(row.delivered_kwh for row in rows) == pytest.approx(final.delivered_kwh, abs=1e-9)
    assert sum(row.baseline_kwh for row in rows) == pytest.approx(final.baseline_kwh, abs=1e-9)
    # From the opening of the delivery window to the close, without a gap or an overlap.
    assert rows[0].start == pytest.approx(T0 + 1.0) and rows[-1].end == pytest.approx(T0 + 598.0)
    assert all(a.end == b.start for a, b in itertools.pairwise(rows))
    totals = report.summary(r)
    assert totals["delivered_kwh"] == final.delivered_kwh
    assert totals["delivery_start"] == report.iso(T0 + 1.0)


def test_an_amended_request_shows_the_power_asked_in_each_row() -> None:
    """-100 kW, amended at T0 + 60 to -200 kW: with 5-minute rows the first is split at
    the amendment, each part showing its own power, never their average."""
    times = [T0 + STEP * k for k in range(1, 120)]
    powers = [-100.0 if t < T0 + 60.0 else -200.0 for t in times]
    r = report.parse("r1", ledger(times, powers, amended_at=T0 + 60.0, end=T0 + 600.0))
    rows = report.intervals(r, 300.0)
    assert [round(row.end - row.start, 6) for row in rows] == [59.0, 240.0, 300.0]
    assert [row.requested_kw for row in rows] == pytest.approx([-100.0, -200.0, -200.0], abs=0.01)
    assert [row.delivered_kw for row in rows] == pytest.approx([-99.0, -198.0, -198.0], abs=0.01)


def test_every_time_in_the_table_and_the_csv_is_iso_8601_utc(tmp_path: Path) -> None:
    times = [T0 + STEP * k for k in range(1, 30)]
    entries = ledger(times, [-100.0] * len(times), end=T0 + 150.0)
    gone = Departure("ev-0007", T0 + 100.25, 20.0, 30.0, T0 + 90.0)
    r = report.parse("r1", [*entries, departure_entry(gone)])
    assert r.vehicles.short  # left after the time they announced, 10 kWh short
    rows = report.intervals(r, 60.0)
    report.write_csv(rows, tmp_path / "report.csv")
    with (tmp_path / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert table and all(ISO.match(row["start"]) and ISO.match(row["end"]) for row in table)
    assert table[0]["start"] == "2026-05-28T20:26:41.000Z"
    lines = report.table(r, rows)
    printed = [w for line in lines for w in re.findall(r"\S*\d\d:\d\d\S*", line)]
    assert printed, lines
    assert all(ISO.match(w.rstrip(",")) or w.startswith("delivery_start=") for w in printed)
    assert any("ev-0007 at 2026-05-28T20:28:20.250Z" in line for line in lines)


def test_the_plot_draws_steps_with_allocated_power_gaps_and_the_totals_in_its_title() -> None:
    # Steps every 5 s, none between T0 + 100 and T0 + 200 (the aggregator was away).
    times = [T0 + STEP * k for k in range(1, 60) if not T0 + 100 < T0 + STEP * k < T0 + 200]
    r = report.parse("r1", ledger(times, [-100.0] * len(times), end=T0 + 300.0))
    fig = report.figure(r)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"requested", "allocated", "delivered", "baseline (plain charging)"} <= set(lines)
    for label in ("requested", "allocated", "delivered", "baseline (plain charging)"):
        line = lines[label]
        assert line.get_drawstyle() in ("steps-post", "steps-pre"), label
        x = np.asarray(line.get_xdata(), dtype=float)
        y = np.asarray(line.get_ydata(), dtype=float)
        # The outage is a NaN between its two sides: no segment spans it.
        inside = (x > (T0 + 100 - T0 - 1.0) / 60.0) & (x < (T0 + 200 - T0 - 1.0) / 60.0)
        assert inside.any() and np.isnan(y[inside]).all(), label
        assert not math.isnan(y[0])
    totals = report.summary(r)
    title = ax.get_title()
    assert "completed" in title
    assert f"{totals['requested_kwh']:+.3f} kWh" in title
    assert f"{totals['delivered_kwh']:+.3f} kWh" in title
    assert f"error {totals['error_pct']:.2f}%" in title
