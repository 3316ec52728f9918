"""``v2g ocpp`` and ``v2g provision station``: the OCPP gateway's commands.

Registered on the ``v2g`` app by :func:`register` (called at the end of v2g/cli.py), which
also turns ``v2g provision`` into a group: ``v2g provision mqtt`` (broker logins, and the
old form ``v2g provision --out DIR ...`` still works) and ``v2g provision station``.

No ``from __future__ import annotations`` here: the commands are defined inside
:func:`register` with the option types cli.py hands over, and typer reads their
annotations as objects.
"""

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import redis.asyncio as aioredis
import structlog
import typer
from typer.core import TyperGroup

from broker.clocklink import shared_clock
from broker.settings import Settings, without_password
from chargers.auth import RedisStations, check_station_id, new_password
from chargers.gateway import Gateway
from chargers.ownership import Ownership
from v2g.commands.serve import Metrics, metrics_endpoint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEFAULT_LISTEN = "127.0.0.1:9000"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:9000``) -> (host, port), or ValueError saying how."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def tls_context(certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext | None:
    """OCPP Security Profile 2: TLS with the server's certificate (None: profile 1, ws://)."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ValueError("TLS needs both --certfile and --keyfile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # OCPP 2.x Part 2, A00.FR.309
    context.load_cert_chain(certfile, keyfile)
    return context


def default_bridge_id(port: int) -> str:
    """One bridge per gateway process: ``ocpp-{host}-{port}`` (a valid id of the contract)."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40]
    return f"ocpp-{host or 'gw'}-{port}"


async def run_gateway(
    settings: Settings,
    *,
    host: str,
    port: int,
    open_mode: bool,
    tls: ssl.SSLContext | None,
    bridge_id: str | None,
    heartbeat_s: int,
    registry: "CollectorRegistry | None" = None,
) -> None:
    """Run the gateway on the fleet's clock until cancelled; its metrics on ``registry``
    when given."""
    log = structlog.get_logger("ocpp")
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
    try:
        async with shared_clock(settings) as shared:
            if shared.clock.speed != 1.0:
                raise typer.BadParameter(
                    f"the fleet's clock runs at x{shared.clock.speed:g}; chargers are real and"
                    " run in real time: start the fleet at --speed 1 (or another --topic-prefix)"
                )
            bridge = bridge_id or default_bridge_id(port)
            gateway = Gateway(
                settings=shared.settings,
                clock=shared.clock,
                stations=RedisStations(redis, settings.redis_prefix),
                bridge_id=bridge,
                ownership=Ownership(redis, settings.redis_prefix, bridge),
                open_mode=open_mode,
                heartbeat_s=heartbeat_s,
                logger=log,
            )
            if registry is not None:
                from chargers.metrics import register_gateway

                register_gateway(gateway, registry)
            log.info(
                "ocpp_gateway_starting",
                broker=without_password(settings.broker_url),
                redis=without_password(settings.redis_url),
                topic_prefix=settings.topic_prefix,
                redis_prefix=settings.redis_prefix,
            )
            await gateway.run(host, port, tls=tls)
    finally:
        await redis.aclose()


async def provision_station(settings: Settings, station_id: str, password: str) -> str:
    """Store ``station_id``'s salted password hash; returns the Redis key."""
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
    try:
        store = RedisStations(redis, settings.redis_prefix)
        await store.provision(station_id, password)
        return store.key(station_id)
    finally:
        await redis.aclose()


class _ProvisionGroup(TyperGroup):
    """``v2g provision``: an unknown first word (a flag) means the old form, ``mqtt``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["mqtt", *args]
        return super().parse_args(ctx, args)


def register(
    app: typer.Typer,
    *,
    run: Callable[..., Any],
    make_settings: Callable[..., Settings],
    fail: Callable[..., Any],
    broker: Any,
    redis: Any,
    prefix: Any,
    log_format: Any,
    provision_mqtt: Callable[..., Any],
) -> None:
    """Add ``v2g ocpp`` and make ``v2g provision`` a group (mqtt, station)."""

    def ocpp(
        listen: Annotated[
            str,
            typer.Option(
                "--listen", metavar="HOST:PORT", help="where chargers connect: ws://HOST:PORT/{id}"
            ),
        ] = DEFAULT_LISTEN,
        broker_url: broker = None,
        redis_url: redis = None,
        topic_prefix: prefix = None,
        fmt: log_format = None,
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
            typer.Option(
                "--keyfile", help="TLS private key (PEM) of --certfile", show_default="none"
            ),
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
            host, port = parse_listen(listen)
            tls = tls_context(certfile, keyfile)
        except (ValueError, OSError) as err:
            raise fail(str(err)) from None
        settings = make_settings(
            broker_url=broker_url,
            redis_url=redis_url,
            topic_prefix=topic_prefix,
            log_format=fmt,
            metrics=metrics,
        )
        with metrics_endpoint(settings.metrics, "ocpp") as registry:
            run(
                run_gateway(
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

    def station(
        station_id: Annotated[
            str, typer.Argument(metavar="ID", help="the station's id (its URL path and username)")
        ],
        password: Annotated[
            str | None,
            typer.Option(
                "--password", help="its password (16-40 characters); default: a generated one"
            ),
        ] = None,
        redis_url: redis = None,
        topic_prefix: prefix = None,
    ) -> None:
        """Register a charging station for `v2g ocpp` (Security Profile 1/2): a salted hash
        of its password in Redis under the deployment's prefix. A generated password is
        printed once; run it again to replace the password."""
        try:
            check_station_id(station_id)
        except ValueError as err:
            raise fail(str(err)) from None
        if password is not None and not 16 <= len(password) <= 40:
            raise fail("--password: OCPP asks for 16 to 40 characters")
        settings = make_settings(redis_url=redis_url, topic_prefix=topic_prefix)
        secret = password or new_password()
        key = run(provision_station(settings, station_id, secret))
        typer.echo(f"station {station_id} provisioned ({key})", err=True)
        if password is None:
            typer.echo(secret)

    app.command("ocpp")(ocpp)
    group = typer.Typer(
        cls=_ProvisionGroup,
        help="Credentials: broker logins (mqtt, the default) and charging stations (station).",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    group.command("mqtt")(provision_mqtt)
    group.command("station")(station)
    app.registered_commands = [
        c for c in app.registered_commands if c.callback is not provision_mqtt
    ]
    app.add_typer(group, name="provision")
