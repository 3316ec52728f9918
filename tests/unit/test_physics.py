"""The physics of DESIGN.md, checked as properties over random fleets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.physics import (
    Batteries,
    baseline_power,
    energy_floor,
    feasible_range,
    protect,
    step_energy,
)
from tests.unit.strategies import NOW, fleets

TOL = 1e-6
windows = st.sampled_from([5.0, 60.0, 900.0, 3600.0, 14_400.0])


def one(**kw: float) -> Batteries:
    base = {
        "capacity_kwh": 60.0,
        "max_charge_kw": 11.0,
        "max_discharge_kw": 11.0,
        "charge_efficiency": 0.9,
        "discharge_efficiency": 0.9,
        "min_soc": 0.2,
        "target_soc": 0.8,
    }
    base.update(kw)
    return Batteries(**{k: np.array([v]) for k, v in base.items()})


def test_floor_is_the_reserve_far_from_departure_and_the_target_at_departure() -> None:
    bat = one()
    dep = np.array([NOW + 10 * 3600])
    assert energy_floor(bat, dep, NOW)[0] == pytest.approx(0.2 * 60)
    assert energy_floor(bat, dep, NOW + 10 * 3600)[0] == pytest.approx(0.8 * 60)
    # One hour before departure the target minus one hour of full charging (11 kW x 0.9).
    assert energy_floor(bat, dep, NOW + 9 * 3600)[0] == pytest.approx(48 - 9.9)


def test_unknown_departure_keeps_only_the_reserve() -> None:
    bat = one()
    assert energy_floor(bat, np.array([np.nan]), NOW)[0] == pytest.approx(12.0)


def test_discharging_takes_more_than_it_delivers_and_charging_stores_less() -> None:
    bat = one()
    e = np.array([30.0])
    assert step_energy(bat, e, np.array([-9.0]), 3600.0)[0] == pytest.approx(30 - 10.0)
    assert step_energy(bat, e, np.array([10.0]), 3600.0)[0] == pytest.approx(30 + 9.0)


def test_vehicle_below_its_floor_must_charge_and_is_never_discharged() -> None:
    bat = one()
    dep = np.array([NOW + 1800.0])  # needs 48 kWh in half an hour: hopeless
    e = np.array([20.0])
    lo, hi = feasible_range(bat, e, dep, NOW, 900.0)
    assert lo[0] == pytest.approx(11.0)
    assert hi[0] == pytest.approx(11.0)
    assert protect(bat, e, dep, NOW, 5.0, np.array([-11.0]))[0] == pytest.approx(11.0)


def test_baseline_charges_flat_out_toward_target_then_stops() -> None:
    bat = one()
    assert baseline_power(bat, np.array([10.0]), 5.0)[0] == pytest.approx(11.0)
    assert baseline_power(bat, np.array([48.0]), 5.0)[0] == 0.0
    # Just below the target: only what closes the gap in one step.
    gap = baseline_power(bat, np.array([48.0 - 0.01]), 3600.0)[0]
    assert gap == pytest.approx(0.01 / 0.9)


@settings(max_examples=300, deadline=None)
@given(fleet=fleets(), window=windows)
def test_feasible_range_is_ordered_and_within_charger_limits(fleet, window: float) -> None:  # type: ignore[no-untyped-def]
    bat, energy, dep = fleet
    lo, hi = feasible_range(bat, energy, dep, NOW, window)
    assert np.all(lo <= hi + TOL)
    assert np.all(lo >= -bat.max_discharge_kw - TOL)
    assert np.all(hi <= bat.max_charge_kw + TOL)


@settings(max_examples=300, deadline=None)
@given(fleet=fleets(), window=windows, frac=st.floats(0.0, 1.0))
def test_holding_any_power_in_range_keeps_every_vehicle_above_its_floor_and_below_full(  # type: ignore[no-untyped-def]
    fleet, window: float, frac: float
) -> None:
    bat, energy, dep = fleet
    lo, hi = feasible_range(bat, energy, dep, NOW, window)
    p = lo + frac * (hi - lo)
    at_or_above = energy >= energy_floor(bat, dep, NOW) - TOL
    # Check the whole window at several points: the floor rises as departure nears.
    for k in range(1, 9):
        t = window * k / 8
        e = step_energy(bat, energy, p, t)
        floor = energy_floor(bat, dep, NOW + t)
        assert np.all(e[at_or_above] >= floor[at_or_above] - 1e-6 * (1 + floor[at_or_above]))
        assert np.all(e <= bat.capacity_kwh + TOL)


@settings(max_examples=200, deadline=None)
@given(fleet=fleets(), wanted=st.floats(-100.0, 100.0))
def test_a_vehicle_never_follows_a_setpoint_beyond_its_limits(fleet, wanted: float) -> None:  # type: ignore[no-untyped-def]
    bat, energy, dep = fleet
    held = protect(bat, energy, dep, NOW, 5.0, np.full(len(bat), wanted))
    assert np.all(held <= bat.max_charge_kw + TOL)
    assert np.all(held >= -bat.max_discharge_kw - TOL)
    below = energy < energy_floor(bat, dep, NOW) - TOL
    assert np.all(held[below] >= 0.0)
