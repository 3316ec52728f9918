"""One clock for the fleet: relative times on the platform clock, and the rules by which a
process adopts the fleet's clock anchor or creates it (core/clock.py, pure)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.dispatch import Dispatcher
from broker.clocklink import explicit, is_stale
from broker.models import ClockAnchor, DispatchRequest, from_epoch, to_epoch
from broker.settings import Settings
from core.clock import Anchor, Given, SimClock, prefer, reconcile, settle
from tests.support.memory_loop import STEP, T0, fleet_and_state
from v2g.commands.options import parse_start

WALL = 1_796_292_000.0  # 2026-12-03 10:00 UTC, a wall time for the pure rules


# -- relative times --------------------------------------------------------------------
def test_a_relative_start_counts_from_the_platform_clock_not_the_wall() -> None:
    # A x30 clock that started an hour of wall time ago is 30 h ahead of the wall.
    wall0 = time.time() - 3600.0
    clock = SimClock(speed=30.0, wall_anchor=wall0, sim_anchor=wall0)
    now = clock.now()
    assert now - time.time() == pytest.approx(29 * 3600.0, abs=5.0)
    start = parse_start("+30m", now=now)
    assert to_epoch(start) == pytest.approx(now + 1800.0, abs=1.0)
    assert parse_start(" +1.5h", now=now) == from_epoch(round(now)) + timedelta(hours=1.5)
    # An absolute time is what it says, whatever the clock.
    assert parse_start("2026-11-26T18:00:00Z", now=now) == datetime(2026, 11, 26, 18, tzinfo=UTC)
    with pytest.raises(ValueError, match="platform clock"):
        parse_start("+30m")


def test_the_readme_example_at_speed_30_is_accepted_by_the_dispatcher() -> None:
    """`V2G_SPEED=30 v2g dispatch --power 300 --duration 1h --start +30m`: on the platform
    clock, not refused as thousands of seconds in the past."""
    _, state = fleet_and_state()
    # The fleet's clock, x30, started 2 h of wall time ago so that it reads T0 now.
    wall0 = time.time() - 7200.0
    anchor = settle(None, Given(30.0, T0 - 30 * 7200.0, wall0), now=wall0)
    clock = anchor.anchor.clock()
    now = clock.now()
    assert now == pytest.approx(T0, abs=10.0)
    req = DispatchRequest(
        request_id="readme",
        power_kw=30.0,
        duration_s=3600.0,
        start=parse_start("+30m", now=now),
    )
    answer = Dispatcher(control_step_s=STEP).submit(req, now, state.view(now, 3 * STEP))
    assert answer.status in ("accepted", "partial"), answer
    assert "in the past" not in (answer.reason or "")
    assert answer.schedule is not None
    assert answer.schedule[0].start == req.start


# -- the anchor: adopt, create, conflict -------------------------------------------------
def test_with_no_anchor_on_the_bus_the_clock_starts_now_not_at_midnight() -> None:
    got = settle(None, Given(speed=30.0), now=WALL)
    assert got.source == "created" and got.publish
    assert got.anchor == Anchor(WALL, WALL, 30.0)
    # One minute of wall time later, 30 simulated minutes have passed: not 24 days.
    assert got.anchor.clock().speed == 30.0
    assert got.anchor.at(WALL + 60.0) == WALL + 1800.0


def test_an_explicit_sim_start_sets_the_clock() -> None:
    start = datetime(2026, 12, 3, 6, tzinfo=UTC).timestamp()
    got = settle(None, Given(speed=30.0, sim_start=start), now=WALL)
    assert got.anchor == Anchor(start, WALL, 30.0) and got.publish


def test_a_later_process_adopts_the_fleet_anchor_speed_included() -> None:
    fleet = Anchor(WALL - 500.0, WALL - 100.0, 30.0)
    for speed in (None, 30.0):  # nothing given, or the same speed
        got = settle(fleet, Given(speed=speed), now=WALL)
        assert got.source == "adopted" and got.anchor == fleet and got.conflict is None
        assert got.publish  # it keeps the anchor fresh with the others
    # The same sim start, written by hand to the second, is the same clock.
    got = settle(fleet, Given(sim_start=round(fleet.sim_start) + 0.4), now=WALL)
    assert got.source == "adopted"


def test_a_command_that_only_reads_the_clock_never_creates_one() -> None:
    got = settle(None, Given(), now=WALL, create=False)
    assert got.source == "local" and not got.publish
    assert got.anchor.at(WALL + 10.0) == WALL + 10.0  # the wall clock


def test_an_explicit_speed_that_contradicts_the_fleet_wins_with_a_warning_naming_both() -> None:
    fleet = Anchor(WALL - 500.0, WALL - 100.0, 30.0)
    got = settle(fleet, Given(speed=60.0), now=WALL)
    assert got.source == "explicit" and not got.publish
    assert got.conflict is not None and "60" in got.conflict and "30" in got.conflict
    # It runs at its own speed from where the fleet's clock is now.
    assert got.anchor.speed == 60.0
    assert got.anchor.at(WALL) == pytest.approx(fleet.at(WALL))


def test_an_explicit_sim_start_that_contradicts_the_fleet_wins_with_a_warning() -> None:
    fleet = Anchor(WALL - 500.0, WALL - 100.0, 30.0)
    mine = WALL - 86_400.0
    got = settle(fleet, Given(sim_start=mine), now=WALL)
    assert got.source == "explicit" and not got.publish
    assert got.anchor.sim_start == mine and got.anchor.speed == 30.0
    assert got.conflict is not None and "sim start" in got.conflict
    assert "2026-12-02T10:00:00Z" in got.conflict  # both times, readable


@given(
    speed=st.floats(1.0, 1000.0),
    first=st.floats(0.0, 1e6),
    later=st.floats(0.0, 1e6),
    probe=st.floats(0.0, 1e6),
)
def test_two_processes_started_at_different_times_agree_on_the_time(
    speed: float, first: float, later: float, probe: float
) -> None:
    a = settle(None, Given(speed=speed), now=WALL + first)
    b = settle(a.anchor, Given(speed=speed), now=WALL + first + later)
    t = WALL + first + later + probe
    assert b.anchor.at(t) == a.anchor.at(t)


def test_two_anchors_created_at_once_end_as_one_the_earlier() -> None:
    early, late = Anchor(WALL, WALL, 30.0), Anchor(WALL + 0.2, WALL + 0.2, 30.0)
    assert prefer(early, late) is early and prefer(late, early) is early
    given = Given(speed=30.0)
    assert reconcile(late, early, given, now=WALL + 1) == "adopt"
    assert reconcile(early, late, given, now=WALL + 1) == "republish"
    assert reconcile(early, Anchor(WALL, WALL, 30.0), given, now=WALL + 1) == "same"
    assert reconcile(early, None, given, now=WALL + 1) == "republish"  # cleared: put it back
    # Never adopt what the explicit settings contradict.
    assert reconcile(late, Anchor(WALL, WALL, 10.0), given, now=WALL + 1) == "ignore"


def test_the_clock_moves_in_place_when_it_adopts() -> None:
    clock = SimClock(speed=30.0, wall_anchor=WALL, sim_anchor=WALL)
    clock.move_to(wall_anchor=WALL - 10.0, sim_anchor=WALL - 600.0)
    assert (clock.wall_anchor, clock.sim_anchor, clock.speed) == (WALL - 10.0, WALL - 600.0, 30.0)


# -- settings and the wire -----------------------------------------------------------------
def test_sim_start_reads_iso_8601_or_epoch_and_only_given_settings_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("V2G_SIM_START", "2026-12-03T06:00:00Z")
    monkeypatch.setenv("V2G_SPEED", "30")
    s = Settings()
    assert s.sim_start == datetime(2026, 12, 3, 6, tzinfo=UTC).timestamp()
    assert explicit(s) == Given(speed=30.0, sim_start=s.sim_start)
    assert Settings(sim_start="1796277600").sim_start == 1796277600.0
    with pytest.raises(ValueError, match="no time zone"):
        Settings(sim_start="2026-12-03T06:00")
    monkeypatch.delenv("V2G_SIM_START")
    monkeypatch.delenv("V2G_SPEED")
    assert explicit(Settings()) == Given()


def test_the_anchor_round_trips_the_wire_and_goes_stale_when_nobody_refreshes_it() -> None:
    a = Anchor(WALL - 1234.5, WALL - 60.25, 30.0)
    msg = ClockAnchor.of(a, refreshed_at=WALL, set_by="agg-1")
    back = ClockAnchor.model_validate_json(msg.to_json())
    assert back.anchor.same_as(a) and back.set_by == "agg-1"
    assert not is_stale(back, wall_now=WALL + 29.0, refresh_s=10.0)
    assert is_stale(back, wall_now=WALL + 31.0, refresh_s=10.0)
