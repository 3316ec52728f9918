"""The grid's messages through the split aggregator (issue 11 on issue 9's refactor): the
router checks them and queues typed events, the control step applies them at the start
of its step, and the grid outlives a takeover's reset."""

from __future__ import annotations

import structlog

from aggregator.control_step import ControlStep
from aggregator.grid import parse_grid
from aggregator.grid_state import GridState
from aggregator.inbox import Inbox, InboxRouter, Refusals
from broker.models import GridLimits, GridMeter, LimitInterval, from_epoch
from broker.settings import Settings
from core.clock import ManualClock

T0 = 1_790_000_000.0
DOC = {
    "nodes": [
        {"id": "feeder", "kind": "feeder", "import_kw": 500},
        {"id": "site-a", "parent": "feeder", "kind": "site", "import_kw": 40},
    ]
}
SETTINGS = Settings(topic_prefix="grid-inbox-test", control_step_s=5.0)


def grid() -> GridState:
    return GridState(parse_grid(DOC), telemetry_interval_s=SETTINGS.telemetry_interval_s)


def router(nodes: tuple[str, ...] | None) -> InboxRouter:
    return InboxRouter(
        topics=SETTINGS.topics,
        clock=ManualClock(T0),
        telemetry_interval_s=SETTINGS.telemetry_interval_s,
        speed=SETTINGS.speed,
        refusals=Refusals(20.0),
        logger=structlog.get_logger("test"),
        grid_nodes=nodes,
    )


def limits(kw: float) -> GridLimits:
    return GridLimits(
        ts=from_epoch(T0),
        intervals=[LimitInterval(start=from_epoch(T0), duration_s=600.0, import_kw=kw)],
    )


def test_grid_messages_are_checked_and_queued_then_applied_by_the_step() -> None:
    state = grid()
    r = router(state.grid.ids)
    t = SETTINGS.topics
    r.route(t.grid_meter("site-a"), GridMeter(ts=from_epoch(T0), power_kw=30.0).to_json())
    r.route(t.grid_limits("site-a"), limits(10.0).to_json())
    r.route(t.grid_limits("site-a"), b"")  # a cleared retained message
    r.route(t.grid_meter("nowhere"), GridMeter(ts=from_epoch(T0), power_kw=1.0).to_json())
    r.route(t.grid_limits("nowhere"), limits(1.0).to_json())
    ahead = GridMeter(ts=from_epoch(T0 + 3600.0), power_kw=5.0)
    r.route(t.grid_meter("site-a"), ahead.to_json())
    assert (r.received, r.accepted, r.ignored) == (6, 2, 1)
    assert r.rejected == {"node": 2, "future": 1}
    inbox = r.take()
    assert [n for n, _ in inbox.grid_meters] == ["site-a"]
    assert [n for n, _ in inbox.grid_limits] == ["site-a"]

    step = ControlStep(settings=SETTINGS, grid=state)
    assert step.dispatcher.grid is not None  # the dispatcher steers by the grid
    plan = step.run(inbox, T0 + 1.0)
    j = state.grid.index["site-a"]
    now = state.in_force(T0 + 1.0)
    assert now.meter_kw[j] == 30.0 and now.import_kw[j] == 10.0
    assert not inbox.grid_meters and not inbox.grid_limits  # applied once
    by = {n.node: n for n in plan.status.nodes}
    assert by["site-a"].import_limit_kw == 10.0 and by["site-a"].meter_kw == 30.0


def test_without_a_grid_its_messages_are_ignored() -> None:
    r = router(None)
    r.route(SETTINGS.topics.grid_meter("site-a"), b"not even json")
    assert (r.received, r.accepted, r.ignored, sum(r.rejected.values())) == (1, 0, 1, 0)
    assert not r.take().grid_meters


def test_a_takeover_reset_keeps_the_grid_and_the_limits_it_holds() -> None:
    state = grid()
    step = ControlStep(settings=SETTINGS, grid=state)
    step.apply_grid(Inbox(grid_limits=[("site-a", limits(10.0))]))
    before = step.dispatcher
    step.reset()
    assert step.dispatcher is not before and step.dispatcher.grid is not None
    assert step.grid is state
    j = state.grid.index["site-a"]
    assert state.in_force(T0 + 1.0).import_kw[j] == 10.0
