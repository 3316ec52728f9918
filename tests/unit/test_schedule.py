"""The HiGHS schedule over cohorts: trajectories in bounds, reservations kept, and never
worse than the proportional fast path on its own objective."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator.schedule import (
    THROUGHPUT_COST,
    Block,
    Cohorts,
    cohorts,
    grid,
    index_of,
    plan,
    proportional,
)
from core.physics import Batteries

T0 = datetime(2024, 6, 3, 17, 0, tzinfo=UTC).timestamp()  # a Monday, 17:00
STEP = 900.0


def plugged_fleet(n: int, seed: int, t0: float = T0, horizon: int = 96) -> Cohorts:
    fleet = SimFleet(generate_fleet(n, seed), t0, step_s=STEP)
    on = fleet.plugged
    bat = Batteries(*(getattr(fleet.bat, f.name)[on] for f in dataclasses.fields(Batteries)))
    return cohorts(bat, fleet.energy[on], fleet.departure[on], t0, step_s=STEP, horizon=horizon)


def assert_in_bounds(c: Cohorts, energy: np.ndarray) -> None:
    for j in range(c.size):
        span = slice(0, int(c.leave[j]) + 1)
        e, f = energy[j, span], c.floor[j, span]
        assert np.all(e >= f - 1e-5), f"cohort {j} under its floor: {e - f}"
        assert np.all(e <= c.capacity[j] + 1e-5), f"cohort {j} over capacity"
        assert np.all(np.isnan(energy[j, int(c.leave[j]) + 1 :]))


def export_edge(c: Cohorts, start: int, end: int) -> float:
    """The most the fleet can export flat over [start, end), found by the LP itself."""
    p = plan(c, new=Block(start, end, -1e7))
    return float(p.power_kw[start:end].max())


def test_a_feasible_evening_discharge_is_met_with_every_trajectory_in_bounds() -> None:
    c = plugged_fleet(300, 1)
    edge = export_edge(c, 4, 8)  # 18:00-19:00
    assert edge < -50.0
    blk = Block(4, 8, round(0.6 * edge, 1))
    p = plan(c, new=blk)
    assert p.reserved_ok
    assert p.shortfall_kwh == pytest.approx(0.0, abs=1e-4)
    assert p.deliverable_kw(blk) == pytest.approx(np.full(4, blk.power_kw), abs=1e-4)
    assert_in_bounds(c, p.energy)
    # Every driver's target holds where the cohort leaves (the floor there includes it).
    assert np.all(c.floor[np.arange(c.size), c.leave] >= 0)


def test_beyond_the_fleet_the_answer_is_partial_with_what_can_be_delivered() -> None:
    c = plugged_fleet(300, 1)
    blk = Block(4, 8, 10 * export_edge(c, 4, 8))
    p = plan(c, new=blk)
    got = p.deliverable_kw(blk)
    assert np.all(got > blk.power_kw)  # less export than asked ...
    assert np.all(got < 0)  # ... but some
    assert p.shortfall_kwh == pytest.approx(float(np.sum(got - blk.power_kw)) * STEP / 3600)


def test_reserved_energy_is_never_taken_by_a_later_request() -> None:
    c = plugged_fleet(300, 2)
    first = Block(4, 8, round(0.8 * export_edge(c, 4, 8), 1))
    a = plan(c, new=first)
    assert a.shortfall_kwh == pytest.approx(0.0, abs=1e-4)
    # A second request right after wants all the fleet could give on its own.
    second = Block(8, 12, export_edge(c, 8, 12))
    b = plan(c, reserved=[first], new=second)
    assert b.reserved_ok
    assert b.power_kw[4:8] == pytest.approx(np.full(4, first.power_kw), abs=1e-4)
    assert b.shortfall_kwh > 0  # it gets what is left, not what the first one holds
    assert_in_bounds(c, b.energy)


def test_reservations_the_fleet_can_no_longer_meet_are_flagged() -> None:
    c = plugged_fleet(200, 3)
    too_much = Block(4, 8, 5 * export_edge(c, 4, 8))
    p = plan(c, reserved=[too_much])
    assert not p.reserved_ok
    assert_in_bounds(c, p.energy)


def test_blocks_must_fit_the_horizon_and_not_overlap() -> None:
    c = plugged_fleet(50, 4, horizon=8)
    with pytest.raises(ValueError, match="horizon"):
        plan(c, new=Block(6, 10, -10.0))
    with pytest.raises(ValueError, match="overlaps"):
        plan(c, reserved=[Block(0, 4, -10.0)], new=Block(3, 5, -5.0))
    with pytest.raises(ValueError, match="start < end"):
        Block(3, 3, 1.0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    share=st.floats(-1.5, 1.5),
    start=st.integers(0, 40),
    length=st.integers(1, 16),
    hour=st.integers(0, 23),
)
def test_the_lp_is_never_worse_than_proportional_and_stays_in_bounds(
    seed: int, share: float, start: int, length: int, hour: int
) -> None:
    t0 = T0 - 17 * 3600 + hour * 3600
    c = plugged_fleet(120, seed, t0=t0, horizon=64)
    if c.size == 0:
        return
    scale = float(np.sum(c.discharge_kw)) or 1.0
    blk = Block(start, start + length, round(share * scale, 1))
    lp = plan(c, new=blk)
    fast = proportional(c, [blk])
    assert_in_bounds(c, lp.energy)
    assert_in_bounds(c, fast.energy)
    h = STEP / 3600.0
    lp_obj = lp.shortfall_kwh + THROUGHPUT_COST * lp.cycled_kwh
    fast_obj = fast.shortfall_kwh + THROUGHPUT_COST * fast.cycled_kwh
    assert lp_obj <= fast_obj + 1e-6 * max(1.0, fast_obj) + 1e-6 * h


def test_the_grid_lies_on_the_quarter_hours_and_on_each_request_s_own_bounds() -> None:
    ten = datetime(2026, 12, 3, 10, 0, tzinfo=UTC).timestamp()
    b = grid(ten + 120, ten + 37 * 60, cuts=[ten + 7 * 60, ten + 37 * 60, ten - 60, ten + 3600])
    assert [round((x - ten) / 60, 3) for x in b] == [2, 7, 15, 30, 37]
    assert index_of(b, ten + 7 * 60) == 1 and index_of(b, ten + 37 * 60) == 4
    # A cut within a millisecond of a quarter hour is that quarter hour, not a sliver.
    b = grid(ten, ten + 1800, cuts=[ten + 900.0002])
    assert list(np.diff(b)) == [900.0, 900.0]
    with pytest.raises(ValueError, match="t_end > t0"):
        grid(ten, ten)


def test_on_unequal_intervals_each_one_books_energy_over_its_own_length() -> None:
    """10:07-10:15, 10:15-10:30, 10:30-10:37: the energy balance of every cohort holds
    with each interval's own length, and a feasible block is met."""
    t0 = T0 + 7 * 60
    fleet = SimFleet(generate_fleet(60, 5), t0, step_s=STEP)
    on = fleet.plugged
    bat = Batteries(*(getattr(fleet.bat, f.name)[on] for f in dataclasses.fields(Batteries)))
    bounds = grid(t0, t0 + 4 * 3600, cuts=[t0 + 3600 + 420])
    c = cohorts(bat, fleet.energy[on], fleet.departure[on], t0, bounds=bounds)
    assert c.horizon == len(bounds) - 1 and c.hours[0] == pytest.approx(8 / 60)
    blk = Block(1, 5, float(np.ceil(10 * export_edge(c, 1, 5))) / 10)  # at its export edge
    p = plan(c, new=blk)
    assert p.shortfall_kwh < 1e-6
    assert_in_bounds(c, p.energy)
    for j in range(c.size):
        for t in range(int(c.leave[j])):
            h = c.hours[t]
            step = p.charge_kw[j, t] * c.eta_ch[j] * h - p.discharge_kw[j, t] / c.eta_dis[j] * h
            assert p.energy[j, t + 1] - p.energy[j, t] == pytest.approx(step, abs=1e-5)
    # The same fleet on equal intervals gives the same plan as without bounds.
    even = cohorts(bat, fleet.energy[on], fleet.departure[on], t0, step_s=STEP, horizon=8)
    by_bounds = cohorts(
        bat, fleet.energy[on], fleet.departure[on], t0, bounds=t0 + STEP * np.arange(9.0)
    )
    np.testing.assert_array_equal(even.leave, by_bounds.leave)
    np.testing.assert_allclose(even.floor, by_bounds.floor)
