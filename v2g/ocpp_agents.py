"""``v2g agents --protocol ocpp``: simulated charging stations that connect to a CSMS.

The work is in agents/ocpp_stations.py; this module runs it as a process: real time
(chargers and a CSMS live on the wall clock), one ``ocpp_stations_summary`` log line
every ``summary_every_wall_s``, and discharge violations loud in every summary.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import structlog

from agents.ocpp_model import parse_mix
from agents.ocpp_stations import OcppStations, build_stations
from core.clock import SimClock


def check_url(url: str) -> str:
    """The CSMS URL, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r} is not a websocket URL: write ws://HOST:PORT (or wss://)")
    if parts.username or parts.password:
        raise ValueError("put no credentials in the URL: use --password (user: the station id)")
    return url.rstrip("/")


def station_prefix(id_prefix: str) -> str:
    """Station ids are ``cs-0000``, ...; ``{id_prefix}-cs-0000`` with another vehicle
    prefix, so two simulator processes never claim the same station id."""
    return "cs" if id_prefix == "ev" else f"{id_prefix}-cs"


async def run_stations(
    *,
    url: str,
    count: int,
    seed: int,
    mix: str,
    password: str | None,
    id_prefix: str,
    daily: bool,
    telemetry_interval_s: float,
    summary_every_wall_s: float,
) -> None:
    """Run ``count`` stations against the CSMS at ``url`` until cancelled."""
    parse_mix(mix)  # fail before connecting anything
    stations = build_stations(
        url=check_url(url),
        count=count,
        clock=SimClock(),
        seed=seed,
        mix=mix,
        id_prefix=id_prefix,
        station_prefix=station_prefix(id_prefix),
        daily=daily,
        telemetry_interval_s=telemetry_interval_s,
        password=password,
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_summaries(stations, summary_every_wall_s), name="stations-summary")
        await stations.run()


async def _summaries(stations: OcppStations, every_s: float) -> None:
    log = structlog.get_logger("ocpp_stations")
    while True:
        await asyncio.sleep(every_s)
        summary = stations.summary()
        if summary["violations"]:
            log.error("ocpp_stations_summary", **summary)
        else:
            log.info("ocpp_stations_summary", **summary)
