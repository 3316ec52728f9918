"""Simulated OCPP stations against a CSMS over real loopback websockets.

The CSMS is tests/support/ocpp_csms.py: the ``ocpp`` library's own CSMS-side
ChargePoint on ``websockets.serve``; the stations are agents/ocpp_stations.py. Nothing
is mocked. Every wait is bounded; every station and server is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ocpp.exceptions import OCPPError
from ocpp.v201 import call as call201

from agents.ocpp_stations import OcppStations, Station, build_stations
from core.clock import SimClock
from core.physics import feasible_range
from tests.support.ocpp_csms import MiniCsms, running
from v2g.provision import make_certs

pytestmark = pytest.mark.timeout(60)

MIX = "v21bpt=0.5,v21=0.25,v201=0.25"
Factory = Callable[..., AbstractAsyncContextManager[tuple[MiniCsms, OcppStations]]]


@pytest.fixture
def ocpp() -> Factory:
    @asynccontextmanager
    async def start(
        count: int = 8,
        *,
        mix: str = MIX,
        csms_password: str | None = None,
        password: str | None = None,
        speed: float = 1.0,
        **options: Any,
    ) -> AsyncIterator[tuple[MiniCsms, OcppStations]]:
        async with MiniCsms(password=csms_password) as csms:
            stations = build_stations(
                url=csms.url,
                count=count,
                clock=SimClock(speed=speed),
                mix=mix,
                seed=4,
                telemetry_interval_s=0.25 * speed,
                password=password,
                **options,
            )
            async with running(stations.run()):
                yield csms, stations

    return start


async def _sessions_open(csms: MiniCsms, stations: OcppStations) -> None:
    await csms.wait_for(
        lambda: all(csms.seen[s.station_id].of("NotifyEVChargingNeeds") for s in stations.stations)
    )


def _first(stations: OcppStations, kind: str) -> list[Station]:
    want = {"v21bpt": (True, "2.1"), "v21": (False, "2.1"), "v201": (False, "2.0.1")}[kind]
    return [s for s in stations.stations if (s.bpt, s.version) == want]


def _feasible(stations: OcppStations, window_s: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    f = stations.fleet
    return feasible_range(f.bat, f.energy, f.departure, f.now, window_s)


async def test_stations_boot_and_open_sessions_with_the_needs_of_their_version(
    ocpp: Factory,
) -> None:
    async with ocpp() as (csms, stations):
        await _sessions_open(csms, stations)
        for st in stations.stations:
            actions = [a for a, _ in csms.seen[st.station_id].messages]
            assert actions[:4] == [
                "BootNotification",
                "StatusNotification",
                "TransactionEvent",
                "NotifyEVChargingNeeds",
            ]
            assert csms.points[st.station_id]._ocpp_version == st.version
            started = csms.seen[st.station_id].of("TransactionEvent")[0]
            assert started["event_type"] == "Started"
            token = started["id_token"]
            assert (token["id_token"], token["type"]) == st.token
            assert token["type"] in ("MacAddress", "eMAID")
            assert csms.last(st.station_id, "StatusNotification")["connector_status"] == (
                "Occupied"
            )
            needs = csms.last(st.station_id, "NotifyEVChargingNeeds")["charging_needs"]
            car = stations.car(st.index)
            if st.version == "2.0.1":
                assert "v2x_charging_parameters" not in needs
                assert {"ac_charging_parameters", "dc_charging_parameters"} & set(needs)
                continue
            v2x = needs["v2x_charging_parameters"]
            assert v2x["max_charge_power"] == pytest.approx(car.max_charge_kw * 1000)
            assert v2x["target_soc"] == round(car.target_soc * 100)
            for key in ("ev_min_v2x_energy_request", "ev_target_energy_request",
                        "ev_max_energy_request"):  # fmt: skip
                assert key in v2x
            assert "departure_time" in needs
            bpt = {"AC_BPT", "DC_BPT"} & set(needs["available_energy_transfer"])
            assert bool(bpt) == st.bpt
            assert (v2x["max_discharge_power"] > 0) == st.bpt
        # Meter values flow every telemetry interval.
        st = stations.stations[0]
        await csms.wait_for(lambda: len(csms.seen[st.station_id].of("MeterValues")) >= 2)
        measurands = {
            v["measurand"]
            for v in csms.last(st.station_id, "MeterValues")["meter_value"][0]["sampled_value"]
        }
        assert {"SoC", "Power.Active.Import", "Power.Active.Export",
                "Energy.Active.Import.Register"} <= measurands  # fmt: skip
        assert sum(stations.violations.values()) == 0


async def test_a_central_setpoint_discharges_at_its_rate(ocpp: Factory) -> None:
    async with ocpp(count=12, mix="v21bpt=1") as (csms, stations):
        await _sessions_open(csms, stations)
        p_lo, _ = _feasible(stations)
        i = int(np.argmin(p_lo))
        assert p_lo[i] < -2.0, "no car of the seed can discharge: pick another seed"
        kw = -min(5.0, -float(p_lo[i]) / 2)
        sid = stations.stations[i].station_id
        assert (await csms.allow(sid, ["AC_BPT", "DC_BPT"])).status == "Accepted"
        prof = csms.profile(sid, setpoint_w=kw * 1000, mode="CentralSetpoint", limit_w=11000,
                            discharge_limit_w=-11000)  # fmt: skip
        assert (await csms.set_profile(sid, prof)).status == "Accepted"
        f = stations.fleet
        await csms.wait_for(lambda: f.power[i] == pytest.approx(kw), timeout=2.0)
        t0, e0 = f.now, float(f.energy[i])
        await asyncio.sleep(1.0)
        stations.advance(stations.clock.now())
        rate_kw = (float(f.energy[i]) - e0) / ((f.now - t0) / 3600.0)
        assert rate_kw == pytest.approx(kw / f.bat.discharge_efficiency[i], rel=1e-6)
        # ... and the meter says so: export, no import.
        await csms.wait_for(
            lambda: _meter(csms, sid).get("Power.Active.Export") == pytest.approx(-kw * 1000)
        )
        assert _meter(csms, sid)["Power.Active.Import"] == 0.0
        assert sum(stations.violations.values()) == 0


def _meter(csms: MiniCsms, sid: str) -> dict[str, float]:
    last = csms.last(sid, "MeterValues")
    if last is None:
        return {}
    return {v["measurand"]: v["value"] for v in last["meter_value"][0]["sampled_value"]}


async def test_a_charging_only_limit_caps_charging(ocpp: Factory) -> None:
    async with ocpp(count=8, mix="v201=1") as (csms, stations):
        await _sessions_open(csms, stations)
        f = stations.fleet
        p_lo, _ = _feasible(stations)
        # A car charging flat out that is not bound to (its floor would overrule a cap).
        i = int(np.argmax(np.where(p_lo < 1.0, f.power, -np.inf)))
        assert f.power[i] > 3.0
        sid = stations.stations[i].station_id
        assert (await csms.set_profile(sid, csms.profile(sid, limit_w=2000))).status == "Accepted"
        await csms.wait_for(lambda: f.power[i] == pytest.approx(2.0), timeout=2.0)
        t0, e0 = f.now, float(f.energy[i])
        await asyncio.sleep(0.5)
        stations.advance(stations.clock.now())
        rate_kw = (float(f.energy[i]) - e0) / ((f.now - t0) / 3600.0)
        assert rate_kw == pytest.approx(2.0 * f.bat.charge_efficiency[i], rel=1e-6)
        # Clearing the profile puts the car back on its baseline (full power).
        assert (await csms.clear_profile(sid)).status == "Accepted"
        await csms.wait_for(lambda: f.power[i] > 3.0, timeout=2.0)


async def test_a_negative_value_to_a_station_that_cannot_discharge_is_a_violation(
    ocpp: Factory,
) -> None:
    async with ocpp(count=8) as (csms, stations):
        await _sessions_open(csms, stations)
        f = stations.fleet
        non_bpt = _first(stations, "v21")[0]
        old = _first(stations, "v201")[0]
        bpt = _first(stations, "v21bpt")[0]
        # A 2.1 car without BPT: a negative setpoint; refused by NotifyAllowedEnergyTransfer.
        assert (await csms.allow(non_bpt.station_id, ["AC_BPT", "DC_BPT"])).status == "Rejected"
        prof = csms.profile(non_bpt.station_id, setpoint_w=-3000, mode="CentralSetpoint")
        res = await csms.set_profile(non_bpt.station_id, prof)
        assert res.status == "Rejected"
        # A 2.0.1 station: a negative limit.
        res = await csms.set_profile(old.station_id, csms.profile(old.station_id, limit_w=-3000))
        assert res.status == "Rejected"
        # A BPT car before the CSMS allowed a BPT mode.
        prof = csms.profile(bpt.station_id, setpoint_w=-3000, mode="CentralSetpoint")
        assert (await csms.set_profile(bpt.station_id, prof)).status == "Rejected"
        # A 2.0.1 station sent a 2.1 setpoint: malformed for it (the library answers
        # FormatViolation), and still a violation.
        prof = csms.profile(old.station_id, setpoint_w=-3000, mode="CentralSetpoint")
        with pytest.raises(OCPPError):
            await csms.points[old.station_id].call(
                call201.SetChargingProfile(evse_id=1, charging_profile=prof),
                suppress=False,
                skip_schema_validation=True,
            )
        assert stations.violations == {"discharge_to_non_bpt": 3, "discharge_not_allowed": 1}
        await asyncio.sleep(0.2)
        stations.advance(stations.clock.now())
        for st in (non_bpt, old, bpt):
            assert f.power[st.index] >= 0.0


async def test_a_dropped_station_comes_back_without_booting_and_keeps_its_profile(
    ocpp: Factory,
) -> None:
    async with ocpp(count=4, mix="v21bpt=1", reconnect_min_s=0.2, reconnect_max_s=1.0) as (
        csms,
        stations,
    ):
        await _sessions_open(csms, stations)
        st = stations.stations[0]
        sid = st.station_id
        assert (await csms.allow(sid, ["AC_BPT", "DC_BPT"])).status == "Accepted"
        prof = csms.profile(sid, setpoint_w=1234, mode="CentralSetpoint")
        assert (await csms.set_profile(sid, prof)).status == "Accepted"
        tx = csms.transaction_id(sid)
        seen_before = len(csms.seen[sid].messages)
        first_socket = csms.sockets[sid]
        await csms.drop(sid)
        await csms.wait_for(
            lambda: (
                csms.sockets.get(sid) not in (None, first_socket)
                and any(a == "TransactionEvent" for a, _ in csms.seen[sid].messages[seen_before:])
            ),
            timeout=10.0,
        )
        after = csms.seen[sid].messages[seen_before:]
        actions = [a for a, _ in after]
        assert "BootNotification" not in actions
        assert actions.index("StatusNotification") < actions.index("TransactionEvent")
        resumed = next(p for a, p in after if a == "TransactionEvent")
        assert resumed["event_type"] == "Updated"
        assert resumed["transaction_info"]["transaction_id"] == tx
        assert (resumed["id_token"]["id_token"], resumed["id_token"]["type"]) == st.token
        assert stations.fleet.power[st.index] == pytest.approx(1.234)
        assert stations.counts["disconnects"] == 1
        # The CSMS asks for the rest: the station answers a TriggerMessage.
        n_needs = len(csms.seen[sid].of("NotifyEVChargingNeeds"))
        res = await csms.trigger(sid, "CustomTrigger", "NotifyEVChargingNeeds")
        assert res.status == "Accepted"
        await csms.wait_for(lambda: len(csms.seen[sid].of("NotifyEVChargingNeeds")) > n_needs)


async def test_a_profile_lapses_when_the_station_stays_offline_past_its_limit(
    ocpp: Factory,
) -> None:
    async with ocpp(count=4, mix="v21bpt=1", reconnect_min_s=3.0, reconnect_max_s=3.0) as (
        csms,
        stations,
    ):
        await _sessions_open(csms, stations)
        p_lo, _ = _feasible(stations)
        i = int(np.argmin(p_lo))
        assert p_lo[i] < -1.0
        sid = stations.stations[i].station_id
        await csms.allow(sid, ["AC_BPT", "DC_BPT"])
        prof = csms.profile(sid, setpoint_w=-1000, mode="CentralSetpoint", max_offline_s=1)
        assert (await csms.set_profile(sid, prof)).status == "Accepted"
        f = stations.fleet
        await csms.wait_for(lambda: f.power[i] == pytest.approx(-1.0), timeout=2.0)
        await csms.drop(sid)
        # Offline for more than maxOfflineDuration: no more discharge, on its own.
        await csms.wait_for(lambda: f.power[i] >= 0.0, timeout=2.5)
        assert stations.counts["profiles_lapsed_offline"] == 1


async def test_wrong_credentials_are_refused_and_not_retried(ocpp: Factory) -> None:
    async with ocpp(count=2, csms_password="right", password="wrong") as (csms, stations):
        await csms.wait_for(lambda: all(s.given_up for s in stations.stations), timeout=10.0)
        assert stations.counts["auth_refused"] == 2
        assert sorted(code for _, code in csms.refused) == [401, 401]
        assert not any(csms.seen[s.station_id].messages for s in stations.stations)
    async with ocpp(count=2, csms_password="right", password="right") as (csms, stations):
        await _sessions_open(csms, stations)


async def test_a_dynamic_profile_follows_its_updates(ocpp: Factory) -> None:
    async with ocpp(count=6, mix="v21bpt=1") as (csms, stations):
        await _sessions_open(csms, stations)
        p_lo, _ = _feasible(stations)
        i = int(np.argmin(p_lo))
        assert p_lo[i] < -1.0
        sid = stations.stations[i].station_id
        await csms.allow(sid, ["AC_BPT", "DC_BPT"])
        prof = csms.profile(sid, setpoint_w=500, mode="CentralSetpoint", kind="Dynamic")
        assert (await csms.set_profile(sid, prof)).status == "Accepted"
        res = await csms.update_dynamic(sid, prof["id"], setpoint=-1000.0)
        assert res.status == "Accepted"
        f = stations.fleet
        await csms.wait_for(lambda: f.power[i] == pytest.approx(-1.0), timeout=2.0)
        assert (await csms.update_dynamic(sid, prof["id"] + 99, setpoint=0.0)).status == (
            "Rejected"
        )


async def test_a_session_ends_at_departure(ocpp: Factory) -> None:
    # An hour a wall second: the first car leaves within a few seconds.
    async with ocpp(count=6, mix="v21bpt=1", speed=3600.0) as (csms, stations):
        await _sessions_open(csms, stations)
        await csms.wait_for(
            lambda: any(
                e["event_type"] == "Ended"
                for s in stations.stations
                for e in csms.seen[s.station_id].of("TransactionEvent")
            ),
            timeout=30.0,
        )
        ended = [
            (s, e)
            for s in stations.stations
            for e in csms.seen[s.station_id].of("TransactionEvent")
            if e["event_type"] == "Ended"
        ]
        st, event = ended[0]
        assert event["transaction_info"]["stopped_reason"] == "EVDisconnected"
        assert not stations.fleet.plugged[st.index]


@pytest.mark.timeout(120)
async def test_the_command_runs_the_mix_against_a_csms(tmp_path: Path) -> None:
    """``v2g agents --protocol ocpp`` as a user runs it, stopped with SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("V2G_")}
    env |= {"V2G_OCPP_PASSWORD": "s3cret", "V2G_TELEMETRY_INTERVAL_S": "0.5",
            "V2G_LOG_FORMAT": "json"}  # fmt: skip
    log = tmp_path / "agents.log"
    async with MiniCsms(password="s3cret") as csms:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "v2g"), "agents", "--protocol", "ocpp",
                "--url", csms.url, "--count", "10", "--mix", "v21bpt=0.6,v21=0.2,v201=0.2",
                env=env, stdout=out, stderr=out,
            )  # fmt: skip
        try:
            ids = [f"cs-{i:04d}" for i in range(10)]
            await csms.wait_for(
                lambda: all(csms.seen[s].of("MeterValues") for s in ids), timeout=60.0
            )
            versions = sorted(csms.points[s]._ocpp_version for s in ids)
            assert versions == ["2.0.1"] * 2 + ["2.1"] * 8
            bpt = sum(
                "AC_BPT" in n or "DC_BPT" in n
                for s in ids
                for n in [str(csms.last(s, "NotifyEVChargingNeeds"))]
            )
            assert bpt == 6
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15.0):
                code = await proc.wait()
    assert code == 0, log.read_text()[-2000:]
    assert "process_stopped" in log.read_text()


async def test_stations_connect_over_tls_with_the_csms_ca(tmp_path: Path) -> None:
    """Security Profile 2: wss:// to a CSMS whose certificate a throwaway CA signed."""
    certs = make_certs(tmp_path / "certs", [])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs.server.cert_file, certs.server.key_file)
    client = ssl.create_default_context(cafile=str(certs.ca_file))
    async with MiniCsms(ssl_context=server, password="pw") as csms:
        assert csms.url.startswith("wss://")
        stations = build_stations(
            url=csms.url, count=3, clock=SimClock(), mix=MIX, seed=4, password="pw",
            ssl_context=client, telemetry_interval_s=0.25,
        )  # fmt: skip
        async with running(stations.run()):
            await _sessions_open(csms, stations)
        assert stations.counts["connects"] == 3
