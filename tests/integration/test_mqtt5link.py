"""The MQTT 5 link (broker/mqtt5link.py) on real Mosquitto, as the setpoint publisher and as
a subscriber: a long burst arrives whole and in order within the broker's Receive Maximum,
a lost connection is reported message by message, an unreachable or refusing broker is an
error at once, and the aggregator sends its setpoints through it, sending again what the
broker did not take. (Moved from test_fastpub.py with the hand-written 3.1.1 publisher;
the ACL refusal is in tests/security/test_mqtt5link_acl.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.fastpub import FastPublisher
from broker.link import Outgoing
from broker.models import DispatchRequest, Setpoint, Telemetry
from broker.mqtt5link import Mqtt5Link
from broker.settings import Settings
from broker.transport import Outgoing as Outgoing_
from broker.transport import Received
from core.clock import ManualClock
from core.errors import AuthenticationError, TransportError
from tests.support.harness import HOST, eventually
from tests.support.servers import Mosquitto, free_port

pytestmark = pytest.mark.integration

T0 = 1_795_651_200.0 + 21 * 3600  # 21:00 UTC: the home cars are plugged in


@contextlib.asynccontextmanager
async def publisher(settings: Settings, name: str) -> AsyncIterator[FastPublisher]:
    """A connected setpoint publisher, its run() in a task that is cancelled (bounded) at exit."""
    pub = FastPublisher(settings=settings, client_id=name)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pub.run(), name=f"fastpub-{name}")
        try:
            await pub.wait_connected(10)
            yield pub
        finally:
            task.cancel()


@contextlib.asynccontextmanager
async def subscriber(
    settings: Settings, filters: list[str], name: str, handler: Callable[[str, bytes], None]
) -> AsyncIterator[Mqtt5Link]:
    """An MQTT 5 subscriber at QoS 1 (the link acknowledges each message as it parses it)."""

    def on_batch(batch: Sequence[Received]) -> None:
        for m in batch:
            handler(m.topic, m.payload)

    link = Mqtt5Link(settings, name, [(f, 1) for f in filters], on_batch)
    async with link.running(10, name=name):
        yield link


async def test_a_burst_longer_than_the_packet_ids_arrives_whole_and_in_order(
    settings: Settings, test_id: str
) -> None:
    """70k QoS 1 messages in one call: more than the 65,535 packet ids and far more than
    the broker's Receive Maximum, so ids are recycled as PUBACKs free them. Spread over 100
    subscribers (one per topic group), as a fleet's vehicles are."""
    n, groups = 70_000, 100
    prefix = settings.topic_prefix
    got: list[list[int]] = [[] for _ in range(groups)]

    def collect(j: int) -> Callable[[str, bytes], None]:
        return lambda _t, p: got[j].append(int(p))

    async with contextlib.AsyncExitStack() as stack:
        for j in range(groups):
            await stack.enter_async_context(
                subscriber(
                    settings,
                    [f"{prefix}/g{j}/+"],
                    f"itest-{test_id}-sub{j}",
                    collect(j),
                )
            )
        pub = await stack.enter_async_context(publisher(settings, f"itest-{test_id}-pub"))
        msgs = [Outgoing(f"{prefix}/g{i % groups}/{i}", b"%d" % i, qos=1) for i in range(n)]
        async with asyncio.timeout(40):  # 20 in flight on a busy shared broker: seconds
            delivery = await pub.publish_many(msgs, timeout=30)
        assert delivery.complete and delivery.count == n
        assert pub.stats.sent == pub.stats.acked == n and pub.stats.unanswered == 0
        assert 0 < pub.stats.receive_maximum < n  # the window the broker granted, honoured
        await eventually(lambda: sum(map(len, got)) >= n, f"{n} messages delivered", 60)
    for j in range(groups):
        assert got[j] == list(range(j, n, groups)), f"group {j} lost or reordered messages"


@pytest.fixture
def stingy_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own that grants a Receive Maximum of 7."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\nmax_inflight_messages 7\n"
        f"user {getpass.getuser()}\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    server = Mosquitto("mosquitto", [binary, "-c", str(conf)], port, tmp_path / "mosquitto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_brokers_receive_maximum_is_honoured_and_its_ids_recycled_without_loss(
    settings: Settings, test_id: str, stingy_broker: Mosquitto
) -> None:
    s = settings.model_copy(update={"broker_url": stingy_broker.url})
    got: list[int] = []
    prefix = settings.topic_prefix
    async with (
        subscriber(
            s, [f"{prefix}/few/+"], f"itest-{test_id}-sub", lambda _t, p: got.append(int(p))
        ),
        publisher(s, f"itest-{test_id}-pub") as pub,
    ):
        assert pub.stats.receive_maximum == 7
        msgs = [Outgoing(f"{prefix}/few/{i}", b"%d" % i, qos=1) for i in range(900)]
        delivery = await pub.publish_many(msgs)
        assert delivery.complete
        await eventually(lambda: len(got) >= 900, "900 messages delivered", 20)
    assert got == list(range(900))


async def test_an_unreachable_broker_is_an_error_at_once_and_retried_in_the_background(
    settings: Settings,
) -> None:
    dead = settings.model_copy(update={"broker_url": f"mqtt://{HOST}:{free_port()}"})
    pub = FastPublisher(settings=dead, client_id=f"itest-dead-{uuid.uuid4().hex[:8]}")
    one = [Outgoing("itest/x/setpoint", b"{}", qos=1)]
    with pytest.raises(TransportError, match="down; 1 messages not sent"):
        await pub.publish_many(one)  # never connected
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pub.run(), name="fastpub-dead")
        with pytest.raises(TransportError, match="no connection to the broker"):
            await pub.wait_connected(1.0)
        assert pub.stats.disconnects >= 2  # it keeps trying, with backoff
        with pytest.raises(TransportError, match="down"):
            await pub.publish_many(one)
        assert not task.done()
        task.cancel()
    assert pub.stats.connects == 0 and pub.stats.refused_offline == 2


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own that lets no one in (no anonymous, no passwords)."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} {HOST}\nallow_anonymous false\nuser {getpass.getuser()}\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    server = Mosquitto("mosquitto", [binary, "-c", str(conf)], port, tmp_path / "mosquitto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_refused_credentials_stop_the_publisher_loudly(
    settings: Settings, refusing_broker: Mosquitto
) -> None:
    s = settings.model_copy(update={"broker_url": refusing_broker.url})
    pub = FastPublisher(settings=s, client_id="itest-refused")
    async with asyncio.timeout(10):
        with pytest.raises(AuthenticationError, match="CONNACK 0x87"):
            await pub.run()
    assert pub.stats.connects == 0


async def test_a_connection_lost_mid_burst_reports_what_the_broker_took(
    settings: Settings, test_id: str
) -> None:
    """Another client connects with our client id: Mosquitto drops our connection in the
    middle of a burst. The broker acknowledges in order, so what it
    took is a prefix; the publisher reconnects and the next burst goes through."""
    name = f"itest-{test_id}-pub"
    n = 200_000
    async with publisher(settings, name) as pub:
        msgs = [Outgoing(f"{settings.topic_prefix}/lost/{i}", b"x" * 100) for i in range(n)]
        burst = asyncio.create_task(pub.publish_many(msgs))
        try:
            await eventually(lambda: pub.stats.sent > 100 or burst.done(), "burst going", 5)
            assert not burst.done()
            thief = Mqtt5Link(settings, name)
            async with thief.running(5, name="thief"):
                async with asyncio.timeout(10):
                    delivery = await burst
        finally:
            burst.cancel()
        assert not delivery.complete
        k = delivery.count
        assert 100 < k < n
        assert delivery.acked[:k].all() and not delivery.acked[k:].any()
        assert pub.stats.unanswered == n - k and pub.stats.acked == k
        # Mosquitto sends DISCONNECT 0x8E, then closes; with our writes still coming the
        # close can be a reset that loses the DISCONNECT: either way, a drop is recorded.
        assert pub.stats.last_disconnect
        await pub.wait_connected(10)
        assert pub.stats.disconnects >= 1 and pub.stats.connects >= 2
        again = await pub.publish_many(msgs[:1000])
        assert again.complete


async def test_the_aggregator_sends_setpoints_on_the_fast_connection_and_resends_the_missed(
    settings: Settings, test_id: str
) -> None:
    """A step while the setpoint connection is down sends no setpoint; the next one, once it
    is up, sends every vehicle's, each a valid Setpoint on its vehicle's topic."""
    svc = AggregatorService(
        settings=settings,
        clock=ManualClock(T0),
        store=MemoryStore(),
        client_id=f"itest-{test_id}-agg",
        fast_setpoints=True,
    )
    fast = svc.setpoints
    assert fast is not None
    t = settings.topics
    seen: dict[str, Setpoint] = {}

    def on_setpoint(topic: str, payload: bytes) -> None:
        sp = Setpoint.model_validate_json(payload)
        assert topic == t.setpoint(sp.vehicle_id)
        seen[sp.vehicle_id] = sp

    fleet = SimFleet(generate_fleet(300, 3), T0)
    async with (
        subscriber(settings, [t.all_setpoints], f"itest-{test_id}-spy", on_setpoint),
        asyncio.TaskGroup() as tg,
    ):
        link = tg.create_task(svc.link.run(), name="agg-link")
        try:
            await svc.link.wait_connected(10)
            svc.inbox.telemetry = [
                Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, T0)
            ]
            rep = await svc.step()
            cap = rep.capability.windows[0]
            svc.inbox.requests = [
                (
                    DispatchRequest(
                        request_id=f"fast-{test_id}",
                        power_kw=round(0.5 * cap.min_power_kw, 1),
                        duration_s=3600.0,
                    ),
                    None,
                )
            ]
            await svc.step()  # the setpoint connection is not up yet
            out = svc.last_output
            assert out is not None and out.rows.size > 50
            assert fast.stats.refused_offline == out.rows.size and not seen
            pub = tg.create_task(fast.run(), name="agg-setpoints")
            try:
                await fast.wait_connected(10)
                svc.clock.advance(1.0)  # type: ignore[attr-defined]
                rep = await svc.step()
                again = svc.last_output
                assert again is not None
                assert set(again.rows.tolist()) >= set(out.rows.tolist())  # all re-sent
                assert fast.stats.acked == again.rows.size
                want = {svc.state.ids[r] for r in again.rows.tolist()}
                await eventually(lambda: set(seen) >= want, "every setpoint delivered", 15)
                assert {sp.request_id for sp in seen.values()} == {f"fast-{test_id}"}
                total = sum(seen[v].power_kw for v in want)
                assert total == pytest.approx(float(np.round(again.power_kw, 3).sum()), abs=1e-6)
            finally:
                pub.cancel()
        finally:
            link.cancel()


async def test_a_kept_session_delivers_what_came_while_the_link_was_away(
    settings: Settings, test_id: str
) -> None:
    """With a session expiry, the first connect starts clean and the next ones resume: the
    broker keeps the subscription and queues its QoS 1 messages across the drop."""
    topic = f"{settings.topic_prefix}/kept/setpoint"
    got: list[bytes] = []

    def on_batch(batch: Sequence[Received]) -> None:
        got.extend(m.payload for m in batch)

    sub = Mqtt5Link(settings, f"itest-{test_id}-kept", [(topic, 1)], on_batch, session_expiry_s=60)
    pub = Mqtt5Link(settings, f"itest-{test_id}-kept-pub")
    async with pub.running(10, name="kept-pub"):
        async with sub.running(10, name="kept-sub"):
            assert (await pub.publish_many([Outgoing_(topic, b"1")])).complete
            await eventually(lambda: got == [b"1"], "the first message", 10)
        # away: the broker holds the session for 60 s
        assert (await pub.publish_many([Outgoing_(topic, b"2")])).complete
        async with sub.running(10, name="kept-sub-again"):
            await eventually(lambda: got == [b"1", b"2"], "the message sent while away", 10)
    assert sub.stats.connects == 2
