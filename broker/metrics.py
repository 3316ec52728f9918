"""The process's Prometheus edge: serving a registry over HTTP (``--metrics HOST:PORT``) and
the MQTT connection families every process shares.

Each process builds one :class:`prometheus_client.CollectorRegistry` with its own
collectors (aggregator/metrics.py, agents/metrics.py) that read the process's state at
scrape time, so nothing is counted twice and nothing costs on the hot path.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.settings import listen_address


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry with the process, platform and GC collectors and ``collectors``."""
    registry = CollectorRegistry(auto_describe=True)
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *collectors):
        registry.register(c)
    return registry


@contextlib.contextmanager
def serving(address: str | None, registry: CollectorRegistry, *, process: str) -> Iterator[None]:
    """Serve ``registry`` on ``address`` (``HOST:PORT`` or ``PORT``; None: do nothing) in a
    daemon thread while the block runs; logs ``metrics_listening`` with the URL."""
    if address is None:
        yield
        return
    host, port = listen_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    structlog.get_logger(process).info(
        "metrics_listening", url=f"http://{host}:{bound}/metrics", process=process
    )
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)


class ConnectionStats(Protocol):
    """What a connection's stats count (broker/link.py LinkStats, broker/fastpub.py's)."""

    connects: int
    disconnects: int
    taken_over: int


@dataclass(frozen=True, slots=True)
class Connections:
    """The MQTT connections of one kind (``main``, ``ingest``, ``setpoints``, ``vehicles``):
    their stats and whether each is connected now."""

    kind: str
    stats: Sequence[ConnectionStats]
    up: int


def mqtt_families(groups: Iterable[Connections]) -> list[Metric]:
    """``v2g_mqtt_*``: connections, how many are up, connects and disconnects since start,
    labelled by the kind of connection (never by client id: per-vehicle links are many)."""
    total = GaugeMetricFamily(
        "v2g_mqtt_connections", "MQTT connections this process keeps", labels=["connection"]
    )
    up = GaugeMetricFamily(
        "v2g_mqtt_connections_up", "MQTT connections connected now", labels=["connection"]
    )
    reconnects = CounterMetricFamily(
        "v2g_mqtt_reconnects",
        "MQTT connects after the first of each connection",
        labels=["connection"],
    )
    disconnects = CounterMetricFamily(
        "v2g_mqtt_disconnects", "MQTT connections lost", labels=["connection"]
    )
    taken = CounterMetricFamily(
        "v2g_mqtt_sessions_taken_over",
        "disconnects because another client connected with our client id",
        labels=["connection"],
    )
    for g in groups:
        total.add_metric([g.kind], len(g.stats))
        up.add_metric([g.kind], g.up)
        reconnects.add_metric([g.kind], sum(max(0, s.connects - 1) for s in g.stats))
        disconnects.add_metric([g.kind], sum(s.disconnects for s in g.stats))
        taken.add_metric([g.kind], sum(s.taken_over for s in g.stats))
    return [total, up, reconnects, disconnects, taken]


class MqttCollector(Collector):
    """The ``v2g_mqtt_*`` families of every part of a process (the demo runs the aggregator
    and the fleet in one), each part adding a source of its connection groups."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Connections]]] = []

    def collect(self) -> Iterator[Metric]:
        yield from mqtt_families(g for source in self.sources for g in source())


_MQTT: weakref.WeakKeyDictionary[CollectorRegistry, MqttCollector] = weakref.WeakKeyDictionary()


def add_connections(
    registry: CollectorRegistry, source: Callable[[], Iterable[Connections]]
) -> None:
    """Report ``source``'s connection groups in ``registry``'s one ``v2g_mqtt_*`` set."""
    collector = _MQTT.get(registry)
    if collector is None:
        collector = _MQTT[registry] = MqttCollector()
        registry.register(collector)
    collector.sources.append(source)
