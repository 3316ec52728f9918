"""How many vehicles one aggregator holds with its control step under 1 s.

Measures, side by side in one run (this machine is shared and noisy, so read ratios):

* the control step's computation (fold telemetry, envelope, allocation, status) at
  N vehicles, against the 1 s budget;
* the pure control step alone (``ControlStep.run`` -> ``StepPlan``: the same computation
  and the setpoint messages formatted, no MQTT, no asyncio): "plan" rows;
* telemetry decoding through the pydantic contract models, against bare ``json.loads``;
* setpoint publishing (QoS 1) through our MQTT link and through the lean publish-only
  connection (broker/fastpub.py), against Mosquitto's own C client ``mosquitto_pub``
  sending the same number of messages to the same broker;
* a whole step with every vehicle's setpoint changed (the worst case) at N, and steady
  steps after it, with setpoints through the general client (``MqttLink``: "general")
  and through ``AggregatorService(fast_setpoints=True)`` ("fast"), side by side.

Needs Mosquitto on 127.0.0.1:1883 (loopback only). Prints a table and writes JSON to
bench/results/control_step.json.

    .venv/bin/python -m bench.control_step [--sizes 1000,10000,100000] [--paths general,fast]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.control_step import ControlStep
from aggregator.inbox import Inbox
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from bench.common import (
    HOST,
    PORT,
    RESULTS,
    T0,
    Row,
    best_of,
    print_table,
    provenance,
    row,
    start,
    wait_connected,
    write_results,
)
from broker.fastpub import FastPublisher
from broker.link import MqttLink, Outgoing
from broker.models import DispatchRequest, Telemetry
from broker.settings import Settings
from core.clock import ManualClock
from v2g import logs

BUDGET_MS = 1000.0
PATHS = ("general", "fast")  # setpoints through MqttLink, or through broker/fastpub.py


def bench_decode(n: int) -> Row:
    fleet = SimFleet(generate_fleet(n, 1), T0)
    payloads = telemetry_payloads(fleet, T0)
    ours = best_of(lambda: [Telemetry.model_validate_json(p) for p in payloads])
    ref = best_of(lambda: [json.loads(p) for p in payloads])
    return row(
        "telemetry decode (pydantic contract)", n, n / ours, n / ref, "msg/s", "json.loads", None
    )


async def make_service(
    n: int, prefix: str, fast: bool = False
) -> tuple[AggregatorService, SimFleet]:
    settings = Settings(topic_prefix=prefix, control_step_s=5.0, log_level="warning")
    clock = ManualClock(T0)
    svc = AggregatorService(
        settings=settings,
        clock=clock,
        store=MemoryStore(),
        client_id=f"bench-{prefix}",
        fast_setpoints=fast,
    )
    fleet = SimFleet(generate_fleet(n, 1), T0)
    return svc, fleet


async def bench_step(n: int, fast: bool = False) -> list[Row]:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    svc, fleet = await make_service(n, prefix, fast)
    tasks = [asyncio.create_task(svc.link.run())]
    if svc.setpoints is not None:
        tasks.append(asyncio.create_task(svc.setpoints.run()))
    try:
        await wait_connected(svc.link, svc.setpoints)
        svc.inbox.telemetry = [
            Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, svc.clock.now())
        ]
        await svc.step()  # warm: the fleet is known
        cap = svc.last_report.capability.windows[0] if svc.last_report else None
        assert cap is not None
        # Compute only: no request active, so no setpoints to send.
        svc.inbox.telemetry = [
            Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, svc.clock.now())
        ]
        t = time.perf_counter()
        await svc.step()
        compute_ms = (time.perf_counter() - t) * 1e3
        # Worst case: a new request, every plugged-in vehicle gets a new setpoint.
        svc.inbox.requests = [
            (
                DispatchRequest(
                    request_id="bench", power_kw=0.5 * cap.min_power_kw, duration_s=3600
                ),
                None,
            )
        ]
        t = time.perf_counter()
        rep = await svc.step()
        full_ms = (time.perf_counter() - t) * 1e3
        sent = rep.setpoints_sent
        # Steady state: the fleet follows its setpoints, reports, and the loop goes on.
        steady_ms, steady_sent = [], []
        for _ in range(6):
            out = svc.last_output
            assert out is not None
            for row_, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
                fleet.set_setpoint(fleet.index[svc.state.ids[row_]], float(p), float(until))
            fleet.tick(fleet.now + 5.0)
            svc.clock.advance(5.0)  # type: ignore[attr-defined]
            svc.inbox.telemetry = [
                Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, fleet.now)
            ]
            t = time.perf_counter()
            rep = await svc.step()
            steady_ms.append((time.perf_counter() - t) * 1e3)
            steady_sent.append(rep.setpoints_sent)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    budget: dict[str, Any] = {
        "unit": "ms",
        "ref": BUDGET_MS,
        "ref_name": "1 s budget",
        "target": BUDGET_MS,
        "lower_is_better": True,
    }
    path = "fast" if fast else "general"
    # The target is the platform's default path (fast); the general one is its reference.
    sending = budget if fast else {**budget, "target": None}
    return [
        row(f"control step, computation ({path})", n, compute_ms, **budget),
        row(f"control step, all {sent} setpoints new ({path})", n, full_ms, **sending),
        row(
            f"control step, steady (~{int(np.median(steady_sent))} sent) ({path})",
            n,
            float(np.median(steady_ms)),
            **sending,
        ),
    ]


def bench_plan(n: int) -> list[Row]:
    """``ControlStep.run`` alone: the step the service publishes, without the edges."""
    step = ControlStep(settings=Settings(control_step_s=5.0, log_level="warning"))
    fleet = SimFleet(generate_fleet(n, 1), T0)

    def inbox() -> Inbox:
        reports = [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, T0)]
        return Inbox(telemetry=list(reports))

    first = step.run(inbox(), T0)  # warm: the fleet is known
    cap = first.capability.windows[0]
    box = inbox()
    t = time.perf_counter()
    step.run(box, T0)
    compute_ms = (time.perf_counter() - t) * 1e3
    box = inbox()
    box.requests = [
        (
            DispatchRequest(request_id="bench", power_kw=0.5 * cap.min_power_kw, duration_s=3600),
            None,
        )
    ]
    t = time.perf_counter()
    plan = step.run(box, T0)
    full_ms = (time.perf_counter() - t) * 1e3
    budget: dict[str, Any] = {
        "unit": "ms",
        "ref": BUDGET_MS,
        "ref_name": "1 s budget",
        "target": None,
        "lower_is_better": True,
    }
    return [
        row("control step plan, computation (pure)", n, compute_ms, **budget),
        row(
            f"control step plan, all {len(plan.setpoints)} setpoints new (pure)",
            n,
            full_ms,
            **budget,
        ),
    ]


async def bench_publish(n: int) -> list[Row]:
    """Our link's and the fast publisher's QoS 1 publish rates against mosquitto_pub's,
    same count, same broker."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    settings = Settings(topic_prefix=prefix, log_level="warning")
    link = MqttLink(settings=settings, client_id=f"bench-pub-{prefix}")
    task = asyncio.create_task(link.run())
    body = b'{"vehicle_id":"ev-0001","request_id":"r","power_kw":-7.4,"issued_at":"2026-11-26T21:00:00Z","valid_until":"2026-11-26T21:00:30Z"}'
    try:
        await link.wait_connected(10)
        msgs = [Outgoing(f"{prefix}/vehicles/ev-{i}/setpoint", body, qos=1) for i in range(n)]
        t = time.perf_counter()
        await link.publish_many(msgs)
        ours = n / (time.perf_counter() - t)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    pub = FastPublisher(settings=settings, client_id=f"bench-fastpub-{prefix}")
    task = asyncio.create_task(pub.run())
    try:
        await pub.wait_connected(10)
        msgs = [Outgoing(f"{prefix}/vehicles/ev-{i}/setpoint", body, qos=1) for i in range(n)]
        t = time.perf_counter()
        delivery = await pub.publish_many(msgs)
        fast = delivery.count / (time.perf_counter() - t)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ref = None
    if shutil.which("mosquitto_pub"):
        lines = (body.decode() + "\n") * n
        t = time.perf_counter()
        subprocess.run(
            [
                "mosquitto_pub",
                "-h",
                HOST,
                "-p",
                str(PORT),
                "-q",
                "1",
                "-t",
                f"{prefix}/ref",
                "-l",
            ],
            input=lines.encode(),
            check=True,
            timeout=300,
        )
        ref = n / (time.perf_counter() - t)
    return [
        row("setpoint publish, QoS 1 (general)", n, ours, ref, "msg/s", "mosquitto_pub (C)"),
        row("setpoint publish, QoS 1 (fast)", n, fast, ref, "msg/s", "mosquitto_pub (C)"),
    ]


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000,100000", help="fleet sizes, comma-separated")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="setpoints through: general, fast (both)"
    )
    ap.add_argument("--out", default=str(RESULTS / "control_step.json"))
    args = ap.parse_args()
    started = start()
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or set(paths) - set(PATHS):
        ap.error(f"--paths takes {', '.join(PATHS)}")
    logs.configure(level="warning")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[Row] = []
    for n in sizes:
        print(f"... N={n}", file=sys.stderr, flush=True)
        rows.append(bench_decode(min(n, 20_000)))
        for path in paths:
            print(f"... N={n} setpoints {path}", file=sys.stderr, flush=True)
            rows.extend(await bench_step(n, fast=path == "fast"))
        rows.extend(await bench_publish(min(n, 20_000)))
        # Last, so the rows above run in the order they always did.
        rows.extend(bench_plan(n))
    stamp = provenance(started)
    print_table(rows, stamp)
    for path in paths:
        for kind in ("all", "steady"):
            within = [
                r["vehicles"]
                for r in rows
                if r["metric"].startswith(f"control step, {kind}")
                and r["metric"].endswith(f"({path})")
                and r["pass"]
            ]
            print(
                f"largest fleet measured with a {kind} step under 1 s ({path}):"
                f" {max(within) if within else 'none'}"
            )
    write_results(rows, args.out, stamp)


if __name__ == "__main__":
    asyncio.run(main())
