"""The least-cost split in the dispatcher: on target like the fast path, wear spread wider."""

from __future__ import annotations

import pytest

from aggregator.allocation import jain_index
from aggregator.capability import envelope
from aggregator.dispatch import Dispatcher
from tests.support.memory_loop import STEP, T0, fleet_and_state, req, run_loop


def run(allocation: str) -> float:
    """Jain's index of the energy cycled per vehicle over an hour of discharge."""
    fleet, state = fleet_and_state(n=120, seed=9)
    d = Dispatcher(control_step_s=STEP, allocation=allocation)  # type: ignore[arg-type]
    view = state.view(T0, 3 * STEP)
    target = round(0.3 * envelope(view, T0)[0].min_power_kw, 1)
    assert d.submit(req(target, 3600.0, "r"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 60)
    now = state.view(t, 3 * STEP)
    assert float(now.power.sum()) == pytest.approx(target, rel=0.02), allocation
    cycled = d.cycled_kwh(now.rows)
    assert cycled.sum() > 0
    assert fleet.short == 0
    return jain_index(cycled)


def test_the_least_cost_split_tracks_like_the_fast_path_and_spreads_the_cycling() -> None:
    fast, cost = run("proportional"), run("cost")
    assert cost > fast, (fast, cost)
