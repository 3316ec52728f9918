"""Firming scored and booked per settlement interval (issue 11): the energy outside the
band and the ramp violations, with the fleet and with the node's cars on plain charging,
from the books (pure), over the in-memory loop, in the ledger entry and in the report."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.firming import FirmingBooks, outside, ramp_broken
from aggregator.ledger import answer_entry, firming_entry
from broker.models import DispatchRequest, GridMeter, from_epoch
from tests.support.memory_loop import STEP, T0, run_loop
from tests.unit.test_grid_step import drawn
from tests.unit.test_grid_step import setup as grid_setup
from v2g import report as rep

pytestmark = pytest.mark.timeout(60)


def test_outside_and_the_ramp() -> None:
    assert outside(-50.0, -100.0, -60.0) == 10.0
    assert outside(-120.0, -100.0, None) == 20.0
    assert outside(-80.0, -100.0, -60.0) == 0.0
    assert outside(1e6, None, None) == 0.0
    assert ramp_broken(0.0, 11.0, 120.0, 5.0)  # 10 kW allowed in 5 s
    assert not ramp_broken(0.0, 10.05, 120.0, 5.0)  # within the 1% tolerance
    assert not ramp_broken(0.0, 1e6, None, 5.0)  # no ramp: never
    assert not ramp_broken(float("nan"), 50.0, 1.0, 5.0)  # no step before: nothing to break


def test_intervals_split_at_the_boundary_and_close_at_the_end() -> None:
    b = FirmingBooks("pv", None, -60.0, 60.0, interval_s=900.0)
    t0 = 900.0 * 1000
    assert b.step(t0 + 890.0, -40.0, -10.0) == []  # 20 kW out (fleet), 50 kW (baseline)
    (first,) = b.step(t0 + 910.0, -40.0, 40.0)  # baseline jumps 50 kW in 20 s: > 20 kW
    assert (first.start, first.end) == (t0 + 890.0, t0 + 900.0)
    assert first.outside_band_kwh == pytest.approx(20.0 * 10.0 / 3600.0)
    assert first.baseline_outside_band_kwh == pytest.approx(50.0 * 10.0 / 3600.0)
    assert first.ramp_violations == first.baseline_ramp_violations == 0
    last = b.close(t0 + 920.0)
    assert last is not None and (last.start, last.end) == (t0 + 900.0, t0 + 920.0)
    assert last.ramp_violations == 0 and last.baseline_ramp_violations == 1
    # 10 s at 20 kW out then 10 s more; the baseline 10 s at 50 then 10 s at 100.
    assert last.outside_band_kwh == pytest.approx(20.0 * 20.0 / 3600.0)
    assert last.baseline_outside_band_kwh == pytest.approx((50.0 + 100.0) * 10.0 / 3600.0)
    assert b.total_outside_kwh == pytest.approx(20.0 * 30.0 / 3600.0)


@given(
    st.lists(
        st.tuples(st.floats(1.0, 400.0), st.floats(-200.0, 200.0), st.floats(-200.0, 200.0)),
        min_size=1,
        max_size=40,
    )
)
def test_the_intervals_tile_the_run_and_add_up(steps: list[tuple[float, float, float]]) -> None:
    """However the steps fall, the intervals are contiguous, aligned, and their energies
    add up to the whole run's (the last step's power held to the end)."""
    b = FirmingBooks("n", -50.0, 50.0, 30.0, interval_s=900.0)
    t = 900.0 * 7 + 13.0
    closed = []
    expected = 0.0
    prev: float | None = None
    for dt, net, base in steps:
        if prev is not None:
            expected += outside(prev, -50.0, 50.0) * dt / 3600.0
        t += dt if prev is not None else 0.0
        closed += b.step(t, net, base)
        prev = net
    last = b.close(t + 60.0)
    expected += outside(prev or 0.0, -50.0, 50.0) * 60.0 / 3600.0
    if last is not None:
        closed.append(last)
    assert all(a.end == c.start for a, c in itertools.pairwise(closed))
    assert all(c.end % 900.0 == 0.0 for c in closed[:-1])
    assert sum(c.outside_band_kwh for c in closed) == pytest.approx(expected, abs=1e-9)
    assert sum(c.ramp_violations for c in closed) == b.total_violations


def test_firming_over_the_in_memory_loop_books_each_interval_against_plain_charging() -> None:
    """A solar site exporting 150 kW, a band [-100, -60]: the fleet holds it (after its
    first step), plain charging would not; the books cross a settlement boundary."""
    fleet, state, d, grid = grid_setup()
    assert T0 % 900.0 == 0.0
    grid.meter("site-b", GridMeter(ts=from_epoch(T0), power_kw=-150.0))
    plain = drawn(fleet, "site-b")
    assert plain > 95.0, "the test needs cars that would leave the band by themselves"
    request = DispatchRequest.model_validate(
        {
            "request_id": "firm",
            "service": "firming",
            "node": "site-b",
            "min_kw": -100.0,
            "max_kw": -60.0,
            "ramp_kw_per_min": 600.0,
            "duration_s": 1200.0,
        }
    )
    assert d.submit(request, T0, state.view(T0, 3 * STEP)).status == "accepted"
    assert d.nodes is not None
    t, taken, done = T0, [], []
    while not done:
        grid.meter("site-b", GridMeter(ts=from_epoch(t), power_kw=-150.0))  # kept fresh
        t, outs = run_loop(fleet, state, d, t, 1)
        done = [r for r in outs[0].results if r.request_id == "firm"]
        taken += d.nodes.take_intervals()
        assert t < T0 + 1500.0, "the request never ended"
    assert [rid for rid, _ in taken] == ["firm", "firm"]
    first, second = (iv for _, iv in taken)
    assert first.node == second.node == "site-b"
    assert first.end == second.start == T0 + 900.0 and second.end == T0 + 1200.0
    # What the intervals book is what the final result says.
    assert done[0].outside_band_kwh == pytest.approx(
        first.outside_band_kwh + second.outside_band_kwh, abs=1e-3
    )
    # Plain charging would have stayed out of the band the whole time, by about
    # (its cars' plain power - 90 kW); the fleet only at its first step.
    assert second.outside_band_kwh == pytest.approx(0.0, abs=1e-6)
    assert first.baseline_outside_band_kwh > 10 * first.outside_band_kwh
    assert second.baseline_outside_band_kwh > 0.0
    assert first.ramp_violations <= 1 and second.ramp_violations == 0
    # The ledger entries and the report show them.
    entries = [answer_entry(done[0])] + [firming_entry(iv) for _, iv in taken]
    r = rep.parse("firm", entries)
    assert [row.end for row in r.firming] == [T0 + 900.0, T0 + 1200.0]
    totals = rep.summary(r)
    assert totals["baseline_outside_band_kwh"] == pytest.approx(
        first.baseline_outside_band_kwh + second.baseline_outside_band_kwh, abs=1e-3
    )
    lines = rep.table(r, [])
    assert any(line.startswith("firming on node site-b") for line in lines)
    assert sum(rep.iso(T0 + 900.0) in line for line in lines) == 2  # one row ends, one starts


def test_a_report_without_firming_has_no_firming_lines_or_totals() -> None:
    r = rep.parse("plain", [])
    assert r.firming == []
    assert "outside_band_kwh" not in rep.summary(r)
    assert not any("firming" in line for line in rep.table(r, []))
