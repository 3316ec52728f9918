"""Each grid node's capability windows (issue 11): within its subtree's range and its
headroom, and clipped by a tight parent (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.capability import WINDOWS_S
from aggregator.fleet_state import FleetState
from aggregator.grid import parse_grid
from aggregator.grid_alloc import subtree_sums
from aggregator.grid_capability import NodeCapabilities, clip_window, headroom, node_capabilities
from aggregator.grid_state import GridState
from broker.models import GridMeter, NodeCapability, from_epoch
from core.physics import feasible_range
from tests.support.memory_loop import STEP, T0, close_loop, fleet_and_state

pytestmark = pytest.mark.timeout(30)

GRID = {
    "nodes": [
        {"id": "feeder", "kind": "feeder", "import_kw": 100.0, "export_kw": 50.0},
        {"id": "site-a", "parent": "feeder", "kind": "site"},
        {"id": "site-b", "parent": "feeder", "kind": "site", "import_kw": 1000.0},
        {"id": "empty", "parent": "feeder", "kind": "site"},
    ]
}


def _case(n: int = 40) -> tuple[GridState, FleetState]:
    fleet, _ = fleet_and_state(n)
    fleet.place(["site-a" if i < n // 2 else "site-b" for i in range(n)])
    state = FleetState()
    close_loop(fleet, state, T0)
    return GridState(parse_grid(GRID), telemetry_interval_s=STEP), state


def test_a_tight_parent_clips_its_children_and_windows_stay_in_range_and_headroom() -> None:
    grid, state = _case()
    grid.meter("feeder", GridMeter(ts=from_epoch(T0), power_kw=30.0))
    view = state.view(T0, 60.0)
    vnode = grid.vehicle_nodes(view)
    g = grid.in_force(T0)
    caps = {c.node: c for c in node_capabilities(grid.grid, vnode, view, T0, WINDOWS_S, g)}
    # "empty" has neither vehicles nor a limit: not published.
    assert set(caps) == {"feeder", "site-a", "site-b"}
    topo = grid.grid
    power = subtree_sums(topo, vnode, view.power)
    cap_lo, cap_hi = headroom(topo, power, g.meter_kw, g.import_kw, g.export_kw)
    others_b = power[0] - power[topo.index["site-b"]]
    # site-b's own limit is loose: the feeder's (100 kW - 30 kW meter - site-a now) binds.
    assert cap_hi[topo.index["site-b"]] == pytest.approx(100.0 - 30.0 - others_b)
    assert cap_lo[topo.index["site-b"]] == pytest.approx(-50.0 - 30.0 - others_b)
    for name, cap in caps.items():
        j = topo.index[name]
        assert cap.vehicles == int(((vnode >= j) & (vnode < topo.end[j])).sum())
        assert [w.duration_s for w in cap.windows] == list(WINDOWS_S)
        for w in cap.windows:
            p_lo, p_hi = feasible_range(
                view.batteries, view.energy, view.departure, T0, w.duration_s
            )
            sub_lo = subtree_sums(topo, vnode, p_lo)[j]
            sub_hi = subtree_sums(topo, vnode, p_hi)[j]
            assert sub_lo - 1e-3 <= w.min_power_kw <= w.max_power_kw <= sub_hi + 1e-3
            if w.feasible:
                assert cap_lo[j] - 1e-3 <= w.min_power_kw
                assert w.max_power_kw <= cap_hi[j] + 1e-3
    # The cars could draw far more than the feeder leaves them: clipped by the parent.
    b = caps["site-b"].windows[0]
    j = topo.index["site-b"]
    assert (
        subtree_sums(
            topo,
            vnode,
            feasible_range(view.batteries, view.energy, view.departure, T0, WINDOWS_S[0])[1],
        )[j]
        > cap_hi[j] + 1.0
    )
    assert b.max_power_kw == pytest.approx(round(float(cap_hi[j]), 3), abs=1e-3)
    NodeCapability.model_validate_json(caps["site-b"].to_json())


def test_headroom_takes_the_tightest_ancestor_in_both_directions() -> None:
    topo = parse_grid(GRID)
    n = len(topo)
    power = np.zeros(n)
    power[topo.index["site-a"]] = 20.0
    power[topo.index["site-b"]] = 10.0
    power[0] = 30.0
    meter = np.full(n, np.nan)
    imp = topo.import_kw.copy()
    exp = topo.export_kw.copy()
    lo, hi = headroom(topo, power, meter, imp, exp)
    a, b, e = topo.index["site-a"], topo.index["site-b"], topo.index["empty"]
    assert hi[a] == pytest.approx(100.0 - 10.0)  # the feeder less site-b's draw
    assert lo[a] == pytest.approx(-50.0 - 10.0)
    assert hi[b] == pytest.approx(100.0 - 20.0)  # its own 1000 kW does not bind
    assert hi[e] == pytest.approx(100.0 - 30.0)
    imp[b] = 5.0  # now its own binds
    assert headroom(topo, power, meter, imp, exp)[1][b] == pytest.approx(5.0)


def test_recomputed_at_most_once_per_turn() -> None:
    due = NodeCapabilities(every_s=2.5)
    assert due.due(T0)
    assert not due.due(T0 + 0.5)
    assert not due.due(T0 + 2.4)
    assert due.due(T0 + 2.5)


finite = st.floats(-500.0, 500.0, allow_nan=False)


@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=20))
def test_a_clipped_window_stays_in_the_vehicles_range_and_the_headroom_when_they_meet(
    rows: list[tuple[float, float, float, float]],
) -> None:
    a, b, c, d = (np.array(col) for col in zip(*rows, strict=True))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    cap_lo, cap_hi = c, d  # not sorted: a meter alone over a limit gives cap_lo > cap_hi
    new_lo, new_hi, ok = clip_window(lo, hi, cap_lo, cap_hi)
    assert (lo - 1e-9 <= new_lo).all() and (new_lo <= new_hi).all() and (new_hi <= hi + 1e-9).all()
    assert (cap_lo[ok] <= new_lo[ok]).all() and (new_hi[ok] <= cap_hi[ok]).all()
    assert (new_lo[~ok] == new_hi[~ok]).all()
    assert np.array_equal(ok, np.maximum(lo, cap_lo) <= np.minimum(hi, cap_hi))
