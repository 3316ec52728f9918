"""The nested grid limits (aggregator/grid_alloc.py) against a linear programme.

For random trees, limits, meters and fleets: where some allocation holds every node's
limits, the water-filling holds them all; where none does, every node's reported excess
is what its net power really is beyond its limit, and no allocation (holding the limits
below it as far as they can be held) does better at that node. The drivers' floors give
only where a limit needs it, and the fleet's total is as close to the wanted one as the
limits and floors allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from scipy.sparse import csr_matrix

from aggregator.grid import GridTopology, parse_grid
from aggregator.grid_alloc import allocate_nested, firming_band, over_limit, subtree_sums
from aggregator.grid_status import node_statuses

Floats = np.ndarray


@dataclass
class Case:
    grid: GridTopology
    node: np.ndarray
    p_min: Floats
    p_max: Floats
    desired: Floats
    meter: Floats
    imp: Floats
    exp: Floats

    @property
    def hard_min(self) -> Floats:
        return np.minimum(self.p_min, 0.0)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 10))
    parents = [draw(st.integers(0, k - 1)) for k in range(1, n)]
    kw = st.floats(0.0, 200.0, allow_nan=False)
    nodes = []
    for k in range(n):
        spec: dict[str, object] = {"id": f"n{k}", "kind": "site"}
        if k:
            spec["parent"] = f"n{parents[k - 1]}"
        if draw(st.booleans()):
            spec["import_kw"] = draw(kw)
        if draw(st.booleans()):
            spec["export_kw"] = draw(kw)
        nodes.append(spec)
    grid = parse_grid({"nodes": nodes})
    meter = np.array([draw(st.one_of(st.just(np.nan), st.floats(-150.0, 150.0))) for _ in range(n)])
    v = draw(st.integers(0, 25))
    node = np.array([draw(st.integers(-1, n - 1)) for _ in range(v)], dtype=np.intp)
    p_max = np.array([draw(st.floats(0.0, 22.0)) for _ in range(v)])
    p_min = np.array([draw(st.floats(-1.0, 1.0)) * p for p in p_max.tolist()])  # floors too
    desired = np.array([draw(st.floats(-30.0, 30.0)) for _ in range(v)])
    return Case(grid, node, p_min, p_max, desired, meter, grid.import_kw, grid.export_kw)


def _membership(c: Case) -> np.ndarray:
    """node x vehicle: 1 where the vehicle is under the node."""
    vn = np.where(c.node < 0, 0, c.node)
    rows = np.arange(len(c.grid))[:, None]
    return ((rows <= vn[None, :]) & (vn[None, :] < c.grid.end[:, None])).astype(float)


def _lp(
    c: Case, low: Floats, high: Floats, lo: Floats, hi: Floats, cost: Floats
) -> tuple[bool, float]:
    """min cost·p with low <= M p <= high (finite rows) and lo <= p <= hi."""
    m = _membership(c)
    rows, rhs = [], []
    for j in range(len(c.grid)):
        if np.isfinite(high[j]):
            rows.append(m[j])
            rhs.append(high[j])
        if np.isfinite(low[j]):
            rows.append(-m[j])
            rhs.append(-low[j])
    if not len(c.node):
        ok = all(low[j] <= 1e-9 and high[j] >= -1e-9 for j in range(len(c.grid)))
        return ok, 0.0
    res = linprog(
        cost,
        A_ub=csr_matrix(np.array(rows)) if rows else None,
        b_ub=np.array(rhs) if rows else None,
        bounds=list(zip(lo.tolist(), hi.tolist(), strict=True)),
        method="highs",
    )
    return res.status == 0, float(res.fun) if res.status == 0 else np.nan


def _bounds(c: Case) -> tuple[Floats, Floats]:
    m0 = np.nan_to_num(c.meter, nan=0.0)
    return -c.exp - m0, c.imp - m0


def _tol(c: Case) -> float:
    return 1e-6 * (1.0 + float(np.abs(c.p_max).sum() + np.abs(c.p_min).sum()))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_every_limit_holds_where_an_allocation_can_hold_them_all(c: Case) -> None:
    r = allocate_nested(c.grid, c.node, c.p_min, c.p_max, c.desired, c.meter, c.imp, c.exp)
    assert np.all(r.power_kw >= c.hard_min - 1e-9)
    assert np.all(r.power_kw <= c.p_max + 1e-9)
    low, high = _bounds(c)
    zero = np.zeros(len(c.node))
    feasible, _ = _lp(c, low, high, c.hard_min, c.p_max, zero)
    if feasible:
        assert r.over_limit_kw.max(initial=0.0) <= _tol(c), r.over_limit_kw
    floors_ok, _ = _lp(c, low, high, c.p_min, c.p_max, zero)
    event(f"feasible={feasible} floors_ok={floors_ok} conflicts={bool(r.conflicts.any())}")
    if floors_ok:
        assert not r.conflicts.any()
        # The fleet's total: as close to the wanted one as the limits and floors allow.
        _, least = _lp(c, low, high, c.p_min, c.p_max, zero + 1.0)
        _, most = _lp(c, low, high, c.p_min, c.p_max, zero - 1.0)
        want = float(np.clip(c.desired, c.p_min, c.p_max).sum())
        assert r.power_kw.sum() == pytest.approx(min(max(want, least), -most), abs=_tol(c))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_reported_excess_is_real_and_no_allocation_does_better_at_that_node(c: Case) -> None:
    r = allocate_nested(c.grid, c.node, c.p_min, c.p_max, c.desired, c.meter, c.imp, c.exp)
    vn = np.where(c.node < 0, 0, c.node)
    node_power = subtree_sums(c.grid, vn, r.power_kw)
    np.testing.assert_allclose(r.node_power_kw, node_power, atol=_tol(c))
    real = over_limit(c.meter, node_power, c.imp, c.exp)
    np.testing.assert_allclose(r.over_limit_kw, real, atol=_tol(c))
    low, high = _bounds(c)
    over = np.flatnonzero(r.over_limit_kw > _tol(c))
    event("some node over its limit" if over.size else "every limit held")
    for j in over.tolist():
        # The least excess at j over every allocation that keeps each node below j
        # within its limits widened by its own reported excess.
        lo_j, hi_j = low.copy(), high.copy()
        below = np.arange(j + 1, c.grid.end[j])
        lo_j[below] -= r.over_limit_kw[below]
        hi_j[below] += r.over_limit_kw[below]
        others = np.setdiff1d(np.arange(len(c.grid)), np.arange(j, c.grid.end[j]))
        lo_j[others], hi_j[others] = -np.inf, np.inf
        lo_j[j], hi_j[j] = -np.inf, np.inf
        m = _membership(c)[j]
        side = 1.0 if np.nan_to_num(c.meter[j]) + node_power[j] > c.imp[j] else -1.0
        feasible, best = _lp(c, lo_j, hi_j, c.hard_min, c.p_max, side * m)
        assert feasible
        net_best = best * side + np.nan_to_num(c.meter[j])
        least_excess = max(0.0, net_best - c.imp[j]) if side > 0 else max(0.0, -c.exp[j] - net_best)
        assert r.over_limit_kw[j] == pytest.approx(least_excess, abs=_tol(c))


def _two_sites() -> GridTopology:
    return parse_grid(
        {
            "nodes": [
                {"id": "feeder", "kind": "feeder", "import_kw": 100.0},
                {"id": "carpark", "parent": "feeder", "kind": "site", "import_kw": 44.0},
                {"id": "solar", "parent": "feeder", "kind": "site", "export_kw": 50.0},
            ]
        }
    )


def test_a_car_park_whose_cars_all_want_to_charge_stays_under_its_transformer() -> None:
    g = _two_sites()
    node = np.full(10, g.index["carpark"])
    p_min, p_max = np.zeros(10), np.full(10, 11.0)
    r = allocate_nested(
        g, node, p_min, p_max, p_max.copy(), np.full(3, np.nan), g.import_kw, g.export_kw
    )
    assert r.node_power_kw[g.index["carpark"]] == pytest.approx(44.0)
    np.testing.assert_allclose(r.power_kw, 4.4)  # shared evenly
    assert r.over_limit_kw.max() == 0.0


def test_a_limit_wins_over_a_drivers_floor_and_the_conflict_is_reported() -> None:
    g = _two_sites()
    node = np.full(4, g.index["carpark"])
    p_min = np.array([11.0, 11.0, 11.0, 0.0])  # three must charge flat out
    p_max = np.full(4, 11.0)
    r = allocate_nested(
        g, node, p_min, p_max, p_max.copy(), np.full(3, np.nan), g.import_kw, g.export_kw
    )
    assert r.node_power_kw[g.index["carpark"]] == pytest.approx(44.0)  # fits: 33 + 11
    meter = np.array([np.nan, 30.0, np.nan])  # the car park's own load takes 30 kW of 44
    r = allocate_nested(g, node, p_min, p_max, p_max.copy(), meter, g.import_kw, g.export_kw)
    assert r.node_power_kw[g.index["carpark"]] == pytest.approx(14.0)
    assert r.conflicts[:3].all() and not r.conflicts[3]
    assert r.power_kw[3] == 0.0  # the car without a floor gives first
    assert r.over_limit_kw.max() == 0.0


def test_surplus_beyond_what_the_cars_can_take_is_reported_exactly() -> None:
    g = _two_sites()
    node = np.full(3, g.index["solar"])
    p_min, p_max = np.full(3, -7.0), np.full(3, 7.0)
    meter = np.array([np.nan, np.nan, -80.0])  # 80 kW of sun behind a 50 kW export limit
    r = allocate_nested(g, node, p_min, p_max, np.zeros(3), meter, g.import_kw, g.export_kw)
    np.testing.assert_allclose(r.power_kw, 7.0)  # every car soaks up what it can
    assert r.over_limit_kw[g.index["solar"]] == pytest.approx(80.0 - 50.0 - 21.0)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_where_no_limit_binds_every_car_gets_what_it_was_to_get(c: Case) -> None:
    none = np.full(len(c.grid), np.inf)
    r = allocate_nested(c.grid, c.node, c.p_min, c.p_max, c.desired, c.meter, none, none)
    np.testing.assert_allclose(r.power_kw, np.clip(c.desired, c.p_min, c.p_max), atol=1e-9)
    assert not r.conflicts.any() and not r.over_limit_kw.any()


def test_a_car_at_a_node_not_in_the_grid_counts_under_the_root() -> None:
    g = _two_sites()
    node = np.array([-1, -1, g.index["carpark"]])
    p = np.full(3, 50.0)
    r = allocate_nested(
        g, node, np.zeros(3), p, p.copy(), np.full(3, np.nan), g.import_kw, g.export_kw
    )
    assert r.vehicle_node.tolist() == [0, 0, g.index["carpark"]]
    assert r.node_power_kw[0] == pytest.approx(100.0)  # the feeder's 100 kW holds for all
    assert r.power_kw[2] == pytest.approx(100.0 / 3)


def test_each_node_reports_its_power_meter_limits_headroom_and_conflicts() -> None:
    g = _two_sites()
    node = np.full(4, g.index["carpark"])
    p_min = np.array([11.0, 11.0, 11.0, 0.0])
    p_max = np.full(4, 11.0)
    meter = np.array([np.nan, 30.0, np.nan])
    r = allocate_nested(g, node, p_min, p_max, p_max.copy(), meter, g.import_kw, g.export_kw)
    rows = {
        s.node: s for s in node_statuses(g, r, ["a", "b", "c"], meter, g.import_kw, g.export_kw)
    }
    park = rows["carpark"]
    assert park.power_kw == pytest.approx(14.0) and park.meter_kw == 30.0
    assert park.import_limit_kw == 44.0 and park.export_limit_kw is None
    assert park.headroom_import_kw == pytest.approx(0.0) and park.headroom_export_kw is None
    assert park.vehicles == 4 and park.conflicts == ["a", "b", "c"]
    assert rows["feeder"].vehicles == 4 and rows["feeder"].conflicts == []
    assert rows["feeder"].headroom_import_kw == pytest.approx(100.0 - 14.0)
    assert rows["solar"].vehicles == 0 and rows["solar"].meter_kw is None
    assert all(s.over_limit_kw == 0.0 for s in rows.values())


@st.composite
def banded(draw: st.DrawFn) -> tuple[Case, Floats, Floats]:
    """A case and a band on some nodes' net power (a firming service's), -inf/inf open."""
    c = draw(cases())
    n = len(c.grid)
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    for j in range(n):
        if draw(st.booleans()):
            a = draw(st.floats(-200.0, 200.0))
            b = a + draw(st.floats(0.0, 100.0))
            if draw(st.booleans()):
                lo[j] = a
            if draw(st.booleans()):
                hi[j] = b
    return c, lo, hi


@settings(max_examples=300, deadline=None)
@given(banded())
def test_a_band_holds_where_it_can_and_never_breaks_a_limit_or_a_floor(
    case: tuple[Case, Floats, Floats],
) -> None:
    c, band_lo, band_hi = case
    r = allocate_nested(
        c.grid,
        c.node,
        c.p_min,
        c.p_max,
        c.desired,
        c.meter,
        c.imp,
        c.exp,
        band_low_kw=band_lo,
        band_high_kw=band_hi,
    )
    zero = np.zeros(len(c.node))
    low, high = _bounds(c)
    if _lp(c, low, high, c.hard_min, c.p_max, zero)[0]:
        assert r.over_limit_kw.max(initial=0.0) <= _tol(c)
    if _lp(c, low, high, c.p_min, c.p_max, zero)[0]:
        assert not r.conflicts.any()
    m0 = np.nan_to_num(c.meter, nan=0.0)
    both_lo, both_hi = np.maximum(low, band_lo - m0), np.minimum(high, band_hi - m0)
    every = _lp(c, both_lo, both_hi, c.p_min, c.p_max, zero)[0] and bool(np.all(both_lo <= both_hi))
    event(f"band holdable={every} missed={bool(r.band_miss_kw.max(initial=0.0) > _tol(c))}")
    if every:
        assert r.band_miss_kw.max(initial=0.0) <= _tol(c), r.band_miss_kw
    net = m0 + r.node_power_kw
    real = np.maximum(0.0, np.maximum(net - band_hi, band_lo - net))
    np.testing.assert_allclose(r.band_miss_kw, real, atol=_tol(c))


def test_a_solar_site_firmed_to_its_committed_export_soaks_up_the_rest_in_its_cars() -> None:
    g = _two_sites()
    node = np.full(6, g.index["solar"])
    p_min, p_max = np.full(6, -7.0), np.full(6, 7.0)
    meter = np.array([np.nan, np.nan, -45.0])  # 45 kW of sun, within the 50 kW DSO limit
    band_lo = np.full(3, -np.inf)
    band_lo[g.index["solar"]] = -30.0  # the plant's committed export: at most 30 kW
    r = allocate_nested(
        g,
        node,
        p_min,
        p_max,
        np.zeros(6),
        meter,
        g.import_kw,
        g.export_kw,
        band_low_kw=band_lo,
    )
    assert r.node_power_kw[g.index["solar"]] == pytest.approx(15.0)  # the cars take 15
    np.testing.assert_allclose(r.power_kw, 2.5)
    assert r.band_miss_kw.max() == 0.0
    # Without the band, the cars idle as asked: the DSO limit alone holds by itself.
    r = allocate_nested(g, node, p_min, p_max, np.zeros(6), meter, g.import_kw, g.export_kw)
    np.testing.assert_allclose(r.power_kw, 0.0)


def test_a_firming_band_is_the_band_within_the_ramp_of_the_last_net_power() -> None:
    assert firming_band(-300.0, 50.0, None, -500.0, 5.0) == (-300.0, 50.0)
    assert firming_band(None, None, 60.0, -200.0, 5.0) == (-205.0, -195.0)  # 1 kW/s
    assert firming_band(-300.0, None, 60.0, -298.0, 5.0) == (-300.0, -293.0)
    # Far outside the band: toward it as fast as the ramp allows, one point.
    assert firming_band(-300.0, 50.0, 60.0, -500.0, 5.0) == (-495.0, -495.0)
    assert firming_band(-300.0, 50.0, 60.0, 52.0, 5.0) == (47.0, 50.0)
    assert firming_band(-300.0, 50.0, 60.0, 60.0, 5.0) == (55.0, 55.0)
    assert firming_band(None, 50.0, 6.0, float("nan"), 5.0) == (-np.inf, 50.0)
