"""The one MQTT connection helper every process uses, over aiomqtt.

``MqttLink.run()`` is a reconnect supervisor: it connects (with the last will), subscribes
to every wanted filter and publishes the birth messages on *every* connect, hands each
message to a synchronous handler, and on a lost connection waits a capped, jittered,
exponential backoff before trying again. Bad credentials stop it loudly instead.

It speaks MQTT 5 (falling back to 3.1.1 for a broker that only knows that, such as the
embedded development broker), so that a publish the broker refuses comes back with a
reason code and is raised or counted as an error instead of vanishing, and so that a
will can be delayed (``V2G_WILL_DELAY_S``) to ride out a short reconnect without an
offline flap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.settings import MqttTarget, Settings
from core.errors import AuthenticationError, PublishRefused, TransportError

log = structlog.get_logger("broker.link")

# CONNACK codes that mean "your credentials are wrong": MQTT 3.1.1 (4, 5) and 5.0 (134, 135).
_AUTH_CODES = frozenset({4, 5, 134, 135})
# ... and "I do not speak MQTT 5": 3.1.1's 1, 5.0's 132, or no CONNACK at all (amqtt).
_VERSION_CODES = frozenset({1, 132})
# MQTT 5 DISCONNECT from the broker: another client connected with this client id.
SESSION_TAKEN_OVER = 0x8E
TAKEOVER_WINDOW_S = 60.0  # two drops this close, each taken back at once: a takeover
TAKEN_OVER_HINT = (
    "another client connected with the same client id and the broker closed this"
    " connection; give each process its own id (V2G_CLIENT_ID / --client-id, or its own"
    " --topic-prefix)"
)

Handler = Callable[[aiomqtt.Message], None]
MAX_BURST = 50_000  # messages handed to paho at once, well under its 65,535 message ids


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: used for wills and birth messages. ``properties``: MQTT 5
    publish properties (response topic, correlation data), dropped on MQTT 3.1.1."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    properties: Properties | None = None


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    handler_errors: int = 0
    dropped_offline: int = 0
    connected_at: float = 0.0  # time.monotonic() of the last successful connect
    refused: int = 0  # publishes the broker acknowledged with a failure reason code
    last_refusal: tuple[str, str] | None = None  # (topic, reason) of the latest
    taken_over: int = 0  # disconnects because another client connected with our id
    taken_over_at: float = -1e9  # time.monotonic() of the latest
    last_disconnect: str = ""  # "session_taken_over", or the error of the last one


def backoff_delays(minimum: float, maximum: float) -> Iterator[float]:
    """Capped exponential backoff with jitter: spreads a reconnect storm out.

    Even the first delay is drawn from [minimum, 2 x minimum]: clients that lost the
    broker at the same instant must not all come back at the same instant.
    """
    ceiling = min(maximum, 2.0 * minimum)
    while True:
        yield random.uniform(minimum, ceiling)
        ceiling = min(maximum, ceiling * 2.0)


async def wait_connected(
    connected: asyncio.Event, timeout: float, broker_url: str, what: str = "connection"
) -> None:
    """Wait for ``connected``, or raise TransportError naming the broker after ``timeout``."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can turn a cancellation
    # that lands as it times out into a TimeoutError, and the task never stops.
    try:
        async with asyncio.timeout(timeout):
            await connected.wait()
    except TimeoutError:
        raise TransportError(
            f"no {what} to the broker at {broker_url} after {timeout:.1f}s;"
            " is it running? (check --broker / V2G_BROKER_URL)"
        ) from None


def tls_context(settings: Settings, target: MqttTarget) -> ssl.SSLContext | None:
    """The TLS context of a connection to ``target``, None for plain TCP: the CA file and
    the client certificate of the settings (every client here, general or lean)."""
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if settings.tls_cert_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def _rc_value(err: aiomqtt.MqttError) -> int | None:
    rc = getattr(err, "rc", None)
    value = rc.value if isinstance(rc, ReasonCode) else rc
    return value if isinstance(value, int) else None


def _is_auth_refusal(err: aiomqtt.MqttError) -> bool:
    return _rc_value(err) in _AUTH_CODES


def is_session_taken_over(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is the broker's DISCONNECT 0x8E, "session taken
    over": aiomqtt raises "Disconnected during message iteration" from a MqttCodeError
    carrying the DISCONNECT's reason code, broker/mqtt5link.py a BrokerDisconnected with
    its ``reason_code`` (MQTT 5 only; 3.1.1 just closes the socket)."""
    seen: BaseException | None = err
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, aiomqtt.MqttError) and _rc_value(seen) == SESSION_TAKEN_OVER:
            return True
        if getattr(seen, "reason_code", None) == SESSION_TAKEN_OVER:  # broker/mqtt5link.py
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(slots=True)
class TakeoverWatch:
    """Tells a session taken over by another client from any other lost connection.

    A broker that sends MQTT 5 reason codes says so (0x8E). One that does not (Mosquitto
    before 2.0.15, and every broker to an MQTT 3.1.1 client) just closes the old
    connection, so the sign is the tug of war: a connection dropped, taken back at the
    first try, and dropped again within ``TAKEOVER_WINDOW_S``. A broker that restarts
    refuses the first tries; a broker that is there and keeps closing us is, most likely,
    another client with our id. Used by :func:`supervise`, the one reconnect loop.
    """

    tries: int = 0  # connect attempts since the last drop of a connection that was up
    last_drop: float | None = None  # time.monotonic() of that drop

    def attempt(self) -> None:
        """A connect attempt starts."""
        self.tries += 1

    def dropped(self, *, up: bool, now: float, reason_code_says: bool = False) -> str | None:
        """A connection ended (``up``: it had connected): the evidence of a takeover, or None."""
        repeated = (
            up
            and self.tries == 1
            and self.last_drop is not None
            and now - self.last_drop < TAKEOVER_WINDOW_S
        )
        if up:
            self.tries, self.last_drop = 0, now
        if reason_code_says:
            return "the broker's DISCONNECT, reason code 0x8E"
        if repeated:
            return (
                f"the broker closed this connection twice within {TAKEOVER_WINDOW_S:.0f} s"
                " and took it back at the first try each time"
            )
        return None


class SupervisedStats(Protocol):
    """The counters :func:`supervise` keeps (LinkStats, the lean links' stats)."""

    disconnects: int
    connected_at: float
    taken_over: int
    taken_over_at: float
    last_disconnect: str


async def supervise(
    session: Callable[[], Awaitable[None]],
    *,
    settings: Settings,
    stats: SupervisedStats,
    connected: asyncio.Event,
    event: str,
    client_id: str,
    lg: structlog.typing.FilteringBoundLogger,
    retry_on: tuple[type[Exception], ...] = (OSError, TransportError, TimeoutError),
) -> None:
    """The one reconnect loop (MqttLink, the lean links): run ``session`` again and again
    until cancelled, a capped, jittered backoff between tries, started over after a try
    that connected (``stats.connected_at`` set during it). AuthenticationError ends it;
    ``retry_on`` errors are logged as ``event`` and retried, a session taken over by
    another client with our id (:class:`TakeoverWatch`) as ``mqtt_session_taken_over``,
    after the longest backoff, since trying at once only goes on with the tug of war."""
    delays = backoff_delays(settings.reconnect_min_s, settings.reconnect_max_s)
    takeover = TakeoverWatch()
    while True:
        tried = time.monotonic()
        takeover.attempt()
        try:
            await session()
            raise TransportError("the broker closed the connection")
        except AuthenticationError:
            raise
        except retry_on as err:
            up = stats.connected_at >= tried
            if up:  # the next try comes soon
                delays = backoff_delays(settings.reconnect_min_s, settings.reconnect_max_s)
            stats.disconnects += 1
            delay = next(delays)
            now = time.monotonic()
            evidence = takeover.dropped(up=up, now=now, reason_code_says=is_session_taken_over(err))
            if evidence is not None:
                stats.taken_over += 1
                stats.taken_over_at = now
                stats.last_disconnect = "session_taken_over"
                delay = max(delay, settings.reconnect_max_s)
                lg.error(
                    "mqtt_session_taken_over",
                    client_id=client_id,
                    hint=TAKEN_OVER_HINT,
                    evidence=evidence,
                    taken_over=stats.taken_over,
                    retry_in_s=round(delay, 2),
                )
            else:
                stats.last_disconnect = str(err)[:200]
                lg.warning(
                    event, client_id=client_id, error=str(err)[:200], retry_in_s=round(delay, 2)
                )
            await asyncio.sleep(delay)
        finally:
            connected.clear()


def _is_version_refusal(err: aiomqtt.MqttError) -> bool:
    return isinstance(err, MqttConnectError) and (
        _rc_value(err) is None or _rc_value(err) in _VERSION_CODES
    )


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
    _v5: bool = True
    _refused: dict[int, ReasonCode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._v5 = self.settings.mqtt_protocol != "3.1.1"

    @property
    def protocol(self) -> str:
        return "5" if self._v5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the link is up, or raise TransportError after ``timeout`` seconds."""
        await wait_connected(self._connected, timeout, self.settings.broker_url)

    @contextlib.asynccontextmanager
    async def running(self, timeout: float, *, name: str) -> AsyncIterator[None]:
        """Run the link in a task called ``name`` for the life of the block, entered once it
        is connected: TransportError after ``timeout``, or at once whatever ended ``run()``
        first (AuthenticationError on bad credentials). The link stops when the block ends."""
        task = asyncio.create_task(self.run(), name=name)
        try:
            waiter = asyncio.create_task(self.wait_connected(timeout))
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:  # the link died first: say why
                waiter.cancel()
                task.result()
            await waiter
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task

    def _make_client(self, target: MqttTarget) -> aiomqtt.Client:
        delay = self.settings.will_delay_s if self._v5 else 0
        will = None
        if self.will is not None:
            w = self.will() if callable(self.will) else self.will
            props = None
            if delay:
                props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
                props.WillDelayInterval = delay
            will = aiomqtt.Will(w.topic, w.payload, w.qos, w.retain, props)
        connect_props = None
        clean_start: bool | Literal[3] = MQTT_CLEAN_START_FIRST_ONLY
        if delay:
            # A delayed will only helps if the session outlives the connection and the
            # next connect resumes it: a new session would end the old one, will and all.
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = delay
            clean_start = self.stats.connects == 0
        client = aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            clean_start=clean_start,
            properties=connect_props,
            will=will,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.publish_timeout_s,
            tls_context=tls_context(self.settings, target),
            logger=logging.getLogger(f"aiomqtt.{self.client_id}"),
            max_queued_outgoing_messages=100_000,
            # paho's default of 20 unacknowledged QoS 1 messages caps a burst of setpoints
            # at the round-trip rate; 1000 in flight doubles what one connection moves.
            max_inflight_messages=1000,
        )
        # aiomqtt drops PUBACK reason codes; catch the failures on the way past.
        paho = client._client
        inner: Any = paho.on_publish

        def on_publish(c: Any, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            if isinstance(rc, ReasonCode) and rc.is_failure:
                self._refused[mid] = rc
            inner(c, userdata, mid, rc, props)

        paho.on_publish = on_publish
        # paho leaves Nagle's algorithm on: a lone small publish (a setpoint, a signal)
        # then waits up to ~40 ms for the ACK of the one before. Measured (bench/
        # signal_latency.py, 1k vehicles batched): p50 44 ms with it, 6 ms without.
        inner_open: Any = paho.on_socket_open

        def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if inner_open is not None:
                inner_open(c, userdata, sock)

        paho.on_socket_open = on_socket_open
        return client

    async def run(self) -> None:
        """Stay connected until cancelled. Raises AuthenticationError on bad credentials."""
        lg = self.logger or log
        target = self.settings.mqtt_target()
        await supervise(
            lambda: self._session(target, lg),
            settings=self.settings,
            stats=self.stats,
            connected=self._connected,
            event="mqtt_disconnected",
            client_id=self.client_id,
            lg=lg,
            retry_on=(TransportError,),
        )

    async def _session(self, target: MqttTarget, lg: structlog.typing.FilteringBoundLogger) -> None:
        """One connection, from connect to drop: subscribe, publish the birth messages, hand
        each message to the handler. Raises TransportError when it drops (from aiomqtt's
        error), AuthenticationError on bad credentials; a broker that refuses MQTT 5 before
        the first connect (``mqtt_protocol`` auto) is tried again at once with 3.1.1."""
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
                    if self.stats.connects > 1:
                        lg.info("mqtt_reconnected", client_id=self.client_id)
                    async for message in client.messages:
                        self._dispatch(message, lg)
                return
            except aiomqtt.MqttError as err:
                auto = self.settings.mqtt_protocol == "auto"
                if auto and self._v5 and self.stats.connects == 0 and _is_version_refusal(err):
                    self._v5 = False
                    lg.info(
                        "mqtt_protocol_fallback",
                        client_id=self.client_id,
                        note="the broker refused MQTT 5; using 3.1.1 (no reason codes on"
                        " refused publishes, no will delay)",
                    )
                    continue
                if _is_auth_refusal(err):
                    lg.error("mqtt_auth_refused", client_id=self.client_id, error=str(err))
                    raise AuthenticationError(
                        f"broker {target.host}:{target.port} refused client {self.client_id!r}:"
                        f" {err}; check the username and password (V2G_USERNAME/V2G_PASSWORD)"
                    ) from err
                raise TransportError(str(err)) from err
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
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> bool:
        """Publish one message. QoS 0 while disconnected is dropped (returns False); QoS >= 1
        waits for the connection up to the publish timeout, then raises TransportError, and
        raises PublishRefused if the broker acknowledges it with a failure (MQTT 5)."""
        if qos == 0 and (self._client is None or not self._connected.is_set()):
            self.stats.dropped_offline += 1
            return False
        done = await self.publish_many([Outgoing(topic, payload, qos, retain, properties)])
        if done:
            return True
        if self.stats.last_refusal and self.stats.last_refusal[0] == topic:
            raise PublishRefused(
                f"the broker refused the publish to {topic}: {self.stats.last_refusal[1]};"
                f" check the ACL for {self.settings.mqtt_target().username or 'anonymous'}"
            )
        if qos == 0:
            return False
        raise TransportError(
            f"publish to {topic} was not acknowledged within"
            f" {self.settings.publish_timeout_s:g}s; is the broker at"
            f" {self.settings.broker_url} up?"
        )

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
        if len(messages) > MAX_BURST:
            # MQTT message ids are 16 bits: more than 65,535 in flight at once would reuse
            # ids still pending, and paho loses track of them. Go in bursts.
            done = 0
            for i in range(0, len(messages), MAX_BURST):
                done += await self.publish_many(messages[i : i + MAX_BURST])
            return done
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
            props = m.properties if self._v5 else None
            info = paho.publish(m.topic, m.payload, m.qos, m.retain, props)
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
        refused = [
            (m, self._refused.pop(i.mid))
            for m, i in zip(messages, infos, strict=False)
            if i.mid in self._refused
        ]
        if refused:
            self.stats.refused += len(refused)
            m, rc = refused[-1]
            self.stats.last_refusal = (m.topic, f"{rc} ({rc.value})")
            (self.logger or log).error(
                "mqtt_publish_refused",
                client_id=self.client_id,
                count=len(refused),
                topic=m.topic[:200],
                reason=str(rc),
                note="the broker's ACL or limits refused these; retrying will not help",
            )
            done -= len(refused)
        if done + len(refused) < len(messages):
            self.stats.dropped_offline += len(messages) - done - len(refused)
        return done
