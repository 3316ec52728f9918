"""The MQTT seam (broker/transport.py): Delivery's reading of reason codes, topic filters,
and the in-memory bus the unit tests run the platform on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.transport import (
    NO_ANSWER,
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    SUCCESS,
    Delivery,
    MemoryBus,
    Outgoing,
    Received,
    Transport,
    topic_matches,
)
from core.errors import TransportError

pytestmark = pytest.mark.timeout(10)


def test_delivered_means_success_or_no_subscribers_and_refused_means_a_failure_code() -> None:
    d = Delivery(
        np.array([SUCCESS, NO_MATCHING_SUBSCRIBERS, NOT_AUTHORIZED, NO_ANSWER, 0x97], np.uint8)
    )
    assert d.acked.tolist() == [True, True, False, False, False]
    assert d.refused.tolist() == [False, False, True, False, True]
    assert d.count == 2
    assert not d.complete
    assert Delivery(np.array([SUCCESS, NO_MATCHING_SUBSCRIBERS], np.uint8)).complete
    assert Delivery.unanswered(3).reason.tolist() == [NO_ANSWER] * 3


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("v2g/vehicles/+/telemetry", "v2g/vehicles/ev-1/telemetry", True),
        ("v2g/vehicles/+/telemetry", "v2g/vehicles/ev-1/status", False),
        ("v2g/vehicles/+/telemetry", "v2g/vehicles/a/b/telemetry", False),
        ("v2g/#", "v2g/vehicles/ev-1/setpoint", True),
        ("v2g/#", "v2g", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/x", "$SYS/x", False),
        ("$share/agg/v2g/bridges/+/telemetry", "v2g/bridges/b1/telemetry", True),
        ("v2g/clock", "v2g/clock", True),
        ("v2g/clock", "v2g/clock/x", False),
    ],
)
def test_topic_filters_match_as_the_mqtt_spec_says(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern, topic) is matches


@given(st.lists(st.from_regex(r"[a-z0-9-]{1,6}", fullmatch=True), min_size=1, max_size=5))
def test_a_topic_matches_itself_hash_and_its_plus_pattern(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic)
    assert topic_matches("/".join("+" for _ in levels), topic)
    assert not topic_matches("/".join(["+", *levels]), topic)


async def test_memory_bus_routes_by_filter_and_answers_with_reason_codes() -> None:
    bus = MemoryBus(refuse=lambda topic: topic.endswith("/setpoint") and "ev-2" in topic)
    agg: Transport = bus.transport("agg")  # mypy holds both implementations to the seam
    ev1 = bus.transport("ev-1")
    await ev1.subscribe([("v2g/vehicles/ev-1/setpoint", 1)])
    delivery = await agg.publish_many(
        [
            Outgoing("v2g/vehicles/ev-1/setpoint", b"a"),
            Outgoing("v2g/vehicles/ev-2/setpoint", b"b"),
            Outgoing("v2g/vehicles/ev-3/setpoint", b"c"),
        ]
    )
    assert delivery.reason.tolist() == [SUCCESS, NOT_AUTHORIZED, NO_MATCHING_SUBSCRIBERS]
    assert delivery.acked.tolist() == [True, False, True]
    batch = await anext(aiter(ev1.batches()))
    assert [(m.topic, m.payload) for m in batch] == [("v2g/vehicles/ev-1/setpoint", b"a")]


async def test_memory_bus_keeps_retained_messages_for_later_subscribers() -> None:
    bus = MemoryBus()
    pub, sub = bus.transport("pub"), bus.transport("sub")
    await pub.publish_many(
        [Outgoing("v2g/fleet/status", b"s1", retain=True), Outgoing("v2g/clock", b"c", retain=True)]
    )
    await pub.publish_many([Outgoing("v2g/fleet/status", b"s2", retain=True)])
    await sub.subscribe([("v2g/fleet/#", 0)])
    batch: list[Received] = list(await anext(aiter(sub.batches())))
    assert [(m.topic, m.payload, m.retain) for m in batch] == [("v2g/fleet/status", b"s2", True)]
    await pub.publish_many([Outgoing("v2g/fleet/status", b"", retain=True)])  # clears it
    assert "v2g/fleet/status" not in bus.retained


async def test_memory_bus_carries_the_response_topic_and_correlation_data() -> None:
    bus = MemoryBus()
    op, agg = bus.transport("op"), bus.transport("agg")
    await agg.subscribe([("v2g/dispatch/requests", 1)])
    await op.publish_many(
        [Outgoing("v2g/dispatch/requests", b"{}", response_topic="v2g/operators/o/r",
                  correlation_data=b"id-1")]
    )  # fmt: skip
    (msg,) = await anext(aiter(agg.batches()))
    assert (msg.response_topic, msg.correlation_data) == ("v2g/operators/o/r", b"id-1")


async def test_a_transport_that_is_down_refuses_a_burst_and_receives_nothing() -> None:
    bus = MemoryBus()
    pub, sub = bus.transport("pub"), bus.transport("sub")
    await sub.subscribe([("t/#", 0)])
    sub.up = False
    assert (await pub.publish_many([Outgoing("t/1", b"x")])).reason.tolist() == [
        NO_MATCHING_SUBSCRIBERS
    ]
    pub.up = False
    with pytest.raises(TransportError, match="down; 1 messages not sent"):
        await pub.publish_many([Outgoing("t/1", b"x")])
    with pytest.raises(TransportError):
        await pub.wait_connected(0.01)
    assert sub.inbox.empty()
    assert (await pub.publish_many([])).reason.size == 0
    await asyncio.sleep(0)
