"""The MQTT seam: what every process needs of the bus, and an in-memory bus for tests.

A :class:`Transport` publishes many messages at once and says, per message, what the
broker answered (:class:`Delivery`, MQTT 5 reason codes), subscribes to topic filters,
and is a source of received messages, a batch at a time (one batch per read of the
socket: no task wake-up per message on the ingest path). Nothing above ``broker/`` needs
to know which client runs behind it.

Two implementations: :class:`broker.mqtt5link.Mqtt5Link` (MQTT 5 over TCP or TLS, on the
``mqtt5`` codec) and :class:`MemoryTransport` here, on a :class:`MemoryBus` that routes
by topic filter and can refuse topics as a broker's ACL does, for tests without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from core.errors import TransportError

# MQTT 5 PUBACK reason codes (spec 3.4.2.1) the platform acts on.
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10  # delivered to the broker, which had no one to give it to
NOT_AUTHORIZED = 0x87  # the broker's ACL refused the publish
NO_ANSWER = 0xFF  # not a reason code: not sent, or no PUBACK before the timeout or a drop


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish. ``response_topic`` and ``correlation_data``: the MQTT 5
    request/response properties (DESIGN.md "Answers")."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


class Received(Protocol):
    """A message the broker delivered. A protocol, not a class: the MQTT 5 link hands over
    the codec's own packet objects, as parsed (building one of ours per message cost
    twice the parse itself: bench/mqtt_clients.py); tests build :class:`Message`."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def retain(self) -> bool: ...
    @property
    def response_topic(self) -> str | None: ...
    @property
    def correlation_data(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Message:
    """A received message of the in-memory bus (and of tests): a :class:`Received`."""

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of a burst: ``reason[i]`` is the broker's reason code for message i
    (QoS 0: SUCCESS once written), NO_ANSWER where none came. Delivered means the broker
    took it: SUCCESS or NO_MATCHING_SUBSCRIBERS; a code >= 0x80 is a refusal (the ACL:
    NOT_AUTHORIZED), which retrying will not change."""

    reason: NDArray[np.uint8]

    @classmethod
    def unanswered(cls, n: int) -> Delivery:
        return cls(np.full(n, NO_ANSWER, dtype=np.uint8))

    @property
    def acked(self) -> NDArray[np.bool_]:
        """Per message: the broker took it."""
        r = self.reason
        out: NDArray[np.bool_] = (r == SUCCESS) | (r == NO_MATCHING_SUBSCRIBERS)
        return out

    @property
    def refused(self) -> NDArray[np.bool_]:
        """Per message: the broker answered with a failure reason code."""
        r = self.reason
        out: NDArray[np.bool_] = (r >= 0x80) & (r != NO_ANSWER)
        return out

    @property
    def count(self) -> int:
        """How many the broker took."""
        return int(np.count_nonzero(self.acked))

    @property
    def complete(self) -> bool:
        return bool(self.acked.all())


class Transport(Protocol):
    """The MQTT seam (see the module docstring)."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected, or raise TransportError after ``timeout`` seconds."""
        ...

    async def publish_many(
        self, messages: Sequence[Outgoing], *, timeout: float | None = None
    ) -> Delivery:
        """Publish in order; wait (up to ``timeout``) for the broker's answers to the QoS 1
        ones. Raises TransportError, having sent nothing, while disconnected."""
        ...

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Add topic filters (with their QoS), kept across reconnects; raises
        TransportError if the broker refuses one."""
        ...

    def batches(self) -> AsyncIterator[Sequence[Received]]:
        """The messages received, a batch at a time, in order, for as long as it runs."""
        ...


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter ``pattern`` (``+``, ``#``, ``$share``)."""
    if pattern.startswith("$share/"):
        pattern = pattern.split("/", 2)[2] if pattern.count("/") >= 2 else ""
    p, t = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and p[0] in ("+", "#"):
        return False
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


@dataclass(slots=True)
class MemoryBus:
    """An in-memory broker for tests: routes each publish to every transport with a
    matching filter, keeps retained messages, and refuses what ``refuse(topic)`` says,
    as a broker's ACL does (NOT_AUTHORIZED)."""

    refuse: Callable[[str], bool] = lambda topic: False
    retained: dict[str, Message] = field(default_factory=dict)
    members: list[MemoryTransport] = field(default_factory=list)

    def transport(self, client_id: str = "memory") -> MemoryTransport:
        t = MemoryTransport(self, client_id)
        self.members.append(t)
        return t

    def route(self, messages: Sequence[Outgoing]) -> Delivery:
        reason = np.empty(len(messages), dtype=np.uint8)
        out: dict[int, list[Message]] = {}
        for i, m in enumerate(messages):
            if self.refuse(m.topic):
                reason[i] = NOT_AUTHORIZED if m.qos else SUCCESS
                continue
            r = Message(m.topic, m.payload, False, m.response_topic, m.correlation_data)
            if m.retain:
                if m.payload:
                    self.retained[m.topic] = Message(
                        m.topic, m.payload, True, m.response_topic, m.correlation_data
                    )
                else:
                    self.retained.pop(m.topic, None)
            matched = False
            for k, member in enumerate(self.members):
                if member.up and any(topic_matches(f, m.topic) for f, _ in member.filters):
                    out.setdefault(k, []).append(r)
                    matched = True
            reason[i] = SUCCESS if matched or not m.qos else NO_MATCHING_SUBSCRIBERS
        for k, batch in out.items():
            self.members[k].inbox.put_nowait(batch)
        return Delivery(reason)


@dataclass(slots=True)
class MemoryTransport:
    """A :class:`Transport` on a :class:`MemoryBus`. ``up`` can be switched off to act
    out a lost connection (publishes raise TransportError, nothing is received)."""

    bus: MemoryBus
    client_id: str
    up: bool = True
    filters: list[tuple[str, int]] = field(default_factory=list)
    inbox: asyncio.Queue[Sequence[Received]] = field(default_factory=asyncio.Queue)
    published: list[Outgoing] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.up

    async def wait_connected(self, timeout: float) -> None:
        if not self.up:
            await asyncio.sleep(timeout)
            if not self.up:
                raise TransportError(f"memory transport {self.client_id} is down")

    async def publish_many(
        self, messages: Sequence[Outgoing], *, timeout: float | None = None
    ) -> Delivery:
        if not messages:
            return Delivery.unanswered(0)
        if not self.up:
            raise TransportError(
                f"memory transport {self.client_id} is down; {len(messages)} messages not sent"
            )
        self.published.extend(messages)
        return self.bus.route(messages)

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        new = [f for f in filters if f not in self.filters]
        self.filters.extend(new)
        retained = [
            r
            for topic, r in self.bus.retained.items()
            if any(topic_matches(f, topic) for f, _ in new)
        ]
        if retained:
            self.inbox.put_nowait(retained)

    async def batches(self) -> AsyncIterator[Sequence[Received]]:
        while True:
            yield await self.inbox.get()
