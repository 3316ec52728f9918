"""Home Assistant over real Mosquitto: the bridge's discovery configs are retained and
valid, the topics they read carry values, and the "no V2G until departure" switch takes
a discharging car out of a running discharge request in a real aggregator."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
import jinja2.sandbox
import numpy as np
import pytest

from broker.settings import Settings
from tests.support.ha_schema import DISCOVERY_TOPIC, validate
from tests.support.harness import HOST, MQTT_PORT, eventually
from tests.support.loop import discharge_half, track
from v2g.homeassistant import Discovery, run_homeassistant

pytestmark = pytest.mark.integration


async def _retained(filter_: str, quiet_s: float = 0.5) -> dict[str, bytes]:
    """Every retained message under ``filter_``, read by a fresh client."""
    got: dict[str, bytes] = {}
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"ha-read-{uuid.uuid4().hex}") as c:
        await c.subscribe(filter_, qos=1)
        async with asyncio.timeout(10.0):
            while True:
                try:
                    async with asyncio.timeout(quiet_s):
                        m = await anext(aiter(c.messages))
                except TimeoutError:
                    return got
                if m.retain and isinstance(m.payload, bytes) and m.payload:
                    got[str(m.topic)] = m.payload


async def _first_of(topics: list[str], timeout: float = 10.0) -> dict[str, bytes]:
    """The first message on each of ``topics`` (retained or live)."""
    got: dict[str, bytes] = {}
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"ha-state-{uuid.uuid4().hex}") as c:
        for topic in topics:
            await c.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for m in c.messages:
                if isinstance(m.payload, bytes) and m.payload:
                    got.setdefault(str(m.topic), m.payload)
                if len(got) == len(topics):
                    return got
    return got


async def _publish(topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"ha-owner-{uuid.uuid4().hex}") as c:
        await c.publish(topic, payload, qos=1, retain=True)


async def test_discovery_configs_appear_retained_and_the_switch_holds_a_car_out_of_discharge(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    # Under the test's own topic prefix: retained_cleanup clears the configs too.
    discovery_prefix = f"{settings.topic_prefix}/homeassistant"
    discovery = Discovery(settings.topics, discovery_prefix)
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    async with loop_factory(count=20, seed=5, mode="multiplexed", connections=2) as loop:
        await loop.wait_all_online()
        loop.start(
            "homeassistant",
            run_homeassistant(settings, discovery_prefix=discovery_prefix, vehicles=[]),
        )
        vids = loop.fleet.ids

        # Every fleet config and every vehicle's configs, retained, valid, availability on.
        async with asyncio.timeout(20.0):
            while True:
                retained = await _retained(f"{discovery_prefix}/#")
                configs = {t: p for t, p in retained.items() if DISCOVERY_TOPIC.match(t)}
                want = {t for t, _ in discovery.fleet_configs()}
                for vid in vids:
                    want |= {t for t, _ in discovery.vehicle_configs(vid)}
                if want <= set(configs):
                    break
                await asyncio.sleep(0.5)
        assert retained[discovery.availability_topic] == b"online"
        for topic, payload in configs.items():
            validate(topic, json.loads(payload))

        # The state topics they read carry values Home Assistant can render.
        t = settings.topics
        state = await _first_of([t.fleet_status, t.fleet_capability, t.telemetry(vids[0])])
        rendered = {}
        for payload in configs.values():
            cfg = json.loads(payload)
            if "value_template" in cfg and cfg["state_topic"] in state:
                value = json.loads(state[cfg["state_topic"]])
                rendered[cfg["unique_id"]] = env.from_string(cfg["value_template"]).render(
                    value_json=value
                )
        node = discovery.node
        assert int(rendered[f"{node}_fleet_online"]) == len(vids)
        assert abs(float(rendered[f"{node}_fleet_power"])) < 1e6
        assert float(rendered[f"{node}_fleet_capability_min"]) < 0
        report = json.loads(state[t.telemetry(vids[0])])
        soc = float(rendered[f"{node}_{vids[0]}_soc"])
        assert soc == pytest.approx(100 * report["soc"], abs=0.05)
        assert rendered[f"{node}_{vids[0]}_plugged"] in ("ON", "OFF")

        # A discharge runs; the car exporting most is then held by its owner.
        power, *_ = await discharge_half(loop, f"ha-{uuid.uuid4().hex[:8]}", 900.0)
        await track(loop, power, "before the hold")
        fleet = loop.fleet
        exporting = np.where(fleet.plugged, fleet.power, np.inf)
        i = int(np.argmin(exporting))
        assert exporting[i] < 0, f"no car is discharging: {fleet.power}"
        vid = fleet.ids[i]
        await _publish(settings.topics.no_v2g(vid), b"ON")
        row = loop.aggregator.state.index[vid]
        await eventually(
            lambda: bool(loop.aggregator.state.held(loop.clock.now())[row]),
            "the aggregator to hold the car",
            10.0,
        )
        # Setpoints last a few steps: within them the car stops exporting, and stays so.
        for _ in range(4):
            await loop.next_report()
        seen = []
        for _ in range(8):
            await loop.next_report()
            seen.append(float(fleet.power[i]))
        assert min(seen) >= 0.0, f"held car {vid} still discharged: {seen} kW"
        assert loop.aggregator.state.held(loop.clock.now())[row]

        # Switched off, the hold ends in the aggregator too.
        await _publish(settings.topics.no_v2g(vid), b"OFF")
        await eventually(
            lambda: not loop.aggregator.state.held(loop.clock.now())[row],
            "the aggregator to release the car",
            10.0,
        )
        await loop.stop("homeassistant")
    # The bridge said offline on its way out.
    after = await _retained(discovery.availability_topic)
    assert after[discovery.availability_topic] == b"offline"
