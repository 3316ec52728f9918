"""The MQTT 5 link (broker/mqtt5link.py) without a network: whatever way the byte stream is
cut, every PUBLISH comes out whole and in order and each QoS 1 one is acknowledged; the
publish pump never has more in flight than the broker's Receive Maximum, and PUBACKs
however cut mark exactly their messages with their reason codes; a lost connection
settles every burst; the broker's DISCONNECT says why. Frames are the codec's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence

import mqtt5
import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_batch_payloads, telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker import link
from broker.columns import TelemetryArrays
from broker.fastlink import FastIngest
from broker.link import LinkStats, is_session_taken_over
from broker.models import Telemetry, TelemetryBatch
from broker.mqtt5link import INBOX_BATCHES, BrokerDisconnected, Mqtt5Link, _Protocol
from broker.settings import Settings
from broker.transport import (
    NO_ANSWER,
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    SUCCESS,
    Delivery,
    Outgoing,
    Received,
)
from core.clock import ManualClock
from core.errors import TransportError

pytestmark = pytest.mark.timeout(60)
Q1 = mqtt5.QoS.AT_LEAST_ONCE


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = b""
        self.was_closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)

    def close(self) -> None:
        self.was_closed = True

    def is_closing(self) -> bool:
        return self.was_closed


def receiver() -> tuple[_Protocol, list[Received], Sink]:
    got: list[Received] = []
    proto = _Protocol(got.extend, lambda p: None)
    sink = Sink()
    proto.connection_made(sink)
    return proto, got, sink


def feed(proto: _Protocol, stream: bytes, cuts: Sequence[int]) -> None:
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        proto.data_received(stream[pos : pos + step])
        pos, k = pos + step, k + 1


topics = st.text(st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=40)
# Big ones drawn as (length, byte) and built in the test: drawing 20 KB byte by byte trips
# hypothesis' too-slow check, and printing one in a failure is useless.
payloads = st.binary(max_size=300) | st.tuples(st.integers(16_384, 20_000), st.integers(0, 255))


def built(p: bytes | tuple[int, int]) -> bytes:
    return p if isinstance(p, bytes) else bytes([p[1]]) * p[0]


@settings(deadline=None)  # 1-byte cuts of 60 KB: thousands of reads, on a shared machine
@given(
    st.lists(st.tuples(topics, payloads, st.sampled_from([0, 1])), min_size=1, max_size=8),
    st.lists(st.integers(1, 5000), min_size=1, max_size=50),
)
async def test_every_publish_comes_out_whole_and_in_order_however_the_stream_is_cut(
    drawn: list[tuple[str, bytes | tuple[int, int], int]], cuts: list[int]
) -> None:
    msgs = [(t, built(p), q) for t, p, q in drawn]
    proto, got, sink = receiver()
    stream = mqtt5.PingRespPacket().write() + b"".join(
        mqtt5.PublishPacket(
            topic=t, payload=p, qos=mqtt5.QoS(q), packet_id=7 if q else None
        ).write()
        for t, p, q in msgs
    )
    feed(proto, stream, cuts)
    assert [(m.topic, m.payload) for m in got] == [(t, p) for t, p, _ in msgs]
    puback = mqtt5.PubAckPacket(7).write()
    assert sink.sent == puback * sum(q for *_, q in msgs)  # a PUBACK per QoS 1
    assert not proto.parts and not proto.lost


async def test_a_big_packet_arriving_in_many_reads_comes_out_whole() -> None:
    proto, got, _ = receiver()
    body = bytes(range(256)) * 4096  # 1 MiB, as a bridge's batch may be
    stream = (
        mqtt5.PublishPacket(topic="v2g/bridges/b1/telemetry", payload=body).write()
        + mqtt5.PublishPacket(topic="a/b", payload=b"next").write()
    )
    reads = [stream[k : k + 65_536] for k in range(0, len(stream), 65_536)]
    for chunk in reads[:-1]:
        proto.data_received(chunk)
        assert not got
        assert proto.have < proto.need == len(stream) - 12  # gathered, not parsed again
    proto.data_received(reads[-1])
    assert [(m.topic, m.payload) for m in got] == [
        ("v2g/bridges/b1/telemetry", body),
        ("a/b", b"next"),
    ]
    assert not proto.parts


async def test_a_malformed_packet_closes_the_connection() -> None:
    proto, got, sink = receiver()
    proto.data_received(b"\xf0\x00" + mqtt5.PublishPacket(topic="c/d", payload=b"x").write())
    assert got == []
    assert sink.was_closed and proto.lost
    assert isinstance(proto.closed.result(), TransportError)


async def test_the_brokers_disconnect_says_why_and_session_taken_over_is_recognised() -> None:
    proto, _, sink = receiver()
    taken = mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER)
    proto.data_received(taken.write())
    err = proto.closed.result()
    assert isinstance(err, BrokerDisconnected) and err.reason_code == 0x8E
    assert is_session_taken_over(err) and sink.was_closed
    assert not is_session_taken_over(BrokerDisconnected(0x8B, "server shutting down"))


class Broker(Sink):
    """A transport that answers every QoS 1 PUBLISH written to it, cut at ``cuts``, on
    the next loop turn as a broker would: with ``refuse(topic)``'s reason code."""

    def __init__(self, proto: _Protocol, cuts: Sequence[int], refused: set[str]) -> None:
        super().__init__()
        self.proto, self.cuts, self.refused = proto, cuts, refused
        self.seen: list[tuple[str, bytes]] = []
        self.most_in_flight = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        acks = b""
        view, pos = memoryview(bytes(data)), 0
        while pos < len(view):
            packet, used = mqtt5.read(view[pos:])
            pos += used
            assert isinstance(packet, mqtt5.PublishPacket)
            self.seen.append((packet.topic, packet.payload))
            if packet.packet_id is not None:
                code = 0x87 if packet.topic in self.refused else 0x00
                acks += mqtt5.PubAckPacket(
                    packet.packet_id, reason_code=mqtt5.PubAckReasonCode(code)
                ).write()
        self.most_in_flight = max(self.most_in_flight, len(self.proto.owner))
        if acks:
            asyncio.get_running_loop().call_soon(feed, self.proto, acks, self.cuts)


def link_on(proto: _Protocol) -> Mqtt5Link:
    link = Mqtt5Link(Settings(), "unit")
    proto.stats = link.stats
    link._proto = proto
    link._connected.set()
    return link


@settings(deadline=None)
@given(
    st.lists(st.tuples(topics, st.binary(max_size=200), st.sampled_from([0, 1])), max_size=40),
    st.lists(st.integers(1, 9), min_size=1, max_size=10),
    st.integers(1, 5),
)
async def test_pubacks_however_cut_mark_exactly_their_messages_within_the_receive_maximum(
    msgs: list[tuple[str, bytes, int]], cuts: list[int], receive_maximum: int
) -> None:
    proto = _Protocol(lambda b: None, lambda p: None)
    refused = {t for t, _, _ in msgs[::3]}
    broker = Broker(proto, cuts, refused)
    proto.connection_made(broker)
    proto.grant(receive_maximum)
    link = link_on(proto)
    out = [Outgoing(t, p, q) for t, p, q in msgs]
    d = await link.publish_many(out, timeout=5.0)
    assert broker.seen == [(t, p) for t, p, _ in msgs]  # all of them, in order
    assert broker.most_in_flight <= receive_maximum
    want = [NOT_AUTHORIZED if q and t in refused else SUCCESS for t, _, q in msgs]
    assert d.reason.tolist() == want
    assert sorted(proto.free) == list(range(1, receive_maximum + 1)) and not proto.owner
    assert link.stats.refused == want.count(NOT_AUTHORIZED)
    assert link.stats.acked + link.stats.refused == link.stats.sent == len(msgs)


async def test_a_lost_connection_settles_the_burst_with_what_was_answered() -> None:
    proto = _Protocol(lambda b: None, lambda p: None)
    sink = Sink()
    proto.connection_made(sink)
    proto.grant(2)
    link = link_on(proto)
    task = asyncio.create_task(
        link.publish_many([Outgoing("a", b"1"), Outgoing("b", b"2"), Outgoing("c", b"3")])
    )
    await asyncio.sleep(0)
    assert len(proto.owner) == 2 and not proto.free  # the third waits for an id
    proto.data_received(mqtt5.PubAckPacket(1).write())  # frees an id: the third goes out
    assert len(proto.owner) == 2
    proto.connection_lost(None)
    d = await asyncio.wait_for(task, 5.0)
    assert d.reason.tolist() == [SUCCESS, NO_ANSWER, NO_ANSWER]
    assert d.count == 1 and not d.complete
    with pytest.raises(TransportError, match="down; 1 messages not sent"):
        await link.publish_many([Outgoing("d", b"4")])


async def test_an_id_given_up_on_comes_free_when_its_puback_comes_late() -> None:
    proto = _Protocol(lambda b: None, lambda p: None)
    proto.connection_made(Sink())
    proto.grant(1)
    link = link_on(proto)
    d = await link.publish_many([Outgoing("a", b"1")], timeout=0.01)
    assert d.reason.tolist() == [NO_ANSWER] and link.stats.unanswered == 1
    assert not proto.free and proto.orphans == {1}
    proto.data_received(mqtt5.PubAckPacket(1).write())
    assert proto.free == [1] and not proto.orphans


async def test_the_ingest_sink_counts_a_handler_error_and_keeps_the_rest_of_the_read() -> None:
    got: list[str] = []

    def handler(topic: str, payload: bytes) -> None:
        if payload == b"bad":
            raise RuntimeError("handler bug")
        got.append(topic)

    ingest = FastIngest(
        settings=Settings(),
        client_id="unit",
        handler=handler,
        logger=structlog.wrap_logger(structlog.ReturnLogger()),
    )
    proto = _Protocol(ingest.link._deliver, lambda p: None)
    proto.connection_made(Sink())
    proto.data_received(
        b"".join(
            mqtt5.PublishPacket(topic=t, payload=p).write()
            for t, p in (("a", b"ok"), ("b", b"bad"), ("c", b"ok"))
        )
    )
    assert got == ["a", "c"]
    assert ingest.stats.handler_errors == 1 and ingest.stats.received == 3


def test_the_service_resends_exactly_the_rows_whose_setpoint_was_not_acknowledged() -> None:
    """A vehicle's own message refused or lost: its row; a bridge's batch lost: every row it
    carries. (Moved from test_fastpub.py with the hand-written publisher.)"""
    now = 1_795_651_200.0 + 21 * 3600
    svc = AggregatorService(
        settings=Settings(), clock=ManualClock(now), store=MemoryStore(), fast_setpoints=True
    )
    fleet = SimFleet(generate_fleet(12, 4), now)
    own = [Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, now, np.arange(6))]
    batches = [
        (gw, TelemetryArrays.from_batch(TelemetryBatch.model_validate_json(body)))
        for gw, part in (("gw-1", np.arange(6, 9)), ("gw-2", np.arange(9, 12)))
        for body in telemetry_batch_payloads(fleet, now, part, gw)
    ]
    svc.inbox.telemetry.extend(own)
    svc.inbox.batches.extend(batches)
    svc._fold(svc.inbox)
    rows = np.arange(12, dtype=np.intp)[::-1].copy()  # any order
    msgs = svc._setpoint_messages(rows, np.full(12, -3.0), np.full(12, now + 30.0), "r1", now)
    assert len(msgs) == 6 + 2
    reason = np.full(len(msgs), SUCCESS, dtype=np.uint8)
    lost_vehicle = msgs[2].topic.split("/")[-2]
    reason[2] = NOT_AUTHORIZED  # the broker refused it
    (gw1,) = [k for k, m in enumerate(msgs) if m.topic.endswith("/gw-1/setpoints")]
    reason[gw1] = NO_ANSWER  # no PUBACK before the timeout
    missed = svc._unacked_rows(msgs, Delivery(reason), rows)
    want = {lost_vehicle, *fleet.ids[6:9]}
    assert {svc.state.ids[r] for r in missed.tolist()} == want
    assert (
        svc._unacked_rows(
            msgs, Delivery(np.full(len(msgs), NO_MATCHING_SUBSCRIBERS, np.uint8)), rows
        ).size
        == 0
    )


async def test_the_supervisor_backs_off_while_down_and_starts_over_after_a_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tries that never connect go further down the backoff; a try that connected starts
    it over, as MqttLink does. (Moved from test_fastlink.py.)"""
    drawn: list[int] = []

    def backoff(minimum: float, maximum: float) -> Iterator[float]:
        k = 0
        while True:  # the k-th delay of this backoff, tiny so that the test is quick
            k += 1
            drawn.append(k)
            yield 1e-4

    monkeypatch.setattr(link, "backoff_delays", backoff)
    stats, connected = LinkStats(), asyncio.Event()
    tries = 0

    async def session() -> None:
        nonlocal tries
        tries += 1
        if tries == 4:  # this one connects, then drops
            stats.connected_at = time.monotonic()
            connected.set()
        if tries == 7:
            raise asyncio.CancelledError
        raise TransportError("refused")

    with pytest.raises(asyncio.CancelledError):
        await link.supervise(
            session,
            settings=Settings(),
            stats=stats,
            connected=connected,
            event="x_disconnected",
            client_id="x",
            lg=structlog.get_logger("test"),
        )
    assert drawn == [1, 2, 3, 1, 2, 3]  # down, down, down, up then down, down, down
    assert stats.disconnects == 6 and not connected.is_set()


async def test_a_broker_answering_in_mqtt_311_is_told_apart_from_a_broken_stream() -> None:
    proto, _, sink = receiver()
    proto.data_received(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable protocol version
    with pytest.raises(TransportError, match="not MQTT 5"):
        proto.connack.result()
    assert sink.was_closed and proto.lost


class Pausable(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_a_full_inbox_pauses_reading_until_the_consumer_catches_up() -> None:
    """Messages nobody takes are left with the broker (TCP backpressure), not piled up here."""
    link = Mqtt5Link(Settings(), "unit")
    proto = _Protocol(link._deliver, lambda p: None, link.stats)
    wire = Pausable()
    proto.connection_made(wire)
    link._proto = proto
    one = mqtt5.PublishPacket(topic="t/x", payload=b"m").write()
    for _ in range(INBOX_BATCHES):
        assert not wire.paused
        proto.data_received(one)
    assert wire.paused and link.stats.received == INBOX_BATCHES
    stream = aiter(link.batches())
    for _ in range(INBOX_BATCHES - 1):
        batch = await anext(stream)
        assert [m.payload for m in batch] == [b"m"]
    assert not wire.paused  # drained: reading again
