"""The fast setpoint publisher without a network: its PUBLISH frames parse back whole
(through the ingest client's parser), and PUBACKs however cut mark exactly their messages
and free their ids; the aggregator sends again exactly the rows whose setpoint was not
acknowledged. (Its payloads are held to the ``Setpoint`` model in test_codec.py.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_batch_payloads, telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.columns import TelemetryArrays
from broker.fastlink import _Protocol as IngestProtocol
from broker.fastpub import Delivery, FastPublisher, _Burst, _Protocol
from broker.link import LinkStats, Outgoing
from broker.models import Telemetry, TelemetryBatch
from broker.settings import Settings
from core.clock import ManualClock


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += bytes(data)


@given(
    st.lists(
        st.tuples(
            st.text(
                st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=30
            ),
            st.binary(max_size=200) | st.binary(min_size=16_400, max_size=17_000),
            st.sampled_from([0, 1]),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(1, 9), min_size=1, max_size=10),
    st.integers(1, 5),
)
async def test_frames_parse_back_and_cut_pubacks_mark_exactly_their_messages(
    msgs: list[tuple[str, bytes, int, bool]], cuts: list[int], max_inflight: int
) -> None:
    """Frames go through fastlink's parser (which answers each QoS 1 with a PUBACK); the
    PUBACKs come back cut anywhere, and ids are reused once freed, never while in flight."""
    out = [Outgoing(t, p, q, r) for t, p, q, r in msgs]
    pub = _Protocol(max_inflight)
    wire = Sink()
    pub.connection_made(wire)
    got: list[tuple[str, bytes]] = []
    sub = IngestProtocol(lambda t, p: got.append((t, p)), LinkStats())
    acks = Sink()
    sub.connection_made(acks)
    burst = _Burst(len(out), asyncio.get_running_loop().create_future())
    sent = 0
    while sent < len(out):  # as publish_many does: no more in flight than there are ids
        stop = min(len(out), sent + len(pub.free))
        sent += pub.send(out, sent, stop, burst)
        assert not pub.free or pub.space.is_set()
        in_flight = [pid for pid in range(65_536) if pub.owner[pid] is not None]
        assert len(in_flight) == burst.pending <= max_inflight
        sub.data_received(wire.sent)
        wire.sent = b""
        stream, acks.sent = acks.sent, b""
        pos, k = 0, 0
        while pos < len(stream):
            step = cuts[k % len(cuts)]
            pub.data_received(stream[pos : pos + step])
            pos, k = pos + step, k + 1
        assert burst.pending == 0 and sorted(pub.free) == list(range(1, max_inflight + 1))
    assert got == [(t, p) for t, p, *_ in msgs]
    assert bytes(burst.acked) == b"\x01" * len(out)
    assert not pub.buf
    assert burst.settled.done() or not any(m.qos for m in out)


async def test_a_lost_connection_settles_bursts_and_wakes_writers() -> None:
    pub = _Protocol(2)
    pub.connection_made(Sink())
    burst = _Burst(3, asyncio.get_running_loop().create_future())
    pub.bursts.add(burst)
    pub.send([Outgoing("a", b"1"), Outgoing("b", b"2")], 0, 2, burst)
    assert not pub.free and not pub.space.is_set()
    pub.data_received(b"\x40\x02\x00\x01")  # the first is acknowledged, the second not
    assert bytes(burst.acked) == b"\x01\x00\x00" and pub.space.is_set()
    pub.connection_lost(None)
    assert pub.lost and burst.settled.done() and pub.space.is_set() and pub.writable.is_set()
    d = Delivery(np.frombuffer(bytes(burst.acked), dtype=np.bool_))
    assert d.count == 1 and not d.complete


class EchoBroker(Sink):
    """A transport that acknowledges every QoS 1 PUBLISH written to it on the next loop
    turn, as a broker would: the protocol's bookkeeping, deterministically."""

    def __init__(self, proto: _Protocol) -> None:
        super().__init__()
        self.parser = IngestProtocol(lambda _t, _p: None, LinkStats())
        self.parser.connection_made(self)
        self.proto = proto

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[:1]) == b"\x40":  # the parser's PUBACKs: back to the publisher
            asyncio.get_running_loop().call_soon(self.proto.data_received, bytes(data))
        else:
            self.parser.data_received(bytes(data))


async def test_publish_many_waits_for_the_last_puback_though_earlier_chunks_settled() -> None:
    """With 3 ids, each chunk is acknowledged whole before the next is written; the last
    chunk's PUBACKs must still be waited for."""
    pub = FastPublisher(settings=Settings(), client_id="unit", max_inflight=3)
    proto = _Protocol(3)
    proto.connection_made(EchoBroker(proto))
    pub._proto = proto
    pub._connected.set()
    msgs = [Outgoing(f"t/{i}", b"%d" % i) for i in range(10)]
    d = await pub.publish_many(msgs, timeout=5.0)
    assert d.complete and pub.stats.acked == pub.stats.sent == 10
    assert sorted(proto.free) == [1, 2, 3]
    with pytest.raises(ValueError, match="max_inflight"):
        FastPublisher(settings=Settings(), client_id="unit", max_inflight=65_536)


def test_the_service_resends_exactly_the_rows_whose_setpoint_was_not_acknowledged() -> None:
    """A vehicle's own message lost: its row; a bridge's batch lost: every row it carries."""
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
    acked = np.ones(len(msgs), dtype=np.bool_)
    lost_vehicle = msgs[2].topic.split("/")[-2]
    acked[2] = False
    (gw1,) = [k for k, m in enumerate(msgs) if m.topic.endswith("/gw-1/setpoints")]
    acked[gw1] = False
    missed = svc._unacked_rows(msgs, Delivery(acked), rows)
    want = {lost_vehicle, *fleet.ids[6:9]}
    assert {svc.state.ids[r] for r in missed.tolist()} == want
    assert svc._unacked_rows(msgs, Delivery(np.ones(len(msgs), np.bool_)), rows).size == 0
