"""Fixtures of the fault tests: a Mosquitto and a Redis of each test's own.

``mqtt_url`` and ``redis_url`` override the fixtures of the same name in tests/conftest.py,
so its ``settings`` point at these servers, which a test may kill, freeze and restart by
PID without disturbing anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Mosquitto, Redis, make_mosquitto, make_redis


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    server = make_mosquitto(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = make_redis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mqtt_url(mosquitto: Mosquitto) -> str:
    return mosquitto.url


@pytest.fixture
def redis_url(redis_server: Redis) -> str:
    return redis_server.url
