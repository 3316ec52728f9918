"""The OCPP gateway's Prometheus metrics (``v2g ocpp --metrics``), read from the gateway
at scrape time: stations and sessions held, profiles sent and refused, CALLERRORs by
code, and setpoint received -> SetChargingProfile answered as a histogram. Totals only:
never a station or vehicle id as a label (their number is unbounded)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.metrics import Connections, add_connections
from chargers.gateway import Gateway

# The gateway's counters reported as v2g_ocpp_{name}_total: (counter key, help).
COUNTERS = (
    ("profile_accepted", "profiles_accepted", "SetChargingProfile answered Accepted"),
    ("profile_rejected", "profiles_rejected", "SetChargingProfile not accepted (counted, logged)"),
    (
        "profile_withheld",
        "profiles_withheld",
        "profiles with a negative value for a charge-only session, never sent",
    ),
    ("profiles_local_frequency", "profiles_local_frequency", "LocalFrequency (FCR) profiles sent"),
    ("fcr_held_locally", "fcr_held_locally", "FCR setpoints the station's curve already answered"),
    ("bpt_accepted", "bpt_accepted", "NotifyAllowedEnergyTransfer answered Accepted"),
    ("bpt_rejected", "bpt_rejected", "NotifyAllowedEnergyTransfer not accepted"),
    ("setpoints", "setpoints_received", "setpoints received for this gateway's vehicles"),
    ("setpoints_refused", "setpoint_batches_refused", "SetpointBatch messages refused"),
    ("setpoints_unknown_vehicle", "setpoints_unknown_vehicle", "setpoints for no session here"),
    ("stations_taken_over", "stations_taken_over", "stations claimed by another gateway"),
)


def register_gateway(gateway: Gateway, registry: CollectorRegistry) -> None:
    """Register ``gateway``'s metrics on ``registry`` (its MQTT link among the process's)."""
    collector = GatewayCollector(gateway)
    registry.register(collector)
    add_connections(registry, collector.connections)


class GatewayCollector(Collector):
    """A :class:`Gateway` as metrics, read at each scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        sessions = list(gw.sessions.values())
        yield GaugeMetricFamily(
            "v2g_ocpp_stations_connected", "stations connected now", value=len(gw.stations)
        )
        yield GaugeMetricFamily(
            "v2g_ocpp_sessions", "EV sessions (vehicles of the fleet) held", value=len(sessions)
        )
        yield GaugeMetricFamily(
            "v2g_ocpp_sessions_bpt",
            "sessions that may discharge (OCPP 2.1, BPT allowed)",
            value=sum(s.can_discharge for s in sessions),
        )
        for key, name, doc in COUNTERS:
            yield CounterMetricFamily(f"v2g_ocpp_{name}", doc, value=gw.counts[key])
        refused = CounterMetricFamily(
            "v2g_ocpp_connections_refused",
            "websocket connections refused before OCPP, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(gw.csms.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        errors = CounterMetricFamily(
            "v2g_ocpp_call_errors_sent",
            "CALLERRORs sent to stations, by OCPP-J error code",
            labels=["code"],
        )
        for code, n in sorted(gw.csms.call_errors.items()):
            errors.add_metric([code], n)
        yield errors
        h = gw.latency
        yield HistogramMetricFamily(
            "v2g_ocpp_setpoint_to_profile_seconds",
            "setpoint received on MQTT -> SetChargingProfile answered by the station",
            buckets=h.cumulative(),
            sum_value=h.total,
        )

    def connections(self) -> list[Connections]:
        link = self.gateway.link
        return [Connections("main", [link.stats], int(link.connected))]
