"""The telemetry ingest connection: QoS 0 subscriptions whose every message goes to a
synchronous ``handler(topic, payload)``, in the order received.

It was a hand-written MQTT 3.1.1 client; it is now :class:`broker.mqtt5link.Mqtt5Link`
(MQTT 5, the ``mqtt5`` codec) with its ``on_batch`` sink: as fast on the ingest bench
(bench/mqtt_clients.py, bench/ingest.py), and a ``$share`` subscription is now MQTT 5's
own instead of riding on broker leniency. This module keeps the name and the
constructor the aggregator service builds it with (``AggregatorService(fast_ingest=True)``);
once the service takes a :class:`~broker.transport.Transport` itself, it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from broker.mqtt5link import Mqtt5Link, Mqtt5Stats
from broker.settings import Settings
from broker.transport import Received

log = structlog.get_logger("broker.fastlink")

RawHandler = Callable[[str, bytes], None]


@dataclass(slots=True)
class FastIngest:
    """Subscribes to ``filters`` (QoS 0) and hands every message to ``handler(topic,
    payload)``, synchronously, in the order received. Run ``run()`` in a task."""

    settings: Settings
    client_id: str
    handler: RawHandler
    filters: Sequence[str] = ()
    logger: structlog.typing.FilteringBoundLogger | None = None
    link: Mqtt5Link = field(init=False)

    def __post_init__(self) -> None:
        self.link = Mqtt5Link(
            self.settings,
            self.client_id,
            subscriptions=[(f, 0) for f in self.filters],
            on_batch=self._on_batch,
            logger=self.logger,
        )

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

    def _on_batch(self, batch: Sequence[Received]) -> None:
        handler = self.handler
        for m in batch:
            try:
                handler(m.topic, m.payload)
            except Exception:  # one bad message must not cost the rest of the read
                self.link.stats.handler_errors += 1
                (self.logger or log).exception("fastlink_handler_error", topic=m.topic[:200])
