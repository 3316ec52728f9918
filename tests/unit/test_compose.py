"""The deployment files agree with the code: docker-compose.yml, the Mosquitto config and ACL.

No Docker engine or broker is needed; the files are parsed and checked against
``broker.settings.Settings`` and ``broker.topics.Topics``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from broker.settings import MqttTarget, Settings
from broker.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
MOSQUITTO_DIR = ROOT / "broker" / "mosquitto"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), "docker-compose.yml must be a mapping"
    svcs = doc.get("services")
    assert isinstance(svcs, dict), "docker-compose.yml has no services mapping"
    return svcs


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or as KEY=VALUE list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps) if isinstance(deps, list) else list(deps.keys())


def read_directives(path: Path) -> dict[str, list[str]]:
    """Mosquitto config or ACL lines as {keyword: [rest of line, ...]}, comments dropped."""
    out: dict[str, list[str]] = defaultdict(list)
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out[key].append(value.strip())
    return out


# --- docker-compose.yml ------------------------------------------------------


def test_compose_defines_broker_store_aggregator_and_agents(services: dict[str, Any]) -> None:
    assert {"mosquitto", "redis", "aggregator", "agents"} <= services.keys()


def test_compose_runs_servers_from_images_and_platform_from_the_repo_build(
    services: dict[str, Any],
) -> None:
    assert str(services["mosquitto"].get("image", "")).startswith("eclipse-mosquitto:2")
    assert str(services["redis"].get("image", "")).startswith("redis:7")
    for name in ("aggregator", "agents"):
        assert services[name].get("build"), f"{name} must be built from the repo"
    assert services["aggregator"]["command"][0] == "aggregator"
    assert services["agents"]["command"][0] == "agents"


def test_aggregator_reaches_broker_and_redis_by_service_name(services: dict[str, Any]) -> None:
    env = env_of(services["aggregator"])
    broker = MqttTarget.parse(env["V2G_BROKER_URL"])
    assert broker.host == "mosquitto"
    assert broker.host in services
    redis_url = urlsplit(env["V2G_REDIS_URL"])
    assert redis_url.scheme == "redis"
    assert redis_url.hostname == "redis"
    assert redis_url.hostname in services


def test_agents_reach_broker_by_service_name(services: dict[str, Any]) -> None:
    env = env_of(services["agents"])
    assert MqttTarget.parse(env["V2G_BROKER_URL"]).host == "mosquitto"


def test_every_depends_on_target_is_a_defined_service(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep in depends_on(svc):
            assert dep in services, f"{name} depends on undefined service {dep!r}"
    assert set(depends_on(services["aggregator"])) >= {"mosquitto", "redis"}
    assert "mosquitto" in depends_on(services["agents"])


def test_mounted_mosquitto_config_exists_in_the_repo(services: dict[str, Any]) -> None:
    mounts = [str(v) for v in services["mosquitto"].get("volumes", [])]
    config_mounts = [m for m in mounts if ":/mosquitto/config/mosquitto.conf" in m]
    assert len(config_mounts) == 1, f"no mosquitto.conf mount in {mounts}"
    source = config_mounts[0].split(":", 1)[0]
    assert (ROOT / source).is_file(), f"mounted config {source} is not in the repo"


def test_published_server_ports_bind_loopback_only(services: dict[str, Any]) -> None:
    for name in ("mosquitto", "redis"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_published_host_ports_can_be_moved_next_to_a_local_broker_or_redis(
    services: dict[str, Any],
) -> None:
    """A developer with Mosquitto or Redis already on 1883/6379 moves the stack's ports."""
    wanted = {"mosquitto": ("V2G_MQTT_HOST_PORT", "1883"), "redis": ("V2G_REDIS_HOST_PORT", "6379")}
    for name, (var, container_port) in wanted.items():
        ports = [str(p) for p in services[name].get("ports", [])]
        assert ports == [f"127.0.0.1:${{{var}:-{container_port}}}:{container_port}"], ports


def test_image_installs_dependencies_before_it_copies_the_code() -> None:
    """Editing code must not re-run the dependency install: that layer comes first."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()]
    copy_all = lines.index("COPY . .")
    install_deps = next(i for i, ln in enumerate(lines) if "pip install -r" in ln)
    assert install_deps < copy_all
    assert any(ln.startswith("COPY pyproject.toml") for ln in lines[:install_deps])
    assert any("pip install --no-deps ." in ln for ln in lines[copy_all:])


def test_simulate_service_writes_its_output_to_a_host_volume(services: dict[str, Any]) -> None:
    sim = services["simulate"]
    assert sim["command"][0] == "simulate"
    out = sim["command"][sim["command"].index("--out") + 1]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in sim.get("volumes", [])}
    assert any(out.startswith(target + "/") for target in mounts), (out, mounts)
    assert (ROOT / sim["command"][1]).is_file(), "the scenario must ship in the repo"
    assert "tools" in sim.get("profiles", []), "the base stack stays small"


def test_every_v2g_variable_in_compose_is_a_settings_field(services: dict[str, Any]) -> None:
    seen = 0
    for name, svc in services.items():
        env = {k: v for k, v in env_of(svc).items() if k.startswith("V2G_")}
        for key in env:
            assert key[4:].lower() in Settings.model_fields, f"{name}: {key} is not a setting"
        seen += len(env)
        # The values must also pass the settings' own validation (e.g. log_format).
        Settings(**{k[4:].lower(): v for k, v in env.items()})
    assert seen > 0


# --- the observability profile (README "Metrics") ---------------------------------

OPS = ROOT / "ops"


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts from the repo: {container path: repo path}."""
    out = {}
    for v in service.get("volumes", []):
        source, target = str(v).split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_prometheus_and_grafana_run_only_in_the_observability_profile(
    services: dict[str, Any],
) -> None:
    for name, image in (("prometheus", "prom/prometheus:"), ("grafana", "grafana/grafana:")):
        assert str(services[name]["image"]).startswith(image)
        assert services[name].get("profiles") == ["observability"], "the base stack stays small"
    for name in ("mosquitto", "redis", "aggregator", "agents"):
        assert not services[name].get("profiles"), f"{name} belongs to the base stack"


def test_observability_ports_are_loopback_and_movable(services: dict[str, Any]) -> None:
    wanted = {
        "prometheus": ("V2G_PROMETHEUS_HOST_PORT", "9090"),
        "grafana": ("V2G_GRAFANA_HOST_PORT", "3000"),
    }
    for name, (var, container_port) in wanted.items():
        ports = [str(p) for p in services[name].get("ports", [])]
        assert ports == [f"127.0.0.1:${{{var}:-{container_port}}}:{container_port}"], ports


def test_observability_mounts_exist_in_the_repo(services: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        mounts = _mounts(services[name])
        assert mounts, f"{name} mounts nothing from ops/"
        for target, source in mounts.items():
            assert source.exists(), f"{name} mounts {source} at {target}: not in the repo"


def test_prometheus_scrapes_the_metrics_port_of_aggregator_and_agents(
    services: dict[str, Any],
) -> None:
    config = yaml.safe_load(
        _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"].read_text()
    )
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    for name in ("aggregator", "agents"):
        listen = Settings(metrics=env_of(services[name])["V2G_METRICS"]).metrics
        assert listen is not None and listen.startswith("0.0.0.0:"), "reachable from Prometheus"
        assert f"{name}:{listen.rpartition(':')[2]}" in targets, (name, targets)
    assert all(t.split(":")[0] in services for t in targets), targets


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards(
    services: dict[str, Any],
) -> None:
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    assert urlsplit(source["url"]).port == 9090
    providers = yaml.safe_load((provisioning / "dashboards" / "v2g.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    dashboards = mounts[path]
    found = sorted(dashboards.glob("*.json"))
    assert found, f"no dashboard JSON in {dashboards}"
    for f in found:
        doc = json.loads(f.read_text())
        uids = {
            t["datasource"]["uid"] for panel in doc["panels"] for t in [panel, *panel["targets"]]
        }
        assert uids == {source["uid"]}, f"{f.name} names datasources {uids}"


# --- broker/mosquitto ------------------------------------------------------------


def test_production_broker_requires_login_acl_and_persists_queued_messages() -> None:
    conf = read_directives(MOSQUITTO_DIR / "mosquitto.conf")
    assert conf["allow_anonymous"] == ["false"]
    assert conf["persistence"] == ["true"]
    assert len(conf["acl_file"]) == 1
    assert conf["acl_file"][0]
    assert len(conf["password_file"]) == 1
    assert conf["password_file"][0]
    assert len(conf["autosave_interval"]) == 1
    assert 0 < int(conf["autosave_interval"][0]) <= 5  # queued QoS 1 survives a crash


def test_production_broker_plain_listener_is_loopback_only() -> None:
    conf = read_directives(MOSQUITTO_DIR / "mosquitto.conf")
    assert conf["listener"] == ["1883 127.0.0.1"]


def test_acl_vehicle_and_bridge_grants_are_the_contract_topics_scoped_to_the_username() -> None:
    acl = read_directives(MOSQUITTO_DIR / "acl")
    topics = Topics("v2g")
    assert sorted(acl["pattern"]) == sorted(
        [
            f"write {topics.telemetry('%u')}",
            f"write {topics.vehicle_status('%u')}",
            f"read {topics.setpoint('%u')}",
            f"write {topics.bridge_telemetry('%u')}",
            f"read {topics.bridge_setpoints('%u')}",
        ]
    )


def test_acl_grants_topics_only_inside_user_blocks() -> None:
    # A "topic" line before the first "user" line would apply to anonymous clients.
    current_user = None
    grants: dict[str, list[str]] = defaultdict(list)
    for raw in (MOSQUITTO_DIR / "acl").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("user "):
            current_user = line.split(" ", 1)[1]
        elif line.startswith("topic "):
            assert current_user is not None, f"{line!r} is granted outside a user block"
            grants[current_user].append(line.split(" ", 1)[1])
    assert grants["aggregator"] == ["readwrite v2g/#"]
    operator = grants["operator"]
    assert "write v2g/dispatch/requests" in operator
    assert not any(g.startswith(("write", "readwrite")) and "vehicles" in g for g in operator)
