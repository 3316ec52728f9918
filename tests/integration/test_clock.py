"""One clock on a real Mosquitto: a process adopts the fleet's retained clock anchor, the
command line's relative times are on it, and a planned request says when it starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker.clocklink import SharedClock, shared_clock
from broker.models import ClockAnchor, DispatchRequest, DispatchResult, from_epoch, to_epoch
from broker.replies import reply_of
from broker.settings import Settings
from core.clock import Anchor, prefer
from tests.support.harness import HOST, MQTT_PORT, eventually
from v2g import operator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def fresh(settings: Settings, **clock: Any) -> Settings:
    """This test's broker and prefix, with only the clock settings given here explicit
    (as a process started with just those flags or V2G_* variables)."""
    return Settings(
        broker_url=settings.broker_url,
        topic_prefix=settings.topic_prefix,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        publish_timeout_s=5.0,
        **clock,
    )


@contextlib.asynccontextmanager
async def anchor_cleared(settings: Settings) -> AsyncIterator[None]:
    """Clears the retained anchor at the end (an empty retained payload)."""
    try:
        yield
    finally:
        async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{uuid.uuid4().hex}") as c:
            await c.publish(settings.topics.clock, b"", qos=1, retain=True)


async def retained_anchor(settings: Settings) -> ClockAnchor | None:
    """What a newcomer finds retained on the clock topic."""
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{uuid.uuid4().hex}") as c:
        await c.subscribe(settings.topics.clock, qos=1)
        try:
            async with asyncio.timeout(2.0):
                m = await anext(aiter(c.messages))
        except TimeoutError:
            return None
        payload = m.payload if isinstance(m.payload, bytes) else b""
        return ClockAnchor.model_validate_json(payload) if payload else None


async def test_a_second_process_adopts_the_first_process_s_retained_clock_anchor(
    settings: Settings, test_id: str
) -> None:
    first_settings = fresh(settings, speed=30.0)
    async with (
        anchor_cleared(settings),
        asyncio.timeout(30.0),
        shared_clock(first_settings, client_id=f"itest-{test_id}-a") as first,
    ):
        assert first.settled.source == "created"
        # Simulated time starts now, not at 00:00 UTC of the day.
        assert first.clock.now() == pytest.approx(time.time(), abs=30.0)
        await asyncio.sleep(0.5)  # the second process starts a little later

        # It gives no speed: it takes the fleet's, and the time with it.
        second: SharedClock
        async with shared_clock(fresh(settings), client_id=f"itest-{test_id}-b") as second:
            assert second.settled.source == "adopted", second.settled
            assert second.settled.anchor.same_as(first.settled.anchor)
            assert second.clock.speed == 30.0 and second.settings.speed == 30.0
            assert second.clock.now() == pytest.approx(first.clock.now(), abs=0.5)

        # A third with a contradicting speed runs on its own, says so, publishes nothing.
        async with shared_clock(
            fresh(settings, speed=60.0), client_id=f"itest-{test_id}-c"
        ) as third:
            assert third.settled.source == "explicit"
            assert third.settled.conflict is not None
            assert "60" in third.settled.conflict and "30" in third.settled.conflict

        on_bus = await retained_anchor(settings)
        assert on_bus is not None and on_bus.anchor.same_as(first.settled.anchor)
        assert on_bus.set_by == f"itest-{test_id}-a"
    assert await retained_anchor(settings) is None  # cleaned up


async def test_an_anchor_left_by_a_fleet_that_stopped_is_replaced_not_adopted(
    settings: Settings, test_id: str
) -> None:
    """Yesterday's x30 session left its anchor retained: adopting it would put today's
    clock days ahead. Nobody refreshed it, so a new process starts a clock of its own."""
    wall = time.time()
    old = ClockAnchor.of(
        Anchor(wall - 86_400.0, wall - 86_400.0, 30.0),
        refreshed_at=wall - 3600.0,
        set_by="yesterday",
    )
    async with (
        anchor_cleared(settings),
        asyncio.timeout(30.0),
    ):
        async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{test_id}-old") as c:
            await c.publish(settings.topics.clock, old.to_json(), qos=1, retain=True)
        async with shared_clock(
            fresh(settings, speed=30.0), client_id=f"itest-{test_id}-new"
        ) as new:
            assert new.settled.source == "created"
            assert new.clock.now() == pytest.approx(time.time(), abs=30.0)
            on_bus = await retained_anchor(settings)
            assert on_bus is not None and on_bus.set_by == f"itest-{test_id}-new"


async def test_two_processes_that_start_at_once_end_on_one_clock(
    settings: Settings, test_id: str
) -> None:
    """Both wait for an anchor, find none and create one (compose starts the aggregator
    and the agents together); within a refresh they run on the earlier of the two."""
    quick = fresh(settings, speed=30.0, clock_refresh_s=0.3)
    async with (
        anchor_cleared(settings),
        asyncio.timeout(30.0),
        contextlib.AsyncExitStack() as stack,
    ):

        async def start(name: str) -> SharedClock:
            cm = shared_clock(quick, client_id=f"itest-{test_id}-{name}")
            return await stack.enter_async_context(cm)

        a, b = await asyncio.gather(start("a"), start("b"))

        def anchor(c: SharedClock) -> Anchor:
            return Anchor(c.clock.sim_anchor, c.clock.wall_anchor, c.clock.speed)

        # Each created its own (unless a machine this busy let one see the other's
        # first): simulated time from its own wall time, a little apart.
        if a.settled.source == b.settled.source == "created":
            assert not a.settled.anchor.same_as(b.settled.anchor)
        await eventually(lambda: anchor(a).same_as(anchor(b)), "one clock for both", 5.0)
        await asyncio.sleep(1.0)  # a few refreshes: nobody flips it back
        assert anchor(a).same_as(anchor(b))
        earlier = prefer(a.settled.anchor, b.settled.anchor)
        assert anchor(a).same_as(earlier)
        on_bus = await retained_anchor(settings)
        assert on_bus is not None and on_bus.anchor.same_as(earlier)


async def test_the_readme_example_at_speed_30_starts_half_an_hour_ahead_on_the_fleet_clock(
    settings: Settings, test_id: str
) -> None:
    """`V2G_SPEED=30 v2g dispatch --power 300 --duration 1h --start +30m` while a fleet
    runs on a x30 clock that started a wall hour ago (30 simulated hours)."""
    wall0 = time.time() - 3600.0
    fleet_settings = fresh(settings, speed=30.0, sim_start=wall0, clock_anchor=wall0)
    t = settings.topics
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    env |= {
        "V2G_SPEED": "30",
        "V2G_BROKER_URL": settings.broker_url,
        "V2G_TOPIC_PREFIX": settings.topic_prefix,
    }
    rid = f"readme-{test_id}"
    async with (
        anchor_cleared(settings),
        asyncio.timeout(60.0),
        shared_clock(fleet_settings, client_id=f"itest-{test_id}-fleet") as fleet,
        # Stands in for the aggregator: takes the request, answers on its response topic.
        aiomqtt.Client(
            HOST,
            MQTT_PORT,
            identifier=f"itest-{test_id}-agg",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as agg,
    ):
        await agg.subscribe(t.dispatch_requests, qos=1)
        assert fleet.clock.now() - time.time() == pytest.approx(29 * 3600.0, abs=60.0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "v2g.cli", "dispatch", "--power", "300",
            "--duration", "1h", "--start", "+30m", "--id", rid, "--timeout", "20",
            env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(20.0):
                msg = await anext(aiter(agg.messages))
            seen_at = fleet.clock.now()
            assert isinstance(msg.payload, bytes)
            req = DispatchRequest.model_validate_json(msg.payload)
            assert req.request_id == rid and req.start is not None
            # Half an hour ahead on the fleet's clock (less the CLI's own start-up).
            ahead = to_epoch(req.start) - seen_at
            assert 1800.0 - 150.0 < ahead <= 1800.0 + 1.0, (req.start, from_epoch(seen_at))
            answer = DispatchResult(
                request_id=rid,
                status="accepted",
                reason="scheduled",
                allocated_kw=300.0,
                ts=from_epoch(seen_at),
            )
            reply = reply_of(msg.properties, settings.topic_prefix)
            assert reply is not None, "the CLI asks for its answer on a response topic"
            await agg.publish(reply.topic, answer.to_json(), qos=1, properties=reply.properties())
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert f"{rid} accepted" in out.decode()
    assert "platform_clock" in err.decode() and "adopted" in err.decode()


async def test_a_planned_request_gets_a_started_result_and_dispatch_wait_goes_on(
    loop_factory: Callable[..., Any], settings: Settings
) -> None:
    async with loop_factory(count=12, seed=9, mode="multiplexed", connections=2) as loop:
        report = await loop.wait_all_online()
        assert report.capability is not None
        win = next(w for w in report.capability.windows if w.duration_s == 900.0)
        now = loop.clock.now()
        start = from_epoch(round(now) + 60)  # 6 wall seconds ahead at x10
        req = DispatchRequest(
            request_id=f"planned-{uuid.uuid4().hex[:8]}",
            power_kw=round(0.5 * (win.min_power_kw + win.max_power_kw), 1),
            start=start,
            duration_s=30.0,
        )
        statuses: list[DispatchResult] = []
        final = await operator.dispatch(
            settings, req, wait=True, timeout_s=30.0, on_result=statuses.append
        )
    names = [r.status for r in statuses]
    assert names[0] in ("accepted", "partial"), statuses[0]
    assert "started" in names, names
    started = statuses[names.index("started")]
    # It began at its start (at the first control step from then), not when it was asked.
    assert 0.0 <= to_epoch(started.ts) - to_epoch(start) <= 2 * settings.control_step_s
    assert "planned for" in (started.reason or "")
    # `dispatch --wait` went on past `started` to the end.
    assert final.status == "completed" and names[-1] == "completed"
    assert names.index("started") < names.index("completed")
