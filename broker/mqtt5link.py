"""The MQTT 5 :class:`~broker.transport.Transport`: one asyncio protocol on the ``mqtt5``
codec (Rust), supervised by :func:`broker.link.supervise`, the one reconnect loop.

Why this stack (measured by bench/mqtt_clients.py; the numbers are in the commit that
chose it and in docs/ARCHITECTURE.md): the maintained asyncio clients on PyPI here either
drop the PUBACK reason code (gmqtt 0.8: "TODO: For MQTT 5.0 parse reason code"), await
one future per QoS 1 publish (zmqtt 0.2), or are paho under a wrapper (aiomqtt 2.5; no
aiomqtt 3 is published). The codec frames and parses every packet (no hand framing); this
module owns only the flow: packet ids, the broker's Receive Maximum, batches of
received messages, keepalive.

MQTT 5 throughout:

- every QoS 1 publish comes back with the broker's reason code (:class:`Delivery`): a
  setpoint the ACL refuses is NOT_AUTHORIZED, not delivered;
- at most the broker's Receive Maximum (CONNACK) QoS 1 publishes are in flight, and ours
  (``receive_maximum``) bounds what the broker sends us;
- ``session_expiry_s`` > 0 keeps the session (and a delayed will) across a short drop:
  clean start on the first connect only, then resumed;
- a DISCONNECT from the broker carries its reason code (0x8E: session taken over, seen by
  the supervisor's TakeoverWatch).

Topic aliases are not used: a setpoint burst names each vehicle's topic once, so an alias
would cost a table entry and save nothing; bridge batches go to ~1 topic per 1000
vehicles, where the saving is a few bytes of a ~50 KB message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import mqtt5
import numpy as np
import structlog

from broker.link import supervise, tls_context, wait_connected
from broker.settings import MqttTarget, Settings
from broker.transport import (
    NO_ANSWER,
    SUCCESS,
    Delivery,
    MemoryTransport,
    Outgoing,
    Received,
    Transport,
)
from core.errors import AuthenticationError, TransportError

log = structlog.get_logger("broker.mqtt5link")

MAX_PACKET_ID = 65_535  # packet ids are 16 bits, 0 is not one
CHUNK = 512  # publishes framed into one write: the broker starts on the first ones at once
INBOX_BATCHES = 256  # received batches queued before reading from the socket pauses
_AUTH_CODES = frozenset({0x86, 0x87})  # CONNACK: bad user name or password, not authorized
_Q1 = mqtt5.QoS.AT_LEAST_ONCE
_Q0 = mqtt5.QoS.AT_MOST_ONCE


class BrokerDisconnected(TransportError):
    """The broker sent DISCONNECT; ``reason_code`` says why (0x8E: session taken over)."""

    def __init__(self, reason_code: int, reason: str | None) -> None:
        super().__init__(
            f"the broker disconnected this client: reason code 0x{reason_code:02X}"
            + (f" ({reason})" if reason else "")
        )
        self.reason_code = reason_code


@dataclass(slots=True)
class Mqtt5Stats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    handler_errors: int = 0  # on_batch raised
    sent: int = 0  # PUBLISH packets written
    acked: int = 0  # ... the broker took (SUCCESS or no matching subscribers)
    refused: int = 0  # ... the broker answered with a failure reason code (the ACL)
    unanswered: int = 0  # ... lost with a connection or not answered in time
    refused_offline: int = 0  # messages of bursts refused while disconnected
    last_refusal: tuple[str, int] | None = None  # (topic, reason code) of the latest
    receive_maximum: int = 0  # what the broker granted in its CONNACK
    connected_at: float = 0.0
    taken_over: int = 0
    taken_over_at: float = -1e9
    last_disconnect: str = ""


def packet_size(head: bytes) -> int:
    """The whole size of the packet ``head`` starts with, read off its fixed header (type
    byte, remaining length); 0 while the header itself is not all here. Only so that a big
    packet arriving in many reads is parsed once, when complete, not at every read (the
    codec says "not enough bytes" and no more): 1 MiB in 1460-byte reads cost 700x."""
    size, shift = 0, 0
    for i in range(1, min(len(head), 5)):
        byte = head[i]
        size |= (byte & 0x7F) << shift
        if byte < 0x80:
            return 1 + i + size
        shift += 7
    return 0


class _Burst:
    """One publish_many call: its messages, the next one to send, and a reason code per
    message, updated as PUBACKs come; ``settled`` once all are sent and answered."""

    __slots__ = ("messages", "next", "pending", "reason", "settled")

    def __init__(self, messages: Sequence[Outgoing], settled: asyncio.Future[None]) -> None:
        self.messages = messages
        self.next = 0
        self.reason = bytearray(b"\xff" * len(messages))  # NO_ANSWER
        self.pending = 0  # sent, not yet answered
        self.settled = settled

    def settle_if_done(self) -> None:
        if not self.pending and self.next >= len(self.messages) and not self.settled.done():
            self.settled.set_result(None)


class _Protocol(asyncio.Protocol):
    """One connection: the codec reads each packet; PUBLISH batches go to ``deliver``."""

    def __init__(
        self,
        deliver: Callable[[list[Received]], None],
        on_lost: Callable[[_Protocol], None],
        stats: Mqtt5Stats | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.stats = Mqtt5Stats() if stats is None else stats
        self.deliver = deliver
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.parts: list[bytes] = []  # the reads of a packet not all here yet,
        self.have = 0  # ... how many bytes they hold,
        self.need = 0  # ... and its whole size, once its fixed header is here
        self.free: list[int] = []  # packet ids we may use: the broker's Receive Maximum
        self.owner: dict[int, tuple[_Burst, int]] = {}
        self.bursts: set[_Burst] = set()
        self.queue: collections.deque[_Burst] = collections.deque()  # with messages unsent
        self.writable = True
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.subacks: dict[int, asyncio.Future[list[int]]] = {}
        self.closed: asyncio.Future[Exception | None] = loop.create_future()
        self.lost = False
        self.last_rx = time.monotonic()
        self.orphans: set[int] = set()  # ids of publishes given up on: freed if answered late

    def grant(self, receive_maximum: int) -> None:
        """The broker's Receive Maximum: that many of our QoS 1 publishes in flight."""
        self.free = list(range(min(receive_maximum, MAX_PACKET_ID), 0, -1))

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.on_lost(self)
        self._close(exc)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.pump()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.parts:
            self.parts.append(data)
            self.have += len(data)
            if self.have < self.need:
                return  # the packet at the head is not all here: do not parse it again
            work = b"".join(self.parts)  # one copy, however many reads it came in
            self.parts = []
        else:
            work = data
        n = len(work)
        pos = 0
        batch: list[Received] = []
        freed = False
        read = mqtt5.read
        publish, puback = mqtt5.PublishPacket, mqtt5.PubAckPacket
        with memoryview(work) as view:
            while pos < n:
                try:
                    packet, used = read(view[pos:])
                except IndexError:  # not all of the packet is here yet
                    break
                except ValueError as err:
                    if not self.connack.done():  # e.g. an MQTT 3.1.1 CONNACK: no properties
                        self._broken(
                            "the broker's CONNACK is not MQTT 5: this link needs an MQTT 5"
                            f" broker (Mosquitto 2), not the embedded one ({err})"
                        )
                    else:
                        self._broken(f"malformed packet: {err}")
                    return
                pos += used
                if isinstance(packet, publish):
                    batch.append(packet)  # a Received as it is: topic, payload, ...
                    pid = packet.packet_id  # QoS 1 (we never subscribe at 2)
                    if pid is not None and self.transport is not None:
                        self.transport.write(puback(pid).write())
                elif isinstance(packet, puback):
                    freed |= self._acked(packet.packet_id, int(packet.reason_code))
                else:
                    self._control(packet)
        if pos < n:
            self.parts = [work[pos:]]
            self.have = n - pos
            self.need = packet_size(self.parts[0])
        if freed and self.queue:
            self.pump()  # the window moved: send what waits, no task wake-up needed
        if batch:
            self.deliver(batch)

    def _acked(self, pid: int, code: int) -> bool:
        entry = self.owner.pop(pid, None)
        if entry is None:
            if pid in self.orphans:
                self.orphans.discard(pid)
                self.free.append(pid)
                return True
            return False
        burst, slot = entry
        self.free.append(pid)
        burst.reason[slot] = code
        burst.pending -= 1
        if not burst.pending:
            burst.settle_if_done()
        return True

    def _control(self, packet: object) -> None:
        if isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            fut = self.subacks.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result([int(c) for c in packet.reason_codes])
        elif isinstance(packet, mqtt5.DisconnectPacket):
            err = BrokerDisconnected(int(packet.reason_code), packet.reason_str)
            if self.transport is not None:
                self.transport.close()
            self._close(err)
        # PINGRESP, and anything else: last_rx is all that matters

    def _close(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        lost = exc if isinstance(exc, TransportError) else TransportError(f"connection lost: {exc}")
        if not self.connack.done():
            self.connack.set_exception(lost)
        for fut in self.subacks.values():
            if not fut.done():
                fut.set_exception(lost)
        for burst in self.bursts:
            if not burst.settled.done():
                burst.settled.set_result(None)
        self.queue.clear()

    def _broken(self, why: str) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        self._close(TransportError(f"broken MQTT stream: {why}"))

    # -- writing ---------------------------------------------------------------------------
    def pump(self) -> None:
        """Write what the queued bursts have unsent, in order, as far as free packet ids
        (the broker's Receive Maximum) allow and at most CHUNK at a time, in one write.
        Called by publish_many and again by every read that frees ids."""
        if self.lost or not self.writable or self.transport is None:
            return
        queue, free, owner = self.queue, self.free, self.owner
        packet = mqtt5.PublishPacket
        frames: list[bytes] = []
        add = frames.append
        budget = CHUNK
        while queue and budget:
            burst = queue[0]
            messages, k = burst.messages, burst.next
            stop = min(len(messages), k + budget)
            while k < stop:
                m = messages[k]
                if m.qos:
                    if not free:
                        break
                    pid: int | None = free.pop()
                    owner[pid] = (burst, k)  # type: ignore[index]
                    burst.pending += 1
                    qos = _Q1
                else:
                    burst.reason[k] = SUCCESS
                    pid, qos = None, _Q0
                add(
                    packet(
                        topic=m.topic,
                        payload=m.payload,
                        qos=qos,
                        retain=m.retain,
                        packet_id=pid,
                        response_topic=m.response_topic,
                        correlation_data=m.correlation_data,
                    ).write()
                )
                k += 1
            budget -= k - burst.next
            burst.next = k
            if k < len(messages):
                break  # out of packet ids or of this call's budget
            queue.popleft()
            burst.settle_if_done()
        if frames:
            self.stats.sent += len(frames)
            self.transport.write(b"".join(frames))


@dataclass(slots=True)
class Mqtt5Link:
    """A supervised MQTT 5 connection: a :class:`~broker.transport.Transport`. Run
    ``run()`` in a task (or use :meth:`running`); on every connect it subscribes to every
    filter asked for so far and publishes ``birth()``; ``will`` is left with the broker.

    Received messages come out of :meth:`batches`, or, with ``on_batch``, are handed to
    it synchronously as each read is parsed (the ingest path: no queue, no task wake-up;
    an exception it raises is counted and logged, never taken out on the connection)."""

    settings: Settings
    client_id: str
    subscriptions: Sequence[tuple[str, int]] = ()
    on_batch: Callable[[Sequence[Received]], None] | None = None
    will: Outgoing | None = None
    birth: Callable[[], Sequence[Outgoing]] = lambda: ()
    session_expiry_s: int = 0
    receive_maximum: int = MAX_PACKET_ID
    logger: structlog.typing.FilteringBoundLogger | None = None
    stats: Mqtt5Stats = field(default_factory=Mqtt5Stats)
    _filters: list[tuple[str, int]] = field(default_factory=list)
    _inbox: asyncio.Queue[list[Received]] = field(
        default_factory=lambda: asyncio.Queue(INBOX_BATCHES)
    )
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _proto: _Protocol | None = None
    _next_sub_id: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.receive_maximum <= MAX_PACKET_ID:
            raise ValueError(f"receive_maximum is 1..{MAX_PACKET_ID}, not {self.receive_maximum}")
        self._filters = list(self.subscriptions)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._proto is not None and not self._proto.lost

    async def wait_connected(self, timeout: float) -> None:
        await wait_connected(self._connected, timeout, self.settings.broker_url)

    @contextlib.asynccontextmanager
    async def running(self, timeout: float, *, name: str) -> AsyncIterator[Mqtt5Link]:
        """Run in a task called ``name`` for the life of the block, entered once connected:
        TransportError after ``timeout``, or at once whatever ended ``run()`` first
        (AuthenticationError on bad credentials)."""
        task = asyncio.create_task(self.run(), name=name)
        try:
            waiter = asyncio.create_task(self.wait_connected(timeout))
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()
            await waiter
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task

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
        )

    # -- the seam --------------------------------------------------------------------------
    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        new = [f for f in filters if f not in self._filters]
        self._filters.extend(new)
        proto = self._proto
        if new and proto is not None and self.connected:
            await self._subscribe(proto, new)

    async def batches(self) -> AsyncIterator[Sequence[Received]]:
        while True:
            batch = await self._inbox.get()
            proto = self._proto
            if proto is not None and proto.transport is not None and self._inbox.qsize() < 2:
                proto.transport.resume_reading()
            yield batch

    async def publish_many(
        self, messages: Sequence[Outgoing], *, timeout: float | None = None
    ) -> Delivery:
        n = len(messages)
        if not n:
            return Delivery.unanswered(0)
        proto = self._proto
        if proto is None or proto.lost or not self._connected.is_set():
            self.stats.refused_offline += n
            raise TransportError(
                f"MQTT connection to {self.settings.broker_url} is down; {n} messages not sent"
            )
        return await self._publish(proto, messages, timeout)

    # -- inside ----------------------------------------------------------------------------
    def _deliver(self, batch: list[Received]) -> None:
        self.stats.received += len(batch)
        if self.on_batch is not None:
            try:
                self.on_batch(batch)
            except Exception:  # a handler bug must not take the connection down
                self.stats.handler_errors += 1
                (self.logger or log).exception("mqtt_handler_error", client_id=self.client_id)
            return
        self._inbox.put_nowait(batch)
        proto = self._proto
        if self._inbox.full() and proto is not None and proto.transport is not None:
            proto.transport.pause_reading()  # the broker holds the rest until we catch up

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._connected.clear()

    async def _publish(
        self, proto: _Protocol, messages: Sequence[Outgoing], timeout: float | None
    ) -> Delivery:
        n = len(messages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.publish_timeout_s if timeout is None else timeout)
        burst = _Burst(messages, loop.create_future())
        proto.bursts.add(burst)
        proto.queue.append(burst)
        try:
            proto.pump()
            # Past the first CHUNK, while ids are free: let the PUBACKs in between chunks.
            # Out of ids, the reads that bring PUBACKs pump the rest by themselves.
            while (
                burst.next < n
                and proto.free
                and proto.writable
                and not proto.lost
                and loop.time() < deadline
            ):
                await asyncio.sleep(0)
                proto.pump()
            if not burst.settled.done():
                await asyncio.wait({burst.settled}, timeout=max(0.0, deadline - loop.time()))
        finally:
            proto.bursts.discard(burst)
            if burst in proto.queue:
                proto.queue.remove(burst)
            if burst.pending:  # given up on: an id comes free if its PUBACK comes late
                for pid in [p for p, (b, _) in proto.owner.items() if b is burst]:
                    del proto.owner[pid]
                    proto.orphans.add(pid)
        delivery = Delivery(np.frombuffer(bytes(burst.reason), dtype=np.uint8))
        self._count(delivery, messages)
        return delivery

    def _count(self, delivery: Delivery, messages: Sequence[Outgoing]) -> None:
        acked = delivery.count
        refused_at = np.flatnonzero(delivery.refused)
        unanswered = int(np.count_nonzero(delivery.reason == NO_ANSWER))
        self.stats.acked += acked
        self.stats.refused += len(refused_at)
        self.stats.unanswered += unanswered
        lg = self.logger or log
        if len(refused_at):
            i = int(refused_at[-1])
            code = int(delivery.reason[i])
            self.stats.last_refusal = (messages[i].topic, code)
            lg.error(
                "mqtt_publish_refused",
                client_id=self.client_id,
                count=len(refused_at),
                topic=messages[i].topic[:200],
                reason_code=code,
                note="the broker's ACL or limits refused these; retrying will not help",
            )
        if unanswered:
            lg.warning(
                "mqtt_publish_unanswered",
                client_id=self.client_id,
                unanswered=unanswered,
                of=len(messages),
            )

    async def _subscribe(self, proto: _Protocol, filters: Sequence[tuple[str, int]]) -> None:
        assert proto.transport is not None
        self._next_sub_id = self._next_sub_id % MAX_PACKET_ID + 1
        pid = self._next_sub_id
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        proto.subacks[pid] = fut
        wanted = [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS(q)) for f, q in filters]
        proto.transport.write(mqtt5.SubscribePacket(pid, wanted).write())
        async with asyncio.timeout(self.settings.publish_timeout_s):
            codes = await fut
        refused = [f for (f, _), c in zip(filters, codes, strict=False) if c >= 0x80]
        if refused:
            raise TransportError(
                f"the broker refused the subscription to {refused} (reason codes"
                f" {[hex(c) for c in codes if c >= 0x80]}); check the ACL"
            )

    async def _session(self, target: MqttTarget, lg: structlog.typing.FilteringBoundLogger) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(s.publish_timeout_s):
            transport, proto = await loop.create_connection(
                lambda: _Protocol(self._deliver, self._lost, self.stats),
                target.host,
                target.port,
                ssl=tls_context(s, target),
            )
        try:
            will = None
            if self.will is not None:
                w = self.will
                will = mqtt5.Will(
                    w.topic,
                    payload=w.payload,
                    qos=mqtt5.QoS(w.qos),
                    retain=w.retain,
                    will_delay_interval=min(s.will_delay_s, self.session_expiry_s),
                )
            transport.write(
                mqtt5.ConnectPacket(
                    self.client_id,
                    username=target.username,
                    password=None if target.password is None else target.password.encode(),
                    # A kept session is resumed after a drop, not thrown away with its will.
                    clean_start=self.session_expiry_s == 0 or self.stats.connects == 0,
                    will=will,
                    keep_alive=s.keepalive_s,
                    session_expiry_interval=self.session_expiry_s,
                    receive_max=self.receive_maximum,
                ).write()
            )
            async with asyncio.timeout(s.publish_timeout_s):
                connack = await proto.connack
            code = int(connack.reason_code)
            if code in _AUTH_CODES:
                lg.error("mqtt_auth_refused", client_id=self.client_id, code=code)
                raise AuthenticationError(
                    f"broker {target.host}:{target.port} refused client {self.client_id!r}"
                    f" (CONNACK 0x{code:02X}); check V2G_USERNAME/V2G_PASSWORD"
                )
            if code != 0:
                raise TransportError(f"broker refused the connection (CONNACK 0x{code:02X})")
            proto.grant(connack.receive_max)
            self.stats.receive_maximum = connack.receive_max
            self._proto = proto
            if self._filters:
                await self._subscribe(proto, self._filters)
            birth = self.birth()
            if birth:
                await self._publish(proto, birth, None)
            self.stats.connects += 1
            self.stats.connected_at = time.monotonic()
            self._connected.set()
            if self.stats.connects > 1:
                lg.info("mqtt_reconnected", client_id=self.client_id)
            keepalive = connack.server_keep_alive or s.keepalive_s
            await _keep_alive(transport, proto, keepalive)
        finally:
            self._connected.clear()
            if self._proto is proto:
                self._proto = None
            if not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(mqtt5.DisconnectPacket().write())
                transport.close()


async def _keep_alive(transport: asyncio.Transport, proto: _Protocol, keepalive_s: int) -> None:
    """PINGREQ every half keepalive until the connection goes; raises TransportError."""
    ping = mqtt5.PingReqPacket().write()
    every = max(1.0, keepalive_s / 2)
    while True:
        done, _ = await asyncio.wait({proto.closed}, timeout=every)
        if done:
            err = proto.closed.result()
            if isinstance(err, TransportError):
                raise err
            raise TransportError(f"connection lost: {err}")
        if time.monotonic() - proto.last_rx > 1.5 * keepalive_s:
            raise TransportError("no PINGRESP from the broker: the connection is dead")
        transport.write(ping)


def _conforms(link: Mqtt5Link, memory: MemoryTransport) -> tuple[Transport, Transport]:
    """Never called: mypy holds both implementations to the seam here."""
    return link, memory
