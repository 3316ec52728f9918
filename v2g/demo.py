"""``v2g demo``: the whole loop in one process, with nothing to install or start.

An embedded broker (unless a broker URL is given), an in-memory store (unless a Redis
URL is given), the aggregator and a simulated fleet on an accelerated clock. The demo
sends one discharge and one charge request, prints fleet status as it goes, and ends
with a summary of requested vs delivered energy and any driver left short.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime, Mode
from aggregator.service import AggregatorService, StepReport
from broker.embedded import EmbeddedBroker
from broker.models import DispatchRequest, DispatchResult, from_epoch
from broker.settings import Settings, without_password
from core.clock import SimClock, day_anchor
from v2g import compose, operator

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEMO_START_TOD_S = 19.5 * 3600  # 19:30 UTC: most cars are home and plugged in


@dataclass(slots=True)
class Outcome:
    request_id: str
    label: str
    requested_kw: float
    result: DispatchResult


async def run_demo(
    settings: Settings,
    *,
    count: int,
    seed: int,
    request_minutes: float,
    use_broker: bool,
    use_redis: bool,
    mode: Mode,
    out: TextIO = sys.stdout,
    warm_start: bool = True,
    registry: CollectorRegistry | None = None,
) -> list[Outcome]:
    """Run the demo to its end and return what each request delivered. ``warm_start``: the
    cars plugged in at the start hold what their baseline charging put in them since they
    arrived (see SimFleet). ``registry``: register the aggregator's and the fleet's
    metrics on it (``--metrics``)."""
    wall0 = time.monotonic()
    broker = None if use_broker else EmbeddedBroker()
    if broker is not None:
        await broker.start()
        settings = settings.model_copy(
            update={"broker_url": broker.url, "mqtt_protocol": broker.PROTOCOL}
        )
    persisted = compose.persistence(settings, memory=not use_redis)
    clock = SimClock(speed=settings.speed, sim_anchor=day_anchor() + DEMO_START_TOD_S)
    fleet = SimFleet(
        generate_fleet(count, seed),
        clock.now(),
        step_s=settings.telemetry_interval_s,
        warm_start=warm_start,
    )
    # One process, many connections: every client id derives from the topic prefix
    # (broker/clientid.py); a V2G_CLIENT_ID meant for one connection would collide here.
    settings = settings.model_copy(update={"client_id": None})
    agents = AgentRuntime(settings=settings, clock=clock, fleet=fleet, mode=mode)
    aggregator = compose.aggregator_service(settings, clock, persisted)
    if registry is not None:  # --metrics: both halves of the loop on one endpoint
        from agents.metrics import register_agents
        from aggregator.metrics import instrument

        instrument(aggregator, registry)
        register_agents(agents, registry)
    print(
        f"v2g demo: {count} vehicles (seed {seed}), clock x{settings.speed:g} from"
        f" {from_epoch(clock.sim_anchor):%Y-%m-%d %H:%M}Z simulated, broker"
        f" {without_password(settings.broker_url)}{' (embedded)' if broker else ''},"
        f" store {'Redis ' + without_password(settings.redis_url) if use_redis else 'in memory'},"
        f" topic prefix {settings.topic_prefix}"
        + (f", Redis prefix {settings.redis_prefix}" if use_redis else ""),
        file=out,
        flush=True,
    )
    outcomes: list[Outcome] = []
    try:
        async with asyncio.TaskGroup() as tg:
            t_agents = tg.create_task(agents.run(), name="demo-agents")
            t_agg = tg.create_task(aggregator.run(), name="demo-aggregator")
            t_print = tg.create_task(_print_status(aggregator, out), name="demo-status")
            try:
                outcomes = await _script(settings, aggregator, request_minutes, count, out)
            finally:
                for t in (t_print, t_agg, t_agents):
                    t.cancel()
    finally:
        await persisted.close()
        if broker is not None:
            await broker.stop()
    _summary(outcomes, fleet, time.monotonic() - wall0, out)
    return outcomes


async def _script(
    settings: Settings, aggregator: AggregatorService, minutes: float, expected: int, out: TextIO
) -> list[Outcome]:
    # Let the fleet report in before asking anything of it.
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        rep = aggregator.last_report
        if rep is not None and rep.status.vehicles_online >= expected:
            break
        await asyncio.sleep(0.1)
    outcomes = []
    duration_s = minutes * 60.0
    for label, share in (("discharge", -0.5), ("charge", 0.5)):
        rep = aggregator.last_report
        assert rep is not None
        win = rep.capability.windows[0]
        bound = win.min_power_kw if share < 0 else win.max_power_kw
        power = round(abs(share) * bound, -1) if abs(bound) > 20 else round(share * 10, 1)
        rid = f"demo-{label}-{int(time.time())}"
        req = DispatchRequest(request_id=rid, power_kw=power, duration_s=duration_s)
        print(
            f"--> {label}: request {rid} power_kw={power:+.0f} for {minutes:g} min",
            file=out,
            flush=True,
        )

        def on_result(r: DispatchResult) -> None:
            print(
                f"<-- {r.request_id} {r.status}: allocated {r.allocated_kw:+.0f} kW over"
                f" {r.vehicles} vehicles" + (f" ({r.reason})" if r.reason else ""),
                file=out,
                flush=True,
            )

        result = await operator.dispatch(
            settings,
            req,
            wait=True,
            timeout_s=duration_s / settings.speed + 60,
            on_result=on_result,
        )
        outcomes.append(Outcome(rid, label, power, result))
    return outcomes


async def _print_status(aggregator: AggregatorService, out: TextIO) -> None:
    while True:
        await asyncio.sleep(2.0)
        rep: StepReport | None = aggregator.last_report
        if rep is None:
            continue
        s = rep.status
        line = (
            f"  {s.ts:%H:%M:%S} online={s.vehicles_online} plugged={s.vehicles_plugged_in}"
            f" power={s.power_kw:+8.1f} kW energy={s.energy_kwh:8.1f} kWh"
        )
        if s.capability is not None:
            # The 15-min window of the capability envelope: fleet net kW it can hold.
            line += (
                f" can hold {s.capability.min_power_kw:+.0f}..{s.capability.max_power_kw:+.0f} kW"
                " for 15 min"
            )
        for d in s.dispatches:
            line += f" [{d.request_id}: req {d.requested_kw:+.0f} / got {d.delivered_kw:+.0f} kW]"
        print(line, file=out, flush=True)


def _summary(outcomes: list[Outcome], fleet: SimFleet, wall_s: float, out: TextIO) -> None:
    print("\nsummary", file=out)
    print(
        f"  {'request':<30} {'status':<10} {'req kW':>9} {'req kWh':>9} {'got kWh':>9} {'error':>7}",
        file=out,
    )
    for o in outcomes:
        r = o.result
        req_kwh = r.requested_kwh or 0.0
        got = r.delivered_kwh or 0.0
        err = abs(got - req_kwh) / abs(req_kwh) * 100 if req_kwh else 0.0
        print(
            f"  {o.request_id:<30} {r.status:<10} {o.requested_kw:>+9.0f} {req_kwh:>+9.1f}"
            f" {got:>+9.1f} {err:>6.1f}%",
            file=out,
        )
    print(
        f"  drivers departed: {fleet.departed}, left short: {fleet.short}"
        + (f" ({', '.join(fleet.short_ids[:10])})" if fleet.short_ids else ""),
        file=out,
    )
    print(f"  wall time: {wall_s:.1f} s", file=out, flush=True)
