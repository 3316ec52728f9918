"""The OCPP gateway over real websockets, with the ocpp library's own ChargePoint classes
as the stations, on real Redis (credentials) and Mosquitto (the bridge)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broker.settings import Settings
from chargers.auth import RedisStations
from chargers.gateway import Gateway
from core.clock import SimClock
from tests.support.ocpp_peer import basic, iso_now, start_session, station

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def rt_settings(settings: Settings) -> Settings:
    """Real time: chargers are real. A 1 s telemetry interval and control step."""
    return settings.model_copy(
        update={"speed": 1.0, "telemetry_interval_s": 1.0, "control_step_s": 1.0}
    )


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    *,
    open_mode: bool = False,
    provision: tuple[str, ...] = ("cs-1",),
    tls: Any = None,
    bridge_id: str = "ocpp-test",
    owner_ttl_s: float | None = None,
) -> AsyncIterator[tuple[Gateway, str]]:
    from chargers.ownership import Ownership

    client = aioredis.Redis.from_url(settings.redis_url)
    stations = RedisStations(client, settings.redis_prefix)
    for sid in provision:
        await stations.provision(sid, PASSWORD)
    gw = Gateway(
        settings=settings,
        clock=SimClock(speed=1.0),
        stations=stations,
        bridge_id=bridge_id,
        open_mode=open_mode,
        ownership=None
        if owner_ttl_s is None
        else Ownership(client, settings.redis_prefix, bridge_id, ttl_s=owner_ttl_s),
    )
    task = asyncio.create_task(gw.run("127.0.0.1", 0, tls=tls), name="gateway")
    try:
        async with asyncio.timeout(5):
            await gw.listening.wait()
            await gw.link.wait_connected(5)
        yield gw, f"{'wss' if tls else 'ws'}://127.0.0.1:{gw.port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def until(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def handshake_status(url: str, *, headers: dict[str, str], protocols: list[str]) -> int:
    try:
        ws = await connect(
            url,
            subprotocols=protocols or None,
            additional_headers=headers,
            open_timeout=5,  # type: ignore[arg-type]
        )
    except InvalidStatus as err:
        return err.response.status_code
    await ws.close()
    return 101


async def test_boot_is_accepted_with_a_heartbeat_interval(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings) as (gw, url):
        for version in ("2.1", "2.0.1"):
            async with station(url, "cs-1", PASSWORD, version) as cp:
                answer = await cp.boot()
                assert answer.status == "Accepted" and answer.interval == 60
                await until(lambda: "cs-1" in gw.stations, what="station registered")
                assert gw.stations["cs-1"].version == version


async def test_auth_comes_first_then_the_subprotocol(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings) as (gw, url):
        good = {"Authorization": basic("cs-1", PASSWORD)}
        ocpp = ["ocpp2.1"]
        assert await handshake_status(f"{url}/cs-1", headers={}, protocols=ocpp) == 401
        assert (
            await handshake_status(
                f"{url}/cs-1", headers={"Authorization": basic("cs-1", "wrong")}, protocols=ocpp
            )
            == 401
        )
        unknown = {"Authorization": basic("cs-9", PASSWORD)}
        assert await handshake_status(f"{url}/cs-9", headers=unknown, protocols=ocpp) == 401
        # Bad credentials and no subprotocol: still 401, auth is first.
        assert await handshake_status(f"{url}/cs-1", headers={}, protocols=[]) == 401
        assert await handshake_status(f"{url}/cs-1", headers=good, protocols=[]) == 400
        assert await handshake_status(f"{url}/cs-1", headers=good, protocols=["ocpp1.6"]) == 400
        assert await handshake_status(f"{url}/cs-1", headers=good, protocols=["ocpp2.0.1"]) == 101
        assert gw.csms.refused["no_credentials"] == 2 and gw.csms.refused["bad_password"] == 1
        assert gw.csms.refused["unknown"] == 1 and gw.csms.refused["subprotocol"] == 2


async def test_open_mode_takes_unprovisioned_stations_but_not_a_wrong_password(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings, open_mode=True) as (_, url):
        ocpp = ["ocpp2.1"]
        assert await handshake_status(f"{url}/lab-7", headers={}, protocols=ocpp) == 101
        wrong = {"Authorization": basic("cs-1", "wrong")}
        assert await handshake_status(f"{url}/cs-1", headers=wrong, protocols=ocpp) == 401


async def test_malformed_calls_get_the_callerror_ocpp_j_names_and_the_station_carries_on(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with (
        running_gateway(rt_settings, provision=("cs-1", "cs-2")) as (gw, url),
        station(url, "cs-2", PASSWORD) as other,
    ):
        headers = {"Authorization": basic("cs-1", PASSWORD)}
        async with connect(
            f"{url}/cs-1",
            subprotocols=["ocpp2.1"],
            additional_headers=headers,  # type: ignore[list-item]
        ) as ws:

            async def ask(frame: str) -> list[Any]:
                await ws.send(frame)
                async with asyncio.timeout(5):
                    return list(json.loads(await ws.recv()))

            got = await ask('[2,"m1","BootNotification",{"reason":"PowerUp"}]')
            assert got[:3] == [4, "m1", "OccurrenceConstraintViolation"]
            got = await ask('[2,"m2","NoSuchAction",{}]')
            assert got[:3] == [4, "m2", "NotImplemented"]
            got = await ask('[2,"m3","SetChargingProfile",{}]')
            assert got[:3] == [4, "m3", "NotSupported"]
            got = await ask("this is not json")
            assert got[:3] == [4, "-1", "RpcFrameworkError"]
            got = await ask('[2,"m4","Heartbeat",{"extra":1}]')
            assert got[:3] == [4, "m4", "FormatViolation"]
            # Every other action a station may send gets a schema-valid answer.
            for i, (action, payload) in enumerate(
                [
                    ("Heartbeat", {}),
                    ("SecurityEventNotification", {"type": "x", "timestamp": iso_now()}),
                    (
                        "NotifyEVChargingSchedule",
                        {
                            "timeBase": iso_now(),
                            "evseId": 1,
                            "chargingSchedule": {
                                "id": 1,
                                "chargingRateUnit": "W",
                                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 1.0}],
                            },
                        },
                    ),
                    ("DataTransfer", {"vendorId": "acme"}),
                    ("PullDynamicScheduleUpdate", {"chargingProfileId": 1}),
                ]
            ):
                got = await ask(json.dumps([2, f"ok{i}", action, payload]))
                assert got[0] == 3 and got[1] == f"ok{i}", (action, got)
        # The other station was never disturbed.
        assert (await other.boot()).status == "Accepted"
        assert "cs-2" in gw.stations
        # Counted by code for the process, with no station id as a label.
        m = await scrape_gateway(gw)
        for code in ("OccurrenceConstraintViolation", "NotImplemented", "NotSupported",
                     "RpcFrameworkError", "FormatViolation"):  # fmt: skip
            assert metric(m, "v2g_ocpp_call_errors_sent_total", code=code) == 1, code
        assert not any("cs-" in str(labels) for rows in m.values() for labels, _ in rows)


async def scrape_gateway(gw: Gateway) -> Any:
    """``gw``'s metrics, as ``v2g ocpp --metrics`` serves them, scraped over HTTP once."""
    import urllib.request

    from broker.metrics import new_registry, serving
    from chargers.metrics import register_gateway
    from tests.support.metrics import parse
    from tests.support.servers import free_port

    registry = new_registry()
    register_gateway(gw, registry)
    port = free_port()
    with serving(f"127.0.0.1:{port}", registry, process="ocpp"):

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0) as r:
                return str(r.read().decode())

        return parse(await asyncio.to_thread(get))


def metric(samples: Any, name: str, **labels: str) -> float | None:
    from tests.support.metrics import value

    return value(samples, name, **labels)


async def test_the_metrics_count_stations_sessions_profiles_and_the_setpoint_latency(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings) as (gw, url), station(url, "cs-1", PASSWORD) as cp:
        await cp.boot()
        await start_session(cp, evse=1, tx="tx-1", soc=0.5, power_w=11000.0)
        await until(lambda: gw.sessions and gw.summary()["can_discharge"] == 1, what="BPT")
        await publish_setpoints(rt_settings, gw, "cs-1.1", -3.0, 60.0)
        await until(lambda: gw.counts["profile_accepted"] == 1, what="accepted")
        m = await scrape_gateway(gw)
        assert metric(m, "v2g_ocpp_stations_connected") == 1
        assert metric(m, "v2g_ocpp_sessions") == 1
        assert metric(m, "v2g_ocpp_sessions_bpt") == 1
        assert metric(m, "v2g_ocpp_profiles_accepted_total") == 1
        assert metric(m, "v2g_ocpp_profiles_rejected_total") == 0
        assert metric(m, "v2g_ocpp_setpoints_received_total") == 1
        assert metric(m, "v2g_ocpp_setpoint_to_profile_seconds_count") == 1
        assert metric(m, "v2g_ocpp_setpoint_to_profile_seconds_bucket", le="+Inf") == 1
        assert 0 < (metric(m, "v2g_ocpp_setpoint_to_profile_seconds_sum") or 0) < 10
        assert metric(m, "v2g_mqtt_connections_up", connection="main") == 1
        cp.accept_profiles = False
        await publish_setpoints(rt_settings, gw, "cs-1.1", -2.0, 60.0)
        await until(lambda: gw.counts["profile_rejected"] == 1, what="rejected")
        m = await scrape_gateway(gw)
        assert metric(m, "v2g_ocpp_profiles_rejected_total") == 1
        assert metric(m, "v2g_ocpp_setpoint_to_profile_seconds_count") == 2


async def test_a_session_becomes_a_vehicle_reported_over_the_bridge(
    rt_settings: Settings, redis_keys: None
) -> None:
    import aiomqtt

    from broker.models import TelemetryBatch

    async with (
        running_gateway(rt_settings) as (gw, url),
        aiomqtt.Client(
            "127.0.0.1", 1883, identifier=f"watch-{rt_settings.topic_prefix.replace('/', '-')}"
        ) as watch,
    ):
        await watch.subscribe(rt_settings.topics.bridge_telemetry("ocpp-test"), qos=0)
        async with station(url, "cs-1", PASSWORD) as cp:
            await cp.boot()
            mac = {"id_token": "00:1A:2B:3C:4D:5E", "type": "MacAddress"}
            await start_session(cp, evse=1, tx="tx-1", soc=0.5, power_w=7000, id_token=mac)
            await until(
                lambda: (
                    gw.sessions.get(("cs-1", 1)) is not None
                    and gw.sessions[("cs-1", 1)].can_discharge
                ),
                what="BPT accepted",
            )
            assert cp.calls("NotifyAllowedEnergyTransfer") == [
                {"transactionId": "tx-1", "allowedEnergyTransfer": ["AC_BPT"]}
            ]
            async with asyncio.timeout(5):
                async for m in watch.messages:
                    batch = TelemetryBatch.model_validate_json(m.payload)  # type: ignore[arg-type]
                    if batch.max_discharge_kw[0] > 0:
                        break
            assert batch.vehicle_id == ["001a2b3c4d5e"]
            assert batch.plugged_in == [True] and batch.power_kw == [7.0]
            assert batch.soc == [0.5] and batch.capacity_kwh == [60.0]
            assert batch.min_soc[0] == pytest.approx((30 - 20) / 60)
            assert batch.max_discharge_kw == [11.0]


# -- with the aggregator: the stations join the fleet and follow its dispatch ------------


@contextlib.asynccontextmanager
async def fleet_with_gateway(
    settings: Settings,
    store: Any,
    test_id: str,
    stations: tuple[str, ...],
    *,
    open_mode: bool = False,
) -> AsyncIterator[tuple[Any, Gateway, str]]:
    from tests.support.harness import make_aggregator

    clock = SimClock(speed=1.0)
    agg = make_aggregator(settings, clock, store, test_id)
    async with running_gateway(settings, provision=stations, open_mode=open_mode) as (gw, url):
        task = asyncio.create_task(agg.run(), name="aggregator")
        try:
            yield agg, gw, url
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def step_where(agg: Any, ok: Callable[[Any], bool], what: str, timeout: float) -> Any:
    last = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await agg.reports.get()
                if ok(last):
                    return last
    except TimeoutError:
        status = None if last is None else last.status.model_dump(exclude={"capability"})
        raise AssertionError(f"no step with {what} within {timeout} s; last: {status}") from None


def profile_periods(cp: Any) -> list[dict[str, Any]]:
    return [
        p["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]
        for p in cp.calls("SetChargingProfile")
    ]


async def test_a_mixed_fleet_joins_and_tracks_a_discharge_and_never_discharges_a_non_bpt_session(
    rt_settings: Settings, store: Any, test_id: str, retained_cleanup: None, figure: Any
) -> None:
    import aiomqtt

    from broker.models import DispatchRequest
    from chargers.profiles import negative_values

    names = ("bpt-a", "bpt-b", "v21-nobpt", "v201")
    async with fleet_with_gateway(rt_settings, store, test_id, names) as (agg, gw, url):
        async with contextlib.AsyncExitStack() as stack:
            cps = {
                n: await stack.enter_async_context(
                    station(url, n, PASSWORD, "2.0.1" if n == "v201" else "2.1")
                )
                for n in names
            }
            for i, (n, cp) in enumerate(cps.items()):
                await cp.boot()
                await start_session(
                    cp, evse=1, tx=f"tx-{i}", soc=0.5, power_w=11000.0, bpt=n.startswith("bpt")
                )
            await until(lambda: gw.summary()["can_discharge"] == 2, what="two BPT sessions")
            joined = await step_where(
                agg,
                lambda r: (
                    r.status.vehicles_plugged_in == 4 and r.status.available_discharge_kw > 20
                ),
                "4 plugged in, 2 x 11 kW to discharge",
                10,
            )
            assert joined.status.vehicles_online == 4
            # A discharge at the fleet's meter: only the two BPT sessions can give it.
            request = DispatchRequest(request_id=f"r-{test_id}", power_kw=-12.0, duration_s=120)
            async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"op-{test_id}") as op:
                await op.publish(rt_settings.topics.dispatch_requests, request.to_json(), qos=1)
            t0 = time.monotonic()
            tracked = await step_where(
                agg,
                lambda r: abs(r.status.power_kw - -12.0) <= 0.6,
                "fleet net power within 5% of -12 kW",
                10,
            )
            took = time.monotonic() - t0
            assert took < 3 * rt_settings.control_step_s + 2.0, took
            assert tracked.status.power_kw == pytest.approx(-12.0, abs=0.6)
            for n in ("v21-nobpt", "v201"):
                assert cps[n].calls("SetChargingProfile"), n
                for p in cps[n].calls("SetChargingProfile"):
                    assert negative_values(p) == [], (n, p)
                assert all("setpoint" not in q and q["limit"] >= 0 for q in profile_periods(cps[n]))
            for n in ("bpt-a", "bpt-b"):
                last = cps[n].calls("SetChargingProfile")[-1]["chargingProfile"]
                period = last["chargingSchedule"][0]["chargingSchedulePeriod"][0]
                assert period["operationMode"] == "CentralSetpoint" and period["setpoint"] < 0
                assert last["maxOfflineDuration"] > 0 and last["invalidAfterOfflineDuration"]
            assert gw.setpoint_latency_s, "no setpoint latency measured"
            figure("time to track -12 kW within 5%", took, "s", limit="< 3 control steps")
            lat = sorted(gw.setpoint_latency_s)
            figure(
                "setpoint in -> SetChargingProfile answered, p50", lat[len(lat) // 2] * 1e3, "ms"
            )
            figure("SetChargingProfile round trip, max", max(gw.call_rtt_s) * 1e3, "ms")

            # One BPT car unplugs mid-dispatch: the other picks up its share.
            from ocpp.v21 import call as call21

            await cps["bpt-b"].call(
                call21.TransactionEvent(
                    event_type="Ended",
                    seq_no=1,
                    timestamp=iso_now(),
                    trigger_reason="EVDeparted",
                    transaction_info={"transaction_id": "tx-1", "stopped_reason": "EVDisconnected"},
                    evse={"id": 1, "connector_id": 1},
                )
            )
            await step_where(
                agg,
                lambda r: (
                    r.status.vehicles_plugged_in == 3 and abs(r.status.power_kw - -11.0) <= 0.6
                ),
                "3 plugged, the last BPT car at its 11 kW discharge limit",
                10,
            )
            assert cps["bpt-a"].power_w[1] == pytest.approx(-11000.0, abs=100)
            # A dropped websocket: its vehicle is out within the stale bound.
            await stack.aclose()
        await step_where(
            agg, lambda r: r.status.vehicles_online == 0, "every station gone stale", 10
        )


async def test_a_dropped_station_goes_stale_and_comes_back_with_the_same_vehicle_id(
    rt_settings: Settings, store: Any, test_id: str, retained_cleanup: None
) -> None:
    mac = {"id_token": "AA-BB-CC-00-11-22", "type": "MacAddress"}
    async with fleet_with_gateway(rt_settings, store, test_id, ("cs-1",)) as (agg, gw, url):
        async with station(url, "cs-1", PASSWORD) as cp:
            await cp.boot()
            await start_session(cp, evse=1, tx="tx-1", soc=0.5, power_w=7000.0, id_token=mac)
            await step_where(agg, lambda r: r.status.vehicles_plugged_in == 1, "joined", 10)
        assert gw.by_vehicle == {"aabbcc001122": ("cs-1", 1)}
        t0 = time.monotonic()
        await step_where(agg, lambda r: r.status.vehicles_online == 0, "stale", 10)
        assert time.monotonic() - t0 < rt_settings.stale_s + 2 * rt_settings.control_step_s + 1
        # Back without a reboot: no BootNotification; the gateway asks with TriggerMessage.
        async with station(url, "cs-1", PASSWORD) as cp:
            await until(lambda: len(cp.calls("TriggerMessage")) >= 2, what="TriggerMessage")
            assert {c["requestedMessage"] for c in cp.calls("TriggerMessage")} == {
                "TransactionEvent",
                "MeterValues",
            }
            await step_where(agg, lambda r: r.status.vehicles_plugged_in == 1, "back", 10)
            assert gw.by_vehicle == {"aabbcc001122": ("cs-1", 1)}


async def publish_setpoints(
    settings: Settings, gw: Gateway, vid: str, power_kw: float, valid_s: float
) -> None:
    import aiomqtt

    from broker.models import SetpointBatch, from_epoch

    now = time.time()
    batch = SetpointBatch(
        bridge_id=gw.bridge_id,
        request_id="r-1",
        issued_at=from_epoch(now),
        vehicle_id=[vid],
        power_kw=[power_kw],
        valid_until=[now + valid_s],
    )
    ident = f"sp-{settings.topic_prefix.replace('/', '-')}"
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=ident) as c:
        await c.publish(settings.topics.bridge_setpoints(gw.bridge_id), batch.to_json(), qos=1)


async def test_a_discharge_setpoint_to_a_2_0_1_station_is_a_zero_limit_and_a_release_restores_the_baseline(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with (
        running_gateway(rt_settings) as (gw, url),
        station(url, "cs-1", PASSWORD, "2.0.1") as cp,
    ):
        await cp.boot()
        await start_session(cp, evse=1, tx="tx-1", soc=None, power_w=11000.0)
        await until(lambda: "cs-1.1" in gw.by_vehicle, what="session")
        await publish_setpoints(rt_settings, gw, "cs-1.1", -7.0, 60.0)
        await until(lambda: len(cp.calls("SetChargingProfile")) == 1, what="profile")
        first = profile_periods(cp)[0]
        assert first == {"startPeriod": 0, "limit": 0.0}
        await asyncio.sleep(0.01)
        await publish_setpoints(rt_settings, gw, "cs-1.1", 0.0, 0.001)  # the release
        await until(lambda: len(cp.calls("SetChargingProfile")) == 2, what="baseline")
        baseline = cp.calls("SetChargingProfile")[1]["chargingProfile"]["chargingSchedule"][0]
        assert "duration" not in baseline
        assert baseline["chargingSchedulePeriod"][0]["limit"] == pytest.approx(11040.0)


async def test_a_rejected_profile_is_counted_and_not_retried(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings) as (gw, url), station(url, "cs-1", PASSWORD) as cp:
        cp.accept_profiles = False
        await cp.boot()
        await start_session(cp, evse=1, tx="tx-1", soc=0.5, power_w=11000.0, bpt=False)
        await until(lambda: "cs-1.1" in gw.by_vehicle, what="session")
        await publish_setpoints(rt_settings, gw, "cs-1.1", 3.0, 60.0)
        await until(lambda: gw.counts["profile_rejected"] == 1, what="rejection counted")
        await asyncio.sleep(1.5)  # a report loop and more: no retry of the same setpoint
        # Tried in W, then once in A (a station may take A only), and no more.
        units = [
            c["chargingProfile"]["chargingSchedule"][0]["chargingRateUnit"]
            for c in cp.calls("SetChargingProfile")
        ]
        assert units == ["W", "A"]


async def test_a_station_that_takes_only_amperes_gets_its_profiles_in_a(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with running_gateway(rt_settings) as (gw, url), station(url, "cs-1", PASSWORD) as cp:
        cp.accept_units = frozenset({"A"})
        await cp.boot()
        await start_session(cp, evse=1, tx="tx-1", soc=0.5, power_w=11000.0, bpt=False)
        await until(lambda: "cs-1.1" in gw.by_vehicle, what="session")
        await publish_setpoints(rt_settings, gw, "cs-1.1", 6.9, 60.0)
        await until(lambda: gw.counts["profile_accepted"] == 1, what="accepted in A")
        await asyncio.sleep(0.01)
        await publish_setpoints(rt_settings, gw, "cs-1.1", 3.45, 60.0)
        await until(lambda: gw.counts["profile_accepted"] == 2, what="second, straight in A")
        periods = [
            c["chargingProfile"]["chargingSchedule"][0] for c in cp.calls("SetChargingProfile")
        ]
        assert [p["chargingRateUnit"] for p in periods] == ["W", "A", "A"]
        assert periods[1]["chargingSchedulePeriod"][0]["limit"] == 10.0  # 6.9 kW / 690 V
        assert periods[2]["chargingSchedulePeriod"][0]["limit"] == 5.0
        assert gw.counts["profile_rejected"] == 0 and gw.units == {"cs-1": "A"}


@pytest.fixture
def server_cert(tmp_path: Any) -> tuple[Any, Any]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_security_profile_2_serves_wss_with_the_given_certificate(
    rt_settings: Settings, redis_keys: None, server_cert: tuple[Any, Any]
) -> None:
    import ssl

    from websockets.exceptions import InvalidHandshake

    from v2g.ocpp_gateway import tls_context

    cert, key = server_cert
    async with running_gateway(rt_settings, tls=tls_context(cert, key)) as (_, url):
        assert url.startswith("wss://")
        client = ssl.create_default_context(cafile=str(cert))
        ws = await connect(
            f"{url}/cs-1",
            subprotocols=["ocpp2.1"],  # type: ignore[list-item]
            additional_headers={"Authorization": basic("cs-1", PASSWORD)},
            ssl=client,
            open_timeout=5,
        )
        await ws.send('[2,"h1","Heartbeat",{}]')
        async with asyncio.timeout(5):
            assert json.loads(await ws.recv())[:2] == [3, "h1"]
        await ws.close()
        with pytest.raises((InvalidHandshake, OSError)):  # plain ws:// to a TLS port
            await connect(
                url.replace("wss://", "ws://") + "/cs-1", subprotocols=["ocpp2.1"], open_timeout=3
            )  # type: ignore[list-item]


async def test_a_station_that_reconnects_to_another_gateway_process_is_dropped_by_the_first(
    rt_settings: Settings, redis_keys: None
) -> None:
    async with (
        running_gateway(rt_settings, bridge_id="gw-a", owner_ttl_s=0.6) as (gw_a, url_a),
        running_gateway(rt_settings, bridge_id="gw-b", owner_ttl_s=0.6) as (gw_b, url_b),
        station(url_a, "cs-1", PASSWORD) as first,
    ):
        await first.boot()
        await start_session(first, evse=1, tx="tx-1", soc=0.5, power_w=7000.0)
        await until(
            lambda: gw_a.ownership is not None and "cs-1" in gw_a.ownership.claims,
            what="claimed by a",
        )
        # The station comes back through the other process while its old socket lingers.
        async with station(url_b, "cs-1", PASSWORD) as second:
            await start_session(second, evse=1, tx="tx-1", soc=0.5, power_w=7000.0)
            await until(
                lambda: "cs-1" not in gw_a.stations and not gw_a.sessions, what="process a let go"
            )
            assert gw_a.counts["stations_taken_over"] == 1
            assert gw_b.by_vehicle == {"cs-1.1": ("cs-1", 1)}
            assert gw_b.ownership is not None
            owner = await gw_b.ownership.owner("cs-1")
            assert owner is not None and owner.startswith("gw-b|")


async def test_the_commands_as_a_user_runs_them_provision_then_serve_a_station(
    settings: Settings, redis_keys: None, retained_cleanup: None, tmp_path: Any
) -> None:
    """`v2g provision station` then `v2g ocpp --metrics`, as processes of this venv's
    `v2g`."""
    import os
    import signal
    import urllib.request

    from tests.support.metrics import parse
    from tests.support.processes import VENV_BIN
    from tests.support.servers import free_port

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("V2G_")} | {
        "V2G_BROKER_URL": settings.broker_url,
        "V2G_REDIS_URL": settings.redis_url,
        "V2G_TOPIC_PREFIX": settings.topic_prefix,
        "V2G_REDIS_PREFIX": settings.redis_prefix,
        "V2G_LOG_FORMAT": "json",
    }
    v2g = str(VENV_BIN / "v2g")
    prov = await asyncio.create_subprocess_exec(
        v2g,
        "provision",
        "station",
        "cs-cli",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await prov.communicate()
    assert prov.returncode == 0, err
    password = out.decode().strip()
    assert len(password) >= 16 and b"provisioned" in err
    port, mport = free_port(), free_port()
    log = tmp_path / "ocpp.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            v2g, "ocpp", "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}",
            env=env, stdout=sink, stderr=sink,
        )  # fmt: skip

    def scrape() -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5.0) as r:
            return parse(r.read().decode())

    try:
        await until(lambda: b"ocpp_gateway_listening" in log.read_bytes(), 20, "listening")
        async with station(f"ws://127.0.0.1:{port}", "cs-cli", password, "2.0.1") as cp:
            assert (await cp.boot()).status == "Accepted"
            samples = await asyncio.to_thread(scrape)
            assert samples["v2g_ocpp_stations_connected"] == [({}, 1.0)]
        wrong = {"Authorization": basic("cs-cli", "not-the-password")}
        assert (
            await handshake_status(
                f"ws://127.0.0.1:{port}/cs-cli", headers=wrong, protocols=["ocpp2.0.1"]
            )
            == 401
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.wait()
    assert b'"process_stopped"' in log.read_bytes() and b"SIGTERM" in log.read_bytes()


async def test_twenty_stations_track_a_discharge_within_5_percent_in_three_steps(
    rt_settings: Settings, store: Any, test_id: str, retained_cleanup: None, figure: Any
) -> None:
    """12 OCPP 2.1 BPT, 4 OCPP 2.1 charge-only and 4 OCPP 2.0.1 stations, one EV each."""
    import aiomqtt

    from broker.models import DispatchRequest
    from chargers.profiles import negative_values

    kinds = ["bpt"] * 12 + ["v21"] * 4 + ["v201"] * 4
    names = tuple(f"cs-{i:02d}-{k}" for i, k in enumerate(kinds))
    async with (
        fleet_with_gateway(rt_settings, store, test_id, names) as (agg, gw, url),
        contextlib.AsyncExitStack() as stack,
    ):
        cps = {}
        for i, (n, k) in enumerate(zip(names, kinds, strict=True)):
            cp = await stack.enter_async_context(
                station(url, n, PASSWORD, "2.0.1" if k == "v201" else "2.1")
            )
            await cp.boot()
            await start_session(cp, evse=1, tx=f"tx-{i}", soc=0.5, power_w=11000.0, bpt=k == "bpt")
            cps[n] = cp
        await until(lambda: gw.summary()["can_discharge"] == 12, 10, "12 BPT sessions")
        await step_where(
            agg,
            lambda r: r.status.vehicles_plugged_in == 20 and r.status.available_discharge_kw > 130,
            "20 joined",
            10,
        )
        target = -60.0
        request = DispatchRequest(request_id=f"r20-{test_id}", power_kw=target, duration_s=120)
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"op20-{test_id}") as op:
            await op.publish(rt_settings.topics.dispatch_requests, request.to_json(), qos=1)
        t0 = time.monotonic()
        hit = await step_where(
            agg,
            lambda r: abs(r.status.power_kw - target) <= 0.05 * abs(target),
            "within 5% of -60 kW",
            3 * rt_settings.control_step_s + 3,
        )
        took = time.monotonic() - t0
        errors = []
        for _ in range(5):  # does it hold?
            r = await step_where(agg, lambda r: True, "a step", 5)
            errors.append(abs(r.status.power_kw - target) / abs(target))
        figure(
            "20 OCPP stations: time to track -60 kW within 5%",
            took,
            "s",
            limit="< 3 control steps + 3 s",
        )
        figure(
            "20 OCPP stations: worst tracking error over 5 steps",
            100 * max(errors),
            "%",
            limit="<= 5 %",
        )
        assert abs(hit.status.power_kw - target) <= 3.0
        assert max(errors) <= 0.05, errors
        for n, k in zip(names, kinds, strict=True):
            if k != "bpt":
                assert all(negative_values(p) == [] for p in cps[n].calls("SetChargingProfile"))


async def test_fcr_reaches_bpt_stations_as_a_local_frequency_curve_they_follow_with_no_round_trip(
    rt_settings: Settings, redis_keys: None
) -> None:
    """Simulated stations (real OCPP 2.1 / 2.0.1 over real websockets): a SetpointBatch
    with the FCR extension gives the BPT sessions a LocalFrequency curve, which they
    follow at their local frequency without another message; the 2.0.1 sessions get the
    central setpoint as a limit, never a negative value."""
    import aiomqtt
    import numpy as np

    from agents.ocpp_stations import build_stations
    from broker.models import SetpointBatch, from_epoch

    async with running_gateway(rt_settings, open_mode=True, provision=()) as (gw, url):
        stations = build_stations(url=url, count=4, clock=SimClock(speed=1.0),
                                  mix="v21bpt=1,v201=1", seed=3, telemetry_interval_s=1.0,
                                  station_prefix="fcr")  # fmt: skip
        n_bpt = int(stations.plan.bpt.sum())
        assert 0 < n_bpt < 4
        task = asyncio.create_task(stations.run(), name="fcr-stations")
        try:
            await until(
                lambda: (
                    len(gw.sessions) == 4
                    and sum(s.can_discharge for s in gw.sessions.values()) == n_bpt
                ),
                20,
                "four sessions, the BPT ones allowed to discharge",
            )
            rows = {s.vehicle_id: stations.by_id[k[0]].index for k, s in gw.sessions.items()}
            vids = sorted(rows)
            top = stations.fleet.bat.max_charge_kw[[rows[v] for v in vids]]
            base, share = 0.5 * top, 0.25 * top  # charging whatever the frequency

            async def publish(hz: float) -> None:
                now = time.time()
                act = {50.0: 0.0, 49.9: -(0.09 / 0.19)}[hz]
                batch = SetpointBatch.model_validate_json(
                    json.dumps({
                        "bridge_id": gw.bridge_id, "request_id": "r-fcr",
                        "issued_at": from_epoch(now).isoformat().replace("+00:00", "Z"),
                        "vehicle_id": vids, "power_kw": list(base + act * share),
                        "valid_until": [now + 60.0] * 4, "fcr": {"frequency_hz": hz},
                        "fcr_capacity_kw": list(share),
                    })
                )  # fmt: skip
                async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"sp-{gw.bridge_id}") as c:
                    topic = rt_settings.topics.bridge_setpoints(gw.bridge_id)
                    await c.publish(topic, batch.to_json(), qos=1)

            await publish(50.0)
            await until(lambda: stations.counts["profiles_applied"] == 4, 10, "profiles")
            assert gw.counts["profiles_local_frequency"] == n_bpt
            assert stations.counts["frequency_profiles"] == n_bpt
            bpt = np.array([bool(stations.plan.bpt[rows[v]]) for v in vids])
            idx = np.array([rows[v] for v in vids])
            f = stations.fleet

            async def holds(hz: float, act: float) -> None:
                stations.set_frequency(hz)
                want = base + act * share

                def ok() -> bool:
                    got = f.power[idx]
                    return bool(np.allclose(got[bpt], want[bpt], atol=0.01))

                await until(ok, 3, f"the BPT cars at {hz} Hz")

            before = stations.counts["profiles_received"]
            for hz, act in ((49.8, -1.0), (50.2, 1.0), (50.005, 0.0), (49.895, -0.5)):
                await holds(hz, act)
            assert stations.counts["profiles_received"] == before  # droop at the charger
            # The 2.0.1 stations hold the central limit and ignore the frequency.
            assert np.all(f.power[idx[~bpt]] <= base[~bpt] + 0.01)
            # A new signal with the same operating point: no call, the curve answers it.
            received = stations.counts["profiles_received"]
            await publish(49.9)
            await until(lambda: gw.counts["fcr_held_locally"] >= n_bpt, 5, "held locally")
            await asyncio.sleep(0.3)
            assert stations.counts["profiles_received"] == received + (4 - n_bpt)
            assert sum(stations.violations.values()) == 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_an_aggregator_fcr_request_reaches_the_bpt_stations_as_local_frequency(
    rt_settings: Settings, store: Any, test_id: str, retained_cleanup: None
) -> None:
    """The whole path (issue 13): a frequency_containment request to the aggregator fills
    the FCR extension of its batches to the gateway, whose BPT sessions get LocalFrequency
    and droop at the charger; the 2.0.1 sessions keep the central path, never negative."""
    import aiomqtt
    import numpy as np

    from agents.ocpp_stations import build_stations
    from broker.models import DispatchRequest, DispatchSignal, Service, from_epoch

    async with fleet_with_gateway(rt_settings, store, test_id, (), open_mode=True) as (
        agg,
        gw,
        url,
    ):
        stations = build_stations(url=url, count=4, clock=SimClock(speed=1.0),
                                  mix="v21bpt=1,v201=1", seed=3, telemetry_interval_s=1.0,
                                  station_prefix=f"ff-{test_id}")  # fmt: skip
        n_bpt = int(stations.plan.bpt.sum())
        assert 0 < n_bpt < 4
        task = asyncio.create_task(stations.run(), name="fcr-stations")
        try:
            await step_where(agg, lambda r: r.status.vehicles_plugged_in == 4, "4 joined", 20)
            rid = f"fcr-{test_id}"
            request = DispatchRequest(request_id=rid, service=Service.FREQUENCY_CONTAINMENT,
                                      capacity_kw=4.0, duration_s=120)  # fmt: skip
            async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"opf-{test_id}") as op:
                await op.publish(rt_settings.topics.dispatch_requests, request.to_json(), qos=1)
                await until(
                    lambda: stations.counts["frequency_profiles"] >= n_bpt,
                    10,
                    "LocalFrequency at the BPT stations",
                )
                held = agg.dispatcher.dispatches[rid].held_kw
                assert held == pytest.approx(4.0)
                wants = list(gw.want.values())
                shares = [w.fcr.capacity_kw for w in wants if w.fcr is not None]
                assert len(wants) == 4 and len(shares) == 4  # every car takes part
                assert sum(shares) == pytest.approx(held, abs=0.01 * 4)
                assert gw.counts["profiles_local_frequency"] >= n_bpt
                # A frequency sample, measured by the stations too: the aggregator's batch
                # says at which frequency it computed the setpoints.
                heard = gw.counts["setpoints"]
                stations.set_frequency(49.8)
                sample = DispatchSignal(frequency_hz=49.8, ts=from_epoch(time.time()))
                await op.publish(rt_settings.topics.dispatch_signal(rid), sample.to_json())
                await until(lambda: gw.counts["setpoints"] > heard, 5, "the signal's batch")
                bpt = {k for k, st in gw.sessions.items() if st.can_discharge}
                assert len(bpt) == n_bpt

                def power_of(k: tuple[str, int]) -> float:
                    return float(stations.fleet.power[stations.by_id[k[0]].index])

                def drooped() -> bool:
                    # Full activation below nominal: each BPT car at its operating point
                    # less its share, by its own curve (the gateway's rounding: 0.01 kW).
                    return all(
                        (w := gw.want[k]).fcr is not None
                        and abs(power_of(k) - (w.base_kw - w.fcr.capacity_kw)) <= 0.05
                        for k in bpt
                    )

                await until(drooped, 5, "the BPT cars drooped to full activation")
            assert all(w.fcr is not None for w in gw.want.values())
            for sid, st in stations.by_id.items():
                if not bool(stations.plan.bpt[st.index]):
                    assert stations.fleet.power[st.index] >= -1e-6, sid
            assert sum(stations.violations.values()) == 0
            assert np.isfinite(stations.fleet.power).all()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
