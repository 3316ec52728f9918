"""Platform processes started as the user starts them (the ``v2g`` command of this venv),
for tests that kill and restart them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from broker.settings import Settings

from .harness import SIM_START

VENV_BIN = Path(sys.executable).parent


def aggregator_env(cfg: Settings, wall_anchor: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("V2G_")}
    return env | {
        "V2G_BROKER_URL": cfg.broker_url,
        "V2G_REDIS_URL": cfg.redis_url,
        "V2G_TOPIC_PREFIX": cfg.topic_prefix,
        "V2G_REDIS_PREFIX": cfg.redis_prefix,
        "V2G_SPEED": str(cfg.speed),
        "V2G_CLOCK_ANCHOR": repr(wall_anchor),
        "V2G_SIM_START": repr(SIM_START),
        "V2G_TELEMETRY_INTERVAL_S": str(cfg.telemetry_interval_s),
        "V2G_CONTROL_STEP_S": str(cfg.control_step_s),
        "V2G_SETPOINT_TTL_S": str(cfg.setpoint_ttl_s),
        "V2G_STATUS_EVERY_WALL_S": "0.5",
        "V2G_KEEPALIVE_S": str(cfg.keepalive_s),
        "V2G_RECONNECT_MIN_S": "0.05",
        "V2G_RECONNECT_MAX_S": "0.5",
        "V2G_LOG_FORMAT": "json",
    }


@contextlib.asynccontextmanager
async def aggregator_process(
    env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "v2g"), "aggregator", env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(5.0):
            await proc.wait()


@contextlib.asynccontextmanager
async def v2g_process(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``v2g ARGS`` in a process of its own, output to ``log``; killed at the end if it
    is still running (a test that wants a clean stop sends SIGTERM and waits first)."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "v2g"), *args, env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(5.0):
            await proc.wait()
