"""The dispatch ledger's writer (nothing lost while the store is away) and the report
built from it (per interval, CSV, PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aggregator.ledger import Entry, LedgerWriter, MemoryLedger, answer_entry, step_entry
from broker.models import DispatchProgress, DispatchResult, from_epoch
from core.errors import TransportError
from v2g import report
from v2g.cli import app

T0 = 1_780_000_000.0


class FlakyLedger(MemoryLedger):
    """A memory ledger that is 'away' while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def append(self, entries):  # type: ignore[no-untyped-def]
        if self.down:
            raise TransportError("away")
        await super().append(entries)


def progress(k: int, power: float = -100.0) -> DispatchProgress:
    t = T0 + 5 * k
    return DispatchProgress(
        request_id="r1",
        ts=from_epoch(t),
        requested_kw=power,
        allocated_kw=power,
        delivered_kw=power * 0.99,
        baseline_kw=20.0,
        requested_kwh=power * 5 * k / 3600,
        delivered_kwh=power * 0.99 * 5 * k / 3600,
        vehicles=10,
        elapsed_s=5 * k,
        remaining_s=600 - 5 * k,
    )


def entries(steps: int = 120) -> list[Entry]:
    accepted = DispatchResult(
        request_id="r1", status="accepted", requested_kw=-100.0, allocated_kw=-100.0,
        ts=from_epoch(T0),
    )  # fmt: skip
    out = [answer_entry(accepted)]
    out += [step_entry(progress(k), setpoints=3) for k in range(1, steps + 1)]
    done = DispatchResult(
        request_id="r1", status="completed", requested_kw=-100.0, allocated_kw=-100.0,
        delivered_kwh=-16.5, requested_kwh=-16.6667, baseline_kwh=3.3,
        ts=from_epoch(T0 + 5 * steps),
    )  # fmt: skip
    return [*out, answer_entry(done)]


async def test_entries_wait_while_the_store_is_away_and_go_out_in_order() -> None:
    ledger = FlakyLedger()
    w = LedgerWriter(ledger)
    ledger.down = True
    for k, e in enumerate(entries(10)):
        w.add("r1", e)
        if k % 3 == 0:
            assert not await w.drain()
    assert len(w.owed) == 12 and w.failed_writes >= 1 and w.written == 0
    ledger.down = False
    assert await w.drain()
    got = await ledger.read("r1")
    assert got == entries(10) and not w.owed and w.written == 12


def test_the_report_has_intervals_totals_a_csv_and_a_png(tmp_path: Path) -> None:
    r = report.parse("r1", entries())
    assert r.final is not None and r.final.status == "completed"
    rows = report.intervals(r, 60.0)
    assert len(rows) == 10  # 120 steps of 5 s in 1-minute intervals
    # kWh are booked to 4 decimals: a minute's row shows its kW to within 0.01 kW.
    assert all(row.requested_kw == pytest.approx(-100.0, abs=0.01) for row in rows)
    assert sum(row.requested_kwh for row in rows) == pytest.approx(-100 * 600 / 3600, abs=1e-4)
    totals = report.summary(r)
    assert totals["status"] == "completed"
    assert totals["delivered_kwh"] == -16.5 and totals["error_pct"] == pytest.approx(1.0, abs=0.01)
    report.write_csv(rows, tmp_path / "report.csv")
    with (tmp_path / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 10 and float(table[0]["requested_kw"]) == pytest.approx(-100.0)
    report.plot(r, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="positive"):
        report.intervals(r, 0.0)


def test_report_for_an_unknown_request_says_where_it_looked() -> None:
    result = CliRunner().invoke(
        app, ["report", "no-such-request", "--redis", "redis://127.0.0.1:9/0"]
    )
    assert result.exit_code != 0
    assert "redis" in result.output.lower()
