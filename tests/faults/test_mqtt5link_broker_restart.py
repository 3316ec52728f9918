"""The MQTT 5 link (broker/mqtt5link.py) through a broker killed and started again: a
burst while it is down is refused at once (nothing sent), the supervisor reconnects,
subscribes again, and messages flow both ways once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from broker.mqtt5link import Mqtt5Link
from broker.settings import Settings
from broker.transport import Outgoing, Received
from core.errors import TransportError
from tests.support.harness import eventually
from tests.support.servers import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_a_killed_broker_is_reconnected_and_subscriptions_renewed(
    settings: Settings, mosquitto: Mosquitto, test_id: str
) -> None:
    topic = f"{settings.topic_prefix}/vehicles/ev-1/setpoint"
    got: list[bytes] = []

    def on_batch(batch: Sequence[Received]) -> None:
        got.extend(m.payload for m in batch)

    sub = Mqtt5Link(settings, f"ftest-{test_id}-sub", [(topic, 1)], on_batch)
    pub = Mqtt5Link(settings, f"ftest-{test_id}-pub")
    async with sub.running(10, name="sub"), pub.running(10, name="pub"):
        assert (await pub.publish_many([Outgoing(topic, b"before")])).complete
        await eventually(lambda: got == [b"before"], "the first message", 10)
        mosquitto.kill()
        await eventually(lambda: not pub.connected and not sub.connected, "both links down", 10)
        with pytest.raises(TransportError, match="down; 1 messages not sent"):
            await pub.publish_many([Outgoing(topic, b"while down")])
        mosquitto.start()
        await pub.wait_connected(20)
        await sub.wait_connected(20)
        assert (await pub.publish_many([Outgoing(topic, b"after")])).complete
        await eventually(lambda: got == [b"before", b"after"], "the message after", 10)
    assert sub.stats.connects >= 2 and pub.stats.connects >= 2
    assert pub.stats.refused_offline == 1
    await asyncio.sleep(0)
