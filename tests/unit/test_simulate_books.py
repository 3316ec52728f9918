"""``v2g simulate``: the per-request table (requests.csv) equals the per-step file
(intervals.csv) summed per request, for every shipped scenario."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from v2g.scenario import load_scenario
from v2g.simulate import run

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.yaml"))
# A smaller fleet keeps every scenario to a few seconds; request powers and regulation
# capacity scale with it (Scenario.with_overrides), the horizon and the steps do not.
VEHICLES = 150


def test_every_shipped_scenario_is_covered() -> None:
    assert len(SCENARIOS) >= 3, SCENARIOS


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_the_request_table_equals_the_step_file_summed_per_request(
    path: Path, tmp_path: Path
) -> None:
    scenario = load_scenario(path)
    scenario = scenario.with_overrides(vehicles=min(VEHICLES, scenario.fleet.vehicles))
    run(scenario, tmp_path, plot=False)
    h = scenario.step_s / 3600.0
    delivered: dict[str, float] = defaultdict(float)
    requested: dict[str, float] = defaultdict(float)
    steps: dict[str, int] = defaultdict(int)
    with (tmp_path / "intervals.csv").open() as fh:
        for row in csv.DictReader(fh):
            rid = row["request_id"]
            if rid:
                delivered[rid] += float(row["interval_kwh"])
                requested[rid] += float(row["requested_kw"]) * h
                steps[rid] += 1
    with (tmp_path / "requests.csv").open() as fh:
        table = [r for r in csv.DictReader(fh) if r["delivered_kwh"] != ""]
    if not scenario.requests and scenario.regulation is None:
        # A grid-only scenario (the limits alone steer the fleet): no request, no books.
        assert scenario.grid is not None and not table and not delivered
        return
    assert table, "no request ran"
    for r in table:
        rid = r["request_id"]
        # intervals.csv rounds each step to 1e-4 kWh and 1e-3 kW.
        tol = 2e-4 * steps[rid] + 1e-4 + 1e-3 * h * steps[rid]
        assert float(r["delivered_kwh"]) == pytest.approx(delivered[rid], abs=tol), (
            f"{rid}: requests.csv says delivered {r['delivered_kwh']} kWh, its"
            f" {steps[rid]} steps in intervals.csv {delivered[rid]:.4f} kWh"
        )
        assert float(r["requested_kwh"]) == pytest.approx(requested[rid], abs=tol), rid
