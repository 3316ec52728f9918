"""The grid operator's side: send a dispatch request and follow it; read fleet status."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiomqtt

from broker.errors import TransportError
from broker.link import MqttLink
from broker.models import (
    Capability,
    DispatchAmend,
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    FleetForecast,
    FleetStatus,
)
from broker.settings import Settings

FINAL = frozenset({"completed", "cancelled", "rejected"})


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    payload: bytes


@contextlib.asynccontextmanager
async def operator_link(
    settings: Settings, subscriptions: list[tuple[str, int]], *, connect_timeout: float = 10.0
) -> AsyncIterator[tuple[MqttLink, asyncio.Queue[Event]]]:
    """A connected link whose messages land in a queue; closed when the block ends."""
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def handler(m: aiomqtt.Message) -> None:
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
        queue.put_nowait(Event(str(m.topic), bytes(payload)))

    link = MqttLink(
        settings=settings,
        client_id=f"v2g-operator-{uuid.uuid4().hex[:8]}",
        handler=handler,
        subscriptions=subscriptions,
    )
    task = asyncio.create_task(link.run(), name="operator-mqtt")
    try:
        waiter = asyncio.create_task(link.wait_connected(connect_timeout))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:  # the link died first (e.g. bad credentials): surface why
            waiter.cancel()
            task.result()
        await waiter
        yield link, queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TransportError):
            await task


async def dispatch(
    settings: Settings,
    request: DispatchRequest,
    *,
    wait: bool,
    timeout_s: float,
    on_result: Callable[[DispatchResult], None],
    on_progress: Callable[[DispatchProgress], None] | None = None,
) -> DispatchResult:
    """Publish a request and return its answer; with ``wait``, follow it to its end."""
    t = settings.topics
    rid = request.request_id
    subs = [(t.dispatch_result(rid), 1), (t.dispatch_progress(rid), 0)]
    async with operator_link(settings, subs, connect_timeout=min(timeout_s, 10.0)) as (link, queue):
        await link.publish(t.dispatch_requests, request.to_json(), qos=1)
        last: DispatchResult | None = None
        async with asyncio.timeout(timeout_s):
            while True:
                ev = await queue.get()
                # Match topics exactly: some brokers (amqtt) deliver beyond the filter.
                if ev.topic == t.dispatch_result(rid):
                    last = DispatchResult.model_validate_json(ev.payload)
                    on_result(last)
                    if not wait or last.status in FINAL:
                        return last
                elif ev.topic == t.dispatch_progress(rid) and on_progress is not None:
                    on_progress(DispatchProgress.model_validate_json(ev.payload))


async def cancel(settings: Settings, request_id: str) -> None:
    """Ask the aggregator to cancel a running request."""
    async with operator_link(settings, []) as (link, _):
        await link.publish(settings.topics.dispatch_cancel(request_id), b"{}", qos=1)


async def amend(
    settings: Settings, request_id: str, change: DispatchAmend, *, timeout_s: float
) -> DispatchResult:
    """Send new terms for a request in flight and return the aggregator's answer."""
    t = settings.topics
    async with operator_link(settings, [(t.dispatch_result(request_id), 1)]) as (link, queue):
        await link.publish(t.dispatch_amend(request_id), change.to_json(), qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    ev = await queue.get()
                    if ev.topic == t.dispatch_result(request_id) and ev.payload:
                        return DispatchResult.model_validate_json(ev.payload)
        except TimeoutError:
            raise TransportError(
                f"no answer to the amendment of {request_id} within {timeout_s:.0f} s;"
                " is the aggregator running, and is the request still running?"
            ) from None


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
