"""Scenarios under a grid: parsed and checked against the grid, the fleet spread over its
nodes, meters from CSV and solar, the export limit held with the cars and broken without
them, and a power flow on a tiny network."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from v2g.powerflow import Feeder, load_network, run_flows
from v2g.scenario import ScenarioError, load_scenario, parse_scenario
from v2g.simgrid import read_meter_csv, resolve_grid, vehicle_nodes
from v2g.simulate import run

pytestmark = pytest.mark.timeout(120)

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

NODES = [
    {"id": "feeder", "kind": "feeder"},
    {"id": "tx", "parent": "feeder", "kind": "transformer", "import_kw": 60, "export_kw": 40},
    {"id": "carpark", "parent": "tx", "kind": "site"},
    {"id": "solar", "parent": "tx", "kind": "site"},
]


def firming(**changes: Any) -> dict[str, Any]:
    """20 workplace cars beside a 100 kW plant that may export 40 kW, over a clear day's
    middle (the cars arrive by 09:00 and have room for the surplus until 14:00)."""
    data: dict[str, Any] = {
        "name": "firming-test",
        "fleet": {"vehicles": 20, "seed": 3, "mix": {"workplace": 1.0}, "nodes": {"carpark": 1}},
        "start": "2026-06-10T09:00:00Z",
        "duration": "5h",
        "step_s": 600,
        "grid": {"nodes": NODES},
        "pv": [{"node": "solar", "ac_kw": 100}],
    }
    data.update(changes)
    return data


def test_a_grid_scenario_parses_and_names_what_is_wrong(tmp_path: Path) -> None:
    scen = parse_scenario(firming())
    grid = resolve_grid(scen)
    assert grid.ids == ("feeder", "tx", "carpark", "solar")
    with pytest.raises(ScenarioError, match="need a grid"):
        parse_scenario(firming(grid=None))
    with pytest.raises(ScenarioError, match=r"pv\.0\.node: node 'roof' is not in the grid"):
        resolve_grid(parse_scenario(firming(pv=[{"node": "roof", "ac_kw": 10}])))
    with pytest.raises(ScenarioError, match=r"pv\.0\.ac_kw"):
        parse_scenario(firming(pv=[{"node": "solar", "ac_kw": -1}]))
    with pytest.raises(ScenarioError, match="exactly one root"):
        resolve_grid(parse_scenario(firming(grid={"nodes": [*NODES, {"id": "x", "kind": "site"}]})))
    # A grid file and a meters CSV are taken from the scenario's folder.
    (tmp_path / "g.yaml").write_text(json.dumps({"nodes": NODES}))
    (tmp_path / "m.csv").write_text("time_s,node,power_kw\n0,carpark,5\n")
    (tmp_path / "s.yaml").write_text(json.dumps(firming(grid="g.yaml", meters="m.csv")))
    loaded = load_scenario(tmp_path / "s.yaml")
    assert loaded.grid == str(tmp_path / "g.yaml") and loaded.meters == str(tmp_path / "m.csv")
    assert resolve_grid(loaded).ids == grid.ids


def test_the_shipped_firming_scenario_resolves_its_grid() -> None:
    scen = load_scenario(SCENARIOS / "solar-site-firming.yaml")
    grid = resolve_grid(scen)
    assert scen.pv and scen.pv[0].node in grid.index
    assert np.isfinite(grid.export_kw[grid.index["tx-site"]])


def test_the_fleet_is_spread_over_its_nodes_exactly() -> None:
    scen = parse_scenario(firming(fleet={"vehicles": 10, "nodes": {"carpark": 0.7, "solar": 0.3}}))
    grid = resolve_grid(scen)
    vn = vehicle_nodes(scen, grid, 10)
    assert np.bincount(vn, minlength=4).tolist() == [0, 0, 7, 3]
    nowhere = parse_scenario(firming(fleet={"vehicles": 5}))
    assert vehicle_nodes(nowhere, grid, 5).tolist() == [0] * 5


def test_meters_from_csv_hold_until_the_next_row(tmp_path: Path) -> None:
    grid = resolve_grid(parse_scenario(firming()))
    path = tmp_path / "m.csv"
    path.write_text("time_s,node,power_kw\n600,solar,-50\n0,carpark,10\n1800,solar,-80\n")
    times = 1000.0 + np.array([0.0, 600.0, 1200.0, 1800.0])
    got = read_meter_csv(path, grid, 1000.0, times)
    j, c = grid.index["solar"], grid.index["carpark"]
    assert np.isnan(got[0, j]) and got[1:, j].tolist() == [-50.0, -50.0, -80.0]
    assert got[:, c].tolist() == [10.0] * 4
    assert np.isnan(got[:, grid.index["tx"]]).all()
    path.write_text("time_s,node,power_kw\n0,nowhere,1\n")
    with pytest.raises(ScenarioError, match="line 2: node 'nowhere' is not in the grid"):
        read_meter_csv(path, grid, 0.0, times)


def test_the_export_limit_holds_with_the_cars_and_breaks_without_them(tmp_path: Path) -> None:
    scen = parse_scenario(firming())
    done = run(scen, tmp_path, plot=False)
    g = done.summary["grid"]
    tx = next(n for n in g["nodes"] if n["node"] == "tx")
    # With the platform: no step beyond a limit (the tolerance of issue 11).
    assert g["platform"]["violations"] == 0
    assert tx["min_net_kw"]["platform"] >= -40.0 - 1.0
    assert tx["max_net_kw"]["platform"] <= 60.0 + 1.0
    # On plain charging the plant exports above its limit (and the morning rush may
    # break the import limit too).
    assert g["plain_charging"]["export_violations"] > 0
    assert tx["min_net_kw"]["plain_charging"] < -41.0
    (cut,) = g["curtailment"]
    assert cut["node"] == "tx"
    assert cut["without_cars_kwh"] > cut["plain_charging_kwh"] >= cut["platform_kwh"]
    assert cut["avoided_kwh"] == pytest.approx(cut["without_cars_kwh"] - cut["platform_kwh"])
    assert cut["avoided_kwh"] > 0.0
    assert g["conflicts"]["vehicles"] == 0  # workplace cars have the day to charge
    assert (tmp_path / "nodes.csv").exists() and "nodes.csv" in done.summary["files"]
    assert done.summary["drivers"]["short"] == 0


def tiny_network(path: Path) -> str:
    """An external grid, a 250 kVA transformer and one 200 m cable: two LV buses."""
    import pandapower as pp

    net = pp.create_empty_network()
    mv = pp.create_bus(net, 20.0, name="mv")
    lv = pp.create_bus(net, 0.4, name="lv")
    far = pp.create_bus(net, 0.4, name="far")
    pp.create_ext_grid(net, mv)
    pp.create_transformer(net, mv, lv, std_type="0.25 MVA 20/0.4 kV")
    pp.create_line(net, lv, far, 0.2, std_type="NAYY 4x150 SE")
    pp.to_json(net, str(path))
    return str(path)


def test_a_power_flow_on_a_tiny_network_sees_export_raise_the_voltage(tmp_path: Path) -> None:
    grid = resolve_grid(parse_scenario(firming()))
    net = load_network(tiny_network(tmp_path / "tiny.json"))
    c, s = grid.index["carpark"], grid.index["solar"]
    feeder = Feeder(net, grid, [c, s], {"carpark": "lv", "solar": "far"})
    assert feeder.buses == {"carpark": "lv", "solar": "far"}
    kw = np.zeros((4, len(grid)))
    kw[1, s] = -150.0  # the plant exports
    kw[2, c] = 150.0  # the cars draw
    flows = run_flows(feeder, kw, every=2)  # steps 0 and 2 only
    assert np.isnan(flows.v_min_pu[[1, 3]]).all()
    assert flows.v_max_pu[0] == pytest.approx(1.0, abs=0.02)
    assert flows.v_min_pu[2] < flows.v_min_pu[0]  # a load pulls the voltage down
    assert flows.trafo_max_pct[2] > 50.0
    assert (flows.ms[[0, 2]] > 0.0).all()
    exporting = run_flows(feeder, kw[1:2], every=1)
    assert exporting.v_max_pu[0] > 1.0  # an export at the far end raises it
    assert flows.summary()["flows"] == 2
    with pytest.raises(ScenarioError, match="no bus named 'nowhere'"):
        Feeder(load_network(str(tmp_path / "tiny.json")), grid, [c], {"carpark": "nowhere"})
    with pytest.raises(ScenarioError, match="is not one of"):
        load_network("ieee_9999")


def test_beyond_the_cars_room_the_excess_is_reported_not_hidden(tmp_path: Path) -> None:
    # Before the cars arrive and once they are full, a 150 kW plant breaks the 40 kW limit:
    # the node is reported over its limit by exactly the excess, and less than without
    # the platform.
    scen = parse_scenario(
        firming(start="2026-06-10T07:00:00Z", duration="9h", pv=[{"node": "solar", "ac_kw": 150}])
    )
    g = run(scen, tmp_path, plot=False).summary["grid"]
    tx = next(n for n in g["nodes"] if n["node"] == "tx")
    assert g["platform"]["export_violations"] > 0
    assert tx["over_limit_kwh"] == pytest.approx(tx["violation_kwh"]["platform"], abs=1e-3)
    assert tx["violation_kwh"]["platform"] < 0.5 * tx["violation_kwh"]["plain_charging"]


def test_powerflow_every_needs_a_grid(tmp_path: Path) -> None:
    scen = parse_scenario(
        {
            "fleet": {"vehicles": 5},
            "start": "2026-06-10T09:00:00Z",
            "duration": "1h",
            "step_s": 900,
            "requests": [{"id": "r", "power_kw": 10, "start": "+0h", "duration": "1h"}],
        }
    )
    with pytest.raises(ScenarioError, match="needs a scenario with a grid"):
        run(scen, tmp_path, plot=False, powerflow_every=2)


def test_a_dynamic_limit_holds_while_it_lasts(tmp_path: Path) -> None:
    # 10 kW of import at the transformer for the first hour, then the file's 60 kW.
    lim = [{"node": "tx", "start": "+0h", "duration": "1h", "import_kw": 10}]
    scen = parse_scenario(firming(pv=[], start="2026-06-10T08:30:00Z", duration="2h", limits=lim))
    run(scen, tmp_path, plot=False)
    with (tmp_path / "nodes.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    tx = [r for r in rows if r["node"] == "tx"]
    first = [float(r["net_kw"]) for r in tx[:6]]
    assert [float(r["import_limit_kw"]) for r in tx[:6]] == [10.0] * 6
    assert max(first) <= 10.0 + 1.0
    assert float(tx[6]["import_limit_kw"]) == 60.0
    assert max(float(r["net_kw"]) for r in tx[6:]) > 10.0 + 1.0  # the cars catch up after


def test_simulate_command_runs_power_flows_every_n_steps(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from v2g.cli import app

    data = firming(
        duration="1h",
        powerflow={"network": "tiny.json", "buses": {"carpark": "lv", "solar": "far"}},
    )
    tiny_network(tmp_path / "tiny.json")
    (tmp_path / "s.yaml").write_text(json.dumps(data))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            str(tmp_path / "s.yaml"),
            "--out",
            str(out),
            "--no-progress",
            "--no-plot",
            "--powerflow-every",
            "2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    pf = summary["grid"]["powerflow"]
    assert pf["buses"] == {"carpark": "lv", "solar": "far"}
    assert pf["platform"]["flows"] == 3 and pf["plain"]["flows"] == 3  # steps 0, 2, 4 of 6
    assert pf["platform"]["not_converged"] == 0
    assert 0.9 < pf["platform"]["v_min_pu"] <= pf["platform"]["v_max_pu"] < 1.1
    assert pf["platform"]["ms_per_flow_mean"] > 0.0


def test_a_firming_band_and_ramp_are_held_where_the_cars_can(tmp_path: Path) -> None:
    # Commit the site to at most 25 kW of export (tighter than the DSO's 40) and to ramps
    # under 2 kW/min while the cars are there; plain charging does neither.
    band = [{"node": "tx", "start": "+0h", "duration": "5h", "min_kw": -25, "ramp_kw_per_min": 2}]
    scen = parse_scenario(firming(firming=band))
    g = run(scen, tmp_path, plot=False).summary["grid"]
    (f,) = g["firming"]
    assert f["node"] == "tx" and f["min_kw"] == -25.0
    plat, plain = f["platform"], f["plain_charging"]
    assert plain["outside_band_kwh"] > 10.0 and plain["ramp_violations"] > 0
    assert plat["outside_band_kwh"] < 0.2 * plain["outside_band_kwh"]
    assert plat["ramp_violations"] < plain["ramp_violations"]
    assert g["platform"]["violations"] == 0  # the band never loosens a limit
    with pytest.raises(ScenarioError, match="give min_kw, max_kw or ramp_kw_per_min"):
        parse_scenario(firming(firming=[{"node": "tx", "start": "+0h", "duration": "1h"}]))
    with pytest.raises(ScenarioError, match=r"firming\.0\.node: node 'roof'"):
        resolve_grid(parse_scenario(firming(firming=[{**band[0], "node": "roof"}])))
