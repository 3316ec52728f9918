"""The MQTT 5 transport (broker/mqtt5link.py) against the production ACL on a real Mosquitto:
a setpoint the broker refuses comes back not delivered, with its reason code, on the seam
and on the aggregator's setpoint connection (which, as a hand-written MQTT 3.1.1 client,
could not see a refusal: 3.1.1 has no reason codes).
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from broker.fastpub import FastPublisher
from broker.link import Outgoing as LinkOutgoing
from broker.mqtt5link import Mqtt5Link
from broker.settings import Settings
from broker.transport import NOT_AUTHORIZED, Outgoing
from core.errors import AuthenticationError

from .conftest import HOST, Broker

pytestmark = pytest.mark.security

WAIT_S = 5.0
SETPOINT = b'{"power_kw": -7.0}'


def settings_for(broker: Broker, user: str, password: str | None = None) -> Settings:
    return Settings(
        broker_url=f"mqtt://{HOST}:{broker.port}",
        username=user,
        password=SecretStr(password or broker.password(user)),
        reconnect_min_s=0.05,
        reconnect_max_s=0.1,
        publish_timeout_s=WAIT_S,
    )


async def test_a_setpoint_the_acl_refuses_is_reported_not_delivered(broker: Broker) -> None:
    # The operator may publish dispatch requests but not setpoints: one burst, both kinds.
    link = Mqtt5Link(settings_for(broker, "operator"), "sec-m5-operator")
    burst = [
        Outgoing("v2g/vehicles/ev-0000/setpoint", SETPOINT),
        Outgoing("v2g/dispatch/requests", b"{}"),
        Outgoing("v2g/vehicles/ev-0001/setpoint", SETPOINT),
    ]
    async with link.running(WAIT_S, name="m5-operator"):
        delivery = await link.publish_many(burst)
    assert delivery.reason.tolist()[0] == NOT_AUTHORIZED
    assert delivery.reason.tolist()[2] == NOT_AUTHORIZED
    assert delivery.acked.tolist() == [False, True, False]
    assert delivery.refused.tolist() == [True, False, True]
    assert link.stats.refused == 2 and link.stats.acked == 1
    assert link.stats.last_refusal == ("v2g/vehicles/ev-0001/setpoint", NOT_AUTHORIZED)


async def test_the_aggregators_setpoints_are_delivered_to_their_vehicle(broker: Broker) -> None:
    vehicle = Mqtt5Link(
        settings_for(broker, "ev-0000"),
        "ev-0000",
        subscriptions=[("v2g/vehicles/ev-0000/setpoint", 1)],
    )
    aggregator = Mqtt5Link(settings_for(broker, "aggregator"), "sec-m5-aggregator")
    async with (
        vehicle.running(WAIT_S, name="m5-ev"),
        aggregator.running(WAIT_S, name="m5-agg"),
    ):
        delivery = await aggregator.publish_many(
            [Outgoing("v2g/vehicles/ev-0000/setpoint", SETPOINT)]
        )
        assert delivery.complete
        async with asyncio.timeout(WAIT_S):
            batch = await anext(aiter(vehicle.batches()))
    assert [(m.topic, m.payload) for m in batch] == [("v2g/vehicles/ev-0000/setpoint", SETPOINT)]


async def test_bad_credentials_stop_the_link_instead_of_retrying(broker: Broker) -> None:
    link = Mqtt5Link(settings_for(broker, "ev-0000", "wrong-password"), "sec-m5-auth")
    with pytest.raises(AuthenticationError, match="refused"):
        async with asyncio.timeout(WAIT_S):
            await link.run()
    assert link.stats.connects == 0
    assert link.stats.disconnects == 0


async def test_the_aggregators_setpoint_connection_reports_the_refusal(broker: Broker) -> None:
    """The setpoint connection the aggregator runs (broker/fastpub.py) was a hand-written
    MQTT 3.1.1 client, to which the broker acknowledged a refused setpoint like a delivered
    one (3.1.1 has no reason codes). It is now MQTT 5: refused, not delivered."""
    pub = FastPublisher(settings=settings_for(broker, "operator"), client_id="sec-fast-op")
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pub.run(), name="fastpub-operator")
        await pub.wait_connected(WAIT_S)
        delivery = await pub.publish_many(
            [LinkOutgoing("v2g/vehicles/ev-0000/setpoint", SETPOINT, 1)]
        )
        task.cancel()
    assert delivery.reason.tolist() == [NOT_AUTHORIZED]
    assert not delivery.complete and delivery.count == 0
