"""Home Assistant discovery: the configs follow HA's schema, their templates read real
platform payloads, and the bridge releases a hold at the car's departure."""

from __future__ import annotations

import json
from datetime import datetime

import jinja2.sandbox
import orjson
import pytest

from agents.telemetry import telemetry_payloads
from broker.models import ActiveDispatch, Capability, CapabilityWindow, FleetStatus, from_epoch
from broker.topics import Topics
from tests.support.ha_schema import DISCOVERY_TOPIC, validate
from tests.support.memory_loop import T0, fleet_and_state
from v2g.homeassistant import (
    Bridge,
    Discovery,
    Holds,
    HomeAssistantError,
    check_discovery_prefix,
    parse_vehicles,
)

D = Discovery(Topics("ha-unit"), "hass", sw_version="0.0.0")
# Home Assistant renders templates in a sandbox; the filters we use are Jinja2's own.
JINJA = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)


def _render(template: str, payload: bytes) -> str:
    return JINJA.from_string(template).render(value_json=json.loads(payload)).strip()


def _all_configs() -> list[tuple[str, dict[str, object]]]:
    return [*D.fleet_configs(), *D.vehicle_configs("car-1"), *D.vehicle_configs("van:2.b")]


def test_every_config_follows_home_assistants_discovery_schema() -> None:
    configs = _all_configs()
    for topic, payload in configs:
        validate(topic, orjson.loads(orjson.dumps(payload)))
        m = DISCOVERY_TOPIC.match(topic)
        assert m is not None and m["prefix"] == "hass" and m["node"] == "v2g_ha-unit"
    uids = [p["unique_id"] for _, p in configs]
    assert len(set(uids)) == len(uids), "unique ids collide"
    assert len({t for t, _ in configs}) == len(configs)
    components = sorted({DISCOVERY_TOPIC.match(t)["component"] for t, _ in configs})  # type: ignore[index]
    assert components == ["binary_sensor", "sensor", "switch"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"unit_of_measurement": "%"}, "unit"),
        ({"state_class": "total_increasing"}, "state"),
        ({"device_clas": "power"}, "extra"),
        ({"state_topic": "a/+/b"}, "pattern"),
    ],
)
def test_the_schema_refuses_what_home_assistant_would_refuse(
    change: dict[str, str], why: str
) -> None:
    topic, cfg = next((t, c) for t, c in D.fleet_configs() if c.get("device_class") == "power")
    with pytest.raises(ValueError, match=why):
        validate(topic, cfg | change)


def test_the_fleet_templates_read_the_fleets_retained_payloads() -> None:
    status = (
        FleetStatus(
            ts=from_epoch(T0),
            vehicles_online=12,
            vehicles_plugged_in=9,
            energy_kwh=321.5,
            power_kw=-42.25,
            available_charge_kw=70.0,
            available_discharge_kw=55.0,
            dispatches=[
                ActiveDispatch(
                    request_id="r1",
                    service="energy",
                    requested_kw=-40.0,
                    allocated_kw=-40.0,
                    delivered_kw=-39.5,
                    delivered_kwh=3.0,
                ),
                ActiveDispatch(
                    request_id="r2",
                    service="energy",
                    requested_kw=-5.0,
                    allocated_kw=-5.0,
                    delivered_kw=-4.0,
                    delivered_kwh=1.0,
                ),
            ],
        )
        .model_dump_json()
        .encode()
    )
    cap = (
        Capability(
            ts=from_epoch(T0),
            windows=[CapabilityWindow(duration_s=900, min_power_kw=-80, max_power_kw=95)],
        )
        .model_dump_json()
        .encode()
    )
    t = D.topics
    got = {
        cfg["unique_id"]: _render(
            str(cfg["value_template"]), status if cfg["state_topic"] == t.fleet_status else cap
        )
        for _, cfg in D.fleet_configs()
    }
    node = D.node
    assert float(got[f"{node}_fleet_power"]) == -42.25
    assert float(got[f"{node}_fleet_energy"]) == 321.5
    assert got[f"{node}_fleet_online"] == "12" and got[f"{node}_fleet_plugged"] == "9"
    assert got[f"{node}_fleet_requests"] == "2"
    requests_cfg = next(c for _, c in D.fleet_configs() if c["unique_id"].endswith("_requests"))
    assert requests_cfg["json_attributes_topic"] == t.fleet_status
    attrs = json.loads(_render(str(requests_cfg["json_attributes_template"]), status))
    assert [d["request_id"] for d in attrs["dispatches"]] == ["r1", "r2"]
    assert float(got[f"{node}_fleet_requested"]) == -45.0
    assert float(got[f"{node}_fleet_delivered"]) == -43.5
    assert float(got[f"{node}_fleet_capability_min"]) == -80.0
    assert float(got[f"{node}_fleet_capability_max"]) == 95.0


def test_the_vehicle_templates_read_a_cars_telemetry() -> None:
    fleet, _ = fleet_and_state(5)
    payload = telemetry_payloads(fleet, T0)[0]
    report = json.loads(payload)
    vid = report["vehicle_id"]
    got = {
        cfg["unique_id"]: _render(str(cfg["value_template"]), payload)
        for _, cfg in D.vehicle_configs(vid)
        if "value_template" in cfg
    }
    base = f"{D.node}_{vid}"
    assert float(got[f"{base}_soc"]) == pytest.approx(report["soc"] * 100, abs=0.05)
    assert float(got[f"{base}_min_soc"]) == pytest.approx(report["min_soc"] * 100, abs=0.05)
    assert float(got[f"{base}_power"]) == report["power_kw"]
    assert got[f"{base}_plugged"] == ("ON" if report["plugged_in"] else "OFF")
    departure = got[f"{base}_departure"]
    if report.get("departure"):
        # HA's timestamp sensor needs an ISO 8601 time with its zone.
        assert datetime.fromisoformat(departure).tzinfo is not None
    else:
        assert departure == "None"
    avail = D.vehicle_configs(vid)[0][1]["availability"][1]  # type: ignore[index]
    assert _render(avail["value_template"], b'{"online": true}') == "online"
    assert _render(avail["value_template"], b'{"online": false}') == "offline"


def test_a_hold_is_released_once_reports_reach_the_departure_it_was_set_for() -> None:
    holds = Holds()
    assert not holds.on_telemetry("a", 100.0, 500.0)
    holds.on_hold("a", True)
    assert not holds.on_telemetry("a", 400.0, 900.0), "a later departure does not move it"
    assert holds.on_telemetry("a", 500.0, 900.0)
    assert not holds.on_telemetry("a", 600.0, 900.0), "released once"
    holds.on_hold("b", True)  # no departure known yet: the first one reported is its end
    assert not holds.on_telemetry("b", 100.0, 300.0)
    assert holds.on_telemetry("b", 300.0, 300.0)
    holds.on_hold("c", True)
    holds.on_hold("c", False)
    assert not holds.on_telemetry("c", 10**10, 1.0)


def _telemetry(vid: str, ts: float, departure: float | None) -> bytes:
    fleet, _ = fleet_and_state(1)
    report = json.loads(telemetry_payloads(fleet, T0)[0])
    report |= {
        "vehicle_id": vid,
        "ts": from_epoch(ts).isoformat(),
        "departure": from_epoch(departure).isoformat() if departure else None,
    }
    return json.dumps(report).encode()


def test_the_bridge_announces_each_car_once_and_releases_its_hold_at_departure() -> None:
    bridge = Bridge(D, vehicles=[])
    t = D.topics
    first = bridge.on_message(t.telemetry("car-9"), _telemetry("car-9", T0, T0 + 3600))
    assert {m.topic for m in first} == {topic for topic, _ in D.vehicle_configs("car-9")}
    assert all(m.retain for m in first)
    assert bridge.on_message(t.telemetry("car-9"), _telemetry("car-9", T0 + 5, T0 + 3600)) == []
    bridge.on_message(t.no_v2g("car-9"), b"ON")
    assert bridge.on_message(t.telemetry("car-9"), _telemetry("car-9", T0 + 60, T0 + 3600)) == []
    out = bridge.on_message(t.telemetry("car-9"), _telemetry("car-9", T0 + 3600, None))
    assert [(m.topic, m.payload, m.retain) for m in out] == [(t.no_v2g("car-9"), b"OFF", True)]
    assert bridge.on_message(t.telemetry("car-9"), b"{not json") == []
    assert bridge.unreadable == 1
    # Home Assistant restarted: everything is announced again, the car included.
    again = bridge.on_message(D.ha_status_topic, b"online")
    assert again[0].topic == D.availability_topic and again[0].payload == b"online"
    assert {m.topic for m in again[1:]} >= {topic for topic, _ in D.vehicle_configs("car-9")}
    assert bridge.on_message(D.ha_status_topic, b"offline") == []


def test_the_bridge_subscribes_only_to_what_it_was_asked_to_show() -> None:
    t = D.topics
    assert [s for s, _ in Bridge(D, None).subscriptions()] == [D.ha_status_topic]
    assert (t.all_telemetry, 0) in Bridge(D, []).subscriptions()
    subs = [s for s, _ in Bridge(D, ["a", "b"]).subscriptions()]
    assert t.telemetry("b") in subs and t.no_v2g("a") in subs and t.all_telemetry not in subs


def test_vehicle_lists_and_discovery_prefixes_are_checked() -> None:
    assert parse_vehicles(None) is None
    assert parse_vehicles("all") == []
    assert parse_vehicles("a, b") == ["a", "b"]
    with pytest.raises(HomeAssistantError, match="not valid"):
        parse_vehicles("a/b")
    assert check_discovery_prefix("homeassistant/") == "homeassistant"
    with pytest.raises(HomeAssistantError, match="discovery prefix"):
        check_discovery_prefix("ha/#")
