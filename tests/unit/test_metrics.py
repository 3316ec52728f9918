"""The Prometheus metrics (README "Metrics") follow the conventions and show the service's
state: read from an aggregator stepped in memory (no broker: what it would publish is
owed) and from a simulated fleet, without I/O. Over real Mosquitto and HTTP:
tests/integration/test_metrics.py."""

from __future__ import annotations

import json
import socket

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from agents.fleet import SimFleet
from agents.metrics import register_agents
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from agents.telemetry import telemetry_payloads
from aggregator.ledger import MemoryLedger
from aggregator.metrics import instrument
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.metrics import new_registry
from broker.settings import Settings
from core.clock import ManualClock
from core.settings import listen_address
from tests.support.memory_loop import STEP as MSTEP
from tests.support.memory_loop import T0 as MT0
from tests.support.memory_loop import fleet_and_state
from tests.support.metrics import (
    Samples,
    dashboard_queries,
    metric_names,
    scrape_registry,
    value,
)
from v2g.cli import app

T0 = 1_795_651_200.0 + 21 * 3600  # 21:00 UTC: most home cars are plugged in
P = "met"
STEP = 5.0
FORBIDDEN_LABELS = {"vehicle", "vehicle_id", "client_id", "bridge", "bridge_id"}


# -- the flag ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        (" localhost:0 ", ("localhost", 0)),
    ],
)
def test_a_listen_address_is_host_port_or_a_port_on_loopback(
    text: str, expected: tuple[str, int]
) -> None:
    assert listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "host:", ":9464", "127.0.0.1:70000", "1:-1"])
def test_a_bad_listen_address_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT or PORT"):
        listen_address(text)


def test_metrics_are_off_by_default_and_a_bare_port_listens_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("V2G_METRICS", raising=False)
    assert Settings().metrics is None
    assert Settings(metrics="9464").metrics == "127.0.0.1:9464"
    monkeypatch.setenv("V2G_METRICS", "0.0.0.0:9000")
    assert Settings().metrics == "0.0.0.0:9000"


# -- a stepped aggregator and a fleet, in memory ----------------------------------------
def request(rid: str, power_kw: float) -> bytes:
    return json.dumps({"request_id": rid, "power_kw": power_kw, "duration_s": 900.0}).encode()


async def stepped(steps: int = 3) -> tuple[AggregatorService, AgentRuntime, CollectorRegistry]:
    """An aggregator fed a 40-car fleet's telemetry for ``steps`` steps, a request running
    from the second; its metrics and the fleet's on one registry."""
    settings = Settings(topic_prefix=P, log_level="warning", control_step_s=STEP)
    clock = ManualClock(T0)
    svc = AggregatorService(
        settings=settings, clock=clock, store=MemoryStore(), ledger=MemoryLedger()
    )
    fleet = SimFleet(generate_fleet(40, 3), T0, step_s=STEP)
    runtime = AgentRuntime(settings=settings, clock=clock, fleet=fleet, mode="multiplexed")
    registry = new_registry()
    instrument(svc, registry)
    register_agents(runtime, registry)
    for k in range(steps):
        for vid, body in zip(fleet.ids, telemetry_payloads(fleet, clock.now()), strict=True):
            svc.on_payload(svc.topics.telemetry(vid), body)
        if k == 1:
            svc.on_payload(svc.topics.dispatch_requests, request("m-1", -50.0))
        report = await svc.step()
        assert svc.reports is not None
        svc.reports.put_nowait(report)  # what the control loop does with each report
        clock.advance(STEP)
        fleet.tick(clock.now())
    return svc, runtime, registry


async def test_every_name_carries_its_unit_and_every_counter_ends_in_total() -> None:
    _, _, registry = await stepped()
    checked = 0
    for fam in registry.collect():
        if not fam.name.startswith("v2g_"):
            continue  # process_*, python_*: prometheus_client's own
        checked += 1
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), f"{fam.name}: a duration in seconds"
        words = fam.name.split("_")
        if "power" in words or fam.name.endswith("_kw"):
            assert fam.name.endswith("_kw"), f"{fam.name}: power is in kW"
        if "energy" in words or "kwh" in words:
            assert fam.name.endswith(("_kwh", "_kwh_total")), f"{fam.name}: energy is in kWh"
        for s in fam.samples:
            assert not FORBIDDEN_LABELS & s.labels.keys(), f"{s.name} labelled {s.labels}"
    assert checked >= 30


async def test_the_fleet_the_request_and_the_steps_show() -> None:
    svc, runtime, registry = await stepped()
    m: Samples = scrape_registry(registry)
    assert value(m, "v2g_fleet_vehicles") == 40
    assert value(m, "v2g_fleet_vehicles_online") == 40
    plugged = value(m, "v2g_fleet_vehicles_plugged")
    assert plugged is not None and 0 < plugged <= 40
    assert value(m, "v2g_agents_vehicles_plugged") == int(runtime.fleet.plugged.sum())
    assert value(m, "v2g_control_step_duration_seconds_count") == 3
    assert value(m, "v2g_messages_received_total") == svc.received == 3 * 40 + 1
    assert value(m, "v2g_dispatch_requested_kw", request_id="m-1") == -50.0
    allocated = value(m, "v2g_dispatch_allocated_kw", request_id="m-1")
    assert allocated is not None and allocated < 0
    assert value(m, "v2g_fleet_requested_kw") == -50.0
    assert value(m, "v2g_dispatches_active") == 1
    assert value(m, "v2g_fleet_capability_min_kw", window_s="900") is not None
    assert value(m, "v2g_ledger_entries_owed") is not None
    assert value(m, "v2g_mqtt_connections_up", connection="main") == 0  # never connected


async def test_a_refused_message_is_counted_under_its_reason() -> None:
    svc, _, registry = await stepped(steps=1)
    svc.on_payload(svc.topics.telemetry("ev-x"), b"{not json")
    svc.on_payload(svc.topics.telemetry("ev-y"), b"{not json either")
    svc.on_payload(f"{P}/nowhere/at/all", b"{}")
    m = scrape_registry(registry)
    assert value(m, "v2g_messages_refused_total", reason="json") == 2
    assert value(m, "v2g_messages_refused_total", reason="topic") == 1


async def test_the_setpoint_latency_histogram_counts_each_signal_followed() -> None:
    svc, _, registry = await stepped(steps=1)
    svc.signal_latency_ms.append(3.0)
    svc.signal_latency_ms.append(40.0)
    m = scrape_registry(registry)
    assert value(m, "v2g_setpoint_latency_seconds_count") == 2
    assert value(m, "v2g_setpoint_latency_seconds_bucket", le="0.005") == 1
    assert list(svc.signal_latency_ms) == [3.0, 40.0]  # the service's own record is kept


def test_every_dashboard_query_names_a_platform_metric() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    for where, expr in queries:
        assert metric_names(expr), f"{where}: {expr!r} names no v2g_ metric"


# -- the flag on the command line -------------------------------------------------------
runner = CliRunner()


def test_a_bad_metrics_address_is_a_usage_error_naming_the_flag() -> None:
    result = runner.invoke(
        app, ["agents", "--metrics", "nowhere", "--broker", "mqtt://127.0.0.1:9"]
    )
    assert result.exit_code == 2, result.output
    assert "--metrics" in result.output and "HOST:PORT or PORT" in result.output


def test_a_metrics_port_in_use_fails_the_command_before_it_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The broker would listen on a free port: it must not start at all.
        result = runner.invoke(app, ["broker", "--port", "9", "--metrics", str(port)])
    assert result.exit_code == 2, result.output
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["ocpp", "--listen", "127.0.0.1:9", "--broker", "mqtt://127.0.0.1:9"],
        ["web", "--listen", "127.0.0.1:9", "--broker", "mqtt://127.0.0.1:9"],
    ],
)
def test_the_gateway_and_the_web_view_take_metrics_and_fail_on_a_busy_port(
    command: list[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, [*command, "--metrics", str(port)])
    assert result.exit_code == 2, result.output
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in result.output


def test_a_driver_who_leaves_short_is_counted_with_the_energy_they_lacked() -> None:
    """As tests/unit/test_settlement.py drives the settlement: one driver leaves on time
    under target (counted), one leaves early (not the platform's doing: not counted)."""
    svc = AggregatorService(
        settings=Settings(topic_prefix=P, log_level="warning"),
        clock=ManualClock(MT0),
        store=MemoryStore(),
    )
    registry = new_registry()
    instrument(svc, registry)
    _, state = fleet_and_state(n=10)
    t = MT0
    on_time, early = (int(r) for r in state.view(t, 3 * MSTEP).rows[:2])
    state.cols["departure"][on_time] = t + MSTEP
    state.cols["departure"][early] = t + 3600.0
    settle = svc.control.settlement  # what the service books with, step after step
    settle.observe(t, state.view(t, 3 * MSTEP), state.col("meter_kwh"), state.col("plugged"),
                   state.ids, MSTEP)  # fmt: skip
    t += MSTEP
    state.cols["plugged"][[on_time, early]] = False
    _, gone = settle.observe(t, state.view(t, 3 * MSTEP), state.col("meter_kwh"),
                             state.col("plugged"), state.ids, MSTEP)  # fmt: skip
    short = [d for d in gone if d.short]
    assert len(gone) == 2 and len(short) == 1
    m = scrape_registry(registry)
    assert value(m, "v2g_drivers_short_total") == 1
    assert value(m, "v2g_drivers_short_kwh_total") == pytest.approx(short[0].short_kwh)


def test_the_metric_names_of_a_query_leave_out_functions_labels_and_strings() -> None:
    expr = (
        'sum by (reason) (rate(v2g_messages_refused_total{reason="v2g_not_a_metric"}[5m]))'
        " / on() group_left v2g_fleet_vehicles"
    )
    assert metric_names(expr) == {"v2g_messages_refused_total", "v2g_fleet_vehicles"}


def test_the_ocpp_gateways_metrics_follow_the_conventions_and_its_histogram_is_cumulative() -> None:
    """`v2g ocpp --metrics`: names with units, counters in _total, no station or vehicle
    labels; the setpoint latency as a cumulative histogram."""
    from typing import Any

    from prometheus_client import CollectorRegistry

    from chargers.gateway import Gateway, Histogram
    from chargers.metrics import register_gateway

    class NoStations:
        async def verify(self, station_id: str, password: str) -> Any:
            raise AssertionError("not called")

    gw = Gateway(
        settings=Settings(topic_prefix="mt", log_level="warning"),
        clock=ManualClock(T0),
        stations=NoStations(),  # type: ignore[arg-type]
        bridge_id="gw-1",
    )
    for seconds in (0.004, 0.03, 0.03, 0.7, 20.0):
        gw.latency.observe(seconds)
    gw.counts["profile_rejected"] += 2
    gw.csms.call_errors["FormatViolation"] += 1
    registry = CollectorRegistry()
    register_gateway(gw, registry)
    m = scrape_registry(registry)
    assert value(m, "v2g_ocpp_profiles_rejected_total") == 2
    assert value(m, "v2g_ocpp_call_errors_sent_total", code="FormatViolation") == 1
    assert value(m, "v2g_ocpp_setpoint_to_profile_seconds_bucket", le="0.01") == 1
    assert value(m, "v2g_ocpp_setpoint_to_profile_seconds_bucket", le="0.05") == 3
    assert value(m, "v2g_ocpp_setpoint_to_profile_seconds_bucket", le="10.0") == 4
    assert value(m, "v2g_ocpp_setpoint_to_profile_seconds_bucket", le="+Inf") == 5
    assert value(m, "v2g_ocpp_setpoint_to_profile_seconds_count") == 5
    assert value(m, "v2g_ocpp_stations_connected") == 0
    for fam in registry.collect():
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
        for s in fam.samples:
            assert not (FORBIDDEN_LABELS | {"station", "station_id"}) & s.labels.keys()
    h = Histogram((1.0, 2.0))
    h.observe(1.0)  # on a bound: counted under it (le is <=)
    assert h.cumulative() == [("1.0", 1), ("2.0", 1), ("+Inf", 1)]
