"""A simulated fleet obeys its drivers whatever it is asked to do."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from agents.fleet import SimFleet
from agents.profiles import generate_fleet, sessions_at
from core.physics import ENERGY_TOL_KWH, energy_floor, feasible_range
from v2g.simcore import fleet_view

DAY0 = 1_795_651_200.0  # 2026-11-26T00:00:00Z


def test_same_seed_gives_the_same_fleet_and_another_seed_another() -> None:
    a, b, c = generate_fleet(50, 7), generate_fleet(50, 7), generate_fleet(50, 8)
    assert a.ids == b.ids
    assert np.array_equal(a.batteries.capacity_kwh, b.batteries.capacity_kwh)
    assert np.array_equal(a.arrival_tod_s, b.arrival_tod_s)
    assert not np.array_equal(a.arrival_tod_s, c.arrival_tod_s)


def test_profiles_are_realistic_mixes() -> None:
    p = generate_fleet(2000, 1)
    assert set(np.unique(p.batteries.capacity_kwh)) <= {40.0, 52.0, 58.0, 64.0, 77.0, 82.0, 100.0}
    assert p.batteries.max_charge_kw.min() >= 7.0
    assert (p.batteries.max_charge_kw > 22.0).mean() < 0.2  # some DC, mostly AC
    assert {"home", "workplace", "depot"} == set(p.pattern)
    home = np.array([k == "home" for k in p.pattern])
    arrival_h = p.arrival_tod_s / 3600.0
    assert 16.5 < np.median(arrival_h[home]) < 20.5  # home cars come back in the evening
    work = np.array([k == "workplace" for k in p.pattern])
    assert 7.0 < np.median(arrival_h[work]) < 10.0
    assert np.all((p.stay_s >= 3600.0) & (p.stay_s <= 23 * 3600.0))


def test_sessions_contain_or_follow_now() -> None:
    p = generate_fleet(300, 3)
    now = DAY0 + 13 * 3600.0
    arrival, departure = sessions_at(p, now)
    assert np.all(departure > now)
    assert np.all(arrival < departure)
    assert np.all(arrival - now < 86_400.0)


def test_unplugged_vehicles_draw_nothing_and_plug_in_at_arrival() -> None:
    fleet = SimFleet(generate_fleet(100, 2), DAY0 + 12 * 3600.0, step_s=60.0)
    assert np.all(fleet.power[~fleet.plugged] == 0.0)
    waiting = ~fleet.plugged
    t = float(fleet.arrival[waiting].min()) + 1.0
    fleet.tick(t)
    first = int(np.argmin(np.where(waiting, fleet.arrival, np.inf)))
    assert fleet.plugged[first]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    start_h=st.floats(0.0, 24.0),
    pushes=st.lists(st.floats(-60.0, 60.0), min_size=1, max_size=12),
)
def test_no_setpoint_can_leave_a_driver_short_or_push_a_car_below_its_floor(
    seed: int, start_h: float, pushes: list[float]
) -> None:
    fleet = SimFleet(generate_fleet(60, seed), DAY0 + start_h * 3600.0, step_s=300.0)
    bat = fleet.bat
    t = fleet.now
    # Cars that arrived hopeless are excused; everyone at or above the floor must stay there.
    ok = fleet.energy >= energy_floor(bat, fleet.departure, t) - ENERGY_TOL_KWH
    for k in range(288):  # a day in 5-minute steps, setpoints changing all the time
        wanted = pushes[k % len(pushes)]
        fleet.setpoint_kw[:] = wanted
        fleet.setpoint_until[:] = t + 600.0
        t += 300.0
        was_plugged = fleet.plugged.copy()
        fleet.tick(t)
        floor = energy_floor(bat, fleet.departure, t)
        new = ~was_plugged & fleet.plugged  # a new session: judged afresh from its arrival
        ok = np.where(new, fleet.energy >= floor - ENERGY_TOL_KWH, ok)
        held = fleet.plugged & ok
        assert np.all(fleet.energy[held] >= floor[held] - 1e-6), f"below floor at step {k}"
        assert np.all(fleet.energy <= bat.capacity_kwh + 1e-9)
    assert fleet.short == 0, f"{fleet.short} drivers left short: {fleet.short_ids[:5]}"
    assert fleet.departed > 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    start_h=st.floats(0.0, 24.0),
    push=st.floats(1.0, 60.0),
)
def test_deciding_on_shared_ranges_holds_what_protect_would(
    seed: int, start_h: float, push: float
) -> None:
    """The simulation hands the fleet the dispatcher's ranges for the step instead of
    computing them twice: the power held must be protect()'s to the bit, floors included."""
    t = DAY0 + start_h * 3600.0
    own = SimFleet(generate_fleet(80, seed), t, step_s=900.0)
    shared = SimFleet(generate_fleet(80, seed), t, step_s=900.0)
    moved = 0
    for k in range(12):
        for f in (own, shared):
            f.setpoint_kw[:] = push * (1 if k % 3 else -1)
            f.setpoint_until[:] = t + 1800.0
        t += 900.0
        own.tick(t)
        shared.tick(t)
        view = fleet_view(shared, t, shared.power, 0.0)
        lo, hi = feasible_range(view.batteries, view.energy, view.departure, t, 900.0)
        shared._decide(t, 900.0, (view.rows, lo, hi))
        np.testing.assert_array_equal(shared.power, own.power)
        moved += int(np.count_nonzero(own.power))
    assert moved > 0  # the check saw vehicles at work, not an idle fleet


def _night_cars(fleet: SimFleet) -> NDArray[np.bool_]:
    kinds = np.array(fleet.profile.pattern)
    return fleet.plugged & np.isin(kinds, ["home", "depot"])


def test_a_warm_night_fleet_is_mostly_at_its_targets_with_room_to_charge_more() -> None:
    """Started at 02:00, home and depot cars have been charging on their baseline for
    hours: most are at their targets and idle, not all charging flat out."""
    fleet = SimFleet(generate_fleet(400, 1), DAY0 + 2 * 3600.0, step_s=5.0, warm_start=True)
    bat, night = fleet.bat, _night_cars(fleet)
    assert night.sum() > 100
    at_target = np.isclose(fleet.energy, bat.target_soc * bat.capacity_kwh, atol=1e-6)
    assert at_target[night].mean() > 0.9
    flat_out = fleet.power >= bat.max_charge_kw - 1e-9
    assert flat_out[night].mean() < 0.1
    # The cars still on the road come back later with their arrival energy.
    arrived = fleet.profile.arrival_soc * bat.capacity_kwh
    np.testing.assert_array_equal(fleet.energy[~fleet.plugged], arrived[~fleet.plugged])


def test_a_cold_fleet_starts_every_car_at_its_arrival_energy_charging() -> None:
    fleet = SimFleet(generate_fleet(400, 1), DAY0 + 2 * 3600.0, step_s=5.0)
    bat, night = fleet.bat, _night_cars(fleet)
    np.testing.assert_array_equal(fleet.energy, fleet.profile.arrival_soc * bat.capacity_kwh)
    assert np.all(fleet.power[night] > 0.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), start_h=st.floats(0.0, 48.0))
@example(seed=60, start_h=10.0)  # targets reached inside the last, partial step (CI)
@example(seed=281, start_h=41.671875)
def test_a_warm_car_holds_what_its_baseline_put_in_never_above_target_or_capacity(
    seed: int, start_h: float
) -> None:
    t = DAY0 + start_h * 3600.0
    profile = generate_fleet(120, seed)
    warm = SimFleet(profile, t, step_s=60.0, warm_start=True)
    bat = warm.bat
    arrived = profile.arrival_soc * bat.capacity_kwh
    target = bat.target_soc * bat.capacity_kwh
    assert np.all(warm.energy <= np.maximum(target, arrived) + 1e-9)
    assert np.all(warm.energy <= bat.capacity_kwh + 1e-9)
    assert np.all(warm.energy >= arrived - 1e-9)  # the baseline never discharges
    # The same as ticking a cold fleet made at each car's arrival on its baseline, car by
    # car, for a few of them.
    for i in np.flatnonzero(warm.plugged)[:5]:
        arrival = float(warm.arrival[i])
        cold = SimFleet(profile, arrival, step_s=60.0)
        steps = int((t - arrival) // 60.0)
        for k in range(1, steps + 1):
            cold.tick(arrival + 60.0 * k)
        cold.tick(t)
        # The ticked fleet picks each step's power for a whole step, so when the target
        # falls inside the last, partial step it stops short by up to one step's charge.
        one_step = bat.max_charge_kw[i] * bat.charge_efficiency[i] * 60.0 / 3600.0
        assert warm.energy[i] - one_step - 1e-6 <= cold.energy[i] <= warm.energy[i] + 1e-6, i
