"""Settings refuse what cannot work, saying how to write it, before anything connects."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.link import MqttLink
from broker.settings import ConnectionSettings, Settings
from core.settings import (
    ClockSettings,
    ControlLoopSettings,
    DispatchPolicySettings,
    LogSettings,
    MetricsSettings,
    ScaleOutSettings,
)


@pytest.mark.parametrize("url", ["localhost:1883", "127.0.0.1", "http://h:1883", "mqtt://h:x"])
def test_a_broker_url_without_scheme_host_or_numeric_port_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="is not a broker URL; use mqtt://HOST:PORT"):
        Settings(broker_url=url)


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtts://u:p@broker", "tcp://h"])
def test_broker_urls_people_write_are_taken(url: str) -> None:
    assert Settings(broker_url=url).broker_url == url


def test_a_redis_url_without_scheme_is_refused() -> None:
    with pytest.raises(ValidationError, match="is not a Redis URL; use redis://HOST:PORT/DB"):
        Settings(redis_url="127.0.0.1:6379")
    assert Settings(redis_url="rediss://h:6380/2").redis_url == "rediss://h:6380/2"


@pytest.mark.parametrize(("protocol", "first"), [("auto", "5"), ("5", "5"), ("3.1.1", "3.1.1")])
def test_a_link_first_speaks_the_protocol_it_is_told(protocol: str, first: str) -> None:
    """A broker known to speak 3.1.1 only (amqtt) is not first refused an MQTT 5 connect."""
    link = MqttLink(settings=Settings(mqtt_protocol=protocol), client_id="t")
    assert link.protocol == first


def test_each_setting_is_defined_once_in_one_concern() -> None:
    """One source of defaults: Settings adds no field of its own, and no two concerns
    define the same field (a second definition would silently shadow the first)."""
    concerns = [
        ConnectionSettings,
        ClockSettings,
        ControlLoopSettings,
        DispatchPolicySettings,
        ScaleOutSettings,
        LogSettings,
        MetricsSettings,
    ]
    owners: dict[str, list[str]] = {}
    for concern in concerns:
        for name in concern.model_fields:
            owners.setdefault(name, []).append(concern.__name__)
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}
    assert set(Settings.model_fields) == set(owners)
    for name, (owner,) in owners.items():
        concern = next(c for c in concerns if c.__name__ == owner)
        assert Settings.model_fields[name].default == concern.model_fields[name].default, name
