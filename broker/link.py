"""The one MQTT connection helper every process uses, over aiomqtt.

``MqttLink.run()`` is a reconnect supervisor: it connects (with the last will), subscribes
to every wanted filter and publishes the birth messages on *every* connect, hands each
message to a synchronous handler, and on a lost connection waits a capped, jittered,
exponential backoff before trying again. Bad credentials stop it loudly instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import aiomqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from broker.errors import AuthenticationError, TransportError
from broker.settings import MqttTarget, Settings

log = structlog.get_logger("broker.link")

# CONNACK codes that mean "your credentials are wrong": MQTT 3.1.1 (4, 5) and 5.0 (134, 135).
_AUTH_CODES = frozenset({4, 5, 134, 135})

Handler = Callable[[aiomqtt.Message], None]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: used for wills and birth messages."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    handler_errors: int = 0
    dropped_offline: int = 0
    connected_at: float = 0.0  # time.monotonic() of the last successful connect


def backoff_delays(minimum: float, maximum: float) -> Iterator[float]:
    """Capped exponential backoff with jitter: spreads a reconnect storm out.

    Even the first delay is drawn from [minimum, 2 x minimum]: clients that lost the
    broker at the same instant must not all come back at the same instant.
    """
    ceiling = min(maximum, 2.0 * minimum)
    while True:
        yield random.uniform(minimum, ceiling)
        ceiling = min(maximum, ceiling * 2.0)


def _is_auth_refusal(err: aiomqtt.MqttError) -> bool:
    rc = getattr(err, "rc", None)
    value = rc.value if isinstance(rc, ReasonCode) else rc
    return isinstance(value, int) and value in _AUTH_CODES


@dataclass(slots=True)
class MqttLink:
    """A supervised MQTT connection. Create it, run ``run()`` in a task, publish through it."""

    settings: Settings
    client_id: str
    handler: Handler | None = None
    subscriptions: Sequence[tuple[str, int]] = ()
    will: Outgoing | Callable[[], Outgoing] | None = None
    birth: Callable[[], Sequence[Outgoing]] = lambda: ()
    logger: structlog.typing.FilteringBoundLogger | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    _client: aiomqtt.Client | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the link is up, or raise TransportError after ``timeout`` seconds."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can turn a cancellation
        # that lands as it times out into a TimeoutError, and the task never stops.
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise TransportError(
                f"no connection to the broker at {self.settings.broker_url} after {timeout:.1f}s;"
                " is it running? (check --broker / V2G_BROKER_URL)"
            ) from None

    def _make_client(self, target: MqttTarget) -> aiomqtt.Client:
        tls_context = None
        if target.tls:
            tls_context = ssl.create_default_context(cafile=self.settings.tls_ca_file)
            if self.settings.tls_cert_file:
                tls_context.load_cert_chain(self.settings.tls_cert_file, self.settings.tls_key_file)
        will = None
        if self.will is not None:
            w = self.will() if callable(self.will) else self.will
            will = aiomqtt.Will(w.topic, w.payload, w.qos, w.retain)
        return aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
            identifier=self.client_id,
            will=will,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.publish_timeout_s,
            tls_context=tls_context,
            logger=logging.getLogger(f"aiomqtt.{self.client_id}"),
            max_queued_outgoing_messages=100_000,
            # paho's default of 20 unacknowledged QoS 1 messages caps a burst of setpoints
            # at the round-trip rate; 1000 in flight doubles what one connection moves.
            max_inflight_messages=1000,
        )

    async def run(self) -> None:
        """Stay connected until cancelled. Raises AuthenticationError on bad credentials."""
        lg = self.logger or log
        target = self.settings.mqtt_target()
        delays = backoff_delays(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        while True:
            try:
                async with self._make_client(target) as client:
                    self._client = client
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    for msg in self.birth():
                        await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
                    self.stats.connects += 1
                    self.stats.connected_at = time.monotonic()
                    self._connected.set()
                    delays = backoff_delays(
                        self.settings.reconnect_min_s, self.settings.reconnect_max_s
                    )
                    if self.stats.connects > 1:
                        lg.info("mqtt_reconnected", client_id=self.client_id)
                    async for message in client.messages:
                        self._dispatch(message, lg)
            except aiomqtt.MqttError as err:
                self._connected.clear()
                self._client = None
                if _is_auth_refusal(err):
                    lg.error("mqtt_auth_refused", client_id=self.client_id, error=str(err))
                    raise AuthenticationError(
                        f"broker {target.host}:{target.port} refused client {self.client_id!r}:"
                        f" {err}; check the username and password (V2G_USERNAME/V2G_PASSWORD)"
                    ) from err
                self.stats.disconnects += 1
                delay = next(delays)
                lg.warning(
                    "mqtt_disconnected",
                    client_id=self.client_id,
                    error=str(err),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
            finally:
                self._connected.clear()
                self._client = None

    def _dispatch(
        self, message: aiomqtt.Message, lg: structlog.typing.FilteringBoundLogger
    ) -> None:
        self.stats.received += 1
        if self.handler is None:
            return
        try:
            self.handler(message)
        except Exception as exc:  # a handler bug must not take the connection down
            self.stats.handler_errors += 1
            lg.exception(
                "mqtt_handler_error", topic=str(message.topic)[:200], error=repr(exc)[:200]
            )

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> bool:
        """Publish one message. QoS 0 while disconnected is dropped (returns False); QoS >= 1
        waits for the connection up to the publish timeout, then raises TransportError."""
        client = self._client
        if client is None or not self._connected.is_set():
            if qos == 0:
                self.stats.dropped_offline += 1
                return False
            await self.wait_connected(self.settings.publish_timeout_s)
            client = self._client
            assert client is not None
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as err:
            raise TransportError(f"publish to {topic} failed: {err}") from err
        return True

    async def publish_many(self, messages: Sequence[Outgoing]) -> int:
        """Publish many messages at once; returns how many the broker took (acked for
        QoS >= 1) within the publish timeout.

        A burst goes straight to aiomqtt's paho client and the acks are awaited together:
        awaiting ``Client.publish`` message by message costs an asyncio.Event and a
        wait_for each, which halves the rate of a 10k-setpoint burst (bench/control_step.py).
        While disconnected, QoS 0 is dropped and QoS >= 1 waits for the connection.
        """
        if not messages:
            return 0
        if self._client is None or not self._connected.is_set():
            if all(m.qos == 0 for m in messages):
                self.stats.dropped_offline += len(messages)
                return 0
            await self.wait_connected(self.settings.publish_timeout_s)
        client = self._client
        assert client is not None
        paho = client._client  # aiomqtt keeps its paho client private; pinned < 3
        infos = []
        for m in messages:
            info = paho.publish(m.topic, m.payload, m.qos, m.retain)
            if info.rc != 0:  # the connection went away mid-burst
                break
            infos.append(info)
        deadline = time.monotonic() + self.settings.publish_timeout_s
        first = 0
        while first < len(infos) and time.monotonic() < deadline:
            while first < len(infos) and infos[first].is_published():
                first += 1
            if first < len(infos):
                await asyncio.sleep(0.002)
        done = sum(1 for info in infos[first:] if info.is_published()) + first
        if done < len(messages):
            self.stats.dropped_offline += len(messages) - done
        return done
