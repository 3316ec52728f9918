"""The simulated fleet's Prometheus metrics (README "Metrics"), read from the agent runtime
at scrape time: what the vehicles do (plugged, following, power, energy), the setpoints
they took or refused, and their MQTT connections, as fleet totals (never per vehicle)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.runtime import AgentRuntime
from broker.metrics import Connections, add_connections


def register_agents(runtime: AgentRuntime, registry: CollectorRegistry) -> None:
    """Register ``runtime``'s metrics on ``registry`` (its connections among the process's)."""
    collector = AgentsCollector(runtime)
    registry.register(collector)
    add_connections(registry, collector.connections)


class AgentsCollector(Collector):
    """An :class:`AgentRuntime`'s fleet as metrics, read at each scrape."""

    def __init__(self, runtime: AgentRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        f = rt.fleet
        summary = rt.summary()
        for name, key, doc in (
            ("v2g_agents_vehicles", "vehicles", "vehicles this process simulates"),
            ("v2g_agents_vehicles_plugged", "plugged", "simulated vehicles plugged in"),
            (
                "v2g_agents_vehicles_following",
                "following",
                "simulated vehicles following a setpoint in force",
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=summary[key])
        yield GaugeMetricFamily(
            "v2g_agents_power_kw", "simulated fleet's net power (+ charging)", float(f.power.sum())
        )
        yield GaugeMetricFamily(
            "v2g_agents_energy_kwh", "energy in the simulated batteries", float(f.energy.sum())
        )
        for name, value, doc in (
            ("v2g_agents_departures", summary["departed"], "simulated drivers who unplugged"),
            (
                "v2g_agents_left_early",
                summary["left_early"],
                "drivers who left before their announced time",
            ),
            (
                "v2g_agents_drivers_short",
                summary["drivers_short"],
                "drivers who left short of what plain charging would have given",
            ),
            (
                "v2g_agents_setpoints_received",
                rt.setpoints_received,
                "setpoints for this process's vehicles",
            ),
            ("v2g_agents_setpoints_applied", rt.setpoints_applied, "setpoints applied"),
            ("v2g_agents_ticks", rt.ticks, "simulation steps of the fleet"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        refused = CounterMetricFamily(
            "v2g_agents_setpoints_refused", "setpoints refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(dict(rt.rejected).items()):
            refused.add_metric([reason], n)
        yield refused

    def connections(self) -> list[Connections]:
        """The fleet's MQTT links: one per vehicle, or the multiplexed few."""
        rt = self.runtime
        kind = "vehicles" if rt.mode == "per-vehicle" else "multiplexed"
        up = sum(1 for link in rt.links if link.connected)
        return [Connections(kind, [link.stats for link in rt.links], up)]
