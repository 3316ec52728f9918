"""Commands that run the platform's processes: ``v2g demo``, ``broker``, ``aggregator``,
``agents``, ``web`` and ``homeassistant``. Long-running; each stops cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from broker.clocklink import shared_clock
from broker.settings import check_broker_url, check_redis_url, without_password
from v2g import logs, ocpp_gateway
from v2g.commands.options import (
    Broker,
    ClientId,
    ColdStart,
    LogFormat,
    Prefix,
    Redis,
    RedisPrefix,
    SimStart,
    Speed,
    checked,
    examples,
    listen_address_text,
    setting_option,
    settings_from,
    url_option,
)
from v2g.commands.running import fail, run
from v2g.web.options import DEFAULT_LISTEN, Listen, Token

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Metrics = Annotated[
    str | None,
    setting_option(
        "--metrics",
        "metrics",
        "serve Prometheus metrics on HOST:PORT (a bare PORT: 127.0.0.1:PORT)",
        metavar="HOST:PORT",
        parser=checked(listen_address_text),
        default="off",
    ),
]


@contextlib.contextmanager
def metrics_endpoint(address: str | None, process: str) -> Iterator[CollectorRegistry]:
    """The process's metrics registry, served on ``address`` while the block runs (not
    served when None); a port that cannot be bound fails the command before it starts."""
    from broker.metrics import new_registry, serving

    registry = new_registry()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(serving(address, registry, process=process))
        except OSError as err:
            fail(f"--metrics {address}: cannot listen there ({err}); give a free HOST:PORT")
        yield registry


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``, in the order ``v2g --help`` lists them."""
    app.command()(demo)
    app.command("broker")(broker_cmd)
    app.command()(aggregator)
    app.command()(agents)
    app.command(
        epilog=examples(
            "v2g web", "V2G_WEB_TOKEN=$(cat ~/.v2g-token) v2g web --listen 127.0.0.1:8080"
        )
    )(web)
    app.command(
        "homeassistant",
        epilog=examples(
            "v2g homeassistant",
            "v2g homeassistant --vehicles car-001,car-002 --discovery-prefix homeassistant",
        ),
    )(homeassistant_cmd)
    app.command("ocpp")(ocpp_cmd)


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
        url_option(
            "--broker", check_broker_url, "use this broker instead of the embedded one", "embedded"
        ),
    ] = None,
    redis: Annotated[
        str | None,
        url_option(
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
    metrics: Metrics = None,
) -> None:
    """Run the whole loop on embedded defaults (no servers needed) and print a summary."""
    from v2g.demo import run_demo

    if mode not in ("per-vehicle", "multiplexed"):
        raise typer.BadParameter("mode must be per-vehicle or multiplexed", param_hint="--mode")
    settings = settings_from(
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
        metrics=metrics,
    )
    with metrics_endpoint(settings.metrics, "demo") as registry:
        run(
            run_demo(
                settings,
                count=count,
                seed=seed,
                request_minutes=minutes,
                use_broker=broker is not None,
                use_redis=redis is not None,
                mode=mode,  # type: ignore[arg-type]
                warm_start=not cold_start,
                registry=registry if settings.metrics else None,
            ),
            process="demo",
        )


def broker_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    metrics: Metrics = None,
) -> None:
    """Run the embedded development broker (amqtt). Use Mosquitto in production."""
    from broker.embedded import EmbeddedBroker

    logs.configure()
    log = structlog.get_logger("broker")

    async def serve() -> None:
        async with EmbeddedBroker(host=host, port=port) as b:
            log.info("broker_listening", url=b.url, note="development broker; Ctrl-C stops it")
            await asyncio.Event().wait()

    # The embedded broker's own counters are amqtt's ($SYS topics); the endpoint serves
    # the process's (CPU, memory, file descriptors, GC).
    with metrics_endpoint(metrics, "broker"):
        run(serve(), process="broker")


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
    grid: Annotated[
        str | None,
        setting_option(
            "--grid",
            "grid_file",
            "grid topology (YAML; 'v2g grid show FILE' prints it): every step's setpoints,"
            " plain charging included, are held under its nodes' limits and meters"
            " (v2g/grid/NODE/meter, v2g/grid/NODE/limits)",
            metavar="FILE",
        ),
    ] = None,
    fast_ingest: Annotated[
        bool,
        typer.Option(
            "--fast-ingest/--no-fast-ingest",
            help="receive telemetry on a second MQTT 5 connection (broker/fastlink.py on"
            " broker/mqtt5link.py): ~10x the general client's ingest",
        ),
    ] = True,
    fast_setpoints: Annotated[
        bool,
        typer.Option(
            "--fast-setpoints/--no-fast-setpoints",
            help="send setpoints on a second, publish-only MQTT 5 connection"
            " (broker/fastpub.py on broker/mqtt5link.py), a reason code for each:"
            " 10-25x the QoS 1 rate of the general client",
        ),
    ] = True,
    log_format: LogFormat = None,
    metrics: Metrics = None,
) -> None:
    """Run the aggregator: fleet state, capability, dispatch and fleet status."""
    from v2g import compose

    settings = settings_from(
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
        grid_file=grid,
        metrics=metrics,
    )
    if memory and settings.share_group:
        fail("--share-group shares fleet state through Redis: drop --memory")
    if settings.grid_file:
        from aggregator.grid import GridError, load_grid

        try:
            load_grid(Path(settings.grid_file))  # a bad file fails here, before any I/O
        except GridError as err:
            fail(f"--grid (or V2G_GRID_FILE): {err}")
    persisted = compose.persistence(settings, memory=memory)
    # The client id comes from the settings (broker/clientid.py): {prefix}-aggregator,
    # per process in a share group, or --client-id / V2G_CLIENT_ID.

    async def main(registry: CollectorRegistry) -> None:
        async with shared_clock(settings) as shared:
            service = compose.aggregator_service(
                shared.settings,
                shared.clock,
                persisted,
                fast_ingest=fast_ingest,
                fast_setpoints=fast_setpoints,
            )
            if settings.metrics:
                from aggregator.metrics import instrument

                instrument(service, registry)
            structlog.get_logger("aggregator").info(
                "aggregator_starting",
                broker=without_password(settings.broker_url),
                store="memory" if memory else without_password(settings.redis_url),
                prefix=settings.topic_prefix,
                speed=shared.settings.speed,
            )
            await service.run()

    with metrics_endpoint(settings.metrics, "aggregator") as registry:
        run(main(registry), process="aggregator")


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
    node: Annotated[
        str | None,
        typer.Option(
            help="the grid node every vehicle reports (Telemetry.node; see --grid of the"
            " aggregator)",
            show_default="none",
        ),
    ] = None,
    nodes: Annotated[
        str | None,
        typer.Option(
            help="spread the fleet over grid nodes by share, e.g. site-a=0.6,site-b=0.4"
            " (contiguous blocks of ids)",
            show_default="none",
        ),
    ] = None,
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
    # One option, read by the protocol: both uses shipped as --mix (issue 11's driver
    # patterns, the OCPP stations' versions).
    mix: Annotated[
        str | None,
        typer.Option(
            help="shares by kind. --protocol mqtt: driver patterns, e.g. workplace=1 (a"
            " workplace car park; default home=0.6,workplace=0.3,depot=0.1). --protocol"
            " ocpp: 2.1 with BPT, 2.1 without, and 2.0.1 stations, e.g."
            " v21bpt=0.6,v21=0.2,v201=0.2 (default v21bpt=1)",
            show_default="by protocol",
        ),
    ] = None,
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
    metrics: Metrics = None,
) -> None:
    """Run N simulated vehicles that report telemetry and follow setpoints. A car plugged in
    at the start holds what plain charging since its arrival put in it (--cold-start: its
    arrival energy, as if it had just plugged in). With --protocol ocpp: N charging
    stations with their cars, every car plugged in at the start (--cold-start: on their
    daily patterns instead), against the CSMS at --url."""
    if protocol not in ("mqtt", "ocpp"):
        raise typer.BadParameter("protocol must be mqtt or ocpp", param_hint="--protocol")
    if protocol == "ocpp":
        if node is not None or nodes is not None:
            raise typer.BadParameter(
                "--node/--nodes place simulated MQTT vehicles under grid nodes: drop them"
                " with --protocol ocpp",
                param_hint="--node" if node is not None else "--nodes",
            )
        stations = "v21bpt=1" if mix is None else mix
        _ocpp_agents(count, seed, id_prefix, cold_start, url, stations, password, log_format)
        return
    from agents.faults import Misbehaviour, parse_fractions
    from agents.fleet import SimFleet
    from agents.profiles import PATTERNS, generate_fleet, parse_shares, spread_nodes
    from agents.runtime import AgentRuntime
    from broker.topics import check_id

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
    if node is not None and nodes is not None:
        raise typer.BadParameter("give --node or --nodes, not both", param_hint="--nodes")
    placed: list[str | None] | None = None
    try:
        if node is not None:
            placed = [check_id(node, "node")] * count
        elif nodes is not None:
            shares = parse_shares(nodes, "node")
            for name in shares:
                check_id(name, "node")
            placed = list(spread_nodes(count, shares))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--nodes" if nodes else "--node") from None
    patterns: dict[str, float] | None = None
    if mix is not None:
        try:
            patterns = parse_shares(mix, "pattern")
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--mix") from None
        if unknown := sorted(set(patterns) - set(PATTERNS)):
            raise typer.BadParameter(
                f"unknown patterns {unknown}; choose from {sorted(PATTERNS)} (station"
                " versions such as v21bpt are for --protocol ocpp)",
                param_hint="--mix",
            )
    settings = settings_from(
        broker_url=broker,
        topic_prefix=topic_prefix,
        speed=speed,
        sim_start=sim_start,
        log_format=log_format,
        metrics=metrics,
    )

    async def main(registry: CollectorRegistry) -> None:
        async with shared_clock(settings) as shared:
            fleet = SimFleet(
                generate_fleet(count, seed, mix=patterns, id_prefix=id_prefix),
                shared.clock.now(),
                step_s=settings.telemetry_interval_s,
                faults=faults,
                warm_start=not cold_start,
            )
            if placed is not None:
                fleet.place(placed)
            runtime = AgentRuntime(
                settings=shared.settings,
                clock=shared.clock,
                fleet=fleet,
                mode=mode,  # type: ignore[arg-type]
                connections=connections,
                batch=batch,
            )
            if settings.metrics:
                from agents.metrics import register_agents

                register_agents(runtime, registry)
            await runtime.run()

    with metrics_endpoint(settings.metrics, "agents") as registry:
        run(main(registry), process="agents")


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
    settings = settings_from(log_format=log_format)
    run(
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


def web(
    listen: Listen = DEFAULT_LISTEN,
    token: Token = None,
    broker: Broker = None,
    topic_prefix: Prefix = None,
    log_format: LogFormat = None,
    metrics: Metrics = None,
) -> None:
    """Serve a live view of the fleet in a browser: status, capability, power against the
    requests, dispatches, refusals; with a token, send, amend and cancel requests.
    ``--metrics``: the process's own (process_*, python_*), as for ``v2g broker``."""
    from v2g.web.serve import run_web

    settings = settings_from(
        broker_url=broker, topic_prefix=topic_prefix, log_format=log_format, metrics=metrics
    )
    with metrics_endpoint(settings.metrics, "web"):
        run(run_web(settings, listen=listen, token=token or None), process="web")


def homeassistant_cmd(
    vehicles: Annotated[
        str | None,
        typer.Option(
            "--vehicles",
            "--homeassistant-vehicles",
            metavar="all|ID,ID",
            help="also announce vehicles: all of them, or these ids (default: the fleet only)",
        ),
    ] = None,
    discovery_prefix: Annotated[
        str,
        typer.Option(metavar="PREFIX", help="Home Assistant's MQTT discovery prefix"),
    ] = "homeassistant",
    broker: Broker = None,
    topic_prefix: Prefix = None,
    log_format: LogFormat = None,
) -> None:
    """Show the fleet in Home Assistant (MQTT discovery): fleet sensors and, on request,
    each vehicle's sensors and its "no V2G until departure" switch."""
    from v2g.homeassistant import HomeAssistantError, parse_vehicles, run_homeassistant

    settings = settings_from(broker_url=broker, topic_prefix=topic_prefix, log_format=log_format)
    try:
        ids = parse_vehicles(vehicles)
    except HomeAssistantError as err:
        raise fail(str(err)) from None
    run(
        run_homeassistant(settings, discovery_prefix=discovery_prefix, vehicles=ids),
        process="homeassistant",
    )


def ocpp_cmd(
    listen: Annotated[
        str,
        typer.Option(
            "--listen", metavar="HOST:PORT", help="where chargers connect: ws://HOST:PORT/{id}"
        ),
    ] = ocpp_gateway.DEFAULT_LISTEN,
    broker_url: Broker = None,
    redis_url: Redis = None,
    topic_prefix: Prefix = None,
    fmt: LogFormat = None,
    open_mode: Annotated[
        bool,
        typer.Option(
            "--open",
            help="also accept stations that are not provisioned (a lab; logged loudly);"
            " a provisioned station still needs its password",
        ),
    ] = False,
    certfile: Annotated[
        Path | None,
        typer.Option(
            "--certfile",
            help="TLS certificate (PEM): wss://, Security Profile 2",
            show_default="none: ws://, Security Profile 1",
        ),
    ] = None,
    keyfile: Annotated[
        Path | None,
        typer.Option("--keyfile", help="TLS private key (PEM) of --certfile", show_default="none"),
    ] = None,
    bridge_id: Annotated[
        str | None,
        typer.Option(
            "--bridge-id",
            help="this gateway's bridge id on the bus (its MQTT username under an ACL)",
            show_default="ocpp-HOST-PORT",
        ),
    ] = None,
    heartbeat: Annotated[
        int, typer.Option("--heartbeat", min=1, help="heartbeat interval told to stations, s")
    ] = 60,
    metrics: Metrics = None,
) -> None:
    """Run the OCPP 2.1 / 2.0.1 CSMS gateway: chargers connect to ws://HOST:PORT/{station_id}
    (subprotocol ocpp2.1 or ocpp2.0.1, HTTP Basic auth) and their EV sessions join the
    fleet as vehicles of one bridge; the aggregator's setpoints go out as
    SetChargingProfile. Runs in real time (the fleet's clock must be at --speed 1)."""
    try:
        host, port = ocpp_gateway.parse_listen(listen)
        tls = ocpp_gateway.tls_context(certfile, keyfile)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from None
    settings = settings_from(
        broker_url=broker_url,
        redis_url=redis_url,
        topic_prefix=topic_prefix,
        log_format=fmt,
        metrics=metrics,
    )
    with metrics_endpoint(settings.metrics, "ocpp") as registry:
        run(
            ocpp_gateway.run_gateway(
                settings,
                host=host,
                port=port,
                open_mode=open_mode,
                tls=tls,
                bridge_id=bridge_id,
                heartbeat_s=heartbeat,
                registry=registry if settings.metrics else None,
            ),
            process="ocpp",
        )
