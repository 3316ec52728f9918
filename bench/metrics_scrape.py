"""What a Prometheus scrape costs (README "Metrics"): one ``/metrics`` render of the
aggregator's registry and of the simulated fleet's, at N vehicles with a request running,
against one control step of the same aggregator (the reference, measured in the same run).

The collectors read the service's last step (its report and output) and its counters, so
the aggregator's scrape should not grow with the fleet; the fleet's sums a few columns.

Prints a table and writes JSON to bench/results/metrics_scrape.json, both with the run's
provenance (bench.common: git SHA, package versions, CPU, load).

    .venv/bin/python -m bench.metrics_scrape [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable

from prometheus_client import generate_latest

from agents.fleet import SimFleet
from agents.metrics import register_agents
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from agents.telemetry import telemetry_payloads
from aggregator.ledger import MemoryLedger
from aggregator.metrics import instrument
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from bench.common import (
    RESULTS,
    T0,
    Row,
    best_of,
    print_table,
    provenance,
    row,
    start,
    write_results,
)
from broker.metrics import new_registry
from broker.settings import Settings
from core.clock import ManualClock

STEP_S = 5.0
SCRAPES = 50


async def _measure(n: int) -> list[Row]:
    settings = Settings(topic_prefix="bench-metrics", log_level="warning", control_step_s=STEP_S)
    clock = ManualClock(T0)
    svc = AggregatorService(
        settings=settings, clock=clock, store=MemoryStore(), ledger=MemoryLedger()
    )
    fleet = SimFleet(generate_fleet(n, 7), T0, step_s=STEP_S)
    runtime = AgentRuntime(settings=settings, clock=clock, fleet=fleet, mode="multiplexed")
    agg_registry, fleet_registry = new_registry(), new_registry()
    instrument(svc, agg_registry)
    register_agents(runtime, fleet_registry)
    topics = [svc.topics.telemetry(v) for v in fleet.ids]
    steps: list[float] = []
    for k in range(4):
        for topic, body in zip(topics, telemetry_payloads(fleet, clock.now()), strict=True):
            svc.on_payload(topic, body)
        if k == 1:
            req = {"request_id": "bench-1", "power_kw": -0.02 * n, "duration_s": 3600.0}
            svc.on_payload(svc.topics.dispatch_requests, json.dumps(req).encode())
        report = await svc.step()
        assert svc.reports is not None
        svc.reports.put_nowait(report)
        steps.append(report.step_ms)
        clock.advance(STEP_S)
        fleet.tick(clock.now())
    step_ms = min(steps[2:])  # with the request running
    agg_text = generate_latest(agg_registry)
    assert b'request_id="bench-1"' in agg_text, "the request must be running"
    agg_ms = best_of(lambda: generate_latest(agg_registry), SCRAPES) * 1e3
    fleet_ms = best_of(lambda: generate_latest(fleet_registry), SCRAPES) * 1e3
    ref = "one control step (ms)"
    return [
        row("aggregator scrape", n, agg_ms, step_ms, "ms", ref),
        row("aggregator scrape size", n, len(agg_text) / 1024, None, "KiB"),
        row("fleet scrape", n, fleet_ms, step_ms, "ms", ref),
    ]


def measure(sizes: Iterable[int]) -> list[Row]:
    rows: list[Row] = []
    for n in sizes:
        rows += asyncio.run(_measure(n))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--out", default=str(RESULTS / "metrics_scrape.json"))
    args = ap.parse_args()
    started = start()
    result = measure(int(s) for s in args.sizes.split(",") if s)
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
