"""The metrics endpoints of a running aggregator and simulated fleet (README "Metrics"), as
the user starts them (``v2g aggregator --metrics``, ``v2g agents --metrics``) on the real
Mosquitto and Redis: the numbers move, a malformed message is counted by its reason, a
request shows, and every metric the Grafana dashboard queries exists."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from broker.settings import MqttTarget, Settings
from tests.support.metrics import Samples, dashboard_queries, metric_names, parse, value
from tests.support.processes import VENV_BIN, aggregator_env
from tests.support.servers import HOST, free_port

pytestmark = pytest.mark.timeout(120)
WAIT_S = 40.0


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5.0) as r:
            return str(r.read().decode())

    return parse(await asyncio.to_thread(get))


async def until(port: int, ok: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape ``port`` until ``ok`` holds (bounded); the last scrape."""
    deadline = time.monotonic() + WAIT_S
    last: Samples = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = await scrape(port)
            if ok(last):
                return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not seen within {WAIT_S} s; last scrape: {sorted(last)[:40]}")


@contextlib.asynccontextmanager
async def process(args: list[str], env: dict[str, str], log: Path) -> AsyncIterator[None]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "v2g"), *args, env=env, stdout=out, stderr=out
        )
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(10.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def publish(settings: Settings, topic: str, payload: bytes) -> None:
    target = MqttTarget.parse(settings.broker_url)
    async with aiomqtt.Client(target.host, target.port, identifier=f"mtest-{time.time_ns()}") as c:
        await c.publish(topic, payload, qos=1)


def positive(name: str, **labels: str) -> Callable[[Samples], bool]:
    return lambda m: (value(m, name, **labels) or 0.0) > 0


async def test_aggregator_and_agents_serve_metrics_that_move(
    settings: Settings, test_id: str, redis_keys: None, retained_cleanup: None, tmp_path: Path
) -> None:
    agg_port, agents_port = free_port(), free_port()
    env = aggregator_env(settings, time.time())
    # A one-member share group: the lease (and its term) shows, as in a scaled-out plant.
    agg_env = env | {"V2G_METRICS": f"{HOST}:{agg_port}", "V2G_SHARE_GROUP": f"m{test_id}"}
    agents_env = env | {"V2G_METRICS": str(agents_port)}  # a bare port: loopback
    topics = settings.topics
    async with (
        process(["aggregator"], agg_env, tmp_path / "aggregator.log"),
        process(
            ["agents", "--count", "20", "--seed", "2", "--mode", "multiplexed"],
            agents_env,
            tmp_path / "agents.log",
        ),
    ):
        m = await until(agg_port, positive("v2g_fleet_vehicles_online"), "vehicles online")
        steps = value(m, "v2g_control_step_duration_seconds_count") or 0.0
        await until(
            agg_port,
            lambda m: (value(m, "v2g_control_step_duration_seconds_count") or 0) > steps + 1,
            "the step histogram growing",
        )
        agents = await until(agents_port, positive("v2g_agents_ticks_total"), "fleet ticks")
        assert value(agents, "v2g_agents_vehicles") == 20
        assert value(agents, "v2g_mqtt_connections_up", connection="multiplexed") == 4

        await publish(settings, topics.telemetry("ev-bad"), b"{not json")
        await until(
            agg_port, positive("v2g_messages_refused_total", reason="json"), "a refusal (json)"
        )
        body = {"request_id": f"m-{test_id}", "power_kw": -20.0, "duration_s": 600.0}
        await publish(settings, topics.dispatch_requests, json.dumps(body).encode())
        m = await until(
            agg_port,
            lambda m: value(m, "v2g_dispatch_requested_kw", request_id=f"m-{test_id}") == -20.0,
            "the request's requested power",
        )
        assert value(m, "v2g_fleet_requested_kw") == -20.0
        assert value(m, "v2g_mqtt_connections_up", connection="main") == 1
        assert value(m, "v2g_redis_up") == 1
        term = value(m, "v2g_lease_term")
        assert term is not None and term >= 1 and value(m, "v2g_lease_leader") == 1
        assert value(m, "v2g_ledger_entries_owed") is not None

        exposed = set(m) | set(await scrape(agents_port))
        missing = {
            f"{where}: {name}"
            for where, expr in dashboard_queries()
            for name in metric_names(expr)
            if name not in exposed
        }
        assert not missing, f"the dashboard queries metrics nobody exposes: {sorted(missing)}"
