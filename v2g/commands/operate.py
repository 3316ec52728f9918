"""Commands an operator runs against a live fleet: ``v2g dispatch``, ``cancel``,
``amend``, ``status``, ``capability``, ``report`` and ``reset``. Each does one thing and
ends with an exit code (0 done, 1 refused or nothing found, 2 a usage error)."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from broker.models import (
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    FleetStatus,
    Service,
    to_epoch,
)
from broker.settings import without_password
from v2g.commands.options import (
    AnswerTimeout,
    Broker,
    Every,
    Json,
    Prefix,
    Redis,
    RedisPrefix,
    SimStart,
    Speed,
    every,
    examples,
    is_relative,
    parse_duration,
    parse_start,
    settings_from,
)
from v2g.commands.output import (
    cancel_line,
    capability_lines,
    forecast_lines,
    print_answer,
    progress_line,
    result_line,
    status_lines,
)
from v2g.commands.running import fail, read_clock, run


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``v2g --help`` lists them."""
    app.command(
        "dispatch",
        epilog=examples(
            "v2g dispatch --power -500 --duration 15m --wait --every 60",
            "v2g dispatch --power 200 --start +30m --duration 1h --id evening-1",
            "v2g dispatch --service frequency_regulation --capacity 300 --duration 1d --json",
        ),
    )(dispatch_cmd)
    app.command("cancel")(cancel_cmd)
    app.command()(amend)
    app.command(
        epilog=examples(
            "v2g status",
            "v2g status --follow --every 5m",
            "v2g status --json --topic-prefix my-fleet",
        )
    )(status)
    app.command(
        epilog=examples("v2g capability", "v2g capability --json --broker mqtt://127.0.0.1:1883")
    )(capability)
    app.command(
        epilog=examples(
            "v2g report evening-1",
            "v2g report evening-1 --interval 60 --out reports/evening-1",
            "v2g report evening-1 --json --redis redis://127.0.0.1:6379/0",
        )
    )(report)
    app.command()(reset)


def dispatch_cmd(
    power: Annotated[
        float | None,
        typer.Option(
            "--power",
            help="fleet net kW: + charge (import), - discharge (export)",
            show_default="none: give --power or --capacity",
        ),
    ] = None,
    capacity: Annotated[
        float | None,
        typer.Option(
            "--capacity",
            help="kW held both ways, for a service that follows a signal"
            " (frequency_regulation, frequency_containment) instead of --power",
            show_default="none",
        ),
    ] = None,
    duration: Annotated[
        str, typer.Option("--duration", metavar="DURATION", help="e.g. 900, 15m, 4h, 1d")
    ] = "15m",
    service: Annotated[Service, typer.Option("--service", help="grid service")] = Service.MANUAL,
    start: Annotated[
        str | None,
        typer.Option(
            "--start",
            metavar="TIME",
            help="ISO time with zone, or +10m from now on the platform clock (the fleet's,"
            " read on the bus)",
            show_default="now",
        ),
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--id", help="request id", show_default="a fresh one")
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(
            help="when requests stack: higher keeps its reserve first (ties go to the earlier)",
            show_default="0",
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="a grid node: served by the vehicles under it, --power their net power"
            " (needs an aggregator with --grid)",
            show_default="none: the whole fleet",
        ),
    ] = None,
    min_kw: Annotated[
        float | None,
        typer.Option(
            "--min-kw",
            help="--service firming: the node's net power at least this",
            show_default="none: open",
        ),
    ] = None,
    max_kw: Annotated[
        float | None,
        typer.Option(
            "--max-kw",
            help="--service firming: the node's net power at most this",
            show_default="none: open",
        ),
    ] = None,
    ramp: Annotated[
        float | None,
        typer.Option(
            "--ramp",
            help="--service firming: its change at most this many kW/min",
            show_default="none: open",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow progress until the request ends")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="give up after this many wall seconds (with --wait, at least the request's"
            " duration at --speed plus 60 s)",
        ),
    ] = 30.0,
    every_s: Every = 0.0,
    as_json: Json = False,
    broker: Broker = None,
    topic_prefix: Prefix = None,
    speed: Speed = None,
    sim_start: SimStart = None,
) -> None:
    """Send a dispatch request and print the answer (and progress with --wait; --every
    thins the progress lines)."""
    from v2g import operator

    settings = settings_from(
        broker_url=broker, topic_prefix=topic_prefix, speed=speed, sim_start=sim_start
    )
    seconds = parse_duration(duration, "--duration")
    relative = start is not None and is_relative(start)
    if relative:
        assert start is not None
        parse_duration(start.strip()[1:], "--start")  # a bad offset is refused before connecting
    now: float | None = None
    if relative or wait:
        # '+30m' and the wait are on the platform clock, the fleet's (read on the bus).
        shared = run(read_clock(settings))
        settings, now = shared.settings, shared.clock.now()
    try:
        req = DispatchRequest(
            request_id=request_id or f"req-{uuid.uuid4().hex[:10]}",
            service=service,
            power_kw=power,
            capacity_kw=capacity,
            start=parse_start(start, now=now) if start else None,
            duration_s=seconds,
            priority=priority,
            node=node,
            min_kw=min_kw,
            max_kw=max_kw,
            ramp_kw_per_min=ramp,
        )
    except ValidationError as err:
        fail(f"invalid request: {err.errors()[0]['msg']}")
    if wait:
        lead = 0.0 if req.start is None or now is None else max(0.0, to_epoch(req.start) - now)
        timeout = max(timeout, (lead + seconds) / settings.speed + 60.0)

    def on_result(r: DispatchResult) -> None:
        typer.echo(r.model_dump_json() if as_json else result_line(r))

    due = every(every_s)

    def on_progress(p: DispatchProgress) -> None:
        if not due(to_epoch(p.ts)):
            return
        if as_json:
            typer.echo(p.model_dump_json())
            return
        typer.echo(progress_line(p))

    result = run(
        operator.dispatch(
            settings,
            req,
            wait=wait,
            timeout_s=timeout,
            on_result=on_result,
            on_progress=on_progress,
        )
    )
    if result is not None and result.status == "rejected":
        raise typer.Exit(1)


def cancel_cmd(
    request_id: Annotated[str, typer.Argument(help="the request to cancel")],
    timeout: AnswerTimeout = 15.0,
    as_json: Json = False,
    broker: Broker = None,
    topic_prefix: Prefix = None,
) -> None:
    """Cancel a running dispatch request and print the answer: cancelled (with the energy
    delivered) or rejected (with why, e.g. unknown request; exit code 1)."""
    from v2g import operator

    settings = settings_from(broker_url=broker, topic_prefix=topic_prefix)
    answer = run(operator.cancel(settings, request_id, timeout_s=timeout))
    print_answer(answer, as_json, cancel_line)


def amend(
    request_id: Annotated[str, typer.Argument(help="the request to change")],
    power: Annotated[
        float | None,
        typer.Option(
            "--power",
            help="new fleet net kW: + charge (import), - discharge (export)",
            show_default="unchanged",
        ),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option(
            "--duration",
            metavar="DURATION",
            help="new duration from its start, e.g. 30m, 2h, 1d",
            show_default="unchanged",
        ),
    ] = None,
    timeout: AnswerTimeout = 15.0,
    as_json: Json = False,
    broker: Broker = None,
    topic_prefix: Prefix = None,
    speed: Speed = None,
) -> None:
    """Change a request in flight (power, duration or both) and print the answer. A running
    request keeps its books; refused new terms leave the old ones standing."""
    from broker.models import DispatchAmend
    from v2g import operator

    if power is None and duration is None:
        raise typer.BadParameter("give --power, --duration or both", param_hint="--power")
    settings = settings_from(broker_url=broker, topic_prefix=topic_prefix, speed=speed)
    change = DispatchAmend(
        power_kw=power,
        duration_s=None if duration is None else parse_duration(duration, "--duration"),
    )
    answer = run(operator.amend(settings, request_id, change, timeout_s=timeout))
    print_answer(answer, as_json, result_line)


def status(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing each new status")
    ] = False,
    every_s: Every = 0.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print each FleetStatus as one JSON object per line")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="wait this many wall seconds for a retained status")
    ] = 5.0,
    broker: Broker = None,
    topic_prefix: Prefix = None,
    speed: Speed = None,
) -> None:
    """Print the fleet status (retained on v2g/fleet/status); --follow keeps going.
    capability_15min is the fleet net kW range (- export, + import) it can hold for the
    next 15 minutes."""
    from v2g import operator

    settings = settings_from(broker_url=broker, topic_prefix=topic_prefix, speed=speed)
    due = every(every_s)

    def show(s: FleetStatus) -> None:
        if not due(to_epoch(s.ts)):
            return
        if as_json:
            typer.echo(s.model_dump_json())
            return
        for line in status_lines(s):
            typer.echo(line)

    seen = run(operator.follow_status(settings, follow=follow, timeout_s=timeout, on_status=show))
    if not seen and not follow:
        fail(
            f"no fleet status on {settings.topics.fleet_status} within {timeout:.0f} s; is the aggregator running?",
            1,
        )


def capability(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="print the Capability and FleetForecast, one JSON object per line"
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="wait this many wall seconds for the retained messages")
    ] = 5.0,
    broker: Broker = None,
    topic_prefix: Prefix = None,
) -> None:
    """Print what the fleet can offer: the capability envelope (fleet net kW it can hold
    for 15 min to 4 h from now) and the availability forecast for the next 24 hourly
    periods with its confidence (retained on v2g/fleet/capability and v2g/fleet/forecast)."""
    from v2g import operator

    settings = settings_from(broker_url=broker, topic_prefix=topic_prefix)
    cap, forecast = run(operator.read_capability(settings, timeout_s=timeout))
    if cap is None and forecast is None:
        fail(
            f"nothing retained on {settings.topics.fleet_capability} or"
            f" {settings.topics.fleet_forecast} within {timeout:.0f} s; is the aggregator running?",
            1,
        )
    if as_json:
        for msg in (cap, forecast):
            if msg is not None:
                typer.echo(msg.model_dump_json())
        return
    if cap is not None:
        for line in capability_lines(cap):
            typer.echo(line)
    if forecast is None:
        typer.echo("no forecast yet (the aggregator publishes one every 15 simulated minutes)")
        return
    for line in forecast_lines(forecast):
        typer.echo(line)


LEDGER_PAGE = 10_000  # entries per read of a request's books: bounded memory per reply


def report(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="directory for report.csv and report.png", show_default="none: no files"
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=1.0, help="seconds of platform time per row")
    ] = 300.0,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="draw report.png")] = True,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print one JSON object per row, then one with the totals and drivers left short",
        ),
    ] = False,
    redis: Redis = None,
    topic_prefix: Prefix = None,
    redis_prefix: RedisPrefix = None,
) -> None:
    """A request's settlement from its ledger in Redis: requested vs baseline vs delivered
    per interval as a table, report.csv and report.png, with the totals, the error, the
    score, and any driver left short; vehicles.csv has each vehicle's metered and
    baseline kWh over the request. A firming request adds its node's energy outside the
    band and ramp violations per settlement interval, with the fleet and on plain
    charging (with --json, one {"firming": ...} object per interval before the totals)."""
    from v2g import compose
    from v2g import report as rep
    from v2g.progress import bar

    settings = settings_from(redis_url=redis, topic_prefix=topic_prefix, redis_prefix=redis_prefix)

    async def read() -> list[dict[str, str]]:
        ledger = compose.redis_ledger(settings)
        try:
            # A large ledger (a day of steps at 100k vehicles) is read in pages under a
            # bar on a terminal; the bar is sized once the first page says how many.
            with bar(f"reading the books of {request_id}", None) as at:
                return await ledger.read(request_id, page=LEDGER_PAGE, on_page=at)
        finally:
            await ledger.close()

    entries = run(read())
    if not entries:
        fail(
            f"no ledger for request {request_id!r} in Redis at {settings.redis_url}"
            f" (key {settings.redis_prefix}:ledger:{request_id}); check the id, --redis and"
            " --topic-prefix / --redis-prefix",
            1,
        )
    r = rep.parse(request_id, entries)
    rows = rep.intervals(r, interval)
    if as_json:  # times as the table prints them, ISO 8601 UTC
        for row in rows:
            fields = dataclasses.asdict(row)
            typer.echo(json.dumps({**fields, "start": rep.iso(row.start), "end": rep.iso(row.end)}))
        for f in r.firming:  # a firming request's settlement intervals
            fields = {**dataclasses.asdict(f), "start": rep.iso(f.start), "end": rep.iso(f.end)}
            typer.echo(json.dumps({"firming": fields}))
        typer.echo(json.dumps({"totals": rep.summary(r), "short": list(r.vehicles.short)}))
        return
    for line in rep.table(r, rows):
        typer.echo(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rep.write_csv(rows, out / "report.csv")
        rep.write_vehicles_csv(r.vehicles, out / "vehicles.csv")
        written = [str(out / "report.csv"), str(out / "vehicles.csv")]
        if plot:
            rep.plot(r, out / "report.png")
            written.append(str(out / "report.png"))
        typer.echo("written " + ", ".join(written))


def reset(
    topic_prefix: Annotated[
        str,
        typer.Option("--topic-prefix", help="the deployment to remove: its topics are PREFIX/..."),
    ],
    redis_prefix: RedisPrefix = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    broker: Broker = None,
    redis: Redis = None,
    as_json: Json = False,
) -> None:
    """Remove a deployment's retained topics (PREFIX/...) and its Redis keys (REDIS_PREFIX:...),
    after a confirmation; prints what it removed (with --json, one object at the end:
    topics, keys, removed). Stop the deployment's processes first: a running aggregator
    publishes its retained status again at its next step."""
    from v2g import reset as rs

    settings = settings_from(
        broker_url=broker, redis_url=redis, topic_prefix=topic_prefix, redis_prefix=redis_prefix
    )
    where = (
        f"topics {settings.topic_prefix}/# on {without_password(settings.broker_url)} and Redis"
        f" keys {settings.redis_prefix}:* on {without_password(settings.redis_url)}"
    )
    found = run(rs.find(settings))

    def answer(removed: bool) -> None:
        typer.echo(json.dumps({"topics": found.topics, "keys": found.keys, "removed": removed}))

    if not found:
        if as_json:
            answer(False)
        else:
            typer.echo(f"nothing to remove: no retained {where}")
        return
    if not as_json:
        for topic in found.topics:
            typer.echo(f"retained  {topic}")
        for key in found.keys:
            typer.echo(f"redis key {key}")
    if found.live:
        typer.echo(
            f"warning: {found.live} live messages under {settings.topic_prefix}/ while looking:"
            " the deployment still runs, and will publish its retained topics again",
            err=True,
        )
    what = f"{len(found.topics)} retained topics and {len(found.keys)} Redis keys"
    if not yes:
        if not sys.stdin.isatty():
            fail(f"not removing {what} without a confirmation: no terminal to ask on; pass --yes")
        if not typer.confirm(f"remove these {what}?", default=False):
            fail("nothing removed", 1)
    run(rs.remove(settings, found))
    if as_json:
        answer(True)
    else:
        typer.echo(f"removed {what} ({where})")
