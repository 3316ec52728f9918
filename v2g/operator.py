"""The grid operator's side: send a dispatch request and follow it; read fleet status."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import aiomqtt
from pydantic import ValidationError

from broker.clientid import main_client_id
from broker.link import MqttLink
from broker.models import (
    Capability,
    DispatchAmend,
    DispatchProgress,
    DispatchRejection,
    DispatchRequest,
    DispatchResult,
    FleetForecast,
    FleetStatus,
)
from broker.replies import correlation_of, request_properties
from broker.settings import Settings
from core.errors import TransportError

FINAL = frozenset({"completed", "cancelled", "rejected"})


def is_final(result: DispatchResult) -> bool:
    """Does ``result`` end its request? (A refused amendment or cancel leaves it running.)"""
    return result.status in FINAL and (result.status != "rejected" or result.answer_to == "request")


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    payload: bytes
    correlation: bytes | None = None  # MQTT 5 correlation data, if the message had any
    retain: bool = False  # the broker's retained copy, not live traffic


@dataclass(frozen=True, slots=True)
class Asking:
    """A private MQTT 5 response topic and the correlation data of one message sent."""

    topic: str
    correlation: bytes

    @classmethod
    def fresh(cls, settings: Settings) -> Asking:
        return cls(settings.topics.operator_responses(uuid.uuid4().hex[:16]), uuid.uuid4().bytes)

    def mine(self, ev: Event) -> bool:
        return ev.topic == self.topic and ev.correlation == self.correlation


def answer_of(payload: bytes, request_id: str) -> DispatchResult:
    """A DispatchResult from an answer's payload (a ``dispatch/rejected`` notice, which
    a response topic may carry too, reads as a ``rejected`` result)."""
    try:
        return DispatchResult.model_validate_json(payload)
    except ValidationError:
        notice = DispatchRejection.model_validate_json(payload)
        return DispatchResult(
            request_id=notice.request_id or request_id,
            status="rejected",
            reason=notice.reason,
            ts=notice.ts,
        )


@contextlib.asynccontextmanager
async def operator_link(
    settings: Settings, subscriptions: list[tuple[str, int]], *, connect_timeout: float = 10.0
) -> AsyncIterator[tuple[MqttLink, asyncio.Queue[Event]]]:
    """A connected link whose messages land in a queue; closed when the block ends."""
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def handler(m: aiomqtt.Message) -> None:
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
        queue.put_nowait(
            Event(str(m.topic), bytes(payload), correlation_of(m.properties), bool(m.retain))
        )

    link = MqttLink(
        settings=settings,
        # {prefix}-cli-{host}-{pid}, or V2G_CLIENT_ID: an operator command is one connection.
        client_id=main_client_id(settings, "cli", per_process=True),
        handler=handler,
        subscriptions=subscriptions,
    )
    async with link.running(connect_timeout, name="operator-mqtt"):
        yield link, queue


@contextlib.asynccontextmanager
async def _answer_within(timeout_s: float, no_answer: str) -> AsyncIterator[None]:
    """Bound the wait for the aggregator's answer: past ``timeout_s``, TransportError
    saying ``no_answer`` (one line for the command, as every other transport error)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise TransportError(no_answer) from None


async def dispatch(
    settings: Settings,
    request: DispatchRequest,
    *,
    wait: bool,
    timeout_s: float,
    on_result: Callable[[DispatchResult], None],
    on_progress: Callable[[DispatchProgress], None] | None = None,
) -> DispatchResult:
    """Publish a request and return its answer; with ``wait``, follow it to its end.
    No answer (with ``wait``: no end) within ``timeout_s`` raises TransportError.

    Over MQTT 5 the answer comes on a private response topic, matched by correlation
    data: an answer meant for someone else who used the same request id (a refusal of
    their request) is never taken for ours, and until ours is in, the request id's
    topics (another sender's request, perhaps) are not followed."""
    t = settings.topics
    rid = request.request_id
    asking = Asking.fresh(settings)
    subs = [(t.dispatch_result(rid), 1), (t.dispatch_progress(rid), 0), (asking.topic, 1)]
    async with operator_link(settings, subs, connect_timeout=min(timeout_s, 10.0)) as (link, queue):
        v5 = link.protocol == "5"
        props = request_properties(asking.topic, asking.correlation) if v5 else None
        await link.publish(t.dispatch_requests, request.to_json(), qos=1, properties=props)
        answered = not v5  # on MQTT 3.1.1 the request's result topic is all there is
        seen: set[bytes] = set()  # an answer comes on both topics: take it once
        no_answer = f"no answer for {rid} within {timeout_s:.0f} s; is the aggregator running?"
        async with _answer_within(timeout_s, no_answer):
            while True:
                ev = await queue.get()
                # Match topics exactly: some brokers (amqtt) deliver beyond the filter.
                if asking.mine(ev) or (answered and ev.topic == t.dispatch_result(rid)):
                    if not ev.payload or ev.payload in seen:
                        continue
                    seen.add(ev.payload)
                    last = answer_of(ev.payload, rid)
                    answered = True
                    on_result(last)
                    if not wait or is_final(last):
                        return last
                elif answered and ev.topic == t.dispatch_progress(rid) and on_progress is not None:
                    on_progress(DispatchProgress.model_validate_json(ev.payload))


async def ask(
    settings: Settings,
    request_id: str,
    kind: Literal["cancel", "amend"],
    payload: bytes,
    *,
    timeout_s: float,
) -> DispatchResult:
    """Send a cancel or an amendment of ``request_id`` and return the aggregator's
    answer to it (its own, by correlation data over MQTT 5)."""
    t = settings.topics
    topic = t.dispatch_cancel(request_id) if kind == "cancel" else t.dispatch_amend(request_id)
    asking = Asking.fresh(settings)
    subs = [(asking.topic, 1), (t.dispatch_result(request_id), 1)]
    async with operator_link(settings, subs, connect_timeout=min(timeout_s, 10.0)) as (link, queue):
        v5 = link.protocol == "5"
        props = request_properties(asking.topic, asking.correlation) if v5 else None
        await link.publish(topic, payload, qos=1, properties=props)
        what = "cancel" if kind == "cancel" else "amendment"
        no_answer = (
            f"no answer to the {what} of {request_id} within {timeout_s:g} s; is the"
            f" aggregator running on {settings.broker_url} with topic prefix"
            f" {t.prefix!r}? The {what} may still be acted on when it comes back."
        )
        async with _answer_within(timeout_s, no_answer):
            while True:
                ev = await queue.get()
                if not ev.payload:
                    continue
                if v5 and asking.mine(ev):
                    return answer_of(ev.payload, request_id)
                if not v5 and ev.topic == t.dispatch_result(request_id):
                    answer = answer_of(ev.payload, request_id)
                    if answer.answer_to == kind:
                        return answer


async def cancel(settings: Settings, request_id: str, *, timeout_s: float = 15.0) -> DispatchResult:
    """Ask the aggregator to cancel a running request; returns its answer (``cancelled``
    with the books, or ``rejected`` with why, e.g. ``unknown request``)."""
    return await ask(settings, request_id, "cancel", b"{}", timeout_s=timeout_s)


async def amend(
    settings: Settings, request_id: str, change: DispatchAmend, *, timeout_s: float
) -> DispatchResult:
    """Send new terms for a request in flight and return the aggregator's answer."""
    return await ask(settings, request_id, "amend", change.to_json(), timeout_s=timeout_s)


async def follow_status(
    settings: Settings, *, follow: bool, timeout_s: float, on_status: Callable[[FleetStatus], None]
) -> int:
    """Print the retained fleet status, and with ``follow`` every new one; returns how many."""
    seen = 0
    subs = [(settings.topics.fleet_status, 1)]
    async with operator_link(settings, subs, connect_timeout=min(timeout_s, 10.0)) as (_, queue):
        while True:
            try:
                async with asyncio.timeout(None if follow else timeout_s):
                    ev = await queue.get()
            except TimeoutError:
                return seen
            if not ev.payload or ev.topic != settings.topics.fleet_status:
                continue
            on_status(FleetStatus.model_validate_json(ev.payload))
            seen += 1
            if not follow:
                return seen


async def read_capability(
    settings: Settings, *, timeout_s: float
) -> tuple[Capability | None, FleetForecast | None]:
    """The retained capability envelope and availability forecast (None where absent)."""
    t = settings.topics
    cap: Capability | None = None
    forecast: FleetForecast | None = None
    async with operator_link(settings, [(t.fleet_capability, 1), (t.fleet_forecast, 1)]) as (
        _,
        queue,
    ):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while cap is None or forecast is None:
                    ev = await queue.get()
                    if not ev.payload:
                        continue
                    if ev.topic == t.fleet_capability:
                        cap = Capability.model_validate_json(ev.payload)
                    elif ev.topic == t.fleet_forecast:
                        forecast = FleetForecast.model_validate_json(ev.payload)
    return cap, forecast
