"""Names that keep deployments apart on one broker and one Redis: client ids, the Redis
prefix, and what a process says about them at start (no I/O)."""

from __future__ import annotations

import os
import socket

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttCodeError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.runtime import AgentRuntime
from aggregator.ledger import is_refusal
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore, RedisStore
from broker.clientid import client_id, main_client_id
from broker.link import TAKEOVER_WINDOW_S, TakeoverWatch, is_session_taken_over
from broker.settings import Settings, without_password
from core.clock import ManualClock
from v2g.reset import redis_pattern

T0 = 1_780_000_000.0


@pytest.fixture(autouse=True)
def _no_v2g_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("V2G_"):
            monkeypatch.delenv(name)


def test_client_ids_start_with_the_topic_prefix_and_per_process_ones_name_host_and_pid() -> None:
    assert client_id("site-a", "aggregator") == "site-a-aggregator"
    host, pid = socket.gethostname(), os.getpid()
    first = client_id("site-a", "unit-ingest", per_process=True)
    second = client_id("site-a", "unit-ingest", per_process=True)
    assert first == f"site-a-unit-ingest-{host}-{pid}"
    assert second == f"{first}-1"  # a second link of one kind in one process differs too


def test_the_main_client_id_is_the_configured_one_when_set() -> None:
    assert main_client_id(Settings(topic_prefix="p"), "aggregator") == "p-aggregator"
    s = Settings(topic_prefix="p", client_id="mine")
    assert main_client_id(s, "aggregator") == "mine"
    assert main_client_id(s, "cli", per_process=True) == "mine"


def test_two_aggregators_with_other_prefixes_share_no_client_id() -> None:
    def ids(prefix: str) -> set[str]:
        svc = AggregatorService(
            settings=Settings(topic_prefix=prefix),
            clock=ManualClock(T0),
            store=MemoryStore(),
            fast_ingest=True,
            fast_setpoints=True,
        )
        assert svc.ingest is not None and svc.setpoints is not None
        return {svc.link.client_id, svc.ingest.client_id, svc.setpoints.client_id}

    a, b = ids("north"), ids("south")
    assert "north-aggregator" in a and "south-aggregator" in b
    assert len(a) == 3 and len(b) == 3 and not a & b


def test_aggregators_of_one_share_group_get_a_client_id_each_unless_one_is_set() -> None:
    cfg = Settings(topic_prefix="p", share_group="g")
    # A group shares state through Redis; nothing here connects to it.
    one, two = (
        AggregatorService(settings=cfg, clock=ManualClock(T0), store=RedisStore(cfg.redis_url))
        for _ in range(2)
    )
    assert one.client_id != two.client_id
    assert one.client_id.startswith(f"p-aggregator-{socket.gethostname()}-{os.getpid()}")
    mine = Settings(topic_prefix="p", client_id="agg-7")
    assert AggregatorService(
        settings=mine, clock=ManualClock(T0), store=MemoryStore()
    ).client_id == ("agg-7")


@pytest.mark.parametrize("mode", ["per-vehicle", "multiplexed"])
def test_agents_client_ids_are_the_topic_prefix_and_the_vehicle_or_bridge(mode: str) -> None:
    cfg = Settings(topic_prefix="east")
    fleet = SimFleet(generate_fleet(4, 1, id_prefix="car"), T0, step_s=5.0)
    rt = AgentRuntime(
        settings=cfg,
        clock=ManualClock(T0),
        fleet=fleet,
        mode=mode,  # type: ignore[arg-type]
        connections=2,
    )
    ids = [link.client_id for link in rt.links]
    if mode == "per-vehicle":
        assert ids == [f"east-{v}" for v in fleet.ids]
    else:
        assert rt.bridge_ids == ["car-0000-mux0", "car-0000-mux1"]
        assert ids == [f"east-{b}" for b in rt.bridge_ids]


def test_the_redis_prefix_follows_the_topic_prefix_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().redis_prefix == "v2g"
    assert Settings(topic_prefix="site-b").redis_prefix == "site-b"
    assert Settings(topic_prefix="site-b", redis_prefix="{v2g}").redis_prefix == "{v2g}"
    monkeypatch.setenv("V2G_TOPIC_PREFIX", "from-env")
    assert Settings().redis_prefix == "from-env"
    monkeypatch.setenv("V2G_REDIS_PREFIX", "keys")
    assert Settings().redis_prefix == "keys"


def test_the_start_line_names_both_prefixes_and_hides_passwords() -> None:
    s = Settings(
        broker_url="mqtt://op:hunter2@broker:1883",
        redis_url="redis://:s3cret@cache:6379/2",
        topic_prefix="west",
    )
    assert s.deployment() == {
        "broker": "mqtt://op:***@broker:1883",
        "redis": "redis://:***@cache:6379/2",
        "topic_prefix": "west",
        "redis_prefix": "west",
    }
    assert without_password("redis://cache:6379/0") == "redis://cache:6379/0"


def test_the_reset_scan_pattern_escapes_the_prefixs_glob_characters() -> None:
    assert redis_pattern("v2g") == "v2g:*"
    assert redis_pattern("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\:*"


def test_only_a_rejected_answer_is_a_refusal() -> None:
    assert is_refusal({"kind": "answer", "status": "rejected"})
    assert not is_refusal({"kind": "answer", "status": "accepted"})
    assert not is_refusal({"kind": "step", "status": "rejected"})


def test_a_drop_reads_as_a_takeover_only_from_the_reason_code_or_a_tug_of_war() -> None:
    # The broker says so: at once.
    w = TakeoverWatch()
    w.attempt()
    assert w.dropped(up=True, now=0.0, reason_code_says=True) is not None
    # Dropped, taken back at the first try, dropped again within the window: a tug of war.
    w = TakeoverWatch()
    w.attempt()
    assert w.dropped(up=True, now=0.0) is None
    w.attempt()
    assert w.dropped(up=True, now=5.0) is not None
    # A restart: the first tries are refused before the broker takes us back.
    w = TakeoverWatch()
    w.attempt()
    assert w.dropped(up=True, now=0.0) is None
    w.attempt()
    assert w.dropped(up=False, now=0.2) is None
    w.attempt()
    assert w.dropped(up=True, now=5.0) is None
    # Two drops far apart: a network, not another client.
    w = TakeoverWatch()
    w.attempt()
    assert w.dropped(up=True, now=0.0) is None
    w.attempt()
    assert w.dropped(up=True, now=TAKEOVER_WINDOW_S + 1.0) is None


def test_the_brokers_session_taken_over_reason_code_is_read_through_aiomqtts_error() -> None:
    """aiomqtt raises "Disconnected during message iteration" from the MqttCodeError that
    carries the DISCONNECT's reason code (what Mosquitto >= 2.0.15 sends)."""

    def disconnected(code: int) -> aiomqtt.MqttError:
        try:
            try:
                raise MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, identifier=code))
            except MqttCodeError as cause:
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
        except aiomqtt.MqttError as err:
            return err

    assert is_session_taken_over(disconnected(0x8E))
    assert not is_session_taken_over(disconnected(0x80))  # unspecified: a lost connection
    assert not is_session_taken_over(aiomqtt.MqttError("Disconnected during message iteration"))
