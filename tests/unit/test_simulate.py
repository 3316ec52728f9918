"""Headless simulation: scenarios are checked field by field, runs are faithful to the
dispatcher and the vehicles, deterministic, and write their results."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator.allocation import jain_index
from broker.models import DispatchRequest, from_epoch
from v2g.cli import app
from v2g.scenario import ScenarioError, load_scenario, parse_scenario, regd_signal
from v2g.simcore import Simulation, fleet_view, make_dispatcher
from v2g.simulate import DELIVERY_TOL, build, run

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
runner = CliRunner()


def small(**changes: Any) -> dict[str, Any]:
    """200 home cars over an evening: a discharge through the peak, then a recharge."""
    data: dict[str, Any] = {
        "name": "small",
        "fleet": {"vehicles": 200, "seed": 5, "mix": {"home": 1.0}},
        "start": "2026-01-15T18:00:00Z",
        "duration": "5h",
        "step_s": 900,
        "requests": [
            {
                "id": "peak",
                "service": "peak_shaving",
                "power_kw": -300,
                "start": "+1h",
                "duration": "1h",
            },
            {"id": "fill", "power_kw": 900, "start": "+3h", "duration": "1h"},
        ],
    }
    data.update(changes)
    return data


# -- scenario validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"fleet": {"seed": 1}}, "fleet.vehicles", "Field required"),
        ({"fleet": {"vehicles": 0}}, "fleet.vehicles", "greater than or equal to 1"),
        ({"fleet": {"vehicles": 10, "mix": {"office": 1.0}}}, "fleet.mix.office", "home"),
        ({"start": "2026-01-15T18:00:00"}, "start", "timezone"),
        ({"duration": "soon"}, "duration", "not a duration"),
        ({"step_s": -5}, "step_s", "greater than 0"),
        ({"fleeet": {}}, "fleeet", "Extra inputs are not permitted"),
        (
            {"requests": [{"id": "a", "power_kw": "lots", "start": "+1h", "duration": 60}]},
            "requests.0.power_kw",
            "valid number",
        ),
        (
            {"requests": [{"id": "a", "power_kw": 1, "start": "tomorrow", "duration": 60}]},
            "requests.0.start",
            "ISO 8601",
        ),
        (
            {"requests": [{"id": "a/b", "power_kw": 1, "start": "+1h", "duration": 60}]},
            "requests.0.id",
            "not valid",
        ),
        (
            {
                "requests": [
                    {
                        "id": "f",
                        "service": "frequency_regulation",
                        "power_kw": 1,
                        "start": "+1h",
                        "duration": 60,
                    }
                ]
            },
            "requests.0.service",
            "regulation:",
        ),
        (
            {
                "regulation": {
                    "capacity_kw": 10,
                    "start": "+1h",
                    "duration": "1h",
                    "signal": "wobbly",
                }
            },
            "regulation.signal",
            "regd",
        ),
        ({"duration": 60}, "(top level)", "shorter than step_s"),
    ],
)
def test_bad_scenario_names_the_field_and_says_why(
    change: dict[str, Any], field: str, why: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(small(**change), "test.yaml")
    text = str(err.value)
    assert "test.yaml is not a valid scenario" in text
    line = next((ln for ln in text.splitlines() if ln.startswith(field + ":")), None)
    assert line is not None, text
    assert why in line, text


def test_duplicate_request_ids_and_broken_files_are_explained(tmp_path: Path) -> None:
    twice = small()
    twice["requests"] = [twice["requests"][0], dict(twice["requests"][0])]
    with pytest.raises(ScenarioError, match="'peak' is used twice"):
        parse_scenario(twice)
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_validate(path: Path) -> None:
    scen = load_scenario(path)
    assert scen.n_steps >= 24
    # Something steers the fleet: requests, a signal, or a grid's limits.
    assert scen.requests or scen.regulation is not None or scen.grid is not None


def test_overrides_scale_the_requests_with_the_fleet() -> None:
    scen = parse_scenario(small()).with_overrides(vehicles=400, seed=9)
    assert scen.fleet.vehicles == 400 and scen.fleet.seed == 9
    assert [r.power_kw for r in scen.requests] == [-600.0, 1800.0]


# -- the run ------------------------------------------------------------------------------


def test_small_scenario_delivers_what_it_is_asked_and_writes_its_files(tmp_path: Path) -> None:
    scen = parse_scenario(small())
    done = run(scen, tmp_path / "out", plot=True)
    out = tmp_path / "out"
    for name in ("intervals.csv", "requests.csv", "vehicles.csv", "summary.json", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "intervals.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == scen.n_steps == 20
    assert {
        "time",
        "fleet_kw",
        "baseline_kw",
        "requested_kw",
        "delivered_kw",
        "plugged",
        "energy_kwh",
    } <= set(rows[0])
    with (out / "requests.csv").open() as fh:
        reqs = {r["request_id"]: r for r in csv.DictReader(fh)}
    assert set(reqs) == {"peak", "fill"}
    for r in reqs.values():
        # Both requests are inside what the fleet can hold: each is accepted and delivered
        # within DELIVERY_TOL (2%) of the energy asked.
        assert r["admission"] == "accepted" and r["status"] == "completed"
        asked, got = float(r["requested_kwh"]), float(r["delivered_kwh"])
        assert got == pytest.approx(asked, rel=DELIVERY_TOL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drivers"]["short"] == 0
    assert summary["drivers"]["departures"] == 0  # nobody leaves before 23:00
    assert 0.0 < summary["energy_cycled"]["jain_index"] <= 1.0
    assert done.summary["requests"]["accepted_within_tolerance"] == "2/2"
    # While a request runs, the fleet holds it; outside, it charges as it would anyway.
    res = done.result
    active = ~np.isnan(res.requested_kw)
    np.testing.assert_allclose(res.fleet_kw[active], res.requested_kw[active], rtol=DELIVERY_TOL)
    np.testing.assert_allclose(res.fleet_kw[:4], res.baseline_kw[:4], rtol=1e-6)


def test_no_driver_left_short_over_a_whole_day() -> None:
    data = small(duration="24h", fleet={"vehicles": 300, "seed": 2})
    res = build(parse_scenario(data)).run()
    assert res.departed > 200
    assert res.short_total == 0


def reference_loop(
    n: int, seed: int, t0: float, step_s: float, steps: int, requests: list[DispatchRequest]
) -> tuple[list[float], dict[str, Any]]:
    """The same job by hand: Dispatcher.step after Dispatcher.step, one setpoint at a time
    through SimFleet.set_setpoint, the fleet re-deciding every step."""
    profile = generate_fleet(n, seed, mix={"home": 1.0})
    fleet = SimFleet(profile, t0, step_s=step_s)
    d = make_dispatcher(step_s, profile.batteries)
    held, meter, powers, finals = np.zeros(n), 0.0, [], {}
    todo = sorted(requests, key=lambda r: r.start.timestamp() if r.start else t0)
    for i in range(steps):
        now = t0 + i * step_s
        if i:
            fleet.tick(now)
        view = fleet_view(fleet, now, held, meter)
        while todo and todo[0].start is not None and todo[0].start.timestamp() <= now:
            d.submit(todo.pop(0), now, view)
        out = d.step(now, view, n)
        finals.update({r.request_id: r for r in out.results})
        for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(int(row), float(p), float(until))
        for row in out.release_rows:
            fleet.set_setpoint(int(row), 0.0, now)
        fleet.tick(now)
        held = fleet.power.copy()
        meter += float(held.sum()) * step_s / 3600.0
        powers.append(float(held.sum()))
    end = t0 + steps * step_s
    fleet.tick(end)
    finals.update(
        {r.request_id: r for r in d.step(end, fleet_view(fleet, end, held, meter), n).results}
    )
    return powers, finals


def test_simulation_equals_dispatcher_steps_by_hand_and_is_deterministic() -> None:
    scen = parse_scenario(small(fleet={"vehicles": 120, "seed": 8, "mix": {"home": 1.0}}))
    sim = build(scen)
    first = sim.run()
    for again in (build(scen).run(), sim.run()):  # a new simulation, and the same one rerun
        np.testing.assert_array_equal(first.fleet_kw, again.fleet_kw)
        np.testing.assert_array_equal(first.throughput_kwh, again.throughput_kwh)
        assert [r.final for r in again.requests] == [r.final for r in first.requests]
    reqs = [
        DispatchRequest(
            request_id=r.id,
            service=r.service,
            power_kw=r.power_kw,
            start=from_epoch(scen.at(r.start)),
            duration_s=r.duration,
        )
        for r in scen.requests
    ]
    powers, finals = reference_loop(120, 8, scen.t0, scen.step_s, scen.n_steps, reqs)
    np.testing.assert_allclose(first.fleet_kw, powers, rtol=0, atol=1e-9)
    for rec in first.requests:
        assert rec.final is not None
        ref = finals[rec.request.request_id]
        assert rec.final.status == ref.status == "completed"
        assert rec.final.delivered_kwh == pytest.approx(ref.delivered_kwh, abs=1e-9)
        assert rec.final.requested_kwh == ref.requested_kwh


def test_regulation_signal_is_followed_around_the_baseline(tmp_path: Path) -> None:
    signal = tmp_path / "signal.csv"
    signal.write_text("offset_s,value\n0,0.5\n1800,-0.5\n3600,0.0\n")
    data = small(
        requests=[],
        step_s=300,
        duration="4h",
        fleet={"vehicles": 200, "seed": 4, "mix": {"depot": 1.0}},
        start="2026-01-15T20:00:00Z",
        regulation={"capacity_kw": 150, "start": "+1h", "duration": "90m", "signal": str(signal)},
    )
    res = build(parse_scenario(data)).run()
    inside = ~np.isnan(res.signal)
    assert inside.sum() == 18
    np.testing.assert_array_equal(np.unique(res.signal[inside]), [-0.5, 0.0, 0.5])
    want = res.baseline_kw[inside] + 150.0 * res.signal[inside]
    np.testing.assert_allclose(res.fleet_kw[inside], want, rtol=0.02, atol=1.0)
    assert sum(r.final is not None and r.final.status == "completed" for r in res.requests) == 18


def test_regd_signal_is_seeded_bounded_and_close_to_energy_neutral() -> None:
    a, b = regd_signal(480, 60.0, 3), regd_signal(480, 60.0, 3)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.2
    assert abs(a.mean()) < 0.15


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_one_taker() -> None:
    assert jain_index(np.full(10, 3.0)) == pytest.approx(1.0)
    assert jain_index(np.array([5.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert jain_index(np.zeros(3)) == 1.0


def test_simulation_rejects_a_signal_of_the_wrong_length() -> None:
    from v2g.simcore import Regulation

    with pytest.raises(ValueError, match="one value per step"):
        Simulation(
            generate_fleet(5, 1),
            start=0.0,
            step_s=60.0,
            steps=10,
            regulation=Regulation(0.0, 600.0, 10.0, np.zeros(3)),
        )


def test_parquet_copies_are_written_only_when_pyarrow_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scen = parse_scenario(small(fleet={"vehicles": 40, "seed": 1}, duration="2h"))
    real = importlib.import_module
    written: list[str] = []

    class FakeParquet:
        @staticmethod
        def write_table(table: dict[str, Any], path: Path) -> None:
            written.append(path.name)
            path.write_bytes(b"PAR1")

    def fake_import(name: str) -> Any:
        if name == "pyarrow":
            return type("FakeArrow", (), {"table": staticmethod(lambda cols: cols)})
        if name == "pyarrow.parquet":
            return FakeParquet
        return real(name)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    done = run(scen, tmp_path / "with", plot=False)
    assert written == ["intervals.parquet", "requests.parquet", "vehicles.parquet"]
    assert "intervals.parquet" in done.summary["files"]

    def no_arrow(name: str) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name)

    monkeypatch.setattr(importlib, "import_module", no_arrow)
    done = run(scen, tmp_path / "without", plot=False)
    assert not list((tmp_path / "without").glob("*.parquet"))


# -- the command --------------------------------------------------------------------------


def test_cli_simulate_runs_a_shipped_scenario_with_overrides(tmp_path: Path) -> None:
    out = tmp_path / "res"
    result = runner.invoke(
        app,
        [
            "simulate",
            str(SCENARIOS / "workplace-solar.yaml"),
            "--out",
            str(out),
            "--vehicles",
            "150",
            "--seed",
            "3",
            "--no-plot",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "workplace-solar: 150 vehicles" in result.output
    assert "drivers short 0" in result.output
    assert (out / "intervals.csv").exists() and not (out / "plot.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vehicles"] == 150 and summary["seed"] == 3


def test_cli_simulate_explains_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet: {vehicles: -3}\nstart: 2026-01-15T18:00:00Z\nduration: 1h\n")
    result = runner.invoke(app, ["simulate", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "fleet.vehicles" in result.output and "greater than or equal to 1" in result.output


def test_cli_simulate_help_lists_its_flags() -> None:
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    for flag in ("SCENARIO", "--out", "--vehicles", "--seed", "--no-plot", "--no-progress"):
        assert flag in result.output
