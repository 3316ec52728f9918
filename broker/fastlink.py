"""A receive-only MQTT 3.1.1 client for the telemetry ingest path, QoS 0, on asyncio.

Why: profiling the aggregator under per-vehicle telemetry (bench/ingest.py, py-spy)
showed ~80 % of its time inside the general client (paho under aiomqtt): a properties
object and a topic-matcher walk per message, one task wake-up per message, and large
messages read 2 KiB per call. This client parses PUBLISH frames straight out of the
socket buffer and calls a synchronous handler with ``(topic, payload)``; no per-message
allocation beyond the two strings it hands over.

It only subscribes and receives (QoS 0; a QoS 1 delivery is acknowledged), keeps the
connection alive with PINGREQ, and reconnects through :func:`broker.link.supervise`, the
loop :class:`broker.link.MqttLink` runs too, re-subscribing on every connect. Publishing, wills and
QoS 1 stay with ``MqttLink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

import structlog

from broker.framing import (
    BAD_LENGTH,
    DISCONNECT,
    MAX_FRAME_BYTES,
    PINGREQ,
    connect_packet,
    decode_length,
    subscribe_packet,
)
from broker.link import LinkStats, supervise, tls_context, wait_connected
from broker.settings import MqttTarget, Settings
from core.errors import AuthenticationError, TransportError

log = structlog.get_logger("broker.fastlink")

RawHandler = Callable[[str, bytes], None]


class Session(Protocol):
    """What the lean clients' protocols share for connecting and keeping alive."""

    connack: asyncio.Future[int]
    closed: asyncio.Future[Exception | None]
    last_rx: float


P = TypeVar("P", bound=asyncio.Protocol)  # and a Session


async def open_session(
    settings: Settings,
    target: MqttTarget,
    client_id: str,
    factory: Callable[[], P],
    what: str,
    lg: structlog.typing.FilteringBoundLogger,
) -> tuple[asyncio.Transport, P]:
    """Connect (TLS if the target says so), send CONNECT and wait for a CONNACK that
    accepts it. Raises AuthenticationError on a refused login, TransportError otherwise;
    the transport is closed on any failure."""
    loop = asyncio.get_running_loop()
    timeout = settings.publish_timeout_s
    async with asyncio.timeout(timeout):
        transport, proto = await loop.create_connection(
            factory, target.host, target.port, ssl=tls_context(settings, target)
        )
    try:
        transport.write(
            connect_packet(client_id, settings.keepalive_s, target.username, target.password)
        )
        async with asyncio.timeout(timeout):
            code = await cast(Session, proto).connack
        if code in (4, 5):
            lg.error("mqtt_auth_refused", client_id=client_id, code=code)
            raise AuthenticationError(
                f"broker {target.host}:{target.port} refused {what} client {client_id!r}"
                f" (CONNACK {code}); check V2G_USERNAME/V2G_PASSWORD"
            )
        if code != 0:
            raise TransportError(f"broker refused the connection (CONNACK {code})")
    except BaseException:
        close_session(transport)
        raise
    return transport, proto


async def keep_alive(transport: asyncio.Transport, proto: Session, keepalive_s: int) -> None:
    """PINGREQ every half keepalive until the connection goes; raises TransportError."""
    ping_every = max(1.0, keepalive_s / 2)
    while True:
        done, _ = await asyncio.wait({proto.closed}, timeout=ping_every)
        if done:
            raise TransportError(f"connection lost: {proto.closed.result()}")
        if time.monotonic() - proto.last_rx > 1.5 * keepalive_s:
            raise TransportError("no PINGRESP from the broker: the connection is dead")
        transport.write(PINGREQ)


def close_session(transport: asyncio.BaseTransport) -> None:
    """DISCONNECT (best effort) and close."""
    if not transport.is_closing():
        if isinstance(transport, asyncio.WriteTransport):
            with contextlib.suppress(Exception):
                transport.write(DISCONNECT)
        transport.close()


class _Protocol(asyncio.Protocol):
    """Splits the byte stream into packets; PUBLISH goes to the handler at once."""

    def __init__(
        self,
        handler: RawHandler,
        stats: LinkStats,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.handler = handler
        self.stats = stats
        self.log = logger or log
        # The start of a packet not all here yet, and how long it will be (a lower bound
        # while its length bytes are incomplete): a big packet arriving in many reads is
        # gathered without parsing or copying it again at each read.
        self.buf = bytearray()
        self.need = 0
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(TransportError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = bytes(buf)
            buf.clear()
        # Parsed straight out of ``data``: a payload is one slice of it, one copy. The
        # common case (a remaining length under 16 KiB: two bytes) is decode_length
        # inlined, without its loop; tests/unit/test_codec.py holds the two to each other.
        n = len(data)
        pos = received = need = 0
        handler = self.handler
        try:
            while n - pos >= 2:
                first = data[pos]
                byte = data[pos + 1]
                if byte < 0x80:
                    length, i = byte, pos + 2
                elif n - pos >= 3 and data[pos + 2] < 0x80:
                    length, i = (byte & 0x7F) | (data[pos + 2] << 7), pos + 3
                else:  # 3 or 4 length bytes, or not all of them here yet
                    length, i = decode_length(data, pos + 1, n)
                    if length == BAD_LENGTH:
                        self._broken("bad remaining length")
                        return
                    if length < 0:
                        need = n - pos + 1
                        break
                if length > MAX_FRAME_BYTES:
                    self._broken(f"frame of {length} bytes")
                    return
                end = i + length
                if end > n:
                    need = end - pos  # wait for the rest of the packet
                    break
                kind = first >> 4
                if kind == 3:  # PUBLISH
                    p = i + 2 + ((data[i] << 8) | data[i + 1]) if length >= 2 else end + 1
                    if p > end:
                        self._broken("PUBLISH topic longer than its packet")
                        return
                    topic = data[i + 2 : p].decode("utf-8", "replace")
                    if first & 0x06:  # QoS 1 or 2: a packet id follows the topic
                        pid = data[p : p + 2]
                        p += 2
                        if (first & 0x06) == 0x02 and self.transport is not None:
                            self.transport.write(b"\x40\x02" + pid)  # PUBACK
                    received += 1
                    try:
                        handler(topic, data[p:end])
                    except Exception:  # a handler bug must not take the connection down
                        self.stats.handler_errors += 1
                        self.log.exception("fastlink_handler_error", topic=topic[:200])
                elif kind == 2 and not self.connack.done():  # CONNACK
                    self.connack.set_result(data[i + 1] if length >= 2 else 255)
                elif kind == 9 and not self.suback.done():  # SUBACK
                    if 0x80 in data[i + 2 : end]:
                        self.suback.set_exception(
                            TransportError("the broker refused a subscription")
                        )
                    else:
                        self.suback.set_result(None)
                pos = end
            else:
                need = 2
        finally:
            self.stats.received += received
        if pos < n:
            self.need = need
            buf += memoryview(data)[pos:]

    def _broken(self, why: str) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed.done():
            self.closed.set_result(TransportError(f"broken MQTT stream: {why}"))


@dataclass(slots=True)
class FastIngest:
    """Subscribes to ``filters`` (QoS 0) and hands every message to ``handler(topic,
    payload)``, synchronously, in the order received. Run ``run()`` in a task."""

    settings: Settings
    client_id: str
    handler: RawHandler
    filters: Sequence[str] = ()
    logger: structlog.typing.FilteringBoundLogger | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        await wait_connected(
            self._connected, timeout, self.settings.broker_url, "ingest connection"
        )

    async def run(self) -> None:
        """Stay connected until cancelled. Raises AuthenticationError on bad credentials."""
        lg = self.logger or log
        target = self.settings.mqtt_target()
        await supervise(
            lambda: self._session(target, lg),
            settings=self.settings,
            stats=self.stats,
            connected=self._connected,
            event="ingest_disconnected",
            client_id=self.client_id,
            lg=lg,
        )

    async def _session(self, target: MqttTarget, lg: structlog.typing.FilteringBoundLogger) -> None:
        s = self.settings
        transport, proto = await open_session(
            s, target, self.client_id, lambda: _Protocol(self.handler, self.stats, lg),
            "ingest", lg,
        )  # fmt: skip
        try:
            if self.filters:
                transport.write(subscribe_packet(1, self.filters))
                async with asyncio.timeout(s.publish_timeout_s):
                    await proto.suback
            self.stats.connects += 1
            self.stats.connected_at = time.monotonic()
            self._connected.set()
            if self.stats.connects > 1:
                lg.info("ingest_reconnected", client_id=self.client_id)
            await keep_alive(transport, proto, s.keepalive_s)
        finally:
            close_session(transport)
