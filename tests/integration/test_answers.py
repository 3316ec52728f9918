"""Every request gets an answer, and only its own: against real Mosquitto and Redis.

An aggregator runs alone (no fleet: what is under test is what it answers), and the test
speaks MQTT 5 to it as an operator's system would: malformed requests, amendments and
cancels of each kind seen to go unanswered, response topics with correlation data, a
second request on a running request's id, and cancels and amendments of nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from aggregator.service import MAX_PAYLOAD_BYTES, AggregatorService
from aggregator.store import RedisStore
from broker.models import DispatchAmend, DispatchRequest, DispatchResult, from_epoch
from broker.settings import Settings
from core.clock import SimClock
from core.errors import TransportError
from tests.support.harness import HOST, MQTT_PORT, STEP_WALL_S, make_aggregator
from v2g import operator
from v2g.cli import app

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def aggregator_alone(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> AsyncIterator[AggregatorService]:
    """An aggregator with no fleet, stepping; cancelled (bounded) at exit."""
    agg = make_aggregator(settings, clock, store, test_id, fast_setpoints=False)
    task = asyncio.create_task(agg.run(), name="aggregator")
    try:
        await agg.link.wait_connected(10.0)
        async with asyncio.timeout(10.0):
            assert agg.reports is not None
            await agg.reports.get()  # it steps
        yield agg
    finally:
        task.cancel()
        async with asyncio.timeout(15.0):
            await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def mqtt5(*filters: str) -> AsyncIterator[aiomqtt.Client]:
    """An operator's own MQTT 5 client, subscribed to ``filters``."""
    async with aiomqtt.Client(
        HOST,
        MQTT_PORT,
        identifier=f"itest-answers-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as c:
        for f in filters:
            await c.subscribe(f, qos=1)
        yield c


async def gather_until(
    c: aiomqtt.Client, done: Any, timeout: float = 10.0
) -> list[aiomqtt.Message]:
    """Messages received until ``done(messages)`` holds (fails after ``timeout``)."""
    got: list[aiomqtt.Message] = []
    try:
        async with asyncio.timeout(timeout):
            async for m in c.messages:
                got.append(m)
                if done(got):
                    return got
    except TimeoutError:
        pass
    pytest.fail(f"timed out; got {[(str(m.topic), bytes(m.payload)[:160]) for m in got]}")


async def quiet_for(c: aiomqtt.Client, seconds: float) -> list[aiomqtt.Message]:
    """Everything received in the next ``seconds``."""
    got: list[aiomqtt.Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for m in c.messages:
                got.append(m)
    return got


# The MQTT 5 properties are built and read here with paho itself, as any operator's system
# would: the test depends on the wire, not on the platform's helpers.
def request_properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def correlation_of(m: aiomqtt.Message) -> bytes | None:
    value = getattr(m.properties, "CorrelationData", None)
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def body(m: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(m.payload, bytes)
    doc: dict[str, Any] = json.loads(m.payload)
    return doc


def request_json(rid: str, **terms: Any) -> bytes:
    doc = {"request_id": rid, "power_kw": -5.0, "duration_s": 900.0, **terms}
    return json.dumps(doc).encode()


async def test_each_kind_of_malformed_message_is_answered_rejected_with_its_reason(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> None:
    t = settings.topics
    # (topic, payload, topic the answer must come on, what its reason must say)
    cases = [
        (t.dispatch_requests, b'{"request_id": "m-missing", "power_kw": -5}', "m-missing", "duration_s"),
        (t.dispatch_requests, request_json("m-negative", duration_s=-60), "m-negative", "greater than 0"),
        (t.dispatch_requests, request_json("m-string", power_kw="-5"), "m-string", "power_kw"),
        (t.dispatch_requests, request_json("m-service", service="peak"), "m-service", "service"),
        (t.dispatch_requests, b'{"request_id": "m-json", "power_kw": -5,', "m-json", "(json)"),
        (
            t.dispatch_requests,
            request_json("m-big", pad="x" * MAX_PAYLOAD_BYTES),
            "m-big",
            "byte limit",
        ),
        (
            t.dispatch_requests,
            request_json("m-strat", strat="2026-12-03T10:00:00Z"),
            "m-strat",
            "'strat' (did you mean 'start'?)",
        ),
        (t.dispatch_amend("m-amend"), b'{"power_kw": "x"}', "m-amend", "power_kw"),
        (t.dispatch_cancel("m-cancel"), b'{"force": true}', "m-cancel", "'force'"),
        (t.dispatch_requests, b'{"power_kw": -5, "duration_s": 60}', None, "request_id"),
    ]  # fmt: skip
    async with (
        aggregator_alone(settings, clock, store, test_id) as agg,
        mqtt5(f"{t.prefix}/dispatch/#") as c,
    ):
        for topic, payload, _, _ in cases:
            await c.publish(topic, payload, qos=1)
        want = {t.dispatch_result(rid) if rid else t.dispatch_rejected for _, _, rid, _ in cases}

        def all_in(got: list[aiomqtt.Message]) -> bool:
            return want <= {str(m.topic) for m in got}

        got = await gather_until(c, all_in)
    answers = {str(m.topic): m.payload for m in got if str(m.topic) in want}
    for topic, _, rid, why in cases:
        answer = answers[t.dispatch_result(rid) if rid else t.dispatch_rejected]
        assert isinstance(answer, bytes)
        if rid is None:  # {"ts", "reason", "request_id" (when known), "payload_head"}
            notice = json.loads(answer)
            assert why in notice["reason"], (topic, notice)
            assert notice.get("request_id") is None and "duration_s" in notice["payload_head"]
            assert notice["ts"].startswith(f"{from_epoch(clock.now()):%Y-%m-%d}")
            continue
        result = DispatchResult.model_validate_json(answer)
        assert result.reason is not None and why in result.reason, (topic, result)
        assert result.status == "rejected" and result.request_id == rid
        kind = topic.rsplit("/", 1)[1]
        assert result.answer_to == (kind if kind in ("amend", "cancel") else "request")
    assert agg.rejected["size"] == 1 and agg.rejected["unknown_field"] == 2
    assert not agg.dispatcher.dispatches  # "strat" did not run at once


async def test_answers_come_on_the_response_topic_with_the_correlation_data(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> None:
    t = settings.topics
    inbox = t.operator_responses("rt")
    async with aggregator_alone(settings, clock, store, test_id), mqtt5(inbox) as c:
        # A request that runs for two control steps: its answer and its end come back.
        await c.publish(
            t.dispatch_requests,
            request_json("rt-1", duration_s=2 * settings.control_step_s),
            qos=1,
            properties=request_properties(inbox, b"\x00corr-1"),
        )
        got = await gather_until(c, lambda g: any(body(m)["status"] == "completed" for m in g))
        assert [body(m)["status"] for m in got][-1] == "completed"
        assert {correlation_of(m) for m in got} == {b"\x00corr-1"}
        assert body(got[0])["status"] in ("accepted", "partial")
        # A malformed one: refused there too, with its own correlation data.
        await c.publish(
            t.dispatch_requests,
            b'{"request_id": "rt-2"}',
            qos=1,
            properties=request_properties(inbox, b"corr-2"),
        )
        (refused,) = await gather_until(c, lambda g: len(g) == 1)
        assert correlation_of(refused) == b"corr-2"
        assert body(refused)["status"] == "rejected" and body(refused)["request_id"] == "rt-2"


async def test_a_second_request_on_a_running_id_is_refused_to_its_sender_only(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> None:
    """Seen: `v2g dispatch --wait` following a request printed the "rejected" meant for
    someone who reused its id, and exited 1 while the fleet went on running it."""
    t = settings.topics
    rid = f"dup-{test_id}"
    steps = 12  # it runs 6 wall seconds: longer than the test needs to try to disturb it
    first = DispatchRequest(
        request_id=rid, power_kw=-5.0, duration_s=steps * settings.control_step_s
    )
    async with (
        aggregator_alone(settings, clock, store, test_id) as agg,
        mqtt5(t.dispatch_result(rid), t.dispatch_rejected) as watcher,
    ):
        seen: list[DispatchResult] = []
        answered = asyncio.Event()

        def on_result(r: DispatchResult) -> None:
            seen.append(r)
            answered.set()

        follower = asyncio.create_task(
            operator.dispatch(settings, first, wait=True, timeout_s=20.0, on_result=on_result)
        )
        async with asyncio.timeout(10.0):
            await answered.wait()
        assert rid in agg.dispatcher.dispatches
        await quiet_for(watcher, 0.2)  # the first answer, on the result topic
        other = first.model_copy(update={"power_kw": -9.0})
        # With a response topic (the CLI's way): the refusal comes there, and only there.
        mine = await operator.dispatch(
            settings, other, wait=True, timeout_s=10.0, on_result=lambda _: None
        )
        assert mine.status == "rejected" and "different terms" in (mine.reason or "")
        # Without one: on dispatch/rejected.
        async with mqtt5() as bare:
            await bare.publish(t.dispatch_requests, other.to_json(), qos=1)
        heard = await quiet_for(watcher, 3 * STEP_WALL_S)
        assert [str(m.topic) for m in heard] == [t.dispatch_rejected], [
            (str(m.topic), m.payload) for m in heard
        ]
        notice = body(heard[0])
        assert notice["request_id"] == rid and "different terms" in notice["reason"]
        # The first sender's follower saw none of it, and the request ran to its end.
        final = await asyncio.wait_for(follower, 20.0)
    assert final.status == "completed", final
    assert [r.status for r in seen][-1] == "completed"
    assert "rejected" not in [r.status for r in seen]


async def test_cancel_and_amend_are_confirmed_or_refused(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> None:
    async with aggregator_alone(settings, clock, store, test_id):
        ghost = f"ghost-{test_id}"
        nothing = await operator.cancel(settings, ghost, timeout_s=5.0)
        assert nothing is not None, "no answer to a cancel"
        assert (nothing.status, nothing.reason, nothing.answer_to) == (
            "rejected",
            "unknown request",
            "cancel",
        )
        refused = await operator.amend(settings, ghost, DispatchAmend(power_kw=-3.0), timeout_s=5.0)
        assert (refused.status, refused.reason) == ("rejected", "unknown request")
        rid = f"run-{test_id}"
        req = DispatchRequest(request_id=rid, power_kw=-5.0, duration_s=900.0)
        await operator.dispatch(settings, req, wait=False, timeout_s=10.0, on_result=lambda _: None)
        amended = await operator.amend(settings, rid, DispatchAmend(power_kw=-4.0), timeout_s=5.0)
        assert amended.status in ("accepted", "partial") and amended.answer_to == "amend"
        assert amended.requested_kw == -4.0
        cancelled = await operator.cancel(settings, rid, timeout_s=5.0)
        assert cancelled.status == "cancelled" and cancelled.delivered_kwh is not None


async def test_the_cli_prints_the_answer_to_a_cancel_and_exits_1_when_refused(
    settings: Settings, clock: SimClock, store: RedisStore, test_id: str
) -> None:
    runner = CliRunner()
    flags = ["--broker", settings.broker_url, "--topic-prefix", settings.topic_prefix]
    async with aggregator_alone(settings, clock, store, test_id):
        rid = f"cli-{test_id}"
        req = DispatchRequest(request_id=rid, power_kw=-5.0, duration_s=900.0)
        await operator.dispatch(settings, req, wait=False, timeout_s=10.0, on_result=lambda _: None)
        ok = await asyncio.to_thread(runner.invoke, app, ["cancel", rid, *flags, "--timeout", "5"])
        assert ok.exit_code == 0, ok.output
        assert f"{rid} cancelled" in ok.output and "cancelled by the operator" in ok.output
        again = await asyncio.to_thread(runner.invoke, app, ["cancel", rid, *flags])
        assert again.exit_code == 1, again.output
        assert f"{rid} rejected" in again.output and "not running" in again.output


async def test_a_cancel_nobody_answers_times_out_with_what_to_check(settings: Settings) -> None:
    with pytest.raises(TransportError, match="no answer to the cancel of r-1 within 1 s") as info:
        await operator.cancel(settings, "r-1", timeout_s=1.0)
    assert settings.topic_prefix in str(info.value)
