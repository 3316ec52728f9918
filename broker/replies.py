"""MQTT 5 request/response: where a sender wants its answers, read off and put on a message.

A sender sets the Response Topic (and Correlation Data) properties on what it publishes;
every answer to it goes there too, with the same correlation data, so a sender can tell
its own answers from anyone else's. On MQTT 3.1.1 there are no properties: answers go
only to the contract's topics.
"""

from __future__ import annotations

from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.topics import check_reply_topic

MAX_CORRELATION = 256  # bytes of correlation data echoed back; more is refused


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a sender wants its answers: a response topic and its correlation data."""

    topic: str
    correlation: bytes | None = None

    def properties(self) -> Properties:
        """The publish properties that carry the correlation data back."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if self.correlation is not None:
            props.CorrelationData = self.correlation
        return props


def reply_record(reply: ReplyTo) -> dict[str, str]:
    """``reply`` as JSON-ready text, to keep with a snapshot."""
    corr = None if reply.correlation is None else reply.correlation.hex()
    return {"topic": reply.topic} | ({} if corr is None else {"correlation": corr})


def reply_from_record(record: object) -> ReplyTo | None:
    """The ``ReplyTo`` :func:`reply_record` wrote (None for anything else)."""
    if not isinstance(record, dict) or not isinstance(record.get("topic"), str):
        return None
    corr = record.get("correlation")
    try:
        return ReplyTo(record["topic"], bytes.fromhex(corr) if isinstance(corr, str) else None)
    except ValueError:
        return None


def reply_of(properties: Properties | None, prefix: str) -> ReplyTo | None:
    """The response topic a message asks answers on (None without one).

    Raises ValueError for one the aggregator may not answer on (a wildcard, too long, a
    contract topic) or correlation data over MAX_CORRELATION bytes."""
    if properties is None:
        return None
    topic = getattr(properties, "ResponseTopic", None)
    if not isinstance(topic, str):
        return None
    correlation = getattr(properties, "CorrelationData", None)
    if correlation is not None:
        if not isinstance(correlation, bytes | bytearray):
            raise ValueError("correlation data is not binary")
        if len(correlation) > MAX_CORRELATION:
            raise ValueError(f"correlation data over {MAX_CORRELATION} bytes")
        correlation = bytes(correlation)
    return ReplyTo(check_reply_topic(topic, prefix), correlation)


def request_properties(response_topic: str, correlation: bytes) -> Properties:
    """Publish properties asking for answers on ``response_topic`` with ``correlation``."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def correlation_of(properties: Properties | None) -> bytes | None:
    """The correlation data an answer carries (None without)."""
    value = getattr(properties, "CorrelationData", None) if properties is not None else None
    return bytes(value) if isinstance(value, bytes | bytearray) else None
