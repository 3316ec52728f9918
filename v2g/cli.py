"""The ``v2g`` command line. ``v2g --help`` lists the commands, ``v2g CMD --help`` their flags.

Every command reads its settings from flags, then ``V2G_*`` environment variables, then
defaults (DESIGN.md, "Configuration").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, cast

import structlog
import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from broker.clocklink import SharedClock, shared_clock
from broker.models import (
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    FleetStatus,
    Service,
    from_epoch,
    to_epoch,
)
from broker.settings import Settings, check_broker_url, check_redis_url, without_password
from core.errors import V2GError
from v2g import logs, units

# typer exports BadParameter but not its base, click's UsageError (of whichever copy of
# click this typer carries); every attribute used below is UsageError's own.
_UsageError = cast("type[typer.BadParameter]", typer.BadParameter.__mro__[1])


class _OneLineErrors(TyperGroup):
    """The ``v2g`` group: a bad flag is one line, what was wrong and where the flags are
    listed, instead of click's usage block around it."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except _UsageError as err:
            if err.ctx is None or type(err).__name__ == "NoArgsIsHelpError":
                err.show()  # the help page itself (no command given), or a bare message
            else:
                typer.echo(
                    f"error: {err.format_message()} (see {err.ctx.command_path} --help)",
                    err=True,
                )
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help=(
        "V2G fleet aggregation: simulated EVs, an aggregator and a dispatcher over MQTT.\n\n"
        "Sign convention: power_kw > 0 charges the vehicles (grid import), < 0 discharges"
        " them into the grid (export)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def parse_duration(text: str | float, flag: str | None = None) -> float:
    """'900', '900s', '15m', '1.5h', '1d' -> seconds, as scenario files write them; a bad
    one is a usage error of ``flag``."""
    if isinstance(text, int | float):  # a default typer hands through the parser as is
        return float(text)
    try:
        return units.seconds(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=flag) from None


def every(seconds: float) -> Callable[[float], bool]:
    """A filter that passes a message stamped ``ts`` (platform epoch s) when ``seconds``
    have gone by since the last one it passed; 0 passes every one."""
    last = -math.inf

    def due(ts: float) -> bool:
        nonlocal last
        if ts - last < seconds:
            return False
        last = ts
        return True

    return due


# The flag that sets each Settings field, for errors that name what the user typed.
FLAG_OF: dict[str, str] = {}


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """A typer parser from a ``ValueError``-raising check: a bad value is a usage error."""

    def parse(text: str) -> str:
        try:
            return check(text)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None

    return parse


def setting_option(
    flag: str,
    field: str,
    help: str,
    *,
    metavar: str,
    parser: Callable[[str], Any] | None = None,
    default: str | None = None,
) -> Any:
    """A flag for ``Settings.<field>``. Its help shows the V2G_* variable and the default,
    both taken from Settings so neither can drift from what the process does; typer reads
    the variable too, so a bad value in it is named like a bad flag."""
    FLAG_OF[field] = flag
    if default is None:
        value = Settings.model_fields[field].default
        default = "none" if value is None else str(value)
    return typer.Option(
        flag,
        help=help,
        envvar=f"V2G_{field.upper()}",
        show_envvar=True,
        show_default=default,
        metavar=metavar,
        parser=parser,
    )


def _url_option(flag: str, check: Callable[[str], str], help: str, shown_default: str) -> Any:
    """A URL flag that is not a setting (no V2G_* variable): checked as the setting is."""
    return typer.Option(
        flag, help=help, metavar="URL", parser=_checked(check), show_default=shown_default
    )


Broker = Annotated[
    str | None,
    setting_option(
        "--broker",
        "broker_url",
        "MQTT broker URL",
        metavar="URL",
        parser=_checked(check_broker_url),
    ),
]
Redis = Annotated[
    str | None,
    setting_option(
        "--redis", "redis_url", "Redis URL", metavar="URL", parser=_checked(check_redis_url)
    ),
]
Prefix = Annotated[
    str | None, setting_option("--topic-prefix", "topic_prefix", "topic prefix", metavar="PREFIX")
]
RedisPrefix = Annotated[
    str | None,
    setting_option(
        "--redis-prefix",
        "redis_prefix",
        "Redis keys go under PREFIX:",
        metavar="PREFIX",
        default="the topic prefix",
    ),
]
ClientId = Annotated[
    str | None,
    setting_option(
        "--client-id",
        "client_id",
        "MQTT client id of the main connection; each process needs its own",
        metavar="ID",
        default="TOPIC_PREFIX-aggregator",
    ),
]
Speed = Annotated[
    float | None,
    setting_option(
        "--speed",
        "speed",
        "simulated seconds per wall second, the same for every process",
        metavar="X",
    ),
]
SimStart = Annotated[
    str | None,
    setting_option(
        "--sim-start",
        "sim_start",
        "simulated time the clock starts at, ISO 8601 or epoch s",
        metavar="TIME",
        default="the fleet's on the bus, else now",
    ),
]
LogFormat = Annotated[
    str | None, setting_option("--log-format", "log_format", "kv (logfmt) or json", metavar="FMT")
]
ColdStart = Annotated[
    bool,
    typer.Option(
        "--cold-start",
        help="start every plugged-in car at its arrival energy, as if it had just plugged in"
        " (default: with what its baseline charging since arrival put in it)",
    ),
]
AnswerTimeout = Annotated[
    float, typer.Option(min=0.1, help="wait this many wall seconds for the answer")
]
Json = Annotated[bool, typer.Option("--json", help="print each answer as one JSON object per line")]
Every = Annotated[
    float,
    typer.Option(
        "--every",
        parser=parse_duration,
        metavar="SECONDS",
        help="print at most one line per this much platform time (e.g. 60, 5m); 0: every one",
    ),
]


def _examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (``\\b`` stops rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("v2g-fleet")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (run from a source tree that is not installed: pip install -e .)"
        typer.echo(f"v2g {version}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    pass


def _settings(**overrides: Any) -> Settings:
    """Flags win over V2G_* variables, which win over defaults."""
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
        msg = str(first["msg"]).removeprefix("Value error, ")
        _fail(f"{flag} (or V2G_{name.upper()}): {msg}")
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


async def _read_clock(settings: Settings) -> SharedClock:
    """The fleet's platform clock, read once (a command that publishes no anchor)."""
    async with shared_clock(settings, create=False) as shared:
        return shared


def _run(coro: Any, process: str | None = None) -> Any:
    """Run ``coro`` to its end; our own errors end the command with one line. A
    ``process`` (a long-running service) also stops cleanly on SIGTERM as on Ctrl-C, and
    logs one ``process_stopped`` line saying why: signal, error or end."""
    stop: list[str] = []
    error: str | None = None
    try:
        return asyncio.run(_until_signal(coro, stop) if process else coro)
    except KeyboardInterrupt:
        stop.append("SIGINT")
        return None
    except V2GError as err:
        error = str(err)
        _fail(error, 1)
    except ExceptionGroup as group:  # from a TaskGroup: report our own errors plainly
        error = str(_first_leaf(group))
        ours = group.subgroup(V2GError)
        if ours is None:
            raise
        _fail(str(_first_leaf(ours)), 1)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if process is not None:
            log = logs.lifecycle()
            if error is not None:
                log.error("process_stopped", process=process, reason="error", error=error)
            elif stop:
                log.info("process_stopped", process=process, reason="signal", signal=stop[0])
            else:
                log.info("process_stopped", process=process, reason="end")


async def _until_signal(coro: Coroutine[Any, Any, Any], stop: list[str]) -> Any:
    """Await ``coro``; SIGINT or SIGTERM cancels it, so its cleanup runs (offline status,
    closed connections), and records which signal in ``stop``."""
    loop = asyncio.get_running_loop()
    task: asyncio.Task[Any] = asyncio.ensure_future(coro)

    def on_signal(sig: signal.Signals) -> None:
        stop.append(sig.name)
        task.cancel()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if stop:
            return None
        raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _first_leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


def is_relative(text: str) -> bool:
    """True for a start like '+10m', counted from the platform clock's now."""
    return text.strip().startswith("+")


def parse_start(text: str, *, now: float | None = None) -> datetime:
    """An ISO 8601 time with a zone ('2026-11-26T18:00:00Z'), or '+10m' from ``now``, the
    platform clock's time (simulated when the clock is accelerated), never the wall's."""
    if is_relative(text):
        if now is None:
            raise ValueError("a relative start needs the platform clock's time")
        return from_epoch(round(now)) + timedelta(seconds=parse_duration(text.strip()[1:]))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time; use ISO 8601 with a zone or +15m"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no time zone; add Z or +00:00")
    return moment


@app.command()
def demo(
    count: Annotated[int, typer.Option(min=1, max=2000, help="vehicles in the fleet")] = 200,
    seed: Annotated[int, typer.Option(help="fleet seed: the same seed, the same fleet")] = 1,
    speed: Annotated[float, typer.Option(min=1.0, help="clock acceleration")] = 30.0,
    minutes: Annotated[
        float, typer.Option(min=1.0, help="simulated length of each request")
    ] = 10.0,
    mode: Annotated[
        str, typer.Option(help="per-vehicle or multiplexed connections")
    ] = "multiplexed",
    interval: Annotated[
        float, typer.Option(min=1.0, help="telemetry and control step, simulated s")
    ] = 15.0,
    broker: Annotated[
        str | None,
        _url_option(
            "--broker", check_broker_url, "use this broker instead of the embedded one", "embedded"
        ),
    ] = None,
    redis: Annotated[
        str | None,
        _url_option(
            "--redis", check_redis_url, "persist to this Redis instead of memory", "in memory"
        ),
    ] = None,
    cold_start: ColdStart = False,
    topic_prefix: Annotated[
        str | None,
        setting_option(
            "--topic-prefix",
            "topic_prefix",
            "topic prefix",
            metavar="PREFIX",
            default="v2g-demo-RANDOM",
        ),
    ] = None,
    log_format: LogFormat = None,
) -> None:
    """Run the whole loop on embedded defaults (no servers needed) and print a summary."""
    from v2g.demo import run_demo

    if mode not in ("per-vehicle", "multiplexed"):
        raise typer.BadParameter("mode must be per-vehicle or multiplexed", param_hint="--mode")
    settings = _settings(
        broker_url=broker,
        redis_url=redis,
        topic_prefix=topic_prefix or f"v2g-demo-{uuid.uuid4().hex[:6]}",
        speed=speed,
        log_format=log_format,
        log_level="warning",
        status_every_wall_s=3600.0,
        # The embedded broker moves ~2k msg/s: report and steer every 15 simulated s.
        telemetry_interval_s=interval,
        control_step_s=interval,
    )
    _run(
        run_demo(
            settings,
            count=count,
            seed=seed,
            request_minutes=minutes,
            use_broker=broker is not None,
            use_redis=redis is not None,
            mode=mode,  # type: ignore[arg-type]
            warm_start=not cold_start,
        ),
        process="demo",
    )


@app.command("broker")
def broker_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
) -> None:
    """Run the embedded development broker (amqtt). Use Mosquitto in production."""
    from broker.embedded import EmbeddedBroker

    logs.configure()
    log = structlog.get_logger("broker")

    async def serve() -> None:
        async with EmbeddedBroker(host=host, port=port) as b:
            log.info("broker_listening", url=b.url, note="development broker; Ctrl-C stops it")
            await asyncio.Event().wait()

    _run(serve(), process="broker")


@app.command()
def aggregator(
    broker: Broker = None,
    redis: Redis = None,
    topic_prefix: Prefix = None,
    redis_prefix: RedisPrefix = None,
    client_id: ClientId = None,
    speed: Speed = None,
    sim_start: SimStart = None,
    memory: Annotated[
        bool, typer.Option("--memory", help="keep state in memory, not Redis")
    ] = False,
    share_group: Annotated[
        str | None,
        setting_option(
            "--share-group",
            "share_group",
            "run as one of several aggregators on an MQTT 5 shared subscription"
            " ($share/GROUP/...), sharing state through Redis, one leading by a Redis lease",
            metavar="GROUP",
            default="none: one aggregator",
        ),
    ] = None,
    lease_ttl: Annotated[
        float | None,
        setting_option("--lease-ttl", "lease_ttl_s", "leader lease, wall seconds", metavar="S"),
    ] = None,
    fast_ingest: Annotated[
        bool,
        typer.Option(
            "--fast-ingest/--no-fast-ingest",
            help="receive telemetry on a second, lean MQTT connection (broker/fastlink.py):"
            " ~10x the general client's ingest",
        ),
    ] = True,
    fast_setpoints: Annotated[
        bool,
        typer.Option(
            "--fast-setpoints/--no-fast-setpoints",
            help="send setpoints on a second, lean publish-only MQTT connection"
            " (broker/fastpub.py): ~20x the QoS 1 rate of the general client",
        ),
    ] = True,
    log_format: LogFormat = None,
) -> None:
    """Run the aggregator: fleet state, capability, dispatch and fleet status."""
    from aggregator.ledger import Ledger, MemoryLedger, RedisLedger
    from aggregator.service import AggregatorService
    from aggregator.store import MemoryStore, RedisStore, StateStore

    settings = _settings(
        broker_url=broker,
        redis_url=redis,
        topic_prefix=topic_prefix,
        redis_prefix=redis_prefix,
        client_id=client_id,
        speed=speed,
        sim_start=sim_start,
        log_format=log_format,
        share_group=share_group,
        lease_ttl_s=lease_ttl,
    )
    if memory and settings.share_group:
        _fail("--share-group shares fleet state through Redis: drop --memory")
    store: StateStore = (
        MemoryStore() if memory else RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    )
    ledger: Ledger = (
        MemoryLedger()
        if memory
        else RedisLedger(
            settings.redis_url,
            prefix=settings.redis_prefix,
            rejected_ttl_s=settings.rejected_ledger_ttl_s,
        )
    )
    # The client id comes from the settings (broker/clientid.py): {prefix}-aggregator,
    # per process in a share group, or --client-id / V2G_CLIENT_ID.

    async def main() -> None:
        async with shared_clock(settings) as shared:
            service = AggregatorService(
                settings=shared.settings,
                clock=shared.clock,
                store=store,
                ledger=ledger,
                fast_ingest=fast_ingest,
                fast_setpoints=fast_setpoints,
            )
            structlog.get_logger("aggregator").info(
                "aggregator_starting",
                broker=without_password(settings.broker_url),
                store="memory" if memory else without_password(settings.redis_url),
                prefix=settings.topic_prefix,
                speed=shared.settings.speed,
            )
            await service.run()

    _run(main(), process="aggregator")


@app.command()
def agents(
    count: Annotated[int, typer.Option(min=1, help="vehicles to simulate")] = 50,
    seed: Annotated[int, typer.Option(help="fleet seed")] = 1,
    mode: Annotated[
        str, typer.Option(help="per-vehicle (one connection each) or multiplexed")
    ] = "per-vehicle",
    connections: Annotated[int, typer.Option(min=1, help="connections in multiplexed mode")] = 4,
    id_prefix: Annotated[str, typer.Option(help="vehicle ids are PREFIX-0000, ...")] = "ev",
    misbehave: Annotated[
        str,
        typer.Option(
            help=(
                "fault injection: shares of the fleet that misbehave, e.g."
                " partial=0.2,lag=0.2,early=0.1,skew=0.05. partial: draw only 30-80% of"
                " the setpoint; lag: ramp over 1-5 s; early: unplug 10 min-2 h before the"
                " announced departure; skew: clock 30-300 s ahead or behind, or stopped."
                " Seeded by --seed"
            ),
            show_default="none",
        ),
    ] = "",
    batch: Annotated[
        bool,
        typer.Option(
            "--batch",
            help="with --mode multiplexed: each connection is a bridge that sends its"
            " vehicles' telemetry as one batch per interval (v2g/bridges/ID/telemetry) and"
            " takes their setpoints in batches",
        ),
    ] = False,
    cold_start: ColdStart = False,
    protocol: Annotated[
        str,
        typer.Option(
            help="mqtt: vehicles on the platform's contract; ocpp: charging stations, each"
            " with its car, that connect to a CSMS (--url) over OCPP 2.1 / 2.0.1"
        ),
    ] = "mqtt",
    url: Annotated[
        str, typer.Option(help="with --protocol ocpp: the CSMS; stations connect to URL/ID")
    ] = "ws://127.0.0.1:9000",
    mix: Annotated[
        str,
        typer.Option(
            help="with --protocol ocpp: shares of 2.1 with BPT, 2.1 without, and 2.0.1"
            " stations, e.g. v21bpt=0.6,v21=0.2,v201=0.2"
        ),
    ] = "v21bpt=1",
    password: Annotated[
        str | None,
        typer.Option(
            envvar="V2G_OCPP_PASSWORD",
            help="with --protocol ocpp: HTTP Basic password of every station (user: its id)",
            show_default="none",
        ),
    ] = None,
    broker: Broker = None,
    topic_prefix: Prefix = None,
    speed: Speed = None,
    sim_start: SimStart = None,
    log_format: LogFormat = None,
) -> None:
    """Run N simulated vehicles that report telemetry and follow setpoints. A car plugged in
    at the start holds what plain charging since its arrival put in it (--cold-start: its
    arrival energy, as if it had just plugged in). With --protocol ocpp: N charging
    stations with their cars, every car plugged in at the start (--cold-start: on their
    daily patterns instead), against the CSMS at --url."""
    if protocol not in ("mqtt", "ocpp"):
        raise typer.BadParameter("protocol must be mqtt or ocpp", param_hint="--protocol")
    if protocol == "ocpp":
        _ocpp_agents(count, seed, id_prefix, cold_start, url, mix, password, log_format)
        return
    from agents.faults import Misbehaviour, parse_fractions
    from agents.fleet import SimFleet
    from agents.profiles import generate_fleet
    from agents.runtime import AgentRuntime

    if mode not in ("per-vehicle", "multiplexed"):
        raise typer.BadParameter("mode must be per-vehicle or multiplexed", param_hint="--mode")
    if batch and mode != "multiplexed":
        raise typer.BadParameter(
            "batched telemetry needs --mode multiplexed (a bridge per connection)",
            param_hint="--batch",
        )
    try:
        faults = Misbehaviour.random(count, seed, **parse_fractions(misbehave))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--misbehave") from None
    settings = _settings(
        broker_url=broker,
        topic_prefix=topic_prefix,
        speed=speed,
        sim_start=sim_start,
        log_format=log_format,
    )

    async def main() -> None:
        async with shared_clock(settings) as shared:
            fleet = SimFleet(
                generate_fleet(count, seed, id_prefix=id_prefix),
                shared.clock.now(),
                step_s=settings.telemetry_interval_s,
                faults=faults,
                warm_start=not cold_start,
            )
            runtime = AgentRuntime(
                settings=shared.settings,
                clock=shared.clock,
                fleet=fleet,
                mode=mode,  # type: ignore[arg-type]
                connections=connections,
                batch=batch,
            )
            await runtime.run()

    _run(main(), process="agents")


def _ocpp_agents(
    count: int,
    seed: int,
    id_prefix: str,
    daily: bool,
    url: str,
    mix: str,
    password: str | None,
    log_format: str | None,
) -> None:
    """``v2g agents --protocol ocpp`` (its work is in v2g/ocpp_agents.py)."""
    from agents.ocpp_model import parse_mix
    from v2g.ocpp_agents import check_url, run_stations

    try:
        parse_mix(mix)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--mix") from None
    try:
        check_url(url)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--url") from None
    settings = _settings(log_format=log_format)
    _run(
        run_stations(
            url=url,
            count=count,
            seed=seed,
            mix=mix,
            password=password,
            id_prefix=id_prefix,
            daily=daily,
            telemetry_interval_s=settings.telemetry_interval_s,
            summary_every_wall_s=settings.summary_every_wall_s,
        ),
        process="agents",
    )


@app.command(
    "dispatch",
    epilog=_examples(
        "v2g dispatch --power -500 --duration 15m --wait --every 60",
        "v2g dispatch --power 200 --start +30m --duration 1h --id evening-1",
        "v2g dispatch --service frequency_regulation --capacity 300 --duration 1d --json",
    ),
)
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

    settings = _settings(
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
        shared = _run(_read_clock(settings))
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
        )
    except ValidationError as err:
        _fail(f"invalid request: {err.errors()[0]['msg']}")
    if wait:
        lead = 0.0 if req.start is None or now is None else max(0.0, to_epoch(req.start) - now)
        timeout = max(timeout, (lead + seconds) / settings.speed + 60.0)

    def on_result(r: DispatchResult) -> None:
        typer.echo(r.model_dump_json() if as_json else _result_line(r))

    due = every(every_s)

    def on_progress(p: DispatchProgress) -> None:
        if not due(to_epoch(p.ts)):
            return
        if as_json:
            typer.echo(p.model_dump_json())
            return
        typer.echo(
            f"  {p.ts:%H:%M:%S} requested {p.requested_kw:+.1f} kW delivered {p.delivered_kw:+.1f} kW"
            f" | {p.delivered_kwh:+.2f}/{p.requested_kwh:+.2f} kWh | {p.remaining_s:.0f} s left"
            + ("" if p.score is None else f" | score {p.score:.3f}")
        )

    result = _run(
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


def _result_line(r: DispatchResult) -> str:
    line = f"{r.request_id} {r.status}: allocated {r.allocated_kw:+.1f} kW, shortfall {r.shortfall_kw:.1f} kW, {r.vehicles} vehicles"
    if r.delivered_kwh is not None:
        line += (
            f", delivered {r.delivered_kwh:+.2f} kWh of {r.requested_kwh or 0:+.2f} kWh requested"
        )
    if r.reason:
        line += f" ({r.reason})"
    return line


@app.command("cancel")
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

    settings = _settings(broker_url=broker, topic_prefix=topic_prefix)
    answer = _run(operator.cancel(settings, request_id, timeout_s=timeout))
    _print_answer(answer, as_json, _cancel_line)


def _cancel_line(r: DispatchResult) -> str:
    line = f"{r.request_id} {r.status}"
    if r.delivered_kwh is not None:
        line += (
            f": delivered {r.delivered_kwh:+.2f} kWh of {r.requested_kwh or 0:+.2f} kWh requested"
        )
    if r.reason:
        line += f" ({r.reason})"
    return line


def _print_answer(
    answer: DispatchResult | None, as_json: bool, line: Callable[[DispatchResult], str]
) -> None:
    """Print the aggregator's answer to a cancel or an amendment, as one JSON object or
    ``line``; exit 1 when it was refused (or the wait was interrupted)."""
    if answer is None:  # interrupted
        raise typer.Exit(1)
    typer.echo(answer.model_dump_json(exclude_none=True) if as_json else line(answer))
    if answer.status == "rejected":
        raise typer.Exit(1)


@app.command()
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
    settings = _settings(broker_url=broker, topic_prefix=topic_prefix, speed=speed)
    change = DispatchAmend(
        power_kw=power,
        duration_s=None if duration is None else parse_duration(duration, "--duration"),
    )
    answer = _run(operator.amend(settings, request_id, change, timeout_s=timeout))
    _print_answer(answer, as_json, _result_line)


@app.command(
    epilog=_examples(
        "v2g status",
        "v2g status --follow --every 5m",
        "v2g status --json --topic-prefix my-fleet",
    )
)
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

    settings = _settings(broker_url=broker, topic_prefix=topic_prefix, speed=speed)
    due = every(every_s)

    def show(s: FleetStatus) -> None:
        if not due(to_epoch(s.ts)):
            return
        if as_json:
            typer.echo(s.model_dump_json())
            return
        cap = (
            f" capability_15min={s.capability.min_power_kw:+.0f}..{s.capability.max_power_kw:+.0f}kW"
            if s.capability
            else ""
        )
        line = (
            f"{s.ts:%Y-%m-%dT%H:%M:%SZ} online={s.vehicles_online} plugged={s.vehicles_plugged_in}"
            f" energy={s.energy_kwh:.1f}kWh power={s.power_kw:+.1f}kW{cap}"
        )
        for d in s.dispatches:
            line += f" [{d.request_id} req={d.requested_kw:+.0f} got={d.delivered_kw:+.0f}kW]"
        typer.echo(line)
        for w in s.warnings:
            typer.echo(f"  warning: {w}")

    seen = _run(operator.follow_status(settings, follow=follow, timeout_s=timeout, on_status=show))
    if not seen and not follow:
        _fail(
            f"no fleet status on {settings.topics.fleet_status} within {timeout:.0f} s; is the aggregator running?",
            1,
        )


@app.command(
    epilog=_examples("v2g capability", "v2g capability --json --broker mqtt://127.0.0.1:1883")
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

    settings = _settings(broker_url=broker, topic_prefix=topic_prefix)
    cap, forecast = _run(operator.read_capability(settings, timeout_s=timeout))
    if cap is None and forecast is None:
        _fail(
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
        typer.echo(
            f"capability at {cap.ts:%Y-%m-%dT%H:%M:%SZ} ({cap.vehicles} vehicles; - export, + import)"
        )
        typer.echo(f"  {'hold for':>9}  {'min kW':>10}  {'max kW':>10}")
        for w in cap.windows:
            typer.echo(
                f"  {w.duration_s / 60:>6.0f} min  {w.min_power_kw:>+10.1f}  {w.max_power_kw:>+10.1f}"
            )
    if forecast is None:
        typer.echo("no forecast yet (the aggregator publishes one every 15 simulated minutes)")
        return
    typer.echo(
        f"forecast at {forecast.ts:%Y-%m-%dT%H:%M:%SZ} (confidence 0: no history for that hour yet)"
    )
    typer.echo(
        f"  {'period (UTC)':<17}  {'min kW':>10}  {'max kW':>10}  {'confidence':>10}  {'samples':>7}"
    )
    for p in forecast.periods:
        typer.echo(
            f"  {p.start:%Y-%m-%d %H:%M}  {p.min_power_kw:>+10.1f}  {p.max_power_kw:>+10.1f}"
            f"  {p.confidence:>10.2f}  {p.samples:>7d}"
        )


@app.command(
    epilog=_examples(
        "v2g report evening-1",
        "v2g report evening-1 --interval 60 --out reports/evening-1",
        "v2g report evening-1 --json --redis redis://127.0.0.1:6379/0",
    )
)
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
    baseline kWh over the request."""
    from aggregator.ledger import RedisLedger
    from v2g import report as rep

    settings = _settings(redis_url=redis, topic_prefix=topic_prefix, redis_prefix=redis_prefix)

    async def read() -> list[dict[str, str]]:
        ledger = RedisLedger(settings.redis_url, prefix=settings.redis_prefix)
        try:
            return await ledger.read(request_id)
        finally:
            await ledger.close()

    entries = _run(read())
    if not entries:
        _fail(
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


@app.command()
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

    settings = _settings(
        broker_url=broker, redis_url=redis, topic_prefix=topic_prefix, redis_prefix=redis_prefix
    )
    where = (
        f"topics {settings.topic_prefix}/# on {without_password(settings.broker_url)} and Redis"
        f" keys {settings.redis_prefix}:* on {without_password(settings.redis_url)}"
    )
    found = _run(rs.find(settings))

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
            _fail(f"not removing {what} without a confirmation: no terminal to ask on; pass --yes")
        if not typer.confirm(f"remove these {what}?", default=False):
            _fail("nothing removed", 1)
    _run(rs.remove(settings, found))
    if as_json:
        answer(True)
    else:
        typer.echo(f"removed {what} ({where})")


@app.command()
def provision(
    out: Annotated[
        Path, typer.Option("--out", help="directory for passwd, credentials.json and certs/")
    ],
    vehicles: Annotated[
        str | None,
        typer.Option(help="comma-separated vehicle ids, e.g. ev-0000,ev-0001", show_default="none"),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            min=0, help="or: this many vehicles, named PREFIX-0000...", show_default="none"
        ),
    ] = None,
    id_prefix: Annotated[str, typer.Option(help="vehicle id prefix for --count")] = "ev",
    operator: Annotated[
        str, typer.Option(help="operator username ('' for none); the ACL grants 'operator'")
    ] = "operator",
    aggregator: Annotated[
        str, typer.Option(help="aggregator username ('' for none); the ACL grants 'aggregator'")
    ] = "aggregator",
    certs: Annotated[
        bool, typer.Option("--certs", help="also a throwaway CA, server and client certificates")
    ] = False,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="new passwords for users that already have one")
    ] = False,
    broker: Annotated[
        str | None,
        _url_option(
            "--broker",
            check_broker_url,
            "URL printed for clients",
            "mqtts://127.0.0.1:8883 with --certs, else mqtt://127.0.0.1:1883",
        ),
    ] = None,
) -> None:
    """Create broker logins: DIR/passwd (mosquitto_passwd), DIR/credentials.json (0600), and
    with --certs DIR/certs/. Prints each vehicle's V2G_* connection settings. Vehicle
    usernames are their vehicle ids, as the ACL's %u patterns require."""
    from v2g import provision as prov

    try:
        ids = prov.vehicle_ids(vehicles, count, id_prefix)
        done = prov.provision(
            out,
            ids,
            aggregator=aggregator or None,
            operator=operator or None,
            certs=certs,
            rotate=rotate,
        )
    except (prov.ProvisionError, ValueError) as err:
        raise _fail(str(err), 1) from None
    url = broker or ("mqtts://127.0.0.1:8883" if certs else "mqtt://127.0.0.1:1883")
    for cred in done.all:
        typer.echo(f"# {cred.username} ({cred.role})")
        for line in prov.env_lines(cred, url, done.certs):
            typer.echo(line)
        typer.echo("")
    typer.echo(
        f"# {len(done.created)} created, {len(done.kept)} kept; password file {done.passwd_file},"
        f" credentials {done.credentials_file} (0600)",
        err=True,
    )


@app.command()
def simulate(
    scenario: Annotated[
        Path,
        typer.Argument(
            metavar="SCENARIO",
            help="scenario YAML file (see scenarios/): fleet, start, duration, step_s, requests, regulation",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="output directory (default: sim-out/NAME, NAME from the scenario)"
        ),
    ] = None,
    vehicles: Annotated[
        int | None,
        typer.Option(
            "--vehicles",
            min=1,
            help="fleet size instead of the scenario's; request powers and regulation"
            " capacity scale with it",
            show_default="the scenario's",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", help="fleet seed instead of the scenario's", show_default="the scenario's"
        ),
    ] = None,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="draw plot.png (matplotlib)")
    ] = True,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="show a progress bar on stderr")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="end with the summary as one JSON object")
    ] = False,
) -> None:
    """Run a scenario headless: the same vehicle physics, driver profiles and dispatcher as
    the live platform, on a discrete simulated clock, as fast as the CPU allows (no MQTT,
    no Redis).

    Writes to the output directory: intervals.csv (per step: fleet, baseline, requested and
    delivered kW, plugged-in count, energy), requests.csv (requested vs delivered kWh and
    status of each request), vehicles.csv (energy cycled per vehicle, fleets up to 100,000),
    summary.json (drivers left short, Jain's fairness index of energy cycled, speed),
    Parquet copies when pyarrow is installed, and plot.png. Ends with a one-line summary.

    A scenario gives fleet (vehicles, seed, mix of home/workplace/depot), start (ISO time
    with zone), duration and step_s (e.g. 900, 15m, 4h), requests (id, service, power_kw:
    fleet net kW, + charges, - discharges; start: ISO time or +offset; duration) and
    optionally regulation (capacity_kw, start, duration, signal: regd or a CSV path),
    followed as one request per step at baseline + value * capacity_kw. A bad scenario is
    reported field by field.

    Example: v2g simulate scenarios/residential-evening-peak.yaml --vehicles 100000
    """
    from v2g import simulate as sim
    from v2g.scenario import ScenarioError, load_scenario

    logs.configure(level="warning")
    try:
        scen = load_scenario(scenario).with_overrides(vehicles=vehicles, seed=seed)
        out_dir = out or Path("sim-out") / scen.name
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            ) as bar:
                task = bar.add_task(
                    f"{scen.name} ({scen.fleet.vehicles:,} vehicles)", total=scen.n_steps
                )
                done = sim.run(
                    scen, out_dir, plot=plot, on_step=lambda i: bar.update(task, completed=i + 1)
                )
        else:
            done = sim.run(scen, out_dir, plot=plot)
    except ScenarioError as err:
        _fail(str(err), 1)
    if as_json:
        typer.echo(json.dumps(done.summary, default=str))
    else:
        typer.echo(sim.summary_line(done.summary, out_dir))


def main() -> None:
    """Entry point of the ``v2g`` console script."""
    with contextlib.suppress(BrokenPipeError):
        app()


if __name__ == "__main__":
    main()
