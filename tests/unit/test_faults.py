"""Misbehaving vehicles: the faults do what they say, and the dispatcher measures and
compensates for them. Pure: no broker, no store."""

from __future__ import annotations

import json
from dataclasses import replace

import aiomqtt
import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from agents.faults import Misbehaviour, parse_fractions
from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetState, check_not_ahead
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.models import Telemetry, to_epoch
from broker.settings import Settings
from core.clock import ManualClock
from core.errors import InvalidMessage
from core.physics import ENERGY_TOL_KWH, energy_floor
from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop
from tests.support.samples import GOOD
from v2g.cli import app

DAY0 = 1_795_651_200.0  # 2026-11-26T00:00:00Z


def some(n: int, share: float, seed: int = 0) -> np.ndarray:
    """A seeded random ``share`` of ``n`` vehicles, as a mask."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: round(share * n)]] = True
    return mask


def with_faults(n: int, **cols: np.ndarray) -> Misbehaviour:
    return replace(Misbehaviour.none(n), **cols)


def drive(fleet: SimFleet, power: float, until: float, t: float) -> None:
    fleet.setpoint_kw[:] = power
    fleet.setpoint_until[:] = until
    fleet.tick(t)


# -- the faults themselves ---------------------------------------------------------------
def test_no_misbehaviour_changes_nothing() -> None:
    plain = SimFleet(generate_fleet(60, 3), T0, step_s=STEP)
    none = SimFleet(generate_fleet(60, 3), T0, step_s=STEP, faults=Misbehaviour.none(60))
    for k, p in enumerate([-7.0, 3.0, -20.0, 0.0]):
        for f in (plain, none):
            drive(f, p, T0 + 100.0, T0 + STEP * (k + 1))
    assert np.array_equal(plain.power, none.power)
    assert np.array_equal(plain.energy, none.energy)
    assert telemetry_payloads(plain, plain.now) == telemetry_payloads(none, none.now)


def test_a_half_follower_draws_half_of_its_setpoint() -> None:
    n = 60
    half = SimFleet(generate_fleet(n, 5), T0, step_s=STEP)
    half.misbehave(with_faults(n, follow_ratio=np.full(n, 0.5)))
    asked_half = SimFleet(generate_fleet(n, 5), T0, step_s=STEP)
    drive(half, -4.0, T0 + 60.0, T0 + STEP)
    drive(asked_half, -2.0, T0 + 60.0, T0 + STEP)
    assert np.allclose(half.power, asked_half.power)
    discharging = half.plugged & (half.power < -1.9)
    assert discharging.sum() > n // 4  # the comparison is not vacuous


def test_a_slow_charger_reaches_its_setpoint_within_its_lag() -> None:
    n, lag = 60, 4.0
    slow = SimFleet(generate_fleet(n, 6), T0, step_s=1.0)
    slow.misbehave(with_faults(n, lag_s=np.full(n, lag)))
    quick = SimFleet(generate_fleet(n, 6), T0, step_s=1.0)
    t = T0
    powers = []
    for _ in range(int(lag)):
        t += 1.0
        drive(slow, -7.0, T0 + 60.0, t)
        drive(quick, -7.0, T0 + 60.0, t)
        powers.append(slow.power.copy())
    moving = slow.plugged & (np.abs(quick.power - powers[0]) > 1.0)
    assert moving.sum() > n // 4
    assert np.all(np.abs(powers[0][moving] - quick.power[moving]) > 0.5)  # not there at once
    assert np.allclose(slow.power, quick.power)  # ... but there within lag_s


def test_an_early_leaver_unplugs_before_the_departure_it_announced() -> None:
    n = 40
    fleet = SimFleet(generate_fleet(n, 2), T0, step_s=60.0)
    plugged = np.flatnonzero(fleet.plugged)
    early = np.zeros(n)
    early[plugged[:5]] = 3600.0
    fleet.misbehave(with_faults(n, early_leave_s=early))
    first = plugged[0]
    announced = fleet.departure[first]
    before = Telemetry.model_validate_json(
        telemetry_payloads(fleet, fleet.now, np.array([first]))[0]
    )
    assert before.departure is not None
    assert to_epoch(before.departure) == pytest.approx(announced, abs=1e-3)
    t, left = fleet.now, 0
    while t < announced - 3600.0 + 60.0:
        t += 60.0
        left += fleet.tick(t).early
    assert not fleet.plugged[first]
    assert fleet.left_early == left >= 1
    assert fleet.short == 0  # plain charging until they left: nobody was cost energy


def test_a_skewed_clock_stamps_its_telemetry_ahead_or_behind_and_a_stopped_one_repeats() -> None:
    fleet = SimFleet(generate_fleet(4, 1), T0, step_s=STEP)
    fleet.misbehave(
        with_faults(
            4,
            clock_skew_s=np.array([0.0, 120.0, -45.0, 0.0]),
            clock_frozen=np.array([False, False, False, True]),
        )
    )
    fleet.tick(T0 + 30.0)
    stamps = [
        to_epoch(Telemetry.model_validate_json(p).ts) for p in telemetry_payloads(fleet, T0 + 30.0)
    ]
    assert stamps == pytest.approx([T0 + 30.0, T0 + 150.0, T0 - 15.0, T0])


def test_random_faults_are_seeded_and_hit_the_asked_shares() -> None:
    a = Misbehaviour.random(1000, 7, partial=0.2, lag=0.1, early=0.05, skew=0.3)
    b = Misbehaviour.random(1000, 7, partial=0.2, lag=0.1, early=0.05, skew=0.3)
    assert np.array_equal(a.follow_ratio, b.follow_ratio)
    assert (a.follow_ratio < 1.0).sum() == 200
    assert (a.lag_s > 0.0).sum() == 100 and a.lag_s.max() <= 5.0
    assert (a.early_leave_s > 0.0).sum() == 50
    assert (a.clock_skew_s > 0.0).any() and (a.clock_skew_s < 0.0).any() and a.clock_frozen.any()
    assert ((a.clock_skew_s != 0.0) | a.clock_frozen).sum() == 300
    assert not Misbehaviour.random(1000, 7).misbehaving().any()


def test_the_misbehave_option_is_parsed_and_checked() -> None:
    assert parse_fractions("partial=0.2, lag=0.2,early=0.1,skew=0.05") == {
        "partial": 0.2,
        "lag": 0.2,
        "early": 0.1,
        "skew": 0.05,
    }
    assert parse_fractions("") == {}
    for bad, why in [
        ("partial", "KIND=FRACTION"),
        ("speed=0.1", "KIND=FRACTION"),
        ("lag=x", "not a number"),
        ("skew=1.5", "not a fraction"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_fractions(bad)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    start_h=st.floats(0.0, 24.0),
    shares=st.tuples(*(st.floats(0.0, 1.0) for _ in range(4))),
    pushes=st.lists(st.floats(-60.0, 60.0), min_size=1, max_size=8),
)
def test_a_misbehaving_car_still_guards_its_driver(
    seed: int, start_h: float, shares: tuple[float, float, float, float], pushes: list[float]
) -> None:
    """Whatever the faults and the setpoints, no car that was on or above its floor goes
    under it, and no driver is cost energy (an early leaver is owed its floor then)."""
    partial, lag, early, skew = shares
    n = 40
    faults = Misbehaviour.random(n, seed, partial=partial, lag=lag, early=early, skew=skew)
    fleet = SimFleet(generate_fleet(n, seed), DAY0 + start_h * 3600.0, step_s=300.0, faults=faults)
    bat, t = fleet.bat, fleet.now
    ok = fleet.energy >= energy_floor(bat, fleet.departure, t) - ENERGY_TOL_KWH
    for k in range(144):  # half a day in 5-minute steps
        was = fleet.plugged.copy()
        t += 300.0
        drive(fleet, pushes[k % len(pushes)], t + 300.0, t)
        floor = energy_floor(bat, fleet.departure, t)
        ok = np.where(~was & fleet.plugged, fleet.energy >= floor - ENERGY_TOL_KWH, ok)
        held = fleet.plugged & ok
        assert np.all(fleet.energy[held] >= floor[held] - 1e-6), f"below floor at step {k}"
    assert fleet.short == 0, f"{fleet.short} drivers left short: {fleet.short_ids[:5]}"


# -- the dispatcher measures and compensates --------------------------------------------
def half_followers(fleet: SimFleet, share: float = 0.3) -> np.ndarray:
    bad = some(len(fleet), share, seed=11)
    fleet.misbehave(with_faults(len(fleet), follow_ratio=np.where(bad, 0.5, 1.0)))
    return bad


def fleet_power(state: FleetState, t: float) -> float:
    return float(state.view(t, 3 * STEP).power.sum())


def test_partial_followers_are_covered_and_the_fleet_converges_within_two_percent() -> None:
    fleet, state = fleet_and_state()
    bad = half_followers(fleet)
    d = Dispatcher(control_step_s=STEP)
    target = round(0.5 * envelope(state.view(T0, 3 * STEP), T0)[0].min_power_kw, 1)
    assert d.submit(req(target, 1800.0), T0, state.view(T0, 3 * STEP)).status == "accepted"
    t, powers = T0, []
    for _ in range(12):
        t, _ = run_loop(fleet, state, d, t, 1)
        powers.append(fleet_power(state, t))
    off = [abs(p - target) / abs(target) for p in powers]
    assert off[0] > 0.05  # the faults bite before they are measured
    assert max(off[3:]) <= 0.02, powers  # on target from the fourth step, and stays
    ratio = d.follow_ratio(np.array([state.index[v] for v in fleet.ids]))
    # Judged on discharge setpoints: a car under its floor charges flat out, obeying or not.
    asked = bad & fleet.plugged & (fleet.setpoint_kw <= -1.0)
    assert asked.sum() >= 5
    assert ratio[asked] == pytest.approx(0.5, abs=0.02)
    assert ratio[~bad] == pytest.approx(1.0, abs=1e-3)
    # A restarted dispatcher takes back what it learned from the snapshot's columns.
    rows = np.array([state.index[v] for v in fleet.ids])
    again = Dispatcher(control_step_s=STEP)
    again.restore_learned(d.learned(len(state)), len(state))
    assert np.array_equal(again.follow_ratio(rows), ratio)
    assert np.array_equal(again.cycled_kwh(rows), d.cycled_kwh(rows))
    assert again.cycled_kwh(rows).sum() > 0


def test_a_learned_ratio_derates_admission_and_the_next_request_is_on_target_at_once() -> None:
    fleet, state = fleet_and_state()
    half_followers(fleet)
    d = Dispatcher(control_step_s=STEP)
    view = state.view(T0, 3 * STEP)
    d.submit(req(round(0.3 * envelope(view, T0)[0].min_power_kw, 1), 60.0, "learn"), T0, view)
    t, _ = run_loop(fleet, state, d, T0, 14)  # learns, completes and releases
    assert not d.dispatches
    view = state.view(t, 3 * STEP)
    full = envelope(view, t)[0].min_power_kw
    answer = d.submit(req(full, 900.0, "all"), t, view)
    assert answer.status == "partial"  # the half followers cannot give their full range
    assert answer.allocated_kw > full + 5.0
    # The envelope the fleet publishes offers what admission would accept: no more.
    offered = envelope(view, t, scale=d.follow_ratio(view.rows))[0].min_power_kw
    assert offered == pytest.approx(answer.allocated_kw, abs=0.01)
    d.cancel("all", t, view)
    edge = d.submit(req(round(offered, 1) + 0.1, 900.0, "edge"), t, view)
    assert edge.status == "accepted", edge
    d.cancel("edge", t, view)
    target = round(0.5 * full, 1)
    assert d.submit(req(target, 900.0, "next"), t, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, t, 1)
    assert fleet_power(state, t) == pytest.approx(target, rel=0.02)  # no settling needed


def test_a_silent_vehicle_is_unknown_not_a_vehicle_that_delivered_nothing() -> None:
    fleet, state = fleet_and_state()
    d = Dispatcher(control_step_s=STEP)
    target = round(0.4 * envelope(state.view(T0, 3 * STEP), T0)[0].min_power_kw, 1)
    d.submit(req(target, 1800.0), T0, state.view(T0, 3 * STEP))
    t, _ = run_loop(fleet, state, d, T0, 4)
    quiet = int(np.argmin(fleet.power))
    row = state.index[fleet.ids[quiet]]
    others = np.array([i for i in range(len(fleet)) if i != quiet])
    for _ in range(8):  # it keeps discharging but its reports are lost
        view = state.view(t, 3 * STEP)
        out = d.step(t, view, len(state))
        for r, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(fleet.index[state.ids[r]], float(p), float(until))
        t += STEP
        fleet.tick(t)
        payloads = telemetry_payloads(fleet, t, others)
        state.apply_telemetry([Telemetry.model_validate_json(p) for p in payloads])
    view = state.view(t, 3 * STEP)
    assert row not in view.rows.tolist()  # out of the allocation and of the measured power
    # Its silence taught nothing (the reports before it round power to 0.1 W: ~1e-6 off).
    assert d.follow_ratio(np.array([row]))[0] == pytest.approx(1.0, abs=1e-4)
    assert float(view.power.sum()) == pytest.approx(target, rel=0.02)  # others took its share


def test_reports_stamped_in_the_future_are_refused_and_counted_as_future() -> None:
    check_not_ahead(T0 + 5.0, T0, 5.0)  # within tolerance: fine
    with pytest.raises(InvalidMessage) as err:
        check_not_ahead(T0 + 60.0, T0, 5.0)
    assert err.value.reason == "future"
    ts0 = to_epoch(Telemetry.model_validate_json(json.dumps(GOOD)).ts)
    svc = AggregatorService(
        settings=Settings(topic_prefix="ft", log_level="warning", telemetry_interval_s=5.0),
        clock=ManualClock(ts0),
        store=MemoryStore(),
        # Its own logger: another test may have pointed the global one at a closed stream.
        logger=structlog.wrap_logger(structlog.ReturnLogger()),
    )
    for i, ts in enumerate(["2026-11-26T18:00:04Z", "2026-11-26T18:02:00Z"]):
        body = json.dumps(dict(GOOD, seq=i, ts=ts)).encode()
        svc.on_message(aiomqtt.Message("ft/vehicles/ev-0001/telemetry", body, 0, False, i, None))
    assert svc.rejected == {"future": 1}
    assert len(svc.inbox.telemetry) == 1


def test_the_agents_command_refuses_a_bad_misbehave_option() -> None:
    result = CliRunner().invoke(app, ["agents", "--count", "3", "--misbehave", "partial=2"])
    assert result.exit_code == 2
    assert "not a fraction" in result.output
