"""Placing simulated cars under grid nodes (v2g agents --node/--nodes/--mix, issue 11)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet, parse_shares, spread_nodes
from agents.telemetry import telemetry_payloads
from broker.models import Telemetry


def test_shares_parse_and_refuse_with_a_reason() -> None:
    assert parse_shares("a=0.6, b=0.4", "node") == {"a": 0.6, "b": 0.4}
    for bad, why in (
        ("a=0.6", "sum to 0.6"),
        ("a", "NODE=SHARE"),
        ("a=x,b=1", "not a number"),
        ("a=0.5,a=0.5", "once"),
        ("", "no node"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_shares(bad, "node")


@given(st.integers(0, 500), st.lists(st.integers(1, 100), min_size=1, max_size=6))
def test_spread_gives_every_vehicle_one_node_in_proportion(count: int, weights: list[int]) -> None:
    total = sum(weights)
    shares = {f"n{k}": w / total for k, w in enumerate(weights)}
    placed = spread_nodes(count, shares)
    assert len(placed) == count
    for name, share in shares.items():
        assert abs(placed.count(name) - share * count) < 1.0  # largest remainders


def test_a_placed_fleet_reports_its_nodes_and_a_move() -> None:
    fleet = SimFleet(generate_fleet(4, 1, mix={"workplace": 1.0}), 1_795_651_200.0)
    fleet.place(spread_nodes(4, {"a": 0.5, "b": 0.5}))
    fleet.move_to(0, "b")
    got = [Telemetry.model_validate_json(p).node for p in telemetry_payloads(fleet, fleet.now)]
    assert got == ["b", "a", "b", "b"]
    with pytest.raises(ValueError, match="nodes for 3 vehicles"):
        fleet.place(["a"] * 3)
