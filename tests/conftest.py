"""Fixtures every kind of test shares, and the end-of-run table of measured figures.

Servers: ``mqtt_url`` and ``redis_url`` are the real Mosquitto on 127.0.0.1:1883 and
Redis on :6379 (a test fails, not skips, when one does not answer); tests/faults/conftest.py
overrides both with servers of each test's own. Nothing here mocks the MQTT client or
Redis. Every test gets its own topic prefix and Redis prefix (a uuid), so tests never see
each other's retained messages or state, and everything a test leaves behind (Redis keys,
retained messages, tasks) is removed at teardown. Every wait is bounded. Helpers that are
not fixtures live in tests/support/.

Figures: the fault and security tests take the ``figure`` fixture and call
``figure("what", value, "unit", limit="< 1 s")`` once per figure they assert on; the table
(and, with ``TEST_FIGURES_JSON=path``, a JSON file) comes after pytest's own summary, so a
CI log carries the numbers next to the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import asdict, dataclass
from typing import Any

import aiomqtt
import pytest
import redis
import redis.asyncio as aioredis

from aggregator.store import RedisStore
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import (
    HOST,
    MQTT_PORT,
    REDIS_PORT,
    SIM_START,
    SPEED,
    STEP_S,
    Loop,
    running_loop,
)


@dataclass(frozen=True, slots=True)
class Figure:
    test: str
    what: str
    value: float
    unit: str
    limit: str
    outcome: str = ""


_FIGURES = pytest.StashKey[list[Figure]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_FIGURES] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Recorder:
    """Record a measured figure of this test for the end-of-run table."""
    figures = request.config.stash[_FIGURES]
    test = request.node.name

    def record(what: str, value: float, unit: str = "", *, limit: str = "") -> None:
        figures.append(Figure(test, what, float(value), unit, limit))

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        figures = item.config.stash[_FIGURES]
        for i, f in enumerate(figures):
            if f.test == item.name and not f.outcome:
                figures[i] = Figure(f.test, f.what, f.value, f.unit, f.limit, report.outcome)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(_FIGURES, [])
    if not figures:
        return
    terminalreporter.section("measured figures (faults, security, load)")
    rows = [(f.what, _fmt(f.value), f.unit, f.limit, f.outcome or "?", f.test) for f in figures]
    head = ("figure", "value", "unit", "limit", "result", "test")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join
    for r in [head, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(r, widths, strict=True))
        terminalreporter.write_line(line(cells).rstrip())
    path = os.environ.get("TEST_FIGURES_JSON")
    if path:
        with open(path, "w") as fh:
            json.dump([asdict(f) for f in figures], fh, indent=1)
        terminalreporter.write_line(f"figures written to {path}")


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


# -- the servers, settings, clock and cleanup (shared by integration and fault tests) ----
def _port_answers(port: int, timeout: float = 2.0) -> str | None:
    """None if something accepts TCP on HOST:port, else why not."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return None
    except OSError as err:
        return str(err)


# -- the servers ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mqtt_url() -> str:
    """The real Mosquitto on loopback; the test fails (not skips) if it is not there."""
    problem = _port_answers(MQTT_PORT)
    if problem is not None:
        pytest.fail(
            f"integration tests need Mosquitto on {HOST}:{MQTT_PORT}, which does not answer"
            f" ({problem}); start it with `mosquitto -d -c /etc/mosquitto/mosquitto.conf`",
            pytrace=False,
        )
    return f"mqtt://{HOST}:{MQTT_PORT}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis on loopback; the test fails (not skips) if it does not answer PING."""
    url = f"redis://{HOST}:{REDIS_PORT}/0"
    hint = (
        "start it with `redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379"
        ' --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log`'
    )
    problem = _port_answers(REDIS_PORT)
    if problem is None:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        except redis.RedisError as err:
            problem = f"PING failed: {err}"
        finally:
            client.close()
    if problem is not None:
        pytest.fail(
            f"integration tests need Redis on {HOST}:{REDIS_PORT}, which does not answer"
            f" ({problem}); {hint}",
            pytrace=False,
        )
    return url


# -- per-test settings, clock and cleanup --------------------------------------------------
@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def settings(
    mqtt_url: str, redis_url: str, test_id: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings on loopback with this test's own prefixes and fast timings."""
    for name in list(os.environ):
        if name.upper().startswith("V2G_"):
            monkeypatch.delenv(name)
    return Settings(
        broker_url=mqtt_url,
        redis_url=redis_url,
        topic_prefix=f"itest/{test_id}",
        redis_prefix=f"v2g-itest:{test_id}",
        speed=SPEED,
        telemetry_interval_s=STEP_S,
        control_step_s=STEP_S,
        setpoint_ttl_s=30.0,
        status_every_wall_s=2.0,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        publish_timeout_s=5.0,
    )


@pytest.fixture
def clock(settings: Settings) -> SimClock:
    """The platform clock shared by agents and aggregator: x10, starting at SIM_START."""
    return SimClock(speed=settings.speed, sim_anchor=SIM_START)


@pytest.fixture
async def redis_keys(settings: Settings, redis_url: str) -> AsyncIterator[None]:
    """Deletes every Redis key under this test's prefix at teardown."""
    yield
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        async with asyncio.timeout(10.0):
            keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*")]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def retained_cleanup(settings: Settings) -> AsyncIterator[None]:
    """Clears every retained message under this test's topic prefix at teardown."""
    yield
    prefix = settings.topic_prefix
    topics: set[str] = set()
    async with aiomqtt.Client(HOST, MQTT_PORT, identifier=f"itest-clean-{uuid.uuid4().hex}") as c:
        await c.subscribe(f"{prefix}/#", qos=1)
        # Retained messages arrive right after SUBACK; stop once the broker goes quiet.
        async with asyncio.timeout(5.0):
            while True:
                try:
                    async with asyncio.timeout(0.3):
                        m = await anext(aiter(c.messages))
                except TimeoutError:
                    break
                if m.retain and m.payload:
                    topics.add(str(m.topic))
        for topic in topics:
            await c.publish(topic, b"", qos=1, retain=True)


@pytest.fixture
async def store(settings: Settings, redis_keys: None) -> AsyncIterator[RedisStore]:
    s = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def loop_factory(
    settings: Settings,
    clock: SimClock,
    store: RedisStore,
    test_id: str,
    retained_cleanup: None,
) -> Callable[..., contextlib.AbstractAsyncContextManager[Loop]]:
    """``async with loop_factory(count=.., seed=..) as loop:`` runs the whole loop."""

    def factory(**kwargs: Any) -> contextlib.AbstractAsyncContextManager[Loop]:
        return running_loop(settings, clock, store, test_id, **kwargs)

    return factory
