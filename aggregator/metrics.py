"""The aggregator's Prometheus metrics (README "Metrics"), read from the service at scrape
time: a custom collector over its public state (the last step's report and output, its
counters, its connections), so a scrape costs the same whatever the fleet's size and the
control step pays nothing for it.

The two histograms and the drivers-short counter need each event, not the latest: they
are fed from the service's existing outlets (the step-report queue, the signal-latency
deque, the settlement's departures) by :func:`instrument`, without a hook in the
service. No metric carries a vehicle id as a label: a fleet is ten thousand series.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.dispatch import StepOutput
from aggregator.fleet_state import FleetView
from aggregator.service import AggregatorService, StepReport
from aggregator.settlement import Departure, Settlement, VehicleInterval
from aggregator.store import MemoryStore
from broker.metrics import Connections, add_connections

# Control steps run from ~1 ms (a small fleet) to seconds (100k vehicles on a slow box).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A signal's setpoints must be on the wire well inside the 2-4 s between samples.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


class StepSink(asyncio.Queue[StepReport]):
    """The service's step-report queue: each report observed into the step histogram and
    counters, with the step's output (the control loop queues a report right after its
    step), then dropped (kept only if ``keep``: someone reads the reports)."""

    def __init__(
        self, service: AggregatorService, metrics: AggregatorMetrics, *, keep: bool = False
    ) -> None:
        super().__init__()
        self.service = service
        self.metrics = metrics
        self.keep = keep

    def put_nowait(self, item: StepReport) -> None:
        self.metrics.observe_step(item, self.service.last_output)
        if self.keep:
            super().put_nowait(item)


class LatencyLog(deque[float]):
    """The service's signal-latency record (ms), each entry observed in seconds too."""

    def __init__(self, histogram: Histogram, maxlen: int | None) -> None:
        super().__init__(maxlen=maxlen)
        self.histogram = histogram

    def append(self, ms: float, /) -> None:
        self.histogram.observe(ms / 1e3)
        super().append(ms)


class CountingSettlement(Settlement):
    """The service's settlement, counting the drivers who left short of their target."""

    def __init__(self, short: Counter, short_kwh: Counter) -> None:
        super().__init__()
        self.short = short
        self.short_kwh = short_kwh

    def observe(
        self,
        now: float,
        view: FleetView,
        meter: NDArray[np.float64],
        plugged: NDArray[np.bool_],
        ids: list[str],
        step_s: float,
    ) -> tuple[list[VehicleInterval], list[Departure]]:
        closed, departures = super().observe(now, view, meter, plugged, ids, step_s)
        for d in departures:
            if d.short:
                self.short.inc()
                self.short_kwh.inc(d.short_kwh)
        return closed, departures


class AggregatorMetrics:
    """The event-fed metrics of one aggregator (histograms and counters), registered on
    ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.step_seconds = Histogram(
            "v2g_control_step_duration_seconds",
            "wall time of one control step, fold to publish",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.latency_seconds = Histogram(
            "v2g_setpoint_latency_seconds",
            "wall time from a signal sample's arrival to its setpoints on the wire",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.setpoints = Counter(
            "v2g_setpoints_sent", "setpoints the broker acknowledged", registry=registry
        )
        self.results = Counter(
            "v2g_dispatch_results",
            "answers and results published about requests",
            ["status"],
            registry=registry,
        )
        self.drivers_short = Counter(
            "v2g_drivers_short",
            "drivers who unplugged short of their target, at or after their announced time",
            registry=registry,
        )
        self.short_kwh = Counter(
            "v2g_drivers_short_kwh",
            "energy the short drivers lacked of their target",
            registry=registry,
        )
        self.store_outages = Counter(
            "v2g_redis_outages",
            "times the state store became unreachable (the service ran from memory)",
            registry=registry,
        )
        self._degraded = False
        # The last step's report and output, replaced together (one assignment) so that a
        # scrape on the HTTP thread never mixes two steps.
        self.stepped: tuple[StepReport, StepOutput | None] | None = None

    def observe_step(self, report: StepReport, output: StepOutput | None) -> None:
        """One control step's report and output: its duration, setpoints, answers, store
        state; the step a scrape shows."""
        self.stepped = (report, output)
        self.step_seconds.observe(report.step_ms / 1e3)
        self.setpoints.inc(report.setpoints_sent)
        for r in report.results:
            self.results.labels(r.status).inc()
        degraded = report.status.degraded
        if degraded and not self._degraded:
            self.store_outages.inc()
        self._degraded = degraded


def instrument(service: AggregatorService, registry: CollectorRegistry) -> AggregatorMetrics:
    """Register ``service``'s metrics on ``registry``: its collector, and the event-fed
    metrics on its outlets (call before ``service.run()``)."""
    metrics = AggregatorMetrics(registry)
    keep = service.reports is not None
    sink = StepSink(service, metrics, keep=keep)
    if keep:  # someone reads the reports already: hand them over in order
        assert service.reports is not None
        while not service.reports.empty():
            sink.put_nowait(service.reports.get_nowait())
    service.reports = sink
    log = LatencyLog(metrics.latency_seconds, service.signal_latency_ms.maxlen)
    log.extend(service.signal_latency_ms)
    service.signal_latency_ms = log
    service.control.settlement = CountingSettlement(metrics.drivers_short, metrics.short_kwh)
    collector = AggregatorCollector(service, metrics)
    registry.register(collector)
    add_connections(registry, collector.connections)
    return metrics


def _gauge(name: str, doc: str, value: float, labels: list[str] | None = None) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=labels)
    if labels is None:
        g.add_metric([], value)
    return g


class AggregatorCollector(Collector):
    """The service's state as Prometheus metrics, read at each scrape.

    A scrape runs on the HTTP server's thread while the event loop steps: it reads
    whole values the loop replaces (the last report and output) and copies the counters
    it iterates in one atomic ``dict()``, so it never sees a half-made step."""

    def __init__(self, service: AggregatorService, metrics: AggregatorMetrics) -> None:
        self.service = service
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._dispatches()
        yield from self._messages()
        yield from self._books()

    def _fleet(self) -> Iterator[Metric]:
        svc = self.service
        yield _gauge("v2g_fleet_vehicles", "vehicles the aggregator knows", len(svc.state))
        stepped = self.metrics.stepped
        if stepped is None:  # before the first step: no fleet figures yet
            return
        report = stepped[0]
        st = report.status
        yield _gauge("v2g_fleet_vehicles_online", "vehicles online", st.vehicles_online)
        yield _gauge("v2g_fleet_vehicles_plugged", "vehicles plugged in", st.vehicles_plugged_in)
        yield _gauge("v2g_fleet_power_kw", "fleet net power (+ charging)", st.power_kw)
        yield _gauge("v2g_fleet_energy_kwh", "energy in the fleet's batteries", st.energy_kwh)
        yield _gauge(
            "v2g_fleet_available_charge_kw", "most the fleet can charge now", st.available_charge_kw
        )
        yield _gauge(
            "v2g_fleet_available_discharge_kw",
            "most the fleet can discharge now",
            st.available_discharge_kw,
        )
        yield _gauge(
            "v2g_fleet_requested_kw",
            "sum of the running requests' requested power",
            sum(d.requested_kw for d in st.dispatches),
        )
        yield _gauge("v2g_dispatches_active", "requests running now", len(st.dispatches))
        lo = GaugeMetricFamily(
            "v2g_fleet_capability_min_kw",
            "least net power the fleet can hold for the whole window (- discharging)",
            labels=["window_s"],
        )
        hi = GaugeMetricFamily(
            "v2g_fleet_capability_max_kw",
            "most net power the fleet can hold for the whole window",
            labels=["window_s"],
        )
        ok = GaugeMetricFamily(
            "v2g_fleet_capability_feasible",
            "1 if a constant power can be held for the whole window",
            labels=["window_s"],
        )
        for w in report.capability.windows:
            key = [f"{w.duration_s:g}"]
            lo.add_metric(key, w.min_power_kw)
            hi.add_metric(key, w.max_power_kw)
            ok.add_metric(key, 1.0 if w.feasible else 0.0)
        yield from (lo, hi, ok)

    def _dispatches(self) -> Iterator[Metric]:
        stepped = self.metrics.stepped
        if stepped is None:
            return
        report, out = stepped
        if out is None:
            return
        service_of = {d.request_id: d.service for d in report.status.dispatches}
        labels = ["request_id", "service"]
        fams = {
            name: GaugeMetricFamily(f"v2g_dispatch_{name}", doc, labels=labels)
            for name, doc in (
                ("requested_kw", "power the request asks for now"),
                ("allocated_kw", "power the fleet was given for it"),
                ("delivered_kw", "power the fleet delivers for it (measured, less baseline)"),
                ("requested_kwh", "energy requested over its delivery window so far"),
                ("delivered_kwh", "energy delivered over its delivery window so far"),
                ("vehicles", "vehicles taking part"),
                ("score_ratio", "a signal service's performance score so far (0..1)"),
            )
        }
        for p in out.progress:
            key = [p.request_id, service_of.get(p.request_id, "")]
            fams["requested_kw"].add_metric(key, p.requested_kw)
            fams["allocated_kw"].add_metric(key, p.allocated_kw)
            fams["delivered_kw"].add_metric(key, p.delivered_kw)
            fams["requested_kwh"].add_metric(key, p.requested_kwh)
            fams["delivered_kwh"].add_metric(key, p.delivered_kwh)
            fams["vehicles"].add_metric(key, p.vehicles)
            if p.score is not None:
                fams["score_ratio"].add_metric(key, p.score)
        yield from fams.values()

    def _messages(self) -> Iterator[Metric]:
        svc = self.service
        yield CounterMetricFamily(
            "v2g_messages_received", "MQTT messages the aggregator received", value=svc.received
        )
        yield CounterMetricFamily(
            "v2g_messages_accepted", "messages validated and queued", value=svc.accepted
        )
        yield CounterMetricFamily(
            "v2g_messages_ignored",
            "messages not for the aggregator (echoes, cleared retained statuses)",
            value=svc.ignored,
        )
        refused = CounterMetricFamily(
            "v2g_messages_refused", "messages refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(dict(svc.rejected).items()):
            refused.add_metric([reason], n)
        yield refused
        rows = CounterMetricFamily(
            "v2g_telemetry_rows_refused",
            "rows dropped from accepted bridge batches, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(dict(svc.rejected_rows).items()):
            rows.add_metric([reason], n)
        yield rows
        yield CounterMetricFamily(
            "v2g_refusals_unanswered",
            "refused operator messages only counted (over the answer budget)",
            value=svc.refusals_unanswered,
        )
        yield CounterMetricFamily(
            "v2g_batched_updates",
            "vehicle reports that came in bridges' batches",
            value=svc.batched_updates,
        )

    def connections(self) -> list[Connections]:
        """The service's MQTT connections: main, and the lean ingest and setpoint ones."""
        svc = self.service
        groups = [Connections("main", [svc.link.stats], int(svc.link.connected))]
        if svc.ingest is not None:
            groups.append(Connections("ingest", [svc.ingest.stats], int(svc.ingest.connected)))
        if svc.setpoints is not None:
            groups.append(
                Connections("setpoints", [svc.setpoints.stats], int(svc.setpoints.connected))
            )
        return groups

    def _books(self) -> Iterator[Metric]:
        svc = self.service
        if not isinstance(svc.store, MemoryStore):
            yield _gauge(
                "v2g_redis_up",
                "1 while the state store takes the snapshots (0: running from memory)",
                0.0 if svc.degraded else 1.0,
            )
        yield CounterMetricFamily(
            "v2g_snapshot_saves_skipped",
            "snapshots skipped because the last one was still being written",
            value=svc.saves_skipped,
        )
        if svc.ledger is not None:
            yield _gauge(
                "v2g_ledger_entries_owed",
                "settlement entries waiting to be written to the ledger",
                len(svc.ledger.owed),
            )
            yield CounterMetricFamily(
                "v2g_ledger_entries_written",
                "settlement entries written to the ledger",
                value=svc.ledger.written,
            )
            yield CounterMetricFamily(
                "v2g_ledger_write_failures",
                "ledger writes that failed (kept and retried)",
                value=svc.ledger.failed_writes,
            )
        scale = svc.scale
        if scale is not None:
            yield _gauge(
                "v2g_lease_term",
                "fencing token of the leader lease this process holds (0: not leading)",
                (scale.lease.token or 0) if scale.leading else 0,
            )
            yield _gauge("v2g_lease_leader", "1 while this process leads", float(scale.leading))
            yield CounterMetricFamily(
                "v2g_lease_promotions", "times this process became leader", scale.stats.promotions
            )
            yield CounterMetricFamily(
                "v2g_scaleout_forward_failures",
                "forwards of received rows to the leader that failed",
                value=scale.stats.forward_failures,
            )
