"""Deployments on one broker and one Redis do not disturb each other (issue 12), on the
real Mosquitto and Redis: two aggregators with other topic prefixes and default client
ids keep their connections, a session taken over is logged as exactly that, the Redis
prefix follows the topic prefix, ``v2g reset`` removes one deployment and nothing of
another, and the ledger stream of a rejected request expires."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from aggregator.ledger import LedgerWriter, RedisLedger, answer_entry, step_entry
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.fastpub import FastPublisher
from broker.link import MqttLink
from broker.models import DispatchProgress, DispatchResult, from_epoch
from broker.settings import Settings
from core.clock import SimClock
from tests.support.harness import HOST, MQTT_PORT, SIM_START, STEP_S, eventually
from v2g import reset

pytestmark = pytest.mark.integration

TROUBLE = {"mqtt_session_taken_over", "broker_unreachable", "mqtt_disconnected"}


@pytest.fixture
def every_level() -> Iterator[None]:
    """capture_logs sees only what the configured level lets through, and a test before
    this one may have configured "warning": let info lines through while this one runs."""
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        yield
    finally:
        structlog.configure(**before)


def deployment(settings: Settings, name: str, **changes: Any) -> Settings:
    """The test's settings for one more deployment under its prefix, with the Redis
    prefix left to its default (the topic prefix)."""
    fields = settings.model_dump(exclude={"redis_prefix", "topic_prefix", "password"})
    return Settings(**fields, topic_prefix=f"{settings.topic_prefix}/{name}", **changes)


async def test_two_aggregators_with_other_prefixes_and_default_ids_keep_their_connections(
    settings: Settings, retained_cleanup: None, every_level: None
) -> None:
    """Seen: two aggregators (other prefixes) both connected as ``v2g-aggregator`` and took
    each other's connection in a loop, logged as ``broker_unreachable``."""
    clock = SimClock(speed=settings.speed, sim_anchor=SIM_START)
    with capture_logs() as logs:
        services = [
            AggregatorService(
                settings=deployment(settings, name),
                clock=clock,
                store=MemoryStore(),
                fast_ingest=True,  # as `v2g aggregator` runs: three connections each
                fast_setpoints=True,
            )
            for name in ("north", "south")
        ]
        for svc in services:
            svc.reports = asyncio.Queue()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(svc.run()) for svc in services]
            try:
                async with asyncio.timeout(30.0):
                    for svc in services:
                        assert svc.reports is not None
                        for _ in range(6):  # a few control steps each
                            await svc.reports.get()
                    await asyncio.sleep(1.0)  # time for a takeover loop to show
            finally:
                for t in tasks:
                    t.cancel()
    for svc in services:
        assert svc.ingest is not None and svc.setpoints is not None
        for what, stats in (
            ("main", svc.link.stats),
            ("ingest", svc.ingest.stats),
            ("setpoints", svc.setpoints.stats),
        ):
            assert (stats.connects, stats.disconnects) == (1, 0), (svc.link.client_id, what, stats)
    assert [s.client_id for s in services] == [
        f"{settings.topic_prefix}/north-aggregator",
        f"{settings.topic_prefix}/south-aggregator",
    ]
    trouble = [e for e in logs if e["event"] in TROUBLE]
    assert trouble == []
    starts = [e for e in logs if e["event"] == "deployment"]
    assert {(e["topic_prefix"], e["client_id"]) for e in starts} == {
        (s.settings.topic_prefix, s.client_id) for s in services
    }


@pytest.mark.parametrize("kind", ["link", "lean"])
async def test_a_session_taken_over_by_a_client_with_the_same_id_is_logged_as_such(
    settings: Settings, kind: str
) -> None:
    """Two clients with one explicit id: the broker keeps dropping one for the other. Each
    says ``mqtt_session_taken_over`` with the id (the general link, and the lean ones)."""
    cfg = settings.model_copy(update={"reconnect_min_s": 0.05, "reconnect_max_s": 0.3})
    same = f"itest-same-{uuid.uuid4().hex[:8]}"
    lg = structlog.get_logger("t")
    links: list[MqttLink | FastPublisher] = [
        MqttLink(settings=cfg, client_id=same, logger=lg)
        if kind == "link"
        else FastPublisher(settings=cfg, client_id=same, logger=lg)
        for _ in range(2)
    ]
    with capture_logs() as logs:
        # One after the other, as two processes start (two CONNECTs with one id in the
        # same few milliseconds can leave Mosquitto 2.0.11 and paho out of step).
        tasks = [asyncio.create_task(links[0].run())]
        try:
            await eventually(lambda: links[0].stats.connects == 1, "the first connection", 10.0)
            tasks.append(asyncio.create_task(links[1].run()))
            await eventually(lambda: any(k.stats.taken_over for k in links), "a takeover", 20.0)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    taken = [e for e in logs if e["event"] == "mqtt_session_taken_over"]
    assert taken, [(e["event"], e.get("error")) for e in logs]
    assert taken[0]["client_id"] == same
    assert "same client id" in taken[0]["hint"]
    assert not any(e["event"] == "broker_unreachable" for e in logs)


async def test_the_aggregator_command_keeps_its_redis_keys_under_its_topic_prefix(
    settings: Settings, retained_cleanup: None
) -> None:
    """``v2g aggregator --topic-prefix P`` with no Redis prefix set: its snapshot is
    ``P:fleet``, not the default deployment's ``v2g:fleet``. Redis db 15, so that even
    the code before this fix (which wrote ``v2g:fleet``) touches nobody's keys."""
    url = f"redis://{HOST}:6379/15"
    prefix = f"{settings.topic_prefix}/cmd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    env |= {"V2G_SPEED": "10", "V2G_CONTROL_STEP_S": "5"}
    r = aioredis.Redis.from_url(url, socket_timeout=5.0)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "v2g"),
        "aggregator", "--broker", f"mqtt://{HOST}:{MQTT_PORT}", "--redis", url,
        "--topic-prefix", prefix,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30.0):
            while not await r.exists(f"{prefix}:fleet"):
                assert proc.returncode is None, "the aggregator exited"
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15.0):
            out, _ = await proc.communicate()
        await r.delete(f"{prefix}:fleet")
        await r.aclose()
    text = out.decode(errors="replace")
    start = next(line for line in text.splitlines() if "deployment" in line)
    for part in (
        f"topic_prefix={prefix}",
        f"redis_prefix={prefix}",
        f"client_id={prefix}-aggregator",
        "broker=mqtt://",
        "redis=redis://",
    ):
        assert part in start, start


async def test_agents_on_another_clock_show_as_stale_with_a_warning_not_an_empty_fleet(
    settings: Settings, retained_cleanup: None
) -> None:
    """Seen: agents and aggregator started with other clock speeds; the fleet showed empty
    with no word why. The agents here run an hour behind the aggregator's clock."""
    agents_clock = SimClock(speed=settings.speed, sim_anchor=SIM_START)
    agg_clock = SimClock(speed=settings.speed, sim_anchor=SIM_START + 3600.0)
    fleet = SimFleet(generate_fleet(10, 2), agents_clock.now(), step_s=STEP_S)
    agents = AgentRuntime(settings=settings, clock=agents_clock, fleet=fleet, connections=1)
    agg = AggregatorService(settings=settings, clock=agg_clock, store=MemoryStore())
    agg.reports = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(agents.run()), tg.create_task(agg.run())]
        try:
            async with asyncio.timeout(30.0):
                while True:
                    report = await agg.reports.get()
                    if report.status.rejected.get("stale", 0) >= len(fleet):
                        break
        finally:
            for t in tasks:
                t.cancel()
    status = report.status
    assert status.vehicles_online == 0
    (warning,) = status.warnings
    assert "behind the aggregator's clock" in warning and "--speed" in warning
    lag = re.search(r"up to (\d+) s behind", warning)
    assert lag is not None and 3600 <= int(lag.group(1)) <= 3600 + 4 * STEP_S, warning


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        yield r
    finally:
        await r.aclose()


async def retained(topic_filter: str, quiet_s: float = 0.5) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{uuid.uuid4().hex}") as c:
        await c.subscribe(topic_filter, qos=1)
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet_s):
                    m = await anext(aiter(c.messages))
                if m.retain and isinstance(m.payload, bytes) and m.payload:
                    out[str(m.topic)] = m.payload
    return out


async def v2g(*args: str) -> tuple[int, str]:
    """Run the real command in a process of its own, with no terminal on stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "v2g"), *args,
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60.0):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_reset_removes_one_deployments_retained_topics_and_keys_and_nothing_else(
    settings: Settings, retained_cleanup: None
) -> None:
    # A prefix with Redis glob characters: SCAN must not read them as a pattern.
    mine = deployment(settings, "a[1]*")
    other = deployment(settings, "a[1]*x")
    keys = [
        f"{mine.redis_prefix}:fleet",
        f"{mine.redis_prefix}:ledger:r1",
        f"{mine.redis_prefix}-stats",  # its characters, but not under "prefix:"
        f"{settings.topic_prefix}/a1zz:fleet",  # what the prefix would match as a pattern
        f"{other.redis_prefix}:fleet",
    ]
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{uuid.uuid4().hex}") as c:
        for s in (mine, other):
            await c.publish(s.topics.fleet_status, b"{}", qos=1, retain=True)
            await c.publish(s.topics.vehicle_status("ev-0001"), b"{}", qos=1, retain=True)
    async with redis_client(settings.redis_url) as r:
        for k in keys:
            await r.set(k, "1")
        try:
            cli = ["reset", "--topic-prefix", mine.topic_prefix, "--broker", mine.broker_url]
            cli += ["--redis", mine.redis_url]
            # No confirmation and no terminal to ask on: refused, nothing removed.
            code, out = await v2g(*cli)
            assert code == 2, out
            assert "pass --yes" in out
            assert await r.exists(keys[0]) == 1
            code, out = await v2g(*cli, "--yes")
            assert code == 0, out
            assert f"retained  {mine.topics.fleet_status}" in out
            assert f"redis key {mine.redis_prefix}:fleet" in out
            assert "removed 2 retained topics and 2 Redis keys" in out
            assert [await r.exists(k) for k in keys] == [0, 0, 1, 1, 1]
            left = await retained(f"{settings.topic_prefix}/#")
            assert set(left) == {other.topics.fleet_status, other.topics.vehicle_status("ev-0001")}
            assert not await reset.find(mine)  # nothing left to remove
        finally:
            await r.delete(*keys)


async def test_reset_answers_in_json_what_it_removed(
    settings: Settings, retained_cleanup: None
) -> None:
    mine = deployment(settings, "json")
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-{uuid.uuid4().hex}") as c:
        await c.publish(mine.topics.fleet_status, b"{}", qos=1, retain=True)
    async with redis_client(settings.redis_url) as r:
        key = f"{mine.redis_prefix}:fleet"
        await r.set(key, "1")
        try:
            cli = ["reset", "--topic-prefix", mine.topic_prefix, "--broker", mine.broker_url]
            cli += ["--redis", mine.redis_url, "--yes", "--json"]
            code, out = await v2g(*cli)
            assert code == 0, out
            answer = json.loads(out.strip().splitlines()[-1])
            assert answer == {"topics": [mine.topics.fleet_status], "keys": [key], "removed": True}
            code, out = await v2g(*cli)
            assert code == 0, out
            assert json.loads(out.strip().splitlines()[-1]) == {
                "topics": [],
                "keys": [],
                "removed": False,
            }
        finally:
            await r.delete(key)


async def test_the_ledger_stream_of_a_rejected_request_expires_and_a_running_ones_does_not(
    settings: Settings, redis_keys: None
) -> None:
    ledger = RedisLedger(settings.redis_url, prefix=settings.redis_prefix, rejected_ttl_s=600)
    writer = LedgerWriter(ledger)
    now = from_epoch(SIM_START)

    def answer(rid: str, status: str) -> dict[str, str]:
        return answer_entry(
            DispatchResult(request_id=rid, status=status, ts=now, requested_kw=-10.0)  # type: ignore[arg-type]
        )

    step = step_entry(
        DispatchProgress(
            request_id="ran",
            ts=now,
            requested_kw=-10.0,
            allocated_kw=-10.0,
            delivered_kw=-10.0,
            baseline_kw=0.0,
            requested_kwh=0.1,
            delivered_kwh=0.1,
            vehicles=3,
            elapsed_s=5.0,
            remaining_s=60.0,
        ),
        3,
    )
    writer.add("refused", answer("refused", "rejected"))
    writer.add("ran", answer("ran", "accepted"))
    writer.add("ran", step)
    writer.add("ran", answer("ran", "rejected"))  # refused new terms: its books stay
    writer.add("resent", answer("resent", "rejected"))
    try:
        assert await writer.drain()
        writer.add("resent", answer("resent", "accepted"))  # the same id, sent again, runs
        assert await writer.drain()
        async with redis_client(settings.redis_url) as r:
            ttl = {rid: await r.ttl(ledger.key(rid)) for rid in ("refused", "ran", "resent")}
    finally:
        await ledger.close()
    assert 0 < ttl["refused"] <= 600
    assert ttl["ran"] == -1 and ttl["resent"] == -1
