"""The setpoint connection: bursts of QoS 1 setpoints on a publish-only connection of
their own, with the broker's answer per message.

It was a hand-written MQTT 3.1.1 client, which could not tell a setpoint the broker's ACL
refused from a delivered one (3.1.1 has no reason codes). It is now
:class:`broker.mqtt5link.Mqtt5Link` (MQTT 5, the ``mqtt5`` codec): a refused setpoint comes
back NOT_AUTHORIZED in the :class:`~broker.transport.Delivery`, not delivered, and is
decided again; the throughput is within the bar of the old client (bench/mqtt_clients.py).
This module keeps the name and the interface the aggregator service uses
(``AggregatorService(fast_setpoints=True)``: ``publish_many`` of ``broker.link.Outgoing``);
once the service takes a :class:`~broker.transport.Transport` itself, it goes.

- :meth:`FastPublisher.publish_many` raises TransportError at once, having sent nothing,
  while disconnected; a connection lost mid-burst (or the timeout) returns what the
  broker answered so far: the caller sends the others again later. Nothing is kept
  across a reconnect (session expiry 0): setpoints are decided afresh.
- At most the broker's Receive Maximum setpoints are in flight (``max_inflight_messages``
  in broker/mosquitto/mosquitto.conf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from broker.link import Outgoing as LinkOutgoing
from broker.mqtt5link import Mqtt5Link, Mqtt5Stats
from broker.settings import Settings
from broker.transport import Delivery, Outgoing

__all__ = ["Delivery", "FastPublisher"]


@dataclass(slots=True)
class FastPublisher:
    """A supervised publish-only connection. Run ``run()`` in a task; publish bursts through
    :meth:`publish_many`."""

    settings: Settings
    client_id: str
    logger: structlog.typing.FilteringBoundLogger | None = None
    link: Mqtt5Link = field(init=False)

    def __post_init__(self) -> None:
        self.link = Mqtt5Link(self.settings, self.client_id, logger=self.logger)

    @property
    def stats(self) -> Mqtt5Stats:
        return self.link.stats

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def wait_connected(self, timeout: float) -> None:
        await self.link.wait_connected(timeout)

    async def run(self) -> None:
        """Stay connected until cancelled. Raises AuthenticationError on bad credentials."""
        await self.link.run()

    async def publish_many(
        self, messages: Sequence[LinkOutgoing | Outgoing], *, timeout: float | None = None
    ) -> Delivery:
        """Publish a burst, in order; wait (up to ``timeout``, default the publish timeout)
        for the broker's answers. See the module docstring for what a drop returns."""
        out = [
            m if isinstance(m, Outgoing) else Outgoing(m.topic, m.payload, m.qos, m.retain)
            for m in messages
        ]
        return await self.link.publish_many(out, timeout=timeout)
