"""A request's books at both ends: its delivery window opens when its first setpoints are
in force and closes at its end, whatever the phase of the control steps.

The vehicles here behave as the agents do (agents/runtime.py): they tick on their own
phase, act on a setpoint a reaction time after it is sent and report at once, and notice
that a setpoint has expired only at their next tick. They follow every setpoint exactly,
so the only error left in the books is the bookkeeping's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher, StepOutput
from aggregator.fleet_state import FleetState, FleetView
from aggregator.settlement import Settlement
from broker.models import DispatchRequest, DispatchResult, Telemetry

T0 = 1_795_651_200.0 + 21 * 3600  # 21:00 UTC: the home cars are plugged in
STEP = 5.0
STALE = 3 * STEP


class Agents:
    """A fleet that ticks every STEP from ``T0 + phase`` and applies each setpoint ``lag``
    after it was sent, reporting every vehicle at each tick and each application."""

    def __init__(self, *, phase: float, lag: float, n: int = 12, seed: int = 4) -> None:
        self.fleet = SimFleet(generate_fleet(n, seed), T0, step_s=STEP)
        self.state = FleetState()
        self.lag = lag
        self.next_tick = T0 + phase
        self.pending: list[tuple[float, list[int], list[float], list[float]]] = []
        self._report(T0)

    def _report(self, t: float) -> None:
        payloads = telemetry_payloads(self.fleet, t)
        self.state.apply_telemetry([Telemetry.model_validate_json(p) for p in payloads])

    def run_to(self, t: float) -> None:
        """Every tick and every setpoint application up to ``t``, in time order."""
        while True:
            apply_at = self.pending[0][0] if self.pending else math.inf
            at = min(self.next_tick, apply_at)
            if at > t:
                return
            if apply_at <= self.next_tick:
                _, idx, power, until = self.pending.pop(0)
                self.fleet.setpoint_kw[idx] = power
                self.fleet.setpoint_until[idx] = until
            else:
                self.next_tick += STEP
            self.fleet.tick(at)
            self._report(at)

    def send(self, out: StepOutput, now: float) -> None:
        ids, index = self.state.ids, self.fleet.index
        idx = [index[ids[r]] for r in out.rows.tolist()]
        released = [index[ids[r]] for r in out.release_rows.tolist()]
        self.pending.append(
            (
                now + self.lag,
                idx + released,
                [*out.power_kw.tolist(), *[0.0] * len(released)],
                [*out.valid_until.tolist(), *[now] * len(released)],
            )
        )

    def view(self, t: float) -> FleetView:
        return self.state.view(t, STALE)


def discharge(agents: Agents, d: Dispatcher, duration_s: float) -> float:
    """Submit, at T0, a discharge of half the fleet's 900 s export capability; its power."""
    view = agents.view(T0)
    power = round(0.5 * envelope(view, T0)[0].min_power_kw, 1)
    answer = d.submit(
        DispatchRequest(request_id="r", power_kw=power, duration_s=duration_s), T0, view
    )
    assert answer.status == "accepted", answer
    return power


def run(agents: Agents, d: Dispatcher, until: float) -> tuple[DispatchResult, dict[float, float]]:
    """Step the dispatcher every STEP from T0 until the request completes; returns its
    result and the fleet power measured at each step."""
    t = T0
    measured: dict[float, float] = {}
    while t <= until + 2 * STEP:
        agents.run_to(t)
        view = agents.view(t)
        measured[t] = float(view.power.sum())
        out = d.step(t, view, len(agents.state))
        agents.send(out, t)
        done = [r for r in out.results if r.request_id == "r" and r.status == "completed"]
        if done:
            return done[0], measured
        t += STEP
    pytest.fail("the request never completed")


def test_the_first_step_books_no_power_from_before_the_setpoints() -> None:
    """Setpoints sent at T0 take hold 2 s later: the window opens then, and the first
    step books the fleet's power after them for 3 s, none of the 2 s before."""
    agents = Agents(phase=1.0, lag=2.0)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, 60.0)
    before = float(agents.view(T0).power.sum())
    assert before > 0  # plain charging: far from the discharge asked
    out = d.step(T0, agents.view(T0), len(agents.state))
    (progress,) = out.progress
    assert progress.delivery_start is None  # nothing in force yet: nothing delivered
    assert progress.delivered_kw == 0.0 and progress.delivered_kwh == 0.0
    agents.send(out, T0)
    agents.run_to(T0 + STEP)
    view = agents.view(T0 + STEP)
    after = float(view.power.sum())
    assert after == pytest.approx(power, rel=1e-5)  # telemetry rounds the power
    out = d.step(T0 + STEP, view, len(agents.state))
    (progress,) = out.progress
    assert progress.delivery_start is not None
    assert progress.delivery_start.timestamp() == pytest.approx(T0 + 2.0, abs=1e-3)
    # Results and progress give kWh to 4 decimals.
    assert progress.delivered_kwh == pytest.approx(after * 3.0 / 3600.0, abs=2e-4)
    assert progress.requested_kwh == pytest.approx(power * 3.0 / 3600.0, abs=2e-4)
    assert progress.delivered_kw == pytest.approx(power, rel=1e-5)


def test_a_request_whose_last_step_falls_just_before_its_end_is_booked_to_its_end() -> None:
    """Steps at T0 + 5k, the request ends at T0 + 60.1: the step at T0 + 60 leaves it
    running, the one at T0 + 65 closes it. The vehicles hold their setpoints until their
    tick at T0 + 61, then charge again: none of that after the end is the request's."""
    agents = Agents(phase=1.0, lag=0.0)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, 60.1)
    result, measured = run(agents, d, T0 + 60.1)
    assert result.ts.timestamp() == pytest.approx(T0 + 65.0)
    assert measured[T0 + 65.0] > 0  # back to plain charging at the closing step
    assert result.delivery_start is not None
    assert result.delivery_start.timestamp() == pytest.approx(T0, abs=1e-3)
    assert result.requested_kwh == pytest.approx(power * 60.1 / 3600.0, abs=1e-4)
    assert result.delivered_kwh == pytest.approx(result.requested_kwh, abs=2e-4)


@settings(max_examples=25, deadline=None)
@given(
    phase=st.floats(0.0, STEP, exclude_max=True),
    lag=st.floats(0.0, 0.8 * STEP),
    steps=st.integers(3, 14),
    part=st.floats(0.0, 1.0, exclude_max=True),
)
def test_a_perfectly_tracked_request_books_its_power_times_its_window(
    phase: float, lag: float, steps: int, part: float
) -> None:
    """Whatever the phase of the vehicles' ticks, their reaction time and where the end
    falls between steps: delivered = requested = power x (end - delivery start), and the
    window opens when the setpoints took hold (so with no reaction time, power x duration)."""
    duration = (steps + part) * STEP
    agents = Agents(phase=phase, lag=lag, n=8)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, duration)
    result, _ = run(agents, d, T0 + duration)
    assert result.delivery_start is not None
    start = result.delivery_start.timestamp()
    assert start == pytest.approx(T0 + lag, abs=1e-3)
    window_h = (T0 + duration - start) / 3600.0
    # Results give kWh to 4 decimals; telemetry rounds each vehicle's power.
    assert result.requested_kwh == pytest.approx(power * window_h, abs=1e-4)
    assert result.delivered_kwh == pytest.approx(power * window_h, rel=1e-5, abs=2e-4)
    if lag == 0.0:
        assert result.delivered_kwh == pytest.approx(power * duration / 3600.0, abs=2e-4)


def test_an_admission_on_the_step_another_request_ends_leaves_the_others_books_alone() -> None:
    """Back to back: b is admitted on the very step a ends. a's last step was booked on
    a's own terms, not with b's power counted as the rest of the stack's on top of a."""
    agents = Agents(phase=1.0, lag=0.0)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, 30.0)
    t = T0
    results: dict[str, DispatchResult] = {}
    while "a_done" not in results and t <= T0 + 60:
        agents.run_to(t)
        view = agents.view(t)
        if t == T0 + 30.0:
            b = DispatchRequest(request_id="b", power_kw=0.5 * power, duration_s=60.0)
            assert d.submit(b, t, view).status == "accepted"
        out = d.step(t, view, len(agents.state))
        agents.send(out, t)
        for r in out.results:
            if r.request_id == "r" and r.status == "completed":
                results["a_done"] = r
        t += STEP
    a = results["a_done"]
    assert a.requested_kwh == pytest.approx(power * 30.0 / 3600.0, abs=1e-4)
    assert a.delivered_kwh == pytest.approx(a.requested_kwh, abs=2e-4)
    assert np.isclose(d.dispatches["b"].stacked_kwh, 0.0)


def test_an_amendment_books_the_time_before_it_on_the_old_power() -> None:
    """Amended at T0 + 30 from P to 1.5 P: the 30 s before are asked at P, the 30 s after
    at 1.5 P (the step before the amendment is not re-booked at the new power)."""
    agents = Agents(phase=1.0, lag=0.0)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, 60.0)
    t = T0
    done: list[DispatchResult] = []
    while not done and t <= T0 + 80:
        agents.run_to(t)
        view = agents.view(t)
        if t == T0 + 30.0:
            answer = d.amend("r", t, view, power_kw=1.5 * power)
            assert answer is not None and answer.status == "accepted", answer
        out = d.step(t, view, len(agents.state))
        agents.send(out, t)
        done += [r for r in out.results if r.request_id == "r" and r.status == "completed"]
        t += STEP
    (result,) = done
    asked = (power * 30.0 + 1.5 * power * 30.0) / 3600.0
    assert result.requested_kwh == pytest.approx(asked, abs=1e-4)
    assert result.delivered_kwh == pytest.approx(asked, abs=2e-4)


def test_each_vehicles_settlement_stops_at_the_end_of_the_request() -> None:
    """The request ends at T0 + 60.5 and the closing step is at T0 + 65; the vehicles
    noticed the expiry at their tick at T0 + 61 and went back to plain charging. Each
    vehicle's meter read back to the end is its meter at the last step plus the power
    it held then, not its power now taken back over the whole gap."""
    agents = Agents(phase=1.0, lag=0.0)
    d = Dispatcher(control_step_s=STEP)
    discharge(agents, d, 60.5)
    s = Settlement()
    state = agents.state
    t = T0
    while t <= T0 + 60.0:
        agents.run_to(t)
        view = agents.view(t)
        agents.send(d.step(t, view, len(state)), t)
        s.observe(t, view, state.meters(t, STALE), state.col("plugged"), state.ids, STEP)
        t += STEP
    last = agents.view(T0 + 60.0)
    meter_last = state.meters(T0 + 60.0, STALE)
    agents.run_to(T0 + 65.0)
    view = agents.view(T0 + 65.0)
    assert np.all(view.ts > T0 + 60.5)  # every vehicle reported after the end ...
    moved = np.abs(view.power - last.power) > 0.1
    assert moved.sum() >= len(view) // 2  # ... most of them back to another power
    got = s.meters_at(T0 + 60.5, T0 + 65.0, state.meters(T0 + 65.0, STALE), view)
    want = meter_last.copy()
    want[last.rows] += last.power * 0.5 / 3600.0
    np.testing.assert_allclose(got[view.rows], want[view.rows], atol=1e-9)


def test_the_window_opens_when_the_setpoints_took_hold_though_a_car_left_meanwhile() -> None:
    """A car unplugs 0.5 s after the setpoints went out, before they take hold at T0 + 2:
    the fleet at the next step is not the one at the send, so the moment is placed from
    the cars present at both, each with its own meter."""
    agents = Agents(phase=1.0, lag=2.0)
    d = Dispatcher(control_step_s=STEP)
    power = discharge(agents, d, 60.0)
    out = d.step(T0, agents.view(T0), len(agents.state))
    agents.send(out, T0)
    fleet = agents.fleet
    leaver = int(np.flatnonzero(fleet.plugged)[0])
    left_kw = float(fleet.power[leaver])
    fleet.departure[leaver] = T0 + 0.5
    fleet.tick(T0 + 0.5)
    agents._report(T0 + 0.5)
    assert not fleet.plugged[leaver]
    agents.run_to(T0 + STEP)
    view = agents.view(T0 + STEP)
    out = d.step(T0 + STEP, view, len(agents.state))
    (progress,) = out.progress
    assert progress.delivery_start is not None
    assert progress.delivery_start.timestamp() == pytest.approx(T0 + 2.0, abs=0.01)
    after = float(view.power.sum())  # the others: their shares (the leaver's next step)
    assert after < 0.5 * power
    # The leaver's half second before it went is not told apart: within that, exact.
    assert progress.delivered_kwh == pytest.approx(
        after * 3.0 / 3600.0, abs=abs(left_kw) * 0.5 / 3600.0 + 2e-4
    )
