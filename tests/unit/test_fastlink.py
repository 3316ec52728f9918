"""The fast ingest client's frame parser: whole PUBLISH packets out of any split of the
byte stream, in order, whatever the packet sizes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from broker import link
from broker.fastlink import _Protocol
from broker.framing import connect_packet, frame, subscribe_packet, utf8
from broker.link import LinkStats
from broker.settings import Settings
from core.errors import TransportError


def publish(topic: str, payload: bytes, qos: int = 0) -> bytes:
    pid = b"\x00\x07" if qos else b""
    return frame(0x30 | (qos << 1), utf8(topic) + pid + payload)


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = b""
        self.was_closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)

    def close(self) -> None:
        self.was_closed = True


messages = st.lists(
    st.tuples(
        st.text(st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=40),
        st.binary(max_size=300) | st.binary(min_size=16_384, max_size=20_000),
        st.sampled_from([0, 1]),
    ),
    min_size=1,
    max_size=8,
)


@given(messages, st.lists(st.integers(1, 5000), min_size=1, max_size=50))
async def test_every_publish_comes_out_whole_and_in_order_however_the_stream_is_cut(
    msgs: list[tuple[str, bytes, int]], cuts: list[int]
) -> None:
    got: list[tuple[str, bytes]] = []
    proto = _Protocol(lambda t, p: got.append((t, p)), LinkStats())
    sink = Sink()
    proto.connection_made(sink)
    stream = b"\xd0\x00" + b"".join(publish(t, p, q) for t, p, q in msgs)  # a PINGRESP first
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        proto.data_received(stream[pos : pos + step])
        pos, k = pos + step, k + 1
    assert got == [(t, p) for t, p, _ in msgs]
    assert proto.stats.received == len(msgs)
    assert sink.sent == b"\x40\x02\x00\x07" * sum(q for *_, q in msgs)  # a PUBACK per QoS 1
    assert not proto.buf


async def test_connack_and_suback_are_answered_and_a_handler_error_is_counted() -> None:
    def boom(topic: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    proto = _Protocol(boom, LinkStats(), structlog.wrap_logger(structlog.ReturnLogger()))
    proto.connection_made(Sink())
    proto.data_received(b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x00" + publish("a/b", b"x"))
    assert proto.connack.result() == 0
    assert proto.suback.result() is None
    assert proto.stats.handler_errors == 1


def test_connect_and_subscribe_packets_follow_mqtt_311() -> None:
    pkt = connect_packet("agg", 15, "u", "p")
    assert pkt[:2] == b"\x10\x15"  # 10 bytes of header, 11 of payload
    assert pkt[2:10] == b"\x00\x04MQTT\x04\xc2"  # level 4; username, password, clean session
    assert subscribe_packet(1, ["v2g/vehicles/+/telemetry"]) == (
        b"\x82\x1d\x00\x01\x00\x18v2g/vehicles/+/telemetry\x00"
    )
    assert frame(0x30, b"x" * 200)[:3] == b"\x30\xc8\x01"  # two-byte remaining length


async def test_a_big_packet_arriving_in_many_reads_is_gathered_once_and_comes_out_whole() -> None:
    got: list[tuple[str, bytes]] = []
    proto = _Protocol(lambda t, p: got.append((t, p)), LinkStats())
    proto.connection_made(Sink())
    body = bytes(range(256)) * 4096  # 1 MiB, as a bridge's batch may be
    stream = publish("v2g/bridges/b1/telemetry", body) + publish("a/b", b"next")
    reads = [stream[k : k + 1500] for k in range(0, len(stream), 1500)]
    for chunk in reads[:-1]:
        proto.data_received(chunk)
        assert not got
        assert len(proto.buf) < proto.need  # waiting: nothing parsed again, nothing copied
    proto.data_received(reads[-1])
    assert got == [("v2g/bridges/b1/telemetry", body), ("a/b", b"next")]
    assert not proto.buf


async def test_a_publish_whose_topic_runs_past_its_packet_closes_the_connection() -> None:
    got: list[tuple[str, bytes]] = []
    proto = _Protocol(lambda t, p: got.append((t, p)), LinkStats())
    sink = Sink()
    proto.connection_made(sink)
    proto.data_received(frame(0x30, b"\x00\x09a/b") + publish("c/d", b"x"))
    assert got == []
    assert sink.was_closed
    assert isinstance(proto.closed.result(), TransportError)


async def test_the_supervisor_backs_off_while_down_and_starts_over_after_a_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tries that never connect go further down the backoff; a try that connected starts
    it over, as MqttLink does."""
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
