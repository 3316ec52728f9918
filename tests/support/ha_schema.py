"""A subset of Home Assistant's MQTT discovery schema, for the configs we publish.

Taken from Home Assistant's documentation (found with the docs search "home assistant mqtt
discovery sensor"): the discovery topic and shared keys from
https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery, the entity keys from
https://www.home-assistant.io/integrations/sensor.mqtt/,
https://www.home-assistant.io/integrations/binary_sensor.mqtt/ and
https://www.home-assistant.io/integrations/switch.mqtt/, the device classes, their units
and the state classes from https://www.home-assistant.io/integrations/sensor/#device-class
and https://developers.home-assistant.io/docs/core/entity/sensor/. Only the keys and
classes we could use are listed: an unknown key is refused (extra="forbid"), as a typo
would be silently ignored by Home Assistant.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# <discovery_prefix>/<component>/[<node_id>/]<object_id>/config; ids: [a-zA-Z0-9_-]+.
DISCOVERY_TOPIC = re.compile(
    r"^(?P<prefix>[^+#]+)/(?P<component>sensor|binary_sensor|switch)"
    r"/(?:(?P<node>[A-Za-z0-9_-]+)/)?(?P<object>[A-Za-z0-9_-]+)/config$"
)

# A publish topic: no wildcards, not empty.
Topic = Annotated[str, Field(min_length=1, pattern=r"^[^+#\x00]+$")]
Template = Annotated[str, Field(min_length=1, pattern=r"\{\{.*\}\}")]

# Sensor device classes and the units Home Assistant accepts for each (the subset).
SENSOR_UNITS: dict[str, set[str | None]] = {
    "power": {"mW", "W", "kW", "MW", "GW", "TW", "BTU/h"},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal"},
    "energy_storage": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh"},
    "battery": {"%"},
    "timestamp": {None},
    "duration": {"d", "h", "min", "s", "ms"},
    "voltage": {"mV", "V", "kV", "µV", "MV"},
    "current": {"mA", "A"},
}
# State classes allowed per device class where Home Assistant restricts them.
STATE_CLASSES: dict[str, set[str | None]] = {
    "power": {"measurement"},
    "battery": {"measurement"},
    "energy": {"total", "total_increasing"},
    "energy_storage": {"measurement"},
    "timestamp": {None},  # a timestamp sensor has no state class
}
BINARY_SENSOR_CLASSES = {"plug", "connectivity", "power", "problem", "running", "battery_charging"}
SWITCH_CLASSES = {"outlet", "switch"}


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")

    identifiers: list[str] | str
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None
    hw_version: str | None = None
    via_device: str | None = None
    suggested_area: str | None = None
    configuration_url: str | None = None
    connections: list[list[str]] | None = None


class Availability(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: Topic
    payload_available: str = "online"
    payload_not_available: str = "offline"
    value_template: Template | None = None


class Entity(BaseModel):
    """Keys every MQTT entity shares."""

    model_config = ConfigDict(extra="forbid")

    name: str | None
    unique_id: Annotated[str, Field(min_length=1)]
    device: Device  # discovery with a device needs the unique_id above
    availability: list[Availability] | None = None
    availability_topic: Topic | None = None
    availability_mode: Literal["all", "any", "latest"] = "latest"
    payload_available: str = "online"
    payload_not_available: str = "offline"
    icon: Annotated[str, Field(pattern=r"^mdi:[a-z0-9-]+$")] | None = None
    entity_category: Literal["config", "diagnostic"] | None = None
    enabled_by_default: bool = True
    json_attributes_topic: Topic | None = None
    json_attributes_template: Template | None = None
    qos: Literal[0, 1, 2] = 0
    encoding: str = "utf-8"

    @model_validator(mode="after")
    def _one_availability(self) -> Entity:
        if self.availability is not None and self.availability_topic is not None:
            raise ValueError("availability and availability_topic must not be used together")
        return self


class SensorConfig(Entity):
    state_topic: Topic
    value_template: Template | None = None
    unit_of_measurement: str | None = None
    device_class: str | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    expire_after: Annotated[int, Field(ge=0)] | None = None
    force_update: bool = False
    suggested_display_precision: Annotated[int, Field(ge=0)] | None = None
    last_reset_value_template: Template | None = None

    @model_validator(mode="after")
    def _units_fit_the_class(self) -> SensorConfig:
        dc = self.device_class
        if dc is None:
            return self
        if dc not in SENSOR_UNITS:
            raise ValueError(f"device_class {dc!r} is not one this schema knows")
        if self.unit_of_measurement not in SENSOR_UNITS[dc]:
            raise ValueError(f"unit {self.unit_of_measurement!r} is not valid for {dc!r}")
        allowed = STATE_CLASSES.get(dc)
        if allowed is not None and self.state_class not in allowed:
            raise ValueError(f"state_class {self.state_class!r} is not valid for {dc!r}")
        return self


class BinarySensorConfig(Entity):
    state_topic: Topic
    value_template: Template | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"
    device_class: str | None = None
    expire_after: Annotated[int, Field(ge=0)] | None = None
    off_delay: Annotated[int, Field(ge=0)] | None = None
    force_update: bool = False

    @model_validator(mode="after")
    def _known_class(self) -> BinarySensorConfig:
        if self.device_class is not None and self.device_class not in BINARY_SENSOR_CLASSES:
            raise ValueError(f"binary sensor device_class {self.device_class!r} is unknown")
        return self


class SwitchConfig(Entity):
    command_topic: Topic
    command_template: Template | None = None
    state_topic: Topic | None = None
    value_template: Template | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"
    state_on: str | None = None
    state_off: str | None = None
    optimistic: bool | None = None
    retain: bool = False
    device_class: str | None = None

    @model_validator(mode="after")
    def _known_class(self) -> SwitchConfig:
        if self.device_class is not None and self.device_class not in SWITCH_CLASSES:
            raise ValueError(f"switch device_class {self.device_class!r} is unknown")
        return self


SCHEMAS: dict[str, type[Entity]] = {
    "sensor": SensorConfig,
    "binary_sensor": BinarySensorConfig,
    "switch": SwitchConfig,
}


def validate(topic: str, payload: object) -> Entity:
    """Validate one discovery config against its component's schema (ValueError if not)."""
    m = DISCOVERY_TOPIC.match(topic)
    if m is None:
        raise ValueError(f"{topic!r} is not a discovery config topic")
    return SCHEMAS[m["component"]].model_validate(payload)
