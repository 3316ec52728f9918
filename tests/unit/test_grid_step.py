"""The grid's limits in the control step (issue 11): the in-memory loop with a topology,
node meters and limits; every check is on what the simulated cars actually draw."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.fleet import SimFleet
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetState
from aggregator.grid import parse_grid
from aggregator.grid_state import GridState
from aggregator.ledger import grid_entry
from broker.models import (
    DispatchRequest,
    GridLimits,
    GridMeter,
    LimitInterval,
    Telemetry,
    from_epoch,
)
from tests.support.memory_loop import STEP, T0, close_loop, fleet_and_state, req, run_loop

pytestmark = pytest.mark.timeout(60)

GRID = {
    "nodes": [
        {"id": "feeder", "kind": "feeder", "import_kw": 400.0},
        {"id": "site-a", "parent": "feeder", "kind": "site", "import_kw": 60.0},
        {"id": "site-b", "parent": "feeder", "kind": "site", "import_kw": 150.0},
    ]
}


def tol(limit: float) -> float:
    return max(0.01 * limit, 1.0)


def setup(n: int = 40, split: int = 20) -> tuple[SimFleet, FleetState, Dispatcher, GridState]:
    fleet, _ = fleet_and_state(n)
    fleet.place(["site-a" if i < split else "site-b" for i in range(n)])
    state = FleetState()
    close_loop(fleet, state, T0)
    grid = GridState(parse_grid(GRID), telemetry_interval_s=STEP)
    d = Dispatcher(control_step_s=STEP, grid=grid)
    return fleet, state, d, grid


def drawn(fleet: SimFleet, node: str) -> float:
    assert fleet.node is not None
    under = np.array([n == node for n in fleet.node])
    return float(fleet.power[under & fleet.plugged].sum())


def test_baseline_charging_held_under_a_site_limit_at_every_step() -> None:
    fleet, state, d, _grid = setup()
    plain = drawn(fleet, "site-a")
    assert plain > 60.0 * 1.5, "the test needs a car park that would overload its site"
    t = T0
    for _ in range(12):
        t, _ = run_loop(fleet, state, d, t, 1)
        assert drawn(fleet, "site-a") <= 60.0 + tol(60.0)
        assert drawn(fleet, "site-a") + drawn(fleet, "site-b") <= 400.0 + tol(400.0)
    nodes, unknown = d.node_statuses(state.ids)
    by = {s.node: s for s in nodes}
    assert unknown == 0
    assert by["site-a"].vehicles == int(sum(fleet.plugged[:20]))
    assert by["site-a"].over_limit_kw == 0.0
    assert by["site-a"].power_kw == pytest.approx(60.0, abs=1.0)  # all the room it has
    # Nothing held the other site: its cars charge as they would.
    assert by["site-b"].headroom_import_kw is not None


def test_meter_counts_and_a_jump_is_followed_within_two_steps() -> None:
    fleet, state, d, grid = setup()
    t, _ = run_loop(fleet, state, d, T0, 3)
    grid.meter("site-b", GridMeter(ts=from_epoch(t), power_kw=120.0))  # 30 kW left there
    t, _ = run_loop(fleet, state, d, t, 2)
    assert drawn(fleet, "site-b") + 120.0 <= 150.0 + tol(150.0)
    grid.meter("site-b", GridMeter(ts=from_epoch(t), power_kw=20.0))  # room again
    t, _ = run_loop(fleet, state, d, t, 2)
    assert drawn(fleet, "site-b") > 30.0 + tol(150.0)  # let go as far as the new meter allows
    assert drawn(fleet, "site-b") + 20.0 <= 150.0 + tol(150.0)


def test_a_stale_meter_is_counted_no_more_and_warned() -> None:
    fleet, state, d, grid = setup()
    grid.meter("site-a", GridMeter(ts=from_epoch(T0), power_kw=50.0))  # 10 kW left
    t, _ = run_loop(fleet, state, d, T0, 2)
    assert drawn(fleet, "site-a") <= 10.0 + tol(60.0)
    t, _ = run_loop(fleet, state, d, t, 4)  # 3 telemetry intervals later: stale
    g = grid.in_force(t)
    assert g.stale[grid.grid.index["site-a"]]
    assert "site-a" in grid.stale_warnings(g)[0]
    assert drawn(fleet, "site-a") > 10.0 + tol(60.0)  # the stale reading holds no more


def test_a_dynamic_limit_mid_dispatch_holds_and_the_request_takes_the_cut() -> None:
    fleet, state, d, grid = setup()
    view = state.view(T0, 3 * STEP)
    answer = d.submit(req(150.0, 600.0), T0, view)
    assert answer.status in ("accepted", "partial")
    t, _ = run_loop(fleet, state, d, T0, 4)
    limits = GridLimits(
        ts=from_epoch(t),
        intervals=[LimitInterval(start=from_epoch(t), duration_s=120.0, import_kw=20.0)],
    )
    grid.limits("feeder", limits)
    t, _ = run_loop(fleet, state, d, t, 2)
    assert drawn(fleet, "site-a") + drawn(fleet, "site-b") <= 20.0 + tol(20.0)
    # After the interval, the static limits again.
    t, _ = run_loop(fleet, state, d, t, 1)
    assert d.node_statuses(state.ids)[0][0].import_limit_kw == 20.0
    t2 = T0 + 4 * STEP + 125.0
    while t < t2:
        t, _ = run_loop(fleet, state, d, t, 1)
    assert d.node_statuses(state.ids)[0][0].import_limit_kw == 400.0


def test_a_car_that_moves_is_counted_once_under_its_new_node() -> None:
    fleet, state, d, _grid = setup()
    t, _ = run_loop(fleet, state, d, T0, 1)
    mover = next(i for i in range(20) if fleet.plugged[i])
    before = {s.node: s.vehicles for s in d.node_statuses(state.ids)[0]}
    fleet.move_to(mover, "site-b")
    t, _ = run_loop(fleet, state, d, t, 2)
    after = {s.node: s.vehicles for s in d.node_statuses(state.ids)[0]}
    assert after["site-a"] == before["site-a"] - 1
    assert after["site-b"] == before["site-b"] + 1
    assert after["feeder"] == before["feeder"]
    # A node the grid does not know: under the root, and counted as unknown.
    fleet.move_to(mover, "nowhere")
    t, _ = run_loop(fleet, state, d, t, 2)
    nodes, unknown = d.node_statuses(state.ids)
    assert unknown == 1
    assert {s.node: s.vehicles for s in nodes}["feeder"] == before["feeder"]


def test_the_node_survives_a_snapshot() -> None:
    fleet, state, _, _ = setup(n=6, split=3)
    ids, cols = state.snapshot()
    again = FleetState.restore(ids, cols)
    view = again.view(T0, 3 * STEP)
    assert view.node is not None
    names = [view.node_names[k] for k in view.node.tolist()]
    assert names == [fleet.node[i] for i in range(6) if fleet.plugged[i]]  # type: ignore[index]


def test_a_report_without_a_node_keeps_the_last_one() -> None:
    state = FleetState()
    base = {
        "vehicle_id": "ev-1",
        "plugged_in": True,
        "soc": 0.5,
        "capacity_kwh": 60.0,
        "power_kw": 0.0,
        "max_charge_kw": 11.0,
        "max_discharge_kw": 11.0,
        "min_soc": 0.2,
        "target_soc": 0.8,
        "charge_efficiency": 0.95,
        "discharge_efficiency": 0.95,
    }
    state.apply_telemetry([Telemetry(**base, seq=1, ts=from_epoch(T0), node="a")])  # type: ignore[arg-type]
    state.apply_telemetry([Telemetry(**base, seq=2, ts=from_epoch(T0 + 5))])  # type: ignore[arg-type]
    assert state.node_names[state.col("node")[0]] == "a"
    state.apply_telemetry([Telemetry(**base, seq=3, ts=from_epoch(T0 + 10), node="b")])  # type: ignore[arg-type]
    state.apply_telemetry([Telemetry(**base, seq=1, ts=from_epoch(T0 - 5), node="c")])  # type: ignore[arg-type]
    assert state.node_names[state.col("node")[0]] == "b"  # a replay moves nothing


def test_node_targeted_requests_on_two_sites_at_once_track_their_subtrees() -> None:
    fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    a = d.submit(req(25.0, 300.0, rid="on-a", node="site-a"), T0, view)
    b = d.submit(req(40.0, 300.0, rid="on-b", node="site-b"), T0, view)
    assert (a.status, b.status) == ("accepted", "accepted"), (a.reason, b.reason)
    _t, outs = run_loop(fleet, state, d, T0, 20)
    errors = {"on-a": [], "on-b": []}
    for out in outs[2:]:  # two steps for the setpoints to take hold
        for p in out.progress:
            errors[p.request_id].append(abs(p.delivered_kw - p.allocated_kw))
    for rid, errs in errors.items():
        assert errs, rid
        assert max(errs) <= 0.5, (rid, max(errs))  # kW: each site holds its own target
    assert drawn(fleet, "site-a") == pytest.approx(25.0, abs=0.5)
    assert drawn(fleet, "site-b") == pytest.approx(40.0, abs=0.5)


def test_a_node_request_beyond_a_limit_is_partial_and_names_the_node() -> None:
    _fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    a = d.submit(req(100.0, 300.0, rid="big", node="site-a"), T0, view)
    assert a.status == "partial"
    assert "site-a's import limit" in (a.reason or "")
    assert a.allocated_kw == pytest.approx(60.0, abs=0.01)
    gone = d.submit(req(10.0, 300.0, rid="nowhere", node="nowhere"), T0, view)
    assert gone.status == "rejected" and "not in the grid" in (gone.reason or "")
    cancelled = d.cancel("big", T0 + STEP, state.view(T0 + STEP, 3 * STEP))
    assert cancelled is not None and cancelled.status == "cancelled"


def test_a_limit_beyond_reach_wins_over_the_floors_and_reports_conflicts_and_excess() -> None:
    fleet, state, d, grid = setup(n=80, split=40)
    t, _ = run_loop(fleet, state, d, T0, 1)
    # Other load alone breaks site-a's 60 kW: every car under it does the most it can
    # (discharge where it may; a car that must charge is held at 0, below its floor).
    grid.meter("site-a", GridMeter(ts=from_epoch(t), power_kw=2000.0))
    view = state.view(t, 3 * STEP)
    lo, _ = d.ranges(view, t, STEP)
    assert view.node is not None
    at_a = np.array([view.node_names[k] == "site-a" for k in view.node.tolist()])
    floors = {state.ids[r] for r in view.rows[at_a & (lo > 1e-6)].tolist()}
    assert floors, "the test needs cars under site-a that must charge now"
    d.step(t, view, len(state))
    # The feeder (no meter of its own: its children's) is over too: site-b's cars that
    # must charge are held as well.
    everywhere = {state.ids[r] for r in view.rows[lo > 1e-6].tolist()}
    assert set(d.grid_conflicts(state.ids)) == everywhere
    by = {s.node: s for s in d.node_statuses(state.ids)[0]}
    assert set(by["site-a"].conflicts) == floors
    assert set(by["site-b"].conflicts) == everywhere - floors
    most = float(np.minimum(lo[at_a], 0.0).sum())  # every car at its lowest
    assert by["site-a"].power_kw == pytest.approx(most, abs=1e-3)
    assert by["site-a"].over_limit_kw == pytest.approx(2000.0 + most - 60.0, abs=1e-3)


def test_the_ledger_books_a_step_with_a_conflict_or_an_excess_only() -> None:
    fleet, state, d, grid = setup()
    run_loop(fleet, state, d, T0, 1)
    nodes, _ = d.node_statuses(state.ids)
    assert grid_entry(T0, nodes) is None  # all held, nobody below a floor
    grid.meter("site-a", GridMeter(ts=from_epoch(T0 + STEP), power_kw=2000.0))  # beyond reach
    run_loop(fleet, state, d, T0 + STEP, 1)
    nodes, _ = d.node_statuses(state.ids)
    entry = grid_entry(T0, nodes)
    assert entry is not None and entry["kind"] == "grid"
    by = {n.node: n for n in nodes}
    over = json.loads(entry["over_limit_kw"])
    assert over["site-a"] == by["site-a"].over_limit_kw > 0.0
    assert json.loads(entry["conflicts"]) == {n.node: n.conflicts for n in nodes if n.conflicts}


def firming(rid: str, node: str, **band: float) -> DispatchRequest:
    return DispatchRequest.model_validate(
        {"request_id": rid, "service": "firming", "node": node, "duration_s": 300.0, **band}
    )


def test_firming_holds_a_solar_sites_net_power_in_its_band_and_books_the_misses() -> None:
    fleet, state, d, grid = setup()
    grid.meter("site-b", GridMeter(ts=from_epoch(T0), power_kw=-150.0))  # PV exports 150
    view = state.view(T0, 3 * STEP)
    plain = drawn(fleet, "site-b")
    assert plain > 90.0 + 5.0, "the test needs cars that would leave the band by themselves"
    answer = d.submit(firming("firm", "site-b", min_kw=-100.0, max_kw=-60.0), T0, view)
    assert answer.status == "accepted", answer.reason
    t = T0
    nets = []
    for _ in range(10):
        grid.meter("site-b", GridMeter(ts=from_epoch(t), power_kw=-150.0))  # kept fresh
        t, outs = run_loop(fleet, state, d, t, 1)
        nets.append(drawn(fleet, "site-b") - 150.0)
    assert all(-100.0 - tol(100.0) <= n <= -60.0 + tol(100.0) for n in nets[1:]), nets
    (p,) = [p for p in outs[0].progress if p.request_id == "firm"]
    assert p.outside_band_kwh is not None and p.outside_band_kwh >= 0.0
    while True:  # to its end: the final result books the energy outside the band
        grid.meter("site-b", GridMeter(ts=from_epoch(t), power_kw=-150.0))
        t, outs = run_loop(fleet, state, d, t, 1)
        done = [r for r in outs[0].results if r.request_id == "firm"]
        if done:
            break
    assert done[0].status == "completed" and done[0].outside_band_kwh is not None
    # Only the first step (plain charging, before the setpoints) was outside the band.
    assert done[0].outside_band_kwh <= (plain - 90.0) * STEP / 3600.0 + 1e-3


def test_firming_the_cars_cannot_hold_is_partial_with_the_shortfall() -> None:
    _, state, d, grid = setup()
    grid.meter("site-b", GridMeter(ts=from_epoch(T0), power_kw=-1000.0))
    answer = d.submit(firming("big", "site-b", min_kw=-10.0), T0, state.view(T0, 3 * STEP))
    assert answer.status == "partial"
    assert "vehicles under site-b" in (answer.reason or "")
    assert answer.shortfall_kw > 500.0


def test_a_node_request_survives_a_restart_on_its_node_only() -> None:
    fleet, state, d, grid = setup()
    view = state.view(T0, 3 * STEP)
    assert d.submit(req(25.0, 300.0, rid="on-a", node="site-a"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 3)
    records = d.to_records()
    again = Dispatcher(control_step_s=STEP, grid=grid)
    again.restore(records)
    assert again.holds("on-a") and "on-a" not in again.dispatches  # not fleet-wide
    t, _ = run_loop(fleet, state, again, t, 3)
    assert drawn(fleet, "site-a") == pytest.approx(25.0, abs=0.5)
    without = Dispatcher(control_step_s=STEP)
    without.restore(records)
    assert not without.holds("on-a")


def test_an_amended_node_request_is_held_at_its_new_power_on_its_node() -> None:
    fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    assert d.submit(req(25.0, 300.0, rid="on-a", node="site-a"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 4)
    assert d.nodes is not None
    before = d.nodes.dispatches["on-a"].delivered_kwh
    assert before > 0
    answer = d.amend("on-a", t, state.view(t, 3 * STEP), power_kw=40.0)
    assert answer is not None and answer.status == "accepted", answer
    assert answer.reason == "amended" and answer.allocated_kw == 40.0
    t, _ = run_loop(fleet, state, d, t, 4)
    assert drawn(fleet, "site-a") == pytest.approx(40.0, abs=0.5)
    assert d.nodes.dispatches["on-a"].delivered_kwh > before  # the same books, carried on
    # The amended terms are now the request's: resending the original is a conflict.
    again = d.submit(req(25.0, 300.0, rid="on-a", node="site-a"), t, state.view(t, 3 * STEP))
    assert again.status == "rejected" and "different terms" in (again.reason or "")


def test_an_amendment_beyond_the_nodes_headroom_is_partial_and_names_the_node() -> None:
    fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    assert d.submit(req(25.0, 300.0, rid="on-a", node="site-a"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 2)
    answer = d.amend("on-a", t, state.view(t, 3 * STEP), power_kw=100.0)
    assert answer is not None and answer.status == "partial", answer
    assert (answer.reason or "").startswith("amended; ")
    assert "site-a's import limit" in (answer.reason or "")
    assert answer.allocated_kw == pytest.approx(60.0, abs=0.01)
    t, _ = run_loop(fleet, state, d, t, 3)
    assert drawn(fleet, "site-a") <= 60.0 + tol(60.0)
    # Refused terms leave the old ones standing, and the refusal is not its answer.
    bad = d.amend("on-a", t, state.view(t, 3 * STEP), duration_s=1.0)
    assert (
        bad is not None and bad.status == "rejected" and "cancel it instead" in (bad.reason or "")
    )
    assert d.answers["on-a"].status == "partial"


def test_an_amended_node_request_runs_to_its_new_end() -> None:
    fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    assert d.submit(req(25.0, 60.0, rid="on-a", node="site-a"), T0, view).status == "accepted"
    t, _ = run_loop(fleet, state, d, T0, 1)
    answer = d.amend("on-a", t, state.view(t, 3 * STEP), duration_s=180.0)
    assert answer is not None and answer.status == "accepted", answer
    ends: list[float] = []
    while t < T0 + 400.0 and not ends:
        t, outs = run_loop(fleet, state, d, t, 1)
        ends += [t for o in outs for r in o.results if r.request_id == "on-a"]
        if not ends:
            assert drawn(fleet, "site-a") == pytest.approx(25.0, abs=0.5) or t < T0 + 3 * STEP
    assert ends and ends[0] >= T0 + 180.0 - STEP  # well past its first end (60 s)
    (done,) = [r for o in outs for r in o.results if r.request_id == "on-a"]
    assert done.status == "completed" and "amended at" in (done.reason or "")


def test_firming_on_a_node_takes_a_new_duration_but_no_power() -> None:
    _, state, d, grid = setup()
    grid.meter("site-b", GridMeter(ts=from_epoch(T0), power_kw=-150.0))
    view = state.view(T0, 3 * STEP)
    assert d.submit(firming("firm", "site-b", min_kw=-100.0), T0, view).status == "accepted"
    bad = d.amend("firm", T0, view, power_kw=10.0)
    assert bad is not None and bad.status == "rejected" and "min_kw" in (bad.reason or "")
    longer = d.amend("firm", T0, view, duration_s=1200.0)
    assert longer is not None and longer.status == "accepted", longer
    assert d.nodes is not None and d.nodes.dispatches["firm"].end == pytest.approx(T0 + 1200.0)


def test_a_node_request_for_later_takes_its_new_terms_at_its_start() -> None:
    fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    later = req(25.0, 300.0, rid="later", node="site-a", start=from_epoch(T0 + 3 * STEP))
    assert d.submit(later, T0, view).status == "accepted"
    answer = d.amend("later", T0, view, power_kw=100.0)
    assert answer is not None and answer.status == "accepted", answer
    assert (answer.reason or "").startswith("amended; scheduled for")
    assert "checked at start" in (answer.reason or "")
    _t, outs = run_loop(fleet, state, d, T0, 5)
    at_start = [r for o in outs for r in o.results if r.request_id == "later"]
    assert [r.status for r in at_start] == ["started", "partial"], at_start
    assert "site-a's import limit" in (at_start[1].reason or "")


def test_a_signal_service_on_a_node_is_refused_and_says_what_a_node_takes() -> None:
    _fleet, state, d, _ = setup()
    view = state.view(T0, 3 * STEP)
    regulation = DispatchRequest(
        request_id="reg-on-a",
        service="frequency_regulation",
        capacity_kw=20.0,
        duration_s=600.0,
        node="site-a",
    )
    a = d.submit(regulation, T0, view)
    assert a.status == "rejected"
    assert "power requests (power_kw) and firming" in (a.reason or "")
    assert "without node" in (a.reason or "")
    assert not d.holds("reg-on-a")
