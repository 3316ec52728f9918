"""Allocation sums to the request inside the envelope and is exact about the shortfall outside."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.allocation import allocate


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
