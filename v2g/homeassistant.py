"""Home Assistant over MQTT discovery: ``v2g homeassistant``, a bridge that reads the broker
like any operator client and tells Home Assistant what the platform already publishes.

The sensors read the platform's own retained topics through value templates (no second
copy of any figure): the fleet from ``{prefix}/fleet/status`` and ``/fleet/capability``,
each vehicle from its telemetry and status. The bridge publishes only discovery configs
(retained, again whenever Home Assistant announces it is online), its availability, and
the release of an owner's "no V2G until departure" hold once the car's reports reach the
departure the hold was set for (the aggregator's own hold ends then by itself).

Discovery schema: https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery, with
the keys of https://www.home-assistant.io/integrations/sensor.mqtt/,
https://www.home-assistant.io/integrations/binary_sensor.mqtt/ and
https://www.home-assistant.io/integrations/switch.mqtt/.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import orjson
import structlog
from pydantic import ValidationError

from broker.clientid import main_client_id
from broker.link import MqttLink, Outgoing
from broker.models import Telemetry
from broker.settings import Settings
from broker.topics import Topics, check_id
from core.errors import InvalidMessage, V2GError
from v2g import logs

log = structlog.get_logger("v2g.homeassistant")

DEFAULT_DISCOVERY_PREFIX = "homeassistant"
ONLINE, OFFLINE = "online", "offline"


class HomeAssistantError(V2GError):
    """The bridge was given something it cannot use (a discovery prefix, a vehicle id)."""


def check_discovery_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a usable discovery prefix, else HomeAssistantError."""
    if not prefix or any(c in prefix for c in "+#\x00") or prefix.startswith(("/", "$")):
        raise HomeAssistantError(
            f"discovery prefix {prefix[:80]!r} is not a plain topic; Home Assistant's default"
            f" is {DEFAULT_DISCOVERY_PREFIX!r}"
        )
    return prefix.rstrip("/")


@dataclass(frozen=True, slots=True)
class Sensor:
    """One fleet or vehicle sensor: where its value is read and what it means to HA."""

    key: str
    name: str
    template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    icon: str | None = None
    attributes: str | None = None  # a template of the entity's attributes, from its topic


# The fleet, from {prefix}/fleet/status (FleetStatus) ...
FLEET_STATUS_SENSORS = (
    Sensor("power", "Power", "{{ value_json.power_kw }}", "kW", "power"),
    Sensor("energy", "Stored energy", "{{ value_json.energy_kwh }}", "kWh", "energy_storage"),
    Sensor("online", "Vehicles online", "{{ value_json.vehicles_online }}", icon="mdi:car"),
    Sensor(
        "plugged",
        "Vehicles plugged in",
        "{{ value_json.vehicles_plugged_in }}",
        icon="mdi:ev-plug-type2",
    ),
    Sensor(
        "available_charge",
        "Available charge",
        "{{ value_json.available_charge_kw }}",
        "kW",
        "power",
    ),
    Sensor(
        "available_discharge",
        "Available discharge",
        "{{ value_json.available_discharge_kw }}",
        "kW",
        "power",
    ),
    Sensor(
        "requests",
        "Active requests",
        "{{ value_json.dispatches | length }}",
        icon="mdi:transmission-tower",
        # Each active request (id, service, requested, allocated and delivered kW) as an
        # attribute: an automation can read which request runs.
        attributes="{{ {'dispatches': value_json.dispatches} | tojson }}",
    ),
    Sensor(
        "requested",
        "Requested power",
        "{{ value_json.dispatches | map(attribute='requested_kw') | sum }}",
        "kW",
        "power",
    ),
    Sensor(
        "delivered",
        "Delivered power",
        "{{ value_json.dispatches | map(attribute='delivered_kw') | sum }}",
        "kW",
        "power",
    ),
)
# ... and its capability envelope's first (15-minute) window from {prefix}/fleet/capability.
FLEET_CAPABILITY_SENSORS = (
    Sensor(
        "capability_min",
        "Capability 15 min, most export",
        "{{ value_json.windows[0].min_power_kw }}",
        "kW",
        "power",
    ),
    Sensor(
        "capability_max",
        "Capability 15 min, most import",
        "{{ value_json.windows[0].max_power_kw }}",
        "kW",
        "power",
    ),
)
# Each vehicle, from its telemetry (Telemetry: fractions shown as percent).
VEHICLE_SENSORS = (
    Sensor("soc", "State of charge", "{{ (value_json.soc * 100) | round(1) }}", "%", "battery"),
    Sensor("power", "Power", "{{ value_json.power_kw }}", "kW", "power"),
    Sensor(
        "departure",
        "Departure",
        "{{ value_json.departure if value_json.departure else 'None' }}",
        device_class="timestamp",
        state_class=None,
    ),
    Sensor(
        "min_soc",
        "Minimum state of charge",
        "{{ (value_json.min_soc * 100) | round(1) }}",
        "%",
        "battery",
    ),
)


@dataclass(frozen=True, slots=True)
class Discovery:
    """The discovery configs of one fleet (pure: topics and payloads, no I/O)."""

    topics: Topics
    prefix: str = DEFAULT_DISCOVERY_PREFIX
    sw_version: str = field(default_factory=lambda: version("v2g-fleet"))

    @property
    def node(self) -> str:
        """The node id grouping this fleet's entities: one per topic prefix."""
        return "v2g_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.topics.prefix)

    @property
    def availability_topic(self) -> str:
        """The bridge's own availability (retained; its will says offline)."""
        return f"{self.prefix}/{self.node}/availability"

    @property
    def ha_status_topic(self) -> str:
        """Home Assistant's birth and will: configs are published again on ``online``."""
        return f"{self.prefix}/status"

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.prefix}/{component}/{self.node}/{object_id}/config"

    def _fleet_device(self) -> dict[str, Any]:
        return {
            "identifiers": [f"{self.node}_fleet"],
            "name": f"V2G fleet {self.topics.prefix}",
            "manufacturer": "v2g",
            "model": "Fleet aggregator",
            "sw_version": self.sw_version,
        }

    def _sensor(
        self, s: Sensor, uid: str, state_topic: str, device: dict[str, Any]
    ) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "name": s.name,
            "unique_id": uid,
            "state_topic": state_topic,
            "value_template": s.template,
            "device": device,
        }
        for key, value in (
            ("unit_of_measurement", s.unit),
            ("device_class", s.device_class),
            ("state_class", s.state_class),
            ("icon", s.icon),
        ):
            if value is not None:
                cfg[key] = value
        if s.attributes is not None:
            cfg["json_attributes_topic"] = state_topic
            cfg["json_attributes_template"] = s.attributes
        return cfg

    def fleet_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """(config topic, payload) of every fleet sensor."""
        device = self._fleet_device()
        availability = {"availability_topic": self.availability_topic}
        out = []
        for sensors, topic in (
            (FLEET_STATUS_SENSORS, self.topics.fleet_status),
            (FLEET_CAPABILITY_SENSORS, self.topics.fleet_capability),
        ):
            for s in sensors:
                obj = f"fleet_{s.key}"
                cfg = self._sensor(s, f"{self.node}_{obj}", topic, device) | availability
                out.append((self.config_topic("sensor", obj), cfg))
        return out

    def vehicle_configs(self, vehicle_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(config topic, payload) of one vehicle's sensors, plugged-in binary sensor and
        its "no V2G until departure" switch; available while both the bridge and the
        vehicle are online."""
        t = self.topics
        device = {
            "identifiers": [f"{self.node}_vehicle_{vehicle_id}"],
            "name": f"Vehicle {vehicle_id}",
            "manufacturer": "v2g",
            "model": "Vehicle",
            "via_device": f"{self.node}_fleet",
        }
        availability = {
            "availability": [
                {"topic": self.availability_topic},
                {
                    "topic": t.vehicle_status(vehicle_id),
                    "value_template": "{{ 'online' if value_json.online else 'offline' }}",
                },
            ],
            "availability_mode": "all",
        }
        base = f"{self.node}_{vehicle_id}"
        obj = re.sub(r"[^A-Za-z0-9_-]", "_", vehicle_id)
        telemetry = t.telemetry(vehicle_id)
        out = []
        for s in VEHICLE_SENSORS:
            cfg = self._sensor(s, f"{base}_{s.key}", telemetry, device) | availability
            out.append((self.config_topic("sensor", f"{obj}_{s.key}"), cfg))
        plugged = {
            "name": "Plugged in",
            "unique_id": f"{base}_plugged",
            "state_topic": telemetry,
            "value_template": "{{ 'ON' if value_json.plugged_in else 'OFF' }}",
            "device_class": "plug",
            "device": device,
        } | availability
        out.append((self.config_topic("binary_sensor", f"{obj}_plugged"), plugged))
        switch = {
            "name": "No V2G until departure",
            "unique_id": f"{base}_no_v2g",
            # One retained topic is both the command and the state: the aggregator reads
            # it, Home Assistant shows it, and it survives a restart of either.
            "command_topic": t.no_v2g(vehicle_id),
            "state_topic": t.no_v2g(vehicle_id),
            "payload_on": "ON",
            "payload_off": "OFF",
            "retain": True,
            "optimistic": False,
            "device_class": "switch",
            "icon": "mdi:car-off",
            "device": device,
        } | availability
        out.append((self.config_topic("switch", f"{obj}_no_v2g"), switch))
        return out


def encode(configs: Iterable[tuple[str, dict[str, Any]]]) -> list[Outgoing]:
    """Discovery configs as retained messages."""
    return [Outgoing(topic, orjson.dumps(cfg), qos=1, retain=True) for topic, cfg in configs]


@dataclass
class Holds:
    """Which holds are on, and the departure each must be released at (pure)."""

    on: dict[str, float | None] = field(default_factory=dict)  # vehicle -> departure
    departure: dict[str, float] = field(default_factory=dict)  # latest reported

    def on_hold(self, vehicle_id: str, held: bool) -> None:
        if not held:
            self.on.pop(vehicle_id, None)
        elif vehicle_id not in self.on:
            self.on[vehicle_id] = self.departure.get(vehicle_id)

    def on_telemetry(self, vehicle_id: str, ts: float, departure: float | None) -> bool:
        """Fold a report; True when the vehicle's hold is due for release (its reports
        reached the departure known when the hold was set)."""
        if departure is not None:
            self.departure[vehicle_id] = departure
        if vehicle_id not in self.on:
            return False
        until = self.on[vehicle_id]
        if until is None:  # set before any departure was known: the first one is its end
            self.on[vehicle_id] = departure
            return False
        if ts >= until:
            del self.on[vehicle_id]
            return True
        return False


@dataclass
class Bridge:
    """What the bridge does with each message it reads (pure: messages in, messages out)."""

    discovery: Discovery
    vehicles: Sequence[str] | None  # None: none; empty: every vehicle seen
    announced: set[str] = field(default_factory=set)
    holds: Holds = field(default_factory=Holds)
    unreadable: int = 0

    def birth(self) -> list[Outgoing]:
        """Availability and every config known so far (on each connect, and whenever Home
        Assistant comes back online)."""
        avail = Outgoing(self.discovery.availability_topic, ONLINE.encode(), qos=1, retain=True)
        configs = list(self.discovery.fleet_configs())
        for vid in sorted(self.announced | set(self.vehicles or ())):
            configs.extend(self.discovery.vehicle_configs(vid))
        return [avail, *encode(configs)]

    def subscriptions(self) -> list[tuple[str, int]]:
        t = self.discovery.topics
        subs = [(self.discovery.ha_status_topic, 1)]
        if self.vehicles is None:
            return subs
        if self.vehicles:
            for vid in self.vehicles:
                subs += [(t.telemetry(vid), 0), (t.no_v2g(vid), 1)]
        else:
            subs += [(t.all_telemetry, 0), (t.all_no_v2g, 1)]
        return subs

    def on_message(self, topic: str, payload: bytes) -> list[Outgoing]:
        """The messages to publish in answer to one message read."""
        d = self.discovery
        if topic == d.ha_status_topic:
            return self.birth() if payload == ONLINE.encode() else []
        try:
            kind, vid = d.topics.parse(topic)
            if kind == "no_v2g":
                self.holds.on_hold(vid, payload == b"ON")
                return []
            if kind != "telemetry":
                return []
            report = Telemetry.model_validate_json(payload)
        except (ValidationError, InvalidMessage) as err:
            self.unreadable += 1
            log.warning("homeassistant_message_dropped", topic=topic[:120], error=str(err)[:200])
            return []
        out: list[Outgoing] = []
        if vid not in self.announced:
            self.announced.add(vid)
            out.extend(encode(d.vehicle_configs(vid)))
        departure = report.departure.timestamp() if report.departure else None
        if self.holds.on_telemetry(vid, report.ts.timestamp(), departure):
            out.append(Outgoing(d.topics.no_v2g(vid), b"OFF", qos=1, retain=True))
            log.info("no_v2g_released", vehicle_id=vid, reason="departure")
        return out


def parse_vehicles(value: str | None) -> list[str] | None:
    """``--homeassistant-vehicles``: none (absent), ``all``, or a comma-separated id list."""
    if value is None or not value.strip():
        return None
    if value.strip() == "all":
        return []
    try:
        return [check_id(v.strip(), "vehicle id") for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise HomeAssistantError(str(err)) from None


async def run_homeassistant(
    settings: Settings,
    *,
    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX,
    vehicles: Sequence[str] | None = None,
    connect_timeout: float = 10.0,
) -> None:
    """Announce the fleet (and ``vehicles``: empty for all) to Home Assistant until
    cancelled; the bridge's will marks every entity unavailable if it dies."""
    discovery = Discovery(settings.topics, check_discovery_prefix(discovery_prefix))
    bridge = Bridge(discovery, vehicles)
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def handler(m: Any) -> None:
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
        queue.put_nowait((str(m.topic), bytes(payload)))

    link = MqttLink(
        settings=settings,
        client_id=main_client_id(settings, "homeassistant", per_process=True),
        handler=handler,
        subscriptions=bridge.subscriptions(),
        will=Outgoing(discovery.availability_topic, OFFLINE.encode(), qos=1, retain=True),
        birth=bridge.birth,
    )
    async with link.running(connect_timeout, name="homeassistant-mqtt"):
        logs.lifecycle().info(
            "homeassistant_bridge_started",
            discovery_prefix=discovery.prefix,
            node=discovery.node,
            vehicles="all" if vehicles == [] else len(vehicles or ()),
        )
        try:
            while True:
                topic, payload = await queue.get()
                out = bridge.on_message(topic, payload)
                if out:
                    await link.publish_many(out)
        finally:
            # A graceful disconnect suppresses the will: say offline ourselves.
            await link.publish(discovery.availability_topic, OFFLINE.encode(), qos=1, retain=True)
