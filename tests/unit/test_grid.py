"""The grid topology file (aggregator/grid.py) and what holds at each node at time t
(aggregator/grid_limits.py): validation with errors that say what to fix, the preorder
layout, the tighter of static and dynamic limits, meters with staleness."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.grid import GridError, load_grid, parse_grid, render_tree
from aggregator.grid_limits import (
    METER_CHILDREN,
    METER_NONE,
    METER_OWN,
    compile_limits,
    limits_in_force,
    meters_in_force,
)
from broker.models import GridLimits

EXAMPLE = Path(__file__).parents[2] / "scenarios" / "grids" / "example.yaml"


def _doc(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": list(nodes)}


SUB = {"id": "sub", "kind": "substation", "import_kw": 1000.0}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"nodes": []}, "at least 1"),
        ([], "expected a mapping"),
        (_doc(SUB, {"id": "sub", "parent": "sub", "kind": "site"}), "appears twice"),
        (_doc(SUB, {"id": "s2", "kind": "site"}), "exactly one root"),
        (_doc({"id": "a", "parent": "b", "kind": "site"}), "exactly one root"),
        (_doc(SUB, {"id": "x", "parent": "nowhere", "kind": "site"}), "not a node of the file"),
        (
            _doc(
                SUB,
                {"id": "a", "parent": "b", "kind": "feeder"},
                {"id": "b", "parent": "a", "kind": "feeder"},
            ),
            "cycle",
        ),
        (_doc(SUB, {"id": "x", "parent": "sub", "kind": "house"}), "kind"),
        (_doc(SUB, {"id": "bad/id", "parent": "sub", "kind": "site"}), "not valid"),
        (_doc(SUB, {"id": "x", "parent": "sub", "kind": "site", "import_kw": -1.0}), "import_kw"),
        (_doc(SUB, {"id": "x", "parent": "sub", "kind": "site", "export_kw": "5"}), "export_kw"),
        (_doc(SUB, {"id": "x", "parent": "sub", "kind": "site", "imprt_kw": 5.0}), "imprt_kw"),
    ],
)
def test_a_bad_grid_file_is_refused_saying_what_to_fix(doc: Any, says: str) -> None:
    with pytest.raises(GridError, match=says):
        parse_grid(doc)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=0, max_size=40), st.randoms())
def test_the_tree_is_kept_in_preorder_with_each_subtree_one_range(
    draws: list[int], rnd: Any
) -> None:
    parents = [d % (k + 1) for k, d in enumerate(draws)]  # node k+1 under an earlier node
    nodes = [{"id": "n0", "kind": "substation"}] + [
        {"id": f"n{k + 1}", "parent": f"n{p}", "kind": "site"} for k, p in enumerate(parents)
    ]
    rnd.shuffle(nodes)  # the file's order does not matter
    g = parse_grid({"nodes": nodes})
    assert g.ids[0] == "n0" and g.parent[0] == -1
    true_parent = {f"n{k + 1}": f"n{p}" for k, p in enumerate(parents)}
    for k, nid in enumerate(g.ids[1:], start=1):
        assert g.ids[g.parent[k]] == true_parent[nid]
        assert g.parent[k] < k  # parents come first
    for j in range(len(g)):
        under = {i for i in range(len(g)) if j in g.ancestors(i)}
        assert under == set(range(j, int(g.end[j])))
        assert g.depth[j] == len(g.ancestors(j)) - 1
    assert sorted(np.concatenate(g.levels).tolist()) == list(range(len(g)))


def test_the_example_grid_loads_and_shows_its_limits() -> None:
    g = load_grid(EXAMPLE)
    text = render_tree(g)
    assert text.splitlines()[0].startswith(g.root)
    assert "import" in text and "kW" in text
    assert np.isinf(g.import_kw).any() or np.isfinite(g.import_kw).all()
    assert g.node_index(["nowhere", None, g.ids[-1]]).tolist() == [-1, -1, len(g) - 1]


def test_an_unreadable_or_non_yaml_file_is_a_grid_error(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="cannot read"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(bad)


T0 = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()


def _grid() -> Any:
    return parse_grid(
        _doc(
            SUB,
            {"id": "f", "parent": "sub", "kind": "feeder", "import_kw": 400.0},
            {"id": "a", "parent": "f", "kind": "site", "export_kw": 50.0},
            {"id": "b", "parent": "f", "kind": "site"},
        )
    )


def _limits(**kw: Any) -> GridLimits:
    return GridLimits.model_validate_json(json.dumps({"ts": "2026-06-01T11:00:00Z", **kw}))


def test_a_dynamic_limit_holds_in_its_interval_the_safe_value_outside_and_the_tighter_wins() -> (
    None
):
    g = _grid()
    a = g.index["a"]
    msg = _limits(
        intervals=[
            {
                "start": "2026-06-01T12:00:00Z",
                "duration_s": 900,
                "import_kw": 30.0,
                "export_kw": 80.0,
            },
            {"start": "2026-06-01T12:15:00Z", "duration_s": 900, "export_kw": 20.0},
        ],
        safe_import_kw=10.0,
    )
    dyn = compile_limits(len(g), {a: msg})
    imp, exp = limits_in_force(g, dyn, T0 + 60)
    assert imp[a] == 30.0
    assert exp[a] == 50.0  # the dynamic 80 never loosens the static 50
    imp, exp = limits_in_force(g, dyn, T0 + 900)  # half-open: the second interval
    assert np.isinf(imp[a]) and exp[a] == 20.0  # null in an interval: no dynamic limit
    imp, exp = limits_in_force(g, dyn, T0 + 1800)  # outside every interval: safe values
    assert imp[a] == 10.0 and exp[a] == 50.0
    imp, exp = limits_in_force(g, dyn, T0 - 1)
    assert imp[a] == 10.0
    # Nodes without a message keep their static limits.
    np.testing.assert_array_equal(imp[[0, 1, 3]], g.import_kw[[0, 1, 3]])


def test_meters_own_when_fresh_else_the_childrens_sum_else_none() -> None:
    g = _grid()
    sub, f, a, b = (g.index[k] for k in ("sub", "f", "a", "b"))
    value = np.full(len(g), np.nan)
    at = np.full(len(g), np.nan)
    value[[a, b]] = [-60.0, 25.0]
    at[[a, b]] = T0
    meter, source, stale = meters_in_force(g, value, at, T0 + 10, stale_after_s=30.0)
    assert meter[f] == pytest.approx(-35.0) and source[f] == METER_CHILDREN
    assert meter[sub] == pytest.approx(-35.0) and source[sub] == METER_CHILDREN
    assert source[a] == METER_OWN and not stale.any()
    value[f], at[f] = 100.0, T0 + 5  # the feeder's own meter replaces the sum
    meter, source, _ = meters_in_force(g, value, at, T0 + 10, stale_after_s=30.0)
    assert meter[f] == 100.0 and source[f] == METER_OWN and meter[sub] == 100.0
    # 31 s later the sites' readings are stale, the feeder's is not yet.
    meter, source, stale = meters_in_force(g, value, at, T0 + 31, stale_after_s=30.0)
    assert stale[a] and stale[b] and not stale[f]
    assert np.isnan(meter[a]) and source[a] == METER_NONE
    assert meter[f] == 100.0
    meter, source, stale = meters_in_force(g, value, at, T0 + 100, stale_after_s=30.0)
    assert np.isnan(meter).all() and (source == METER_NONE).all() and stale[f]
