"""Allocation sums to the request inside the envelope and is exact about the shortfall outside."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.allocation import allocate, allocate_cost, jain_index


@st.composite
def ranges(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 200))
    a = draw(arrays(np.float64, n, elements=st.floats(-50.0, 50.0)))
    b = draw(arrays(np.float64, n, elements=st.floats(-50.0, 50.0)))
    return np.minimum(a, b), np.maximum(a, b)


@settings(max_examples=400, deadline=None)
@given(r=ranges(), target=st.floats(-20_000.0, 20_000.0))
def test_allocation_respects_limits_and_meets_target_or_nearest_bound(r, target: float) -> None:  # type: ignore[no-untyped-def]
    lo, hi = r
    a = allocate(target, lo, hi)
    scale = 1e-9 * (1.0 + np.abs(lo).sum() + np.abs(hi).sum() + abs(target))
    assert np.all(a.power >= lo - scale)
    assert np.all(a.power <= hi + scale)
    lo_sum, hi_sum = lo.sum(), hi.sum()
    expected = min(max(target, lo_sum), hi_sum)
    assert a.power.sum() == pytest.approx(expected, abs=1e-6 * (1 + abs(expected)))
    assert a.total_kw == pytest.approx(expected, abs=1e-6 * (1 + abs(expected)))
    assert a.shortfall_kw == pytest.approx(abs(target - expected), abs=1e-6 * (1 + abs(target)))
    assert a.shortfall_kw >= 0.0


def test_vehicle_that_must_charge_keeps_charging_during_a_discharge() -> None:
    lo = np.array([3.0, -10.0, -10.0])
    hi = np.array([11.0, 10.0, 10.0])
    a = allocate(-7.0, lo, hi)
    assert a.power[0] == pytest.approx(3.0)
    assert a.power[1:].sum() == pytest.approx(-10.0)


def test_split_is_proportional_to_headroom() -> None:
    lo = np.array([-22.0, -11.0, 0.0])
    hi = np.array([22.0, 11.0, 7.0])
    a = allocate(-16.5, lo, hi)
    assert a.power.tolist() == pytest.approx([-11.0, -5.5, 0.0])


def test_zero_request_leaves_idle_vehicles_idle() -> None:
    a = allocate(0.0, np.array([-5.0, -5.0]), np.array([5.0, 5.0]))
    assert a.power.tolist() == [0.0, 0.0]


def test_non_finite_target_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        allocate(float("nan"), np.zeros(1), np.ones(1))


# -- least-cost split --------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    r=ranges(),
    target=st.floats(-20_000.0, 20_000.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_least_cost_split_is_feasible_and_never_costlier_than_proportional(  # type: ignore[no-untyped-def]
    r, target: float, seed: int
) -> None:
    lo, hi = r
    w = np.random.default_rng(seed).uniform(0.2, 5.0, lo.shape[0])
    a = allocate_cost(target, lo, hi, w)
    p = allocate(target, lo, hi)
    scale = 1e-6 * (1.0 + np.abs(lo).sum() + np.abs(hi).sum() + abs(target))
    assert np.all(a.power >= lo - scale) and np.all(a.power <= hi + scale)
    assert a.total_kw == pytest.approx(p.total_kw)
    assert float(a.power.sum()) == pytest.approx(a.total_kw, abs=scale)

    def cost(x: np.ndarray) -> float:
        return float(np.sum(w * x * x)) / 2

    assert cost(a.power) <= cost(p.power) * (1 + 1e-6) + scale


def test_least_cost_split_leans_on_cheap_batteries_in_inverse_proportion() -> None:
    lo, hi = np.full(3, -20.0), np.full(3, 20.0)
    a = allocate_cost(-30.0, lo, hi, np.array([1.0, 2.0, 4.0]))
    assert a.power == pytest.approx([-30 * 4 / 7, -30 * 2 / 7, -30 * 1 / 7], rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        allocate_cost(-30.0, lo, hi, np.array([1.0, 0.0, 1.0]))


def test_weighting_by_energy_cycled_spreads_wear_over_the_fleet() -> None:
    """Step after step the same export: weighting each battery by what it has cycled
    evens wear out, where the proportional split keeps working the big chargers."""
    rng = np.random.default_rng(3)
    n = 50
    hi = rng.choice([7.4, 11.0, 22.0], n)
    lo = -hi
    cycled_p, cycled_c = np.zeros(n), np.zeros(n)
    for _ in range(200):
        cycled_p += np.abs(allocate(-150.0, lo, hi).power) / 60
        w = 1.0 + cycled_c / max(float(cycled_c.mean()), 1e-9)
        cycled_c += np.abs(allocate_cost(-150.0, lo, hi, w).power) / 60
    assert cycled_c.sum() == pytest.approx(cycled_p.sum(), rel=1e-6)  # same energy delivered
    assert jain_index(cycled_c) > jain_index(cycled_p) + 0.05
    assert jain_index(cycled_c) > 0.95


def test_jain_index() -> None:
    assert jain_index(np.full(10, 3.0)) == pytest.approx(1.0)
    assert jain_index(np.array([5.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert jain_index(np.zeros(0)) == 1.0
