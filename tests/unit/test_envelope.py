"""The capability envelope as a linear programme (aggregator/envelope.py): hand-made
fleets whose answer is known, and the production (cohort) computation held to the
per-vehicle reference within 1% on random fleets with departures and arrivals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator import envelope as ev
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetView
from bench.envelope import random_fleet
from broker.models import DispatchRequest, Service
from core.physics import Batteries, feasible_range
from v2g.simcore import Simulation, fleet_view

NOW = 1_800_000_000.0
HOUR = 3600.0


def cars(n: int, **over: list[float]) -> Batteries:
    """``n`` cars of 100 kWh, 10 kW both ways, lossless, no reserve and no target."""
    base = {
        "capacity_kwh": [100.0] * n,
        "max_charge_kw": [10.0] * n,
        "max_discharge_kw": [10.0] * n,
        "charge_efficiency": [1.0] * n,
        "discharge_efficiency": [1.0] * n,
        "min_soc": [0.0] * n,
        "target_soc": [0.0] * n,
    }
    base.update(over)
    return Batteries(**{k: np.array(v, dtype=np.float64) for k, v in base.items()})


def both(
    bat: Batteries, energy: list[float], departure: list[float], **kw: object
) -> list[ev.Envelope]:
    """The reference and the production envelope (pooled, whatever the fleet's size)."""
    e, d = np.array(energy), np.array(departure)
    arrival = kw.get("arrival")
    arr = None if arrival is None else np.array(arrival)
    return [
        ev.reference(bat, e, d, NOW, HOUR, 4, arr),
        ev.window(bat, e, d, NOW, HOUR, steps=4, arrival=arr, exact_below=0),
    ]


def test_a_car_that_leaves_mid_window_counts_only_until_it_leaves() -> None:
    # B leaves at half time: after it, A alone must hold the fleet's power, so the
    # fleet can hold ±10 kW, not the ±20 kW the sum of constant ranges says.
    bat = cars(2)
    energy, departure = [50.0, 50.0], [np.nan, NOW + HOUR / 2]
    lo, hi = feasible_range(bat, np.array(energy), np.array(departure), NOW, HOUR)
    assert (lo.sum(), hi.sum()) == pytest.approx((-20.0, 20.0))  # today's envelope
    for env in both(bat, energy, departure):
        assert (env.min_power_kw, env.max_power_kw) == pytest.approx((-10.0, 10.0), abs=1e-6)
        assert env.feasible


def test_a_leaving_cars_must_charge_goes_with_it() -> None:
    # B needs 5 kWh more by its departure in half an hour: 10 kW, flat out, until it
    # leaves. Then A alone holds P, so P in [0, 10]; the sum of ranges says [0, 20].
    bat = cars(2, target_soc=[0.0, 0.5])
    energy, departure = [50.0, 45.0], [np.nan, NOW + HOUR / 2]
    lo, hi = feasible_range(bat, np.array(energy), np.array(departure), NOW, HOUR)
    assert (lo.sum(), hi.sum()) == pytest.approx((0.0, 20.0))
    for env in both(bat, energy, departure):
        assert (env.min_power_kw, env.max_power_kw) == pytest.approx((0.0, 10.0), abs=1e-6)


def test_an_announced_arrival_takes_over_from_a_car_running_low() -> None:
    # A has 2.5 kWh to give: alone, -2.5 kW for the hour. C arrives at half time with
    # plenty: A gives -5 kW for the first half, C the second, so -5 kW holds.
    bat = cars(2)
    for env in both(bat, [2.5, 80.0], [np.nan, np.nan], arrival=[np.nan, NOW + HOUR / 2]):
        assert (env.min_power_kw, env.max_power_kw) == pytest.approx((-5.0, 10.0), abs=1e-6)


def test_the_only_power_held_with_nobody_plugged_in_for_a_step_is_zero() -> None:
    bat = cars(1)
    for env in both(bat, [50.0], [NOW + HOUR / 2]):
        assert (env.min_power_kw, env.max_power_kw) == pytest.approx((0.0, 0.0), abs=1e-9)
        assert env.feasible


def test_a_fleet_that_cannot_hold_any_constant_power_says_so() -> None:
    # B is under its floor and charges flat out (10 kW) until it leaves at half time;
    # A can neither charge nor give anything, so the fleet draws 10 kW, then 0: no
    # constant power holds, and the answer is the closest one, 5 kW (5 kW off at worst).
    bat = cars(2, target_soc=[0.0, 1.0], max_charge_kw=[0.0, 10.0])
    for env in both(bat, [0.0, 10.0], [np.nan, NOW + HOUR / 2]):
        assert not env.feasible
        assert env.min_power_kw == env.max_power_kw == pytest.approx(5.0, abs=1e-6)


def test_follow_ratio_scales_each_car() -> None:
    bat = cars(2)
    e, d = np.array([50.0, 50.0]), np.array([np.nan, np.nan])
    env = ev.window(bat, e, d, NOW, HOUR, steps=4, ratio=np.array([1.0, 0.5]))
    assert (env.min_power_kw, env.max_power_kw) == pytest.approx((-15.0, 15.0), abs=1e-6)


def fleet_of(n: int, seed: int) -> tuple[Batteries, np.ndarray, np.ndarray, np.ndarray]:
    """A fleet like the simulated ones, departures and arrivals on the 12-step grid of a
    900-s window: some leave inside it, some arrive, some stay with no departure."""
    return random_fleet(np.random.default_rng(seed), n, NOW, 900.0, 12)


def pooling_error(got: ev.Envelope, ref: ev.Envelope) -> float:
    """The larger bound's difference, over the larger |bound| of the reference."""
    scale = max(abs(ref.min_power_kw), abs(ref.max_power_kw), 1.0)
    return (
        max(abs(got.min_power_kw - ref.min_power_kw), abs(got.max_power_kw - ref.max_power_kw))
        / scale
    )


# Issue 14 asks for 1%. Cars whose energy bounds cannot bind in the window (loose) pool
# exactly; the others are solved one by one while fewer than EXACT_BELOW, so on these
# fleets the cohort envelope is the reference's to the LP's tolerance.
POOLING_TOLERANCE = 0.01


# Derandomized so that CI sees the same fleets every run. The examples are fleets the
# cohorts of kinds (before loose cars were kept apart) put 1.2-2.0% off the reference,
# too generous on the least import: a loose car's slack covered another's floor.
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.integers(20, 40), st.integers(0, 2**32 - 1))
@example(37, 4067360522)
@example(32, 3105024420)
@example(31, 2767167619)
@example(29, 3702768549)
@example(29, 3901015456)
@example(27, 1655011002)
def test_cohort_envelope_is_within_one_percent_of_the_per_vehicle_lp(n: int, seed: int) -> None:
    bat, energy, departure, arrival = fleet_of(n, seed)
    ref = ev.reference(bat, energy, departure, NOW, 900.0, 12, arrival)
    got = ev.window(bat, energy, departure, NOW, 900.0, steps=12, arrival=arrival, exact_below=0)
    assert got.units < ref.units  # it did pool
    assert got.feasible == ref.feasible
    assert pooling_error(got, ref) <= POOLING_TOLERANCE
    assert pooling_error(got, ref) <= 1e-6  # in fact exact


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.integers(100, 300), st.integers(0, 2**32 - 1))
def test_cohorts_of_cars_whose_bounds_bind_stay_within_one_percent_of_the_lp(
    n: int, seed: int
) -> None:
    # Many cars whose energy bounds bind (as at 10k vehicles and more) are pooled by
    # kind: not exact, but held to the LP within 1% (bench/envelope.py measures it).
    bat, energy, departure, arrival = fleet_of(n, seed)
    ref = ev.reference(bat, energy, departure, NOW, 900.0, 12, arrival)
    got = ev.window(
        bat,
        energy,
        departure,
        NOW,
        900.0,
        steps=12,
        arrival=arrival,
        exact_below=0,
        exact_bound_below=0,
    )
    assert got.units < n // 2
    assert got.feasible == ref.feasible
    assert pooling_error(got, ref) <= POOLING_TOLERANCE


def test_loose_cars_pool_exactly_and_bound_ones_are_told_apart() -> None:
    # Over an hour of 4 steps: A (50 kWh of 100, 10 kW) can do anything it is allowed in
    # every step; B (99 kWh) fills in the first step; C (1 kWh above its reserve) runs
    # out; D leaves after two steps, loose until then.
    bat = cars(4, min_soc=[0.0, 0.0, 0.1, 0.0])
    e, d = np.array([50.0, 99.0, 11.0, 50.0]), np.array([np.nan, np.nan, np.nan, NOW + HOUR / 2])
    u = ev.vehicle_units(bat, e, d, NOW, HOUR, 4)
    assert u.free.tolist() == [True, False, False, True]
    # Pooled, A and its twin share a cohort, D (loose, leaving) has one, B and C are each
    # their own unit: exact.
    many = cars(5, min_soc=[0.0, 0.0, 0.0, 0.1, 0.0])
    e5 = np.array([50.0, 30.0, 99.0, 11.0, 50.0])
    d5 = np.array([np.nan, np.nan, np.nan, np.nan, NOW + HOUR / 2])
    ref = ev.reference(many, e5, d5, NOW, HOUR, 4)
    got = ev.window(many, e5, d5, NOW, HOUR, steps=4, exact_below=0)
    assert got.units == 4
    assert (got.min_power_kw, got.max_power_kw) == pytest.approx(
        (ref.min_power_kw, ref.max_power_kw), abs=1e-6
    )


# -- commitments: what the dispatcher answers is what the fleet then holds ---------------
def wave_view(n: int, at: float, seed: int = 7) -> tuple[SimFleet, FleetView]:
    fleet = SimFleet(generate_fleet(n, seed), at, step_s=5.0)
    return fleet, fleet_view(fleet, at, np.zeros(n), 0.0)


DEPARTURES = 86_400.0 * 20_000 + 7.25 * HOUR  # 07:15, home cars leave for work


@pytest.mark.parametrize("which", ["min", "max"])
def test_a_commitment_at_the_bound_is_held_through_a_departure_wave(which: str) -> None:
    # The case: 300 cars at 07:15. Asked a little beyond a bound, the answer is
    # partial with the envelope's bound, the fleet holds it within 2% at every step, no
    # driver is left short, and the completed result reports the same allocated_kw.
    prof = generate_fleet(300, 7)
    _, view = wave_view(300, DEPARTURES)
    env = ev.window(view.batteries, view.energy, view.departure, DEPARTURES, 900.0)
    bound = env.max_power_kw if which == "max" else env.min_power_kw
    ask = round(bound + (1.0 if which == "max" else -1.0) * 0.01 * abs(bound), 1)
    req = DispatchRequest(request_id="wave", service=Service.MANUAL, power_kw=ask, duration_s=900)
    res = Simulation(prof, start=DEPARTURES, step_s=5.0, steps=182, requests=[req]).run()
    rec = res.requests[0]
    assert rec.admission is not None and rec.final is not None
    assert rec.admission.status == "partial"
    assert rec.admission.allocated_kw == pytest.approx(bound, abs=1e-3)
    assert res.departed > 10  # it is a departure wave
    held = res.fleet_kw[~np.isnan(res.requested_kw)]
    assert np.all(np.abs(held - bound) <= 0.02 * abs(bound)), held
    assert rec.final.status == "completed"
    assert rec.final.allocated_kw == rec.admission.allocated_kw
    assert rec.final.reason is None
    assert res.short_total == 0


def test_the_commitment_moves_only_when_the_fleet_changed_and_says_why() -> None:
    # Committed at the most the fleet can export; then a third of the cars go offline
    # (no departure announced for then): the fleet cannot hold it any more, so the
    # commitment moves to what it can hold, and progress and the result say why.
    fleet, view = wave_view(120, DEPARTURES)
    d = Dispatcher(control_step_s=5.0)
    env = d.envelope(view, DEPARTURES, 900.0)
    answer = d.submit(
        DispatchRequest(
            request_id="c", service=Service.MANUAL, power_kw=env.min_power_kw - 5.0, duration_s=900
        ),
        DEPARTURES,
        view,
    )
    assert answer.status == "partial"
    committed = answer.allocated_kw
    out = d.step(DEPARTURES, view, len(fleet))
    assert [p.allocated_kw for p in out.progress] == [committed]
    assert out.progress[0].reason is None
    t = DEPARTURES + 5.0
    keep = np.ones(len(view), dtype=bool)
    keep[: len(view) // 3] = False
    gone = dataclasses.replace(
        view,
        rows=view.rows[keep],
        batteries=view.batteries.take(keep),
        energy=view.energy[keep],
        departure=view.departure[keep],
        power=view.power[keep],
        ts=np.full(int(keep.sum()), t),
    )
    out = d.step(t, gone, len(fleet))
    moved = out.progress[0]
    assert moved.allocated_kw != committed
    assert moved.reason is not None and "the fleet changed" in moved.reason
    assert f"{len(view) - int(keep.sum())} vehicle(s) left" in moved.reason
    result = d.cancel("c", t + 5.0, gone)
    assert result is not None and result.allocated_kw == moved.allocated_kw
    assert "the fleet changed" in (result.reason or "")


def test_a_large_fleet_follows_its_plan_between_solves_and_stays_on_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Above replan_every_step_below (here: always) the plan is solved again only when its
    # first step has run out or a car comes or goes; the fleet stays on the commitment.
    from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop

    solves = []
    real = ev.steer
    monkeypatch.setattr(ev, "steer", lambda *a, **k: solves.append(a[3]) or real(*a, **k))
    fleet, state = fleet_and_state(80)
    d = Dispatcher(control_step_s=STEP, replan_every_step_below=0)
    view = state.view(T0, 3 * STEP)
    target = round(0.5 * d.envelope(view, T0, 1800.0).min_power_kw, 1)
    assert d.submit(req(target, 1800.0), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 12)
    assert 1 <= len(solves) < 12  # 1800 s / 16 steps: one solve every ~112 s at most
    assert state.view(t, 3 * STEP).power.sum() == pytest.approx(target, rel=0.02)
    assert d.dispatches["r1"].allocated_kw == target


def test_published_envelope_refreshes_the_first_window_every_step_and_the_rest_in_turn() -> None:
    from aggregator.capability import WINDOWS_S, Envelopes

    _, view = wave_view(40, DEPARTURES)
    envs = Envelopes(step_s=5.0)
    first = envs.update(view, DEPARTURES)
    assert [w.duration_s for w in first] == list(WINDOWS_S)  # all of them at the start
    seen: list[float] = []
    for k in range(1, len(WINDOWS_S)):
        before = dict(envs._last)
        envs.update(view, DEPARTURES + 5.0 * k)
        changed = [w for w in WINDOWS_S if envs._last[w] is not before[w]]
        assert changed[0] == WINDOWS_S[0] and len(changed) == 2
        seen.append(changed[1])
    assert sorted(seen) == sorted(WINDOWS_S[1:])  # every longer window within four steps
