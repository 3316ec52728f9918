"""A publish-only MQTT 3.1.1 client for bursts of QoS 1 messages (setpoints), on asyncio.

Why: a step that changes every vehicle's setpoint sends one QoS 1 message per vehicle.
Through the general client (paho under aiomqtt) that costs a ``MQTTMessageInfo``, a lock,
a socket write and a callback per message: ~9k msg/s, 873 ms (p99) to put 10k setpoints
on the wire and 8 s for 100k (bench/dispatch_latency.py, bench/control_step.py). This
client frames thousands of PUBLISH packets into one ``transport.write``, reads the PUBACKs
straight out of the socket buffer, and reports per message whether the broker took it.

- Packet ids are 16 bits: at most ``max_inflight`` (<= 65,535) messages are in flight;
  a longer burst waits for PUBACKs to free ids, within the publish timeout.
- :meth:`FastPublisher.publish_many` raises :class:`TransportError` at once, having sent
  nothing, while disconnected; a connection lost mid-burst (or a timeout) returns the
  messages acknowledged so far (:class:`Delivery`): the caller re-sends the others later.
  Nothing is retransmitted on reconnect (clean session): setpoints are decided afresh.
- It reconnects through :func:`broker.link.supervise`, as :class:`broker.link.MqttLink`
  does, keeps the connection alive with PINGREQ, honours TLS and credentials from the settings,
  and stops loudly (AuthenticationError) on bad credentials.
- MQTT 3.1.1, not 5: Mosquitto grants an MQTT 5 client a Receive Maximum of 20 in-flight
  messages, which would cap a burst at the round-trip rate. The price: a publish the
  broker's ACL refuses is acknowledged all the same (3.1.1 has no reason codes), so ACL
  refusals show only on the ``MqttLink`` path.

The setpoint payloads it carries are formatted by broker/codec.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog
from numpy.typing import NDArray

from broker.fastlink import close_session, keep_alive, open_session
from broker.framing import BAD_LENGTH, MAX_FRAME_BYTES, decode_length, encode_length
from broker.link import Outgoing, supervise, wait_connected
from broker.settings import MqttTarget, Settings
from core.errors import TransportError

log = structlog.get_logger("broker.fastpub")

MAX_INFLIGHT = 65_535  # MQTT packet ids are 16 bits, 0 is not one
CHUNK = 512  # messages framed into one write: the broker starts on the first ones at once


@dataclass(slots=True)
class PublishStats:
    connects: int = 0
    disconnects: int = 0
    sent: int = 0  # PUBLISH packets written
    acked: int = 0  # ... of which the broker acknowledged in time
    unacked: int = 0  # ... lost with a connection or not acknowledged in time
    refused_offline: int = 0  # messages of bursts refused while disconnected
    connected_at: float = 0.0  # time.monotonic() of the last successful connect
    taken_over: int = 0  # drops to another client with our id (broker/link.py)
    taken_over_at: float = -1e9  # time.monotonic() of the latest
    last_disconnect: str = ""  # "session_taken_over", or the error of the last drop


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of a burst: ``acked[i]`` is True if the broker acknowledged message i
    (QoS 0: if it was written)."""

    acked: NDArray[np.bool_]

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.acked))

    @property
    def complete(self) -> bool:
        return bool(self.acked.all())


class _Burst:
    """One ``publish_many`` call's bookkeeping, updated by the protocol as PUBACKs come."""

    __slots__ = ("acked", "pending", "settled")

    def __init__(self, n: int, settled: asyncio.Future[None]) -> None:
        self.acked = bytearray(n)
        self.pending = 0  # written and not yet acknowledged
        self.settled = settled  # resolved when pending drops to 0 or the connection goes


class _Protocol(asyncio.Protocol):
    """One connection: packet ids in flight, PUBACKs, CONNACK, PINGRESP, write pauses."""

    def __init__(
        self, max_inflight: int, on_lost: Callable[[_Protocol], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.on_lost = on_lost  # told at once, before the supervisor notices
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.free: list[int] = list(range(max_inflight, 0, -1))  # pop() gives 1, 2, ...
        self.owner: list[_Burst | None] = [None] * 65_536
        self.slot: list[int] = [0] * 65_536
        self.bursts: set[_Burst] = set()
        self.space = asyncio.Event()  # set while a packet id is free
        self.space.set()
        self.writable = asyncio.Event()  # cleared while the transport's buffer is full
        self.writable.set()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[Exception | None] = loop.create_future()
        self.lost = False
        self.last_rx = time.monotonic()

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.connack.done():
            self.connack.set_exception(TransportError(f"connection lost: {exc}"))
        for burst in self.bursts:
            if not burst.settled.done():
                burst.settled.set_result(None)
        self.space.set()  # wake writers: they see ``lost`` and stop
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        owner, slot, free = self.owner, self.slot, self.free
        freed = False
        while n - pos >= 2:
            first = buf[pos]
            if first == 0x40 and buf[pos + 1] == 2:  # PUBACK, the common case by far
                if n - pos < 4:
                    break
                pid = (buf[pos + 2] << 8) | buf[pos + 3]
                pos += 4
                burst = owner[pid]
                if burst is not None:
                    owner[pid] = None
                    free.append(pid)
                    freed = True
                    burst.acked[slot[pid]] = 1
                    burst.pending -= 1
                    if not burst.pending and not burst.settled.done():
                        burst.settled.set_result(None)
                continue
            length, i = decode_length(buf, pos + 1, n)
            if length == BAD_LENGTH:
                self._broken("bad remaining length")
                return
            if length < 0:
                break
            if length > MAX_FRAME_BYTES:
                self._broken(f"frame of {length} bytes")
                return
            end = i + length
            if end > n:
                break
            kind = first >> 4
            if kind == 2 and not self.connack.done():  # CONNACK: flags, return code
                self.connack.set_result(buf[i + 1] if length >= 2 else 255)
            elif kind == 3:  # a PUBLISH: we subscribe to nothing, so a broken broker
                self._broken("the broker sent a PUBLISH to a publish-only client")
                return
            # PINGRESP (13) and anything else: last_rx is all that matters
            pos = end
        if pos:
            del buf[:pos]
        if freed:
            self.space.set()

    # -- writing ---------------------------------------------------------------------------
    def send(self, messages: Sequence[Outgoing], start: int, stop: int, burst: _Burst) -> int:
        """Frame ``messages[start:stop]`` into one write; QoS 1 ones take a free packet id
        each (the caller made sure there are enough). Returns how many were written."""
        assert self.transport is not None
        free, owner, slot = self.free, self.owner, self.slot
        frames: list[bytes] = []
        add = frames.append
        for k in range(start, stop):
            m = messages[k]
            topic = m.topic.encode()
            payload = m.payload
            tlen = len(topic)
            if m.qos:
                pid = free.pop()
                owner[pid] = burst
                slot[pid] = k
                burst.pending += 1
                add(
                    bytes((0x32 | (1 if m.retain else 0),))
                    + encode_length(tlen + 4 + len(payload))
                    + tlen.to_bytes(2, "big")
                    + topic
                    + pid.to_bytes(2, "big")
                    + payload
                )
            else:
                burst.acked[k] = 1
                add(
                    bytes((0x30 | (1 if m.retain else 0),))
                    + encode_length(tlen + 2 + len(payload))
                    + tlen.to_bytes(2, "big")
                    + topic
                    + payload
                )
        if not free:
            self.space.clear()
        self.transport.write(b"".join(frames))
        return stop - start

    def _broken(self, why: str) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed.done():
            self.closed.set_result(TransportError(f"broken MQTT stream: {why}"))


@dataclass(slots=True)
class FastPublisher:
    """A supervised publish-only connection. Run ``run()`` in a task; publish bursts through
    :meth:`publish_many`."""

    settings: Settings
    client_id: str
    max_inflight: int = MAX_INFLIGHT
    logger: structlog.typing.FilteringBoundLogger | None = None
    stats: PublishStats = field(default_factory=PublishStats)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _proto: _Protocol | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_inflight <= MAX_INFLIGHT:
            raise ValueError(f"max_inflight must be 1..{MAX_INFLIGHT}, not {self.max_inflight}")

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._proto is not None and not self._proto.lost

    async def wait_connected(self, timeout: float) -> None:
        await wait_connected(
            self._connected, timeout, self.settings.broker_url, "setpoint connection"
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
            event="setpoint_link_disconnected",
            client_id=self.client_id,
            lg=lg,
        )

    def _lost(self, proto: _Protocol) -> None:
        """A connection went: not connected from now, not once the supervisor notices."""
        if self._proto is proto:
            self._connected.clear()

    async def _session(self, target: MqttTarget, lg: structlog.typing.FilteringBoundLogger) -> None:
        transport, proto = await open_session(
            self.settings,
            target,
            self.client_id,
            lambda: _Protocol(self.max_inflight, self._lost),
            "setpoint",
            lg,
        )
        try:
            self._proto = proto
            self.stats.connects += 1
            self.stats.connected_at = time.monotonic()
            self._connected.set()
            if self.stats.connects > 1:
                lg.info("setpoint_link_reconnected", client_id=self.client_id)
            await keep_alive(transport, proto, self.settings.keepalive_s)
        finally:
            self._connected.clear()
            self._proto = None
            close_session(transport)

    async def publish_many(
        self, messages: Sequence[Outgoing], *, timeout: float | None = None
    ) -> Delivery:
        """Publish a burst, in order; wait (up to ``timeout``, default the publish timeout)
        for the broker to acknowledge the QoS 1 ones. Raises TransportError, having sent
        nothing, while disconnected; a connection lost on the way, or the timeout, returns
        with the messages acknowledged so far marked in the :class:`Delivery`."""
        n = len(messages)
        if not n:
            return Delivery(np.zeros(0, dtype=np.bool_))
        proto = self._proto
        if proto is None or proto.lost or not self._connected.is_set():
            self.stats.refused_offline += n
            raise TransportError(
                f"setpoint connection to {self.settings.broker_url} is down; {n} messages not sent"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.publish_timeout_s if timeout is None else timeout)
        burst = _Burst(n, loop.create_future())
        proto.bursts.add(burst)
        sent = 0
        try:
            while sent < n and not proto.lost:
                if not proto.free and not await _wait_event(proto.space, deadline):
                    break
                if not proto.writable.is_set() and not await _wait_event(proto.writable, deadline):
                    break
                if proto.lost:
                    break
                stop = min(n, sent + min(CHUNK, len(proto.free)))
                written = proto.send(messages, sent, stop, burst)
                sent += written
                self.stats.sent += written
                if sent < n:
                    await asyncio.sleep(0)  # let the PUBACKs in before the next chunk
            if burst.pending and not proto.lost:
                if burst.settled.done():  # it settled between chunks: wait afresh
                    burst.settled = loop.create_future()
                await asyncio.wait({burst.settled}, timeout=max(0.0, deadline - loop.time()))
        finally:
            proto.bursts.discard(burst)
        acked = np.frombuffer(bytes(burst.acked), dtype=np.bool_)
        done = int(np.count_nonzero(acked))
        self.stats.acked += done
        self.stats.unacked += n - done
        if done < n:
            (self.logger or log).warning(
                "setpoints_unacknowledged",
                client_id=self.client_id,
                unacknowledged=n - done,
                of=n,
                connection_lost=proto.lost,
            )
        return Delivery(acked)


async def _wait_event(event: asyncio.Event, deadline: float) -> bool:
    """Wait for ``event`` until the loop time ``deadline``; False if it did not come."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        return event.is_set()
    try:
        async with asyncio.timeout(remaining):
            await event.wait()
    except TimeoutError:
        return False
    return True
