"""Charging stations for tests: the ocpp library's own ChargePoint classes (ocpp.v21,
ocpp.v201) over real websockets, recording every CALL the CSMS sends them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from ocpp.routing import after, on
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21 import call as call21
from ocpp.v21 import call_result as result21
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection, connect


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Recording:
    """What the CSMS called, raw (camelCase, as on the wire), and how to answer. With
    ``follow`` the EV does what each accepted profile says (a CentralSetpoint's setpoint,
    else its natural draw capped at the limit) and reports it at once in MeterValues."""

    received: list[tuple[str, dict[str, Any]]]
    accept_profiles: bool = True
    accept_bpt: bool = True
    accept_units: frozenset[str] = frozenset({"W", "A"})
    follow: bool = True
    natural_w: float = 11000.0
    soc: float | None = 0.5
    power_w: dict[int, float]

    def _takes(self, charging_profile: dict[str, Any]) -> bool:
        unit = charging_profile["charging_schedule"][0]["charging_rate_unit"]
        return self.accept_profiles and unit in self.accept_units

    def _followed(self, evse_id: int, charging_profile: dict[str, Any]) -> float:
        period = charging_profile["charging_schedule"][0]["charging_schedule_period"][0]
        if period.get("operation_mode") == "CentralSetpoint":
            return float(period["setpoint"])
        return min(float(period.get("limit", self.natural_w)), self.natural_w)

    def _record(self, raw: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            frame = json.loads(raw)
            if isinstance(frame, list) and frame and frame[0] == 2:
                self.received.append((frame[2], frame[3]))

    def calls(self, action: str) -> list[dict[str, Any]]:
        return [p for a, p in self.received if a == action]


class Station21(_Recording, ChargePoint21):  # type: ignore[misc]
    def __init__(self, station_id: str, connection: ClientConnection) -> None:
        super().__init__(station_id, connection, response_timeout=10)
        self.received = []
        self.power_w = {}

    async def route_message(self, raw_msg: str | bytes) -> None:
        self._record(raw_msg)
        await super().route_message(raw_msg)

    @on("SetChargingProfile")
    def _scp(self, charging_profile: dict[str, Any], **_: Any) -> result21.SetChargingProfile:
        return result21.SetChargingProfile(
            status="Accepted" if self._takes(charging_profile) else "Rejected"
        )

    @after("SetChargingProfile")
    async def _follow(self, evse_id: int, charging_profile: dict[str, Any], **_: Any) -> None:
        if self.follow and self._takes(charging_profile):
            self.power_w[evse_id] = self._followed(evse_id, charging_profile)
            await self.call(
                call21.MeterValues(
                    evse_id=evse_id, meter_value=meter(self.soc, self.power_w[evse_id])
                )
            )

    @on("NotifyAllowedEnergyTransfer")
    def _naet(self, **_: Any) -> result21.NotifyAllowedEnergyTransfer:
        return result21.NotifyAllowedEnergyTransfer(
            status="Accepted" if self.accept_bpt else "Rejected"
        )

    @on("TriggerMessage")
    def _trigger(self, **_: Any) -> result21.TriggerMessage:
        return result21.TriggerMessage(status="Accepted")

    async def boot(self) -> Any:
        return await self.call(
            call21.BootNotification(
                charging_station={"model": "test", "vendor_name": "v2g"}, reason="PowerUp"
            )
        )


class Station201(_Recording, ChargePoint201):  # type: ignore[misc]
    def __init__(self, station_id: str, connection: ClientConnection) -> None:
        super().__init__(station_id, connection, response_timeout=10)
        self.received = []
        self.power_w = {}

    async def route_message(self, raw_msg: str | bytes) -> None:
        self._record(raw_msg)
        await super().route_message(raw_msg)

    @on("SetChargingProfile")
    def _scp(self, charging_profile: dict[str, Any], **_: Any) -> result201.SetChargingProfile:
        return result201.SetChargingProfile(
            status="Accepted" if self._takes(charging_profile) else "Rejected"
        )

    @after("SetChargingProfile")
    async def _follow(self, evse_id: int, charging_profile: dict[str, Any], **_: Any) -> None:
        if self.follow and self._takes(charging_profile):
            self.power_w[evse_id] = self._followed(evse_id, charging_profile)
            await self.call(
                call201.MeterValues(evse_id=evse_id, meter_value=meter(None, self.power_w[evse_id]))
            )

    @on("TriggerMessage")
    def _trigger(self, **_: Any) -> result201.TriggerMessage:
        return result201.TriggerMessage(status="Accepted")

    async def boot(self) -> Any:
        return await self.call(
            call201.BootNotification(
                charging_station={"model": "test", "vendor_name": "v2g"}, reason="PowerUp"
            )
        )


Peer = Station21 | Station201


@contextlib.asynccontextmanager
async def station(
    url: str, station_id: str, password: str | None, version: str = "2.1"
) -> AsyncIterator[Any]:
    """A connected station running its receive loop; closed at the end."""
    headers = {"Authorization": basic(station_id, password)} if password is not None else {}
    ws = await connect(
        f"{url}/{station_id}",
        subprotocols=[f"ocpp{version}"],  # type: ignore[list-item]
        additional_headers=headers,
        open_timeout=5,
    )
    cp: Any = (Station21 if version == "2.1" else Station201)(station_id, ws)
    task = asyncio.create_task(cp.start(), name=f"peer-{station_id}")
    try:
        yield cp
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await ws.close()


def meter(soc: float | None, power_w: float) -> list[dict[str, Any]]:
    """One meter value (snake_case, for the library's call dataclasses)."""
    sampled: list[dict[str, Any]] = [
        {"value": power_w if power_w > 0 else 0.0, "measurand": "Power.Active.Import"},
        {"value": -power_w if power_w < 0 else 0.0, "measurand": "Power.Active.Export"},
    ]
    if soc is not None:
        sampled.append({"value": soc * 100.0, "measurand": "SoC"})
    return [{"timestamp": iso_now(), "sampled_value": sampled}]


async def start_session(
    cp: Any,
    *,
    evse: int,
    tx: str,
    soc: float | None,
    power_w: float,
    id_token: dict[str, str] | None = None,
    bpt: bool = True,
) -> None:
    """A transaction and the EV's charging needs, as a station sends them."""
    v21 = isinstance(cp, Station21)
    call = call21 if v21 else call201
    await cp.call(
        call.TransactionEvent(
            event_type="Started",
            seq_no=0,
            timestamp=iso_now(),
            trigger_reason="CablePluggedIn",
            transaction_info={"transaction_id": tx, "charging_state": "EVConnected"},
            evse={"id": evse, "connector_id": 1},
            id_token=id_token,
            meter_value=meter(soc, power_w),
        )
    )
    if v21:
        needs: dict[str, Any] = {
            "requested_energy_transfer": "AC_BPT" if bpt else "AC_three_phase",
            "available_energy_transfer": ["AC_three_phase", "AC_BPT"]
            if bpt
            else ["AC_three_phase"],
            "departure_time": datetime.fromtimestamp(
                datetime.now(UTC).timestamp() + 8 * 3600, UTC
            ).isoformat(),
            "v2x_charging_parameters": {
                "max_charge_power": 11000.0,
                "max_discharge_power": 11000.0 if bpt else 0.0,
                "ev_min_v2x_energy_request": -20000.0,
                "target_soc": 80,
                "ev_target_energy_request": 12000.0,
            },
            "dc_charging_parameters": {
                "ev_max_current": 32,
                "ev_max_voltage": 400,
                "ev_energy_capacity": 60000,
            },
        }
    else:
        needs = {
            "requested_energy_transfer": "AC_three_phase",
            "ac_charging_parameters": {
                "energy_amount": 15000,
                "ev_min_current": 6,
                "ev_max_current": 16,
                "ev_max_voltage": 230,
            },
        }
    await cp.call(call.NotifyEVChargingNeeds(evse_id=evse, charging_needs=needs))
