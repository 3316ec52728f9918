"""The production broker config (mosquitto.conf + acl + provisioned logins) enforces who may
say and hear what, against a real Mosquitto (see conftest.py).

How a refusal shows up in Mosquitto 2.0 under MQTT 5:

- a publish the ACL denies is acknowledged (QoS 1) with reason code 135 "Not authorized"
  and not delivered; an allowed one gets 0 or 16 "No matching subscribers";
- a subscription the ACL does not allow is *granted* (SUBACK QoS 1): the read ACL is
  applied per message at delivery, so a forbidden reader simply never receives anything.
  Tests prove that by absence, bounded by a sentinel: the same publisher then sends an
  allowed message, and once that arrives the forbidden one would have arrived before it;
- a login without, or with wrong, credentials is refused in CONNACK with 135.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from broker.link import MqttLink
from broker.settings import Settings
from core.errors import AuthenticationError, PublishRefused
from v2g import provision as prov

from .conftest import HOST, Broker, client

pytestmark = pytest.mark.security

NOT_AUTHORIZED = 135
OK_CODES = frozenset({0, 16})  # success, no matching subscribers
WAIT_S = 3.0


class Acks:
    """Records the PUBACK reason code of each QoS 1 publish (aiomqtt drops it)."""

    def __init__(self, c: aiomqtt.Client) -> None:
        self.codes: dict[int, int] = {}
        self._acked = asyncio.Event()
        self._paho = c._client  # aiomqtt keeps its paho client private; pinned < 3
        inner: Any = self._paho.on_publish

        def on_publish(cl: Any, ud: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            self.codes[mid] = int(rc.value)
            self._acked.set()
            inner(cl, ud, mid, rc, props)

        self._paho.on_publish = on_publish

    async def publish(self, topic: str, payload: bytes = b"{}") -> int:
        info = self._paho.publish(topic, payload, qos=1)
        assert info.rc == 0, f"paho could not send to {topic}: {info.rc}"
        async with asyncio.timeout(WAIT_S):
            while info.mid not in self.codes:
                self._acked.clear()
                await self._acked.wait()
        return self.codes[info.mid]


async def collect_until(sub: aiomqtt.Client, sentinel: str, timeout: float = WAIT_S) -> list[str]:
    """Topics received on ``sub`` up to and including ``sentinel``; fails after ``timeout``."""
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        async for msg in sub.messages:
            seen.append(str(msg.topic))
            if str(msg.topic) == sentinel:
                return seen
    raise AssertionError("message stream ended")  # pragma: no cover


async def expect_none(sub: aiomqtt.Client, timeout: float) -> list[str]:
    """Topics that arrive on ``sub`` within ``timeout`` (expected: none)."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            async for msg in sub.messages:
                seen.append(str(msg.topic))
    except TimeoutError:
        pass
    return seen


# -- vehicles ---------------------------------------------------------------------------
async def test_vehicle_cannot_publish_another_vehicles_telemetry(broker: Broker) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "ev-0000") as ev:
        await agg.subscribe("v2g/vehicles/+/telemetry", qos=1)
        acks = Acks(ev)
        assert await acks.publish("v2g/vehicles/ev-0001/telemetry") == NOT_AUTHORIZED
        own = "v2g/vehicles/ev-0000/telemetry"
        assert await acks.publish(own) in OK_CODES
        assert await collect_until(agg, own) == [own]


async def test_vehicle_cannot_publish_dispatch_requests_or_setpoints(broker: Broker) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "ev-0000") as ev:
        await agg.subscribe("v2g/#", qos=1)
        acks = Acks(ev)
        assert await acks.publish("v2g/dispatch/requests") == NOT_AUTHORIZED
        assert await acks.publish("v2g/dispatch/r1/cancel") == NOT_AUTHORIZED
        assert await acks.publish("v2g/vehicles/ev-0000/setpoint") == NOT_AUTHORIZED
        assert await acks.publish("v2g/fleet/status") == NOT_AUTHORIZED
        own = "v2g/vehicles/ev-0000/status"
        assert await acks.publish(own) in OK_CODES
        assert await collect_until(agg, own) == [own]


async def test_vehicle_reads_its_own_setpoints_but_not_another_vehicles(broker: Broker) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "ev-0000") as ev:
        # Mosquitto 2.0 grants the subscription (the read ACL applies per message) ...
        granted = await ev.subscribe("v2g/vehicles/ev-0001/setpoint", qos=1)
        assert [getattr(rc, "value", rc) for rc in granted] == [1]
        await ev.subscribe("v2g/vehicles/+/setpoint", qos=1)
        await ev.subscribe("v2g/vehicles/ev-0000/setpoint", qos=1)
        acks = Acks(agg)
        other, own = "v2g/vehicles/ev-0001/setpoint", "v2g/vehicles/ev-0000/setpoint"
        assert await acks.publish(other) in OK_CODES
        assert await acks.publish(own) in OK_CODES
        # ... but delivers only its own setpoint (once per matching filter), never ev-0001's.
        seen = await collect_until(ev, own)
        seen += await expect_none(ev, 0.3)
        assert other not in seen
        assert own in seen


async def test_vehicle_cannot_read_other_vehicles_telemetry_or_dispatch(broker: Broker) -> None:
    async with (
        client(broker, "ev-0000") as ev0,
        client(broker, "ev-0001") as ev1,
        client(broker, "operator") as op,
    ):
        await ev0.subscribe("v2g/#", qos=1)
        assert await Acks(ev1).publish("v2g/vehicles/ev-0001/telemetry") in OK_CODES
        assert await Acks(op).publish("v2g/dispatch/requests") in OK_CODES
        assert await expect_none(ev0, 0.5) == []


# -- aggregator -------------------------------------------------------------------------
async def test_aggregator_reads_telemetry_and_publishes_setpoints(broker: Broker) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "ev-0001") as ev:
        await agg.subscribe("v2g/vehicles/+/telemetry", qos=1)
        await ev.subscribe("v2g/vehicles/ev-0001/setpoint", qos=1)
        tel = "v2g/vehicles/ev-0001/telemetry"
        assert await Acks(ev).publish(tel, b'{"soc": 0.5}') in OK_CODES
        assert await collect_until(agg, tel) == [tel]
        sp = "v2g/vehicles/ev-0001/setpoint"
        assert await Acks(agg).publish(sp, b'{"power_kw": -3}') == 0
        assert await collect_until(ev, sp) == [sp]


# -- operator ---------------------------------------------------------------------------
async def test_operator_sends_dispatch_requests_and_reads_results_but_not_setpoints(
    broker: Broker,
) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "operator") as op:
        await agg.subscribe("v2g/#", qos=1)
        await op.subscribe("v2g/dispatch/#", qos=1)
        await op.subscribe("v2g/vehicles/+/setpoint", qos=1)
        op_acks, agg_acks = Acks(op), Acks(agg)
        req = "v2g/dispatch/requests"
        assert await op_acks.publish(req) == 0
        assert await collect_until(agg, req) == [req]
        # Results reach the operator; setpoints do not (the read ACL drops them).
        sp, result = "v2g/vehicles/ev-0000/setpoint", "v2g/dispatch/r1/result"
        assert await agg_acks.publish(sp) in OK_CODES
        assert await agg_acks.publish(result) == 0
        seen = await collect_until(op, result)
        assert sp not in seen
        assert await collect_until(agg, result) == [sp, result]  # its own, drained
        # The operator cannot publish setpoints, telemetry or fleet status.
        for topic in (sp, "v2g/vehicles/ev-0000/telemetry", "v2g/fleet/status"):
            assert await op_acks.publish(topic) == NOT_AUTHORIZED, topic
        cancel = "v2g/dispatch/r1/cancel"
        assert await op_acks.publish(cancel) == 0
        seen = await collect_until(agg, cancel)
        assert seen[-1] == cancel
        amend = "v2g/dispatch/r1/amend"
        assert await op_acks.publish(amend) == 0
        assert (await collect_until(agg, amend))[-1] == amend
        assert not any(t.startswith("v2g/vehicles/") or t == "v2g/fleet/status" for t in seen)


async def test_the_operator_gets_its_answers_on_a_response_topic_and_a_vehicle_does_not(
    broker: Broker,
) -> None:
    """`v2g dispatch/cancel/amend` ask for their answers on v2g/operators/<them>/responses
    (MQTT 5 Response Topic): the operator must read there, the aggregator write there."""
    async with (
        client(broker, "aggregator") as agg,
        client(broker, "operator") as op,
        client(broker, "ev-0000") as ev,
    ):
        inbox = "v2g/operators/op-1/responses"
        await op.subscribe(inbox, qos=1)
        await ev.subscribe("v2g/operators/#", qos=1)
        assert await Acks(agg).publish(inbox) == 0
        assert await collect_until(op, inbox) == [inbox]
        assert await expect_none(ev, 0.3) == []


async def test_home_assistant_reads_the_fleet_and_sets_holds_but_cannot_dispatch(
    broker: Broker,
) -> None:
    async with client(broker, "aggregator") as agg, client(broker, "homeassistant") as ha:
        await agg.subscribe("v2g/#", qos=1)
        await ha.subscribe("v2g/vehicles/+/telemetry", qos=1)
        await ha.subscribe("v2g/fleet/#", qos=1)
        ha_acks, agg_acks = Acks(ha), Acks(agg)
        # Its discovery configs and an owner's hold; the aggregator hears the hold.
        assert await ha_acks.publish("homeassistant/sensor/v2g_v2g/fleet_power/config") in OK_CODES
        hold = "v2g/vehicles/ev-0000/no_v2g"
        assert await ha_acks.publish(hold, b"ON") == 0
        assert (await collect_until(agg, hold))[-1] == hold
        # It reads the fleet's topics ...
        status = "v2g/fleet/status"
        assert await agg_acks.publish(status) == 0
        assert (await collect_until(ha, status))[-1] == status
        # ... and may not act as the aggregator, an operator or a vehicle.
        for topic in (
            "v2g/vehicles/ev-0000/setpoint",
            "v2g/dispatch/requests",
            "v2g/vehicles/ev-0000/telemetry",
            status,
        ):
            assert await ha_acks.publish(topic) == NOT_AUTHORIZED, topic


async def test_a_vehicle_cannot_hold_itself_out_of_v2g(broker: Broker) -> None:
    async with client(broker, "ev-0000") as car:
        # The hold is the owner's word through Home Assistant, not the car's.
        assert await Acks(car).publish("v2g/vehicles/ev-0000/no_v2g", b"ON") == NOT_AUTHORIZED


async def test_a_vehicle_cannot_amend_a_request_or_speak_as_a_bridge(broker: Broker) -> None:
    async with client(broker, "ev-0000") as ev:
        acks = Acks(ev)
        for topic in ("v2g/dispatch/r1/amend", "v2g/bridges/ev-0001/telemetry"):
            assert await acks.publish(topic) == NOT_AUTHORIZED, topic


async def test_a_bridge_publishes_only_its_own_batches(broker: Broker) -> None:
    """A bridge is provisioned like a vehicle; its id names its batch topics."""
    async with client(broker, "aggregator") as agg, client(broker, "ev-0000") as bridge:
        await agg.subscribe("v2g/bridges/#", qos=1)
        acks = Acks(bridge)
        own = "v2g/bridges/ev-0000/telemetry"
        assert await acks.publish("v2g/bridges/ev-0001/telemetry") == NOT_AUTHORIZED
        assert await acks.publish(own) in OK_CODES
        assert await collect_until(agg, own) == [own]
        await bridge.subscribe("v2g/bridges/+/setpoints", qos=1)
        agg_acks = Acks(agg)
        other, mine = "v2g/bridges/ev-0001/setpoints", "v2g/bridges/ev-0000/setpoints"
        assert await agg_acks.publish(other) in OK_CODES
        assert await agg_acks.publish(mine) in OK_CODES
        assert await collect_until(bridge, mine) == [mine]  # the other bridge's never came


# -- authentication ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("ev-0000", "wrong-password"), ("nobody", "whatever"), ("operator", "")],
    ids=["anonymous", "wrong-password", "unknown-user", "empty-password"],
)
async def test_clients_without_valid_credentials_are_refused(
    broker: Broker, user: str | None, password: str | None
) -> None:
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with client(broker, user, password):
            pass
    rc = refused.value.rc
    assert getattr(rc, "value", rc) == NOT_AUTHORIZED


async def test_mqtt_link_raises_authentication_error_instead_of_retrying(broker: Broker) -> None:
    settings = Settings(
        broker_url=f"mqtt://{HOST}:{broker.port}",
        username="ev-0000",
        password=SecretStr("wrong-password"),
        reconnect_min_s=0.05,
        reconnect_max_s=0.1,
    )
    link = MqttLink(settings, client_id="sec-auth-test")
    with pytest.raises(AuthenticationError, match="refused"):
        async with asyncio.timeout(WAIT_S):
            await link.run()
    assert link.stats.connects == 0
    assert link.stats.disconnects == 0  # no retry loop: it stopped at the first refusal


# -- TLS with client certificates -------------------------------------------------------
# The listener asks for TLS >= 1.2, so a default client negotiates TLS 1.3, where the server
# checks the client certificate only after the client's side of the handshake is done: the
# refusal arrives as a TLS alert on the first read, and the MQTT connect then fails. paho
# writes its CONNECT first, and when that lands on the closed socket the reset can discard
# the alert (CI saw "EOF occurred in violation of protocol"), so the reason is read by a
# probe that only reads, while the MQTT connect is checked to fail.
REFUSAL_TIMEOUT_S = 2.0


async def _connect_error(broker: Broker, ctx: ssl.SSLContext) -> str:
    """Connect over TLS; return why it failed (the test fails if it connects)."""
    try:
        async with client(broker, "ev-0000", tls=ctx, timeout=REFUSAL_TIMEOUT_S):
            pass
    except aiomqtt.MqttError as err:
        reason = f"{err!r} {err.__cause__!r}"
    else:
        pytest.fail("the TLS connection was accepted")
    await _collect_leaked_sockets()
    return reason


async def _tls_alert(broker: Broker, ctx: ssl.SSLContext) -> str:
    """Handshake and read without writing; return the TLS error the server's alert raised."""
    async with asyncio.timeout(REFUSAL_TIMEOUT_S):
        try:
            reader, writer = await asyncio.open_connection(HOST, broker.tls_port, ssl=ctx)
            try:
                got = await reader.read(1)
            finally:
                writer.close()
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    await writer.wait_closed()
        except ssl.SSLError as err:
            return str(err)
    pytest.fail(f"the TLS connection was not refused (read {got!r})")


async def _tls_refused(broker: Broker, ctx: ssl.SSLContext, alert: str) -> None:
    await _connect_error(broker, ctx)
    reason = await _tls_alert(broker, ctx)
    assert alert in reason.upper(), reason


async def _collect_leaked_sockets() -> None:
    """aiomqtt runs paho's connect in an executor thread, which drops the socket of a failed
    TLS connect a moment later; let that happen, quietly, rather than in a later test as an
    unraisable ResourceWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.sleep(0.1)
        gc.collect()


async def test_tls_listener_refuses_a_client_without_a_certificate(broker: Broker) -> None:
    await _tls_refused(broker, broker.tls_context(), "CERTIFICATE_REQUIRED")


async def test_tls_listener_refuses_a_certificate_from_another_ca(
    broker: Broker, tmp_path: Path
) -> None:
    rogue_ca = prov.make_ca(tmp_path, cn="rogue CA")
    rogue = prov.make_leaf(tmp_path, "rogue-ev-0000", "ev-0000", rogue_ca, server=False)
    ctx = broker.tls_context()
    ctx.load_cert_chain(str(rogue.cert_file), str(rogue.key_file))
    await _tls_refused(broker, ctx, "UNKNOWN_CA")


async def test_tls_client_refuses_a_server_its_ca_did_not_sign(
    broker: Broker, tmp_path: Path
) -> None:
    other_ca, _ = prov.make_ca(tmp_path, cn="some other CA")
    ctx = broker.tls_context("ev-0000", ca=other_ca)

    async def handshake() -> None:
        async with asyncio.timeout(REFUSAL_TIMEOUT_S):
            _, writer = await asyncio.open_connection(HOST, broker.tls_port, ssl=ctx)
        writer.close()

    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake()


async def test_tls_client_with_a_proper_certificate_is_accepted_as_its_cn(
    broker: Broker,
) -> None:
    """use_identity_as_username: the certificate's CN is the username, whatever it claims."""
    async with (
        client(broker, "aggregator") as agg,
        client(broker, "ev-0001", tls=broker.tls_context("ev-0000")) as ev,
    ):
        await agg.subscribe("v2g/vehicles/+/telemetry", qos=1)
        acks = Acks(ev)
        # It claimed ev-0001 but its certificate says ev-0000, so only ev-0000 is allowed.
        assert await acks.publish("v2g/vehicles/ev-0001/telemetry") == NOT_AUTHORIZED
        own = "v2g/vehicles/ev-0000/telemetry"
        assert await acks.publish(own) in OK_CODES
        assert await collect_until(agg, own) == [own]


async def test_on_tls_a_vehicle_cannot_take_over_another_vehicles_client_id(
    broker: Broker,
) -> None:
    """use_username_as_clientid on the TLS listener: the client id is the certificate's CN,
    so ev-0000 connecting as client "ev-0001" does not knock the real ev-0001 off."""
    async with client(broker, None, tls=broker.tls_context("ev-0001"), identifier="ev-0001") as ev1:
        await ev1.subscribe("v2g/vehicles/ev-0001/setpoint", qos=1)
        async with client(broker, None, tls=broker.tls_context("ev-0000"), identifier="ev-0001"):
            # Had the broker taken "ev-0001" as a client id, the first session would be
            # gone now and this publish would fail; it must still be acknowledged.
            acks = Acks(ev1)
            assert await acks.publish("v2g/vehicles/ev-0001/telemetry") in OK_CODES
            async with client(broker, "aggregator") as agg:
                await agg.publish("v2g/vehicles/ev-0001/setpoint", b"{}", qos=1)
                got = await collect_until(ev1, "v2g/vehicles/ev-0001/setpoint")
        assert got == ["v2g/vehicles/ev-0001/setpoint"]


# -- provisioning -----------------------------------------------------------------------
def test_provision_refuses_ids_the_acl_cannot_confine(tmp_path: Path) -> None:
    bad: list[Callable[[], object]] = [
        lambda: prov.vehicle_ids("ev-0000,ev/0001"),
        lambda: prov.vehicle_ids("ev-+"),
        lambda: prov.vehicle_ids("operator"),
        lambda: prov.vehicle_ids("ev-1,ev-1"),
        lambda: prov.provision(tmp_path, ["aggregator"]),
    ]
    for call in bad:
        with pytest.raises(prov.ProvisionError):
            call()


def test_provision_appends_and_keeps_existing_passwords(tmp_path: Path) -> None:
    first = prov.provision(tmp_path, ["ev-a"], operator=None)
    second = prov.provision(tmp_path, ["ev-a", "ev-b"], operator=None)
    assert {c.username for c in second.created} == {"ev-b"}
    assert second.password("ev-a") == first.password("ev-a")
    users = [line.split(":")[0] for line in (tmp_path / "passwd").read_text().splitlines()]
    assert sorted(users) == ["aggregator", "ev-a", "ev-b"]
    assert (tmp_path / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert len(second.password("ev-b")) >= 32


def test_provision_says_clearly_when_mosquitto_passwd_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("os.access", lambda _path, _mode: False)
    with pytest.raises(prov.ProvisionError, match="mosquitto_passwd not found"):
        prov.provision(tmp_path, ["ev-a"])


# -- the platform's own client surfaces refusals ---------------------------------------------
async def test_the_platform_link_raises_when_the_acl_refuses_a_publish(broker: Broker) -> None:
    """MqttLink speaks MQTT 5, so a refused publish is an error (PublishRefused with the
    reason), not a message silently dropped; allowed publishes still go through."""
    settings = Settings(
        broker_url=f"mqtt://{HOST}:{broker.port}",
        username="ev-0000",
        password=SecretStr(broker.password("ev-0000")),
        topic_prefix="v2g",
        reconnect_min_s=0.05,
        reconnect_max_s=0.1,
    )
    link = MqttLink(settings, client_id="ev-0000")
    task = asyncio.create_task(link.run())
    try:
        await link.wait_connected(WAIT_S)
        assert link.protocol == "5"
        ok = await link.publish("v2g/vehicles/ev-0000/telemetry", b"{}", qos=1)
        assert ok
        with pytest.raises(PublishRefused, match="Not authorized"):
            await link.publish("v2g/vehicles/ev-0001/telemetry", b"{}", qos=1)
        with pytest.raises(PublishRefused, match="v2g/dispatch/requests"):
            await link.publish("v2g/dispatch/requests", b"{}", qos=1)
        assert link.stats.refused == 2
        assert link.connected  # a refusal is not a lost connection
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
