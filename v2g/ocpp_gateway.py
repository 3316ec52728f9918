"""The OCPP gateway's work for its commands (`v2g ocpp` in v2g/commands/serve.py, `v2g
provision station` in v2g/commands/tools.py): run the gateway, store a station's
credentials, read --listen and the TLS files."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog
import typer

from broker.clocklink import shared_clock
from broker.settings import Settings, without_password
from chargers.auth import RedisStations
from chargers.gateway import Gateway
from chargers.ownership import Ownership
from core.settings import listen_address

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEFAULT_LISTEN = "127.0.0.1:9000"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); ValueError saying how."""
    return listen_address(text, bare_port=False)


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
    registry: CollectorRegistry | None = None,
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
