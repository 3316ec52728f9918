"""The production broker config persists queued QoS 1 messages across a kill -9.

A vehicle with a persistent session is away while the aggregator sends it setpoints at
QoS 1; the broker acknowledges them (PUBACK) and queues them. Mosquitto is then killed
outright and restarted from its persistence file: every acknowledged setpoint must still
reach the vehicle when it comes back, in order, none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiomqtt
import pytest

from tests.support.figures import Recorder
from tests.support.servers import HOST, Mosquitto

pytestmark = pytest.mark.integration

QUEUED = 200
AUTOSAVE_S = 2.0  # broker/mosquitto/mosquitto.conf autosave_interval
TOPIC = "persist/vehicles/ev-0001/setpoint"


def vehicle(port: int) -> aiomqtt.Client:
    # A persistent session (clean_session false): the broker keeps its subscription and
    # queues QoS 1 messages for it while it is away.
    return aiomqtt.Client(
        HOST, port, identifier="persist-ev-0001", clean_session=False, timeout=5.0
    )


async def test_acknowledged_setpoints_queued_for_an_absent_vehicle_survive_a_broker_kill(
    mosquitto: Mosquitto, figure: Recorder
) -> None:
    async with vehicle(mosquitto.port) as c:
        await c.subscribe(TOPIC, qos=1)
    # The vehicle is gone; its session and subscription stay with the broker.
    async with aiomqtt.Client(HOST, mosquitto.port, identifier="persist-agg", timeout=5.0) as agg:
        for i in range(QUEUED):
            await agg.publish(TOPIC, f'{{"n":{i}}}'.encode(), qos=1)  # returns on PUBACK
    acked = time.monotonic()
    # Two autosave periods and a margin: one whole autosave has run since the last PUBACK
    # even on a loaded machine (with one period, a CI run once lost the lot).
    await asyncio.sleep(2 * AUTOSAVE_S + 1.0)
    mosquitto.kill()
    await asyncio.to_thread(mosquitto.start)
    restarted = time.monotonic()

    got: list[int] = []
    async with vehicle(mosquitto.port) as c, asyncio.timeout(10.0):
        async for m in c.messages:
            assert isinstance(m.payload, bytes)
            got.append(int(m.payload.decode().split(":")[1].rstrip("}")))
            if len(got) == QUEUED:
                break
        # Nothing more: a duplicate would show up right behind the last one.
        extra: list[bytes] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for m in c.messages:
                    extra.append(bytes(m.payload) if isinstance(m.payload, bytes) else b"")
    assert not extra, f"queued setpoints came twice: {extra[:3]}"
    back_s = time.monotonic() - restarted
    assert got == list(range(QUEUED)), "queued setpoints lost, reordered or doubled"
    figure(
        "broker kill -9: acknowledged QoS 1 setpoints queued for an absent vehicle, kept",
        len(got),
        f"of {QUEUED}",
        limit=f"= {QUEUED}",
    )
    figure("... delivered after the restart within", back_s, "s wall", limit="< 10 s")
    assert acked < restarted
