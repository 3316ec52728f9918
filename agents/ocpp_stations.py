"""Simulated bidirectional charging stations speaking OCPP-J to a CSMS.

Each station is a real websocket client (``websockets``) running the ``ocpp`` library's
charge-point side (``ocpp.v21.ChargePoint`` or ``ocpp.v201.ChargePoint``) on
``{url}/{station_id}``, with one EV behind it. The EVs are one :class:`SimFleet`: the
physics is advanced for all stations at once, never station by station.

What a station does, per connection:

* first connection (or after a reboot): BootNotification until Accepted, then
  StatusNotification; on a reconnect without a reboot: StatusNotification and, when a
  transaction runs, TransactionEvent Updated (with its idToken and a meter reading);
* at plug-in: TransactionEvent Started (idToken MacAddress or eMAID: the car's identity,
  the same at every station) and NotifyEVChargingNeeds; every telemetry interval:
  MeterValues; at departure: TransactionEvent Ended; Heartbeat when idle for the
  interval the CSMS gave;
* answers SetChargingProfile (TxProfile/TxDefaultProfile; CentralSetpoint, ChargingOnly,
  Idle, and LocalFrequency: a v2xFreqWattCurve on a v2xBaseline, followed at the local
  frequency (:meth:`OcppStations.set_frequency`) with no message to the CSMS; Absolute,
  Relative or Dynamic), UpdateDynamicSchedule (2.1),
  ClearChargingProfile, NotifyAllowedEnergyTransfer (2.1), TriggerMessage and
  Get/SetVariables, and applies the power to the physics within ``react_wall_s``.

Discharge is only carried out by a 2.1 station whose car has BPT and whose CSMS allowed a
BPT mode with NotifyAllowedEnergyTransfer. Any negative value sent to another station is
a violation: counted in :attr:`OcppStations.violations`, logged at error level, answered
Rejected, and never applied (the car cannot discharge; it holds 0 at most).
"""

from __future__ import annotations

import asyncio
import base64
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import numpy as np
import structlog
from numpy.typing import NDArray
from ocpp.exceptions import OCPPError
from ocpp.routing import on as _on
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v201 import ChargePoint as ChargePoint201
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from agents.fleet import SimFleet
from agents.ocpp_model import (
    BPT_MODES,
    MAX_CURVE_POINTS,
    SUBPROTOCOL,
    CarState,
    Order,
    ProfileRefused,
    ReadProfile,
    StationPlan,
    asks_discharge,
    assign_kinds,
    charging_needs,
    droop_power,
    has_negative,
    iso,
    parse_mix,
    period_order,
    plan_stations,
    plugged_at,
    read_profile,
    sampled_values,
    station_batteries,
)
from agents.profiles import generate_fleet
from broker.link import backoff_delays
from core.clock import Clock, raise_if_cancelled
from core.errors import AuthenticationError

VENDOR = "v2g-sim"
MODEL = "bpt-sim"
OUTBOX_MAX = 64  # a station offline for long keeps its transaction events, not more
NOMINAL_HZ = 50.0  # the grid frequency a station measures until told otherwise


_F = TypeVar("_F", bound=Callable[..., Any])


def on(action: str) -> Callable[[_F], _F]:
    """The ``ocpp`` library's ``@on`` with a type (the library ships none)."""
    return cast("Callable[[_F], _F]", _on(action))


class StationAuthError(AuthenticationError):
    """The CSMS refused the station's credentials (HTTP 401/403): retrying cannot help."""


@dataclass(eq=False)
class Station:
    """One station's connection and session state (its car is a row of the fleet)."""

    index: int
    station_id: str
    version: str
    bpt: bool
    token: tuple[str, str]
    booted: bool = False
    connected: bool = False
    given_up: str = ""
    heartbeat_s: float = 60.0
    tx_id: str | None = None
    tx_seq: int = 0
    tx_announced: bool = False
    tx_count: int = 0
    allowed: frozenset[str] = frozenset()
    profile: ReadProfile | None = None
    pending: list[Order] = field(default_factory=list)  # later periods of the profile
    meter_pending: bool = False
    connects: int = 0
    outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_MAX)
    )

    @property
    def subprotocol(self) -> str:
        return SUBPROTOCOL["v201" if self.version == "2.0.1" else "v21"]


class _Handlers:
    """The CALLs a station answers; shared by the 2.1 and 2.0.1 charge points."""

    runtime: OcppStations
    station: Station
    _call_result: Any

    async def _handle_call(self, msg: Any) -> Any:
        # Screen what may carry power before the library's schema check: a negative value
        # to a station that cannot discharge is a violation even in a malformed message.
        if msg.action in ("SetChargingProfile", "UpdateDynamicSchedule"):
            self.runtime.screen(self.station, msg.action, msg.payload)
        return await super()._handle_call(msg)  # type: ignore[misc]

    @on("SetChargingProfile")
    def on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **_: Any
    ) -> Any:
        status, reason = self.runtime.apply_profile(self.station, charging_profile)
        return self._call_result.SetChargingProfile(
            status=status, status_info={"reason_code": reason} if reason else None
        )

    @on("ClearChargingProfile")
    def on_clear_charging_profile(self, **_: Any) -> Any:
        cleared = self.runtime.clear_profile(self.station)
        return self._call_result.ClearChargingProfile(status="Accepted" if cleared else "Unknown")

    @on("TriggerMessage")
    def on_trigger_message(self, requested_message: str, **kw: Any) -> Any:
        status = self.runtime.trigger(self.station, requested_message, kw.get("custom_trigger"))
        return self._call_result.TriggerMessage(status=status)

    @on("GetVariables")
    def on_get_variables(self, get_variable_data: list[dict[str, Any]], **_: Any) -> Any:
        return self._call_result.GetVariables(
            get_variable_result=[
                self.runtime.get_variable(self.station, d) for d in get_variable_data
            ]
        )

    @on("SetVariables")
    def on_set_variables(self, set_variable_data: list[dict[str, Any]], **_: Any) -> Any:
        return self._call_result.SetVariables(
            set_variable_result=[
                self.runtime.set_variable(self.station, d) for d in set_variable_data
            ]
        )


class _Station201(_Handlers, ChargePoint201):  # type: ignore[misc]  # ocpp ships no types
    pass


class _Station21(_Handlers, ChargePoint21):  # type: ignore[misc]
    @on("NotifyAllowedEnergyTransfer")
    def on_notify_allowed_energy_transfer(
        self, allowed_energy_transfer: list[str], transaction_id: str, **_: Any
    ) -> Any:
        status = self.runtime.allow_transfer(self.station, allowed_energy_transfer, transaction_id)
        return self._call_result.NotifyAllowedEnergyTransfer(status=status)

    @on("UpdateDynamicSchedule")
    def on_update_dynamic_schedule(
        self, charging_profile_id: int, schedule_update: dict[str, Any], **_: Any
    ) -> Any:
        status, reason = self.runtime.update_dynamic(
            self.station, charging_profile_id, schedule_update
        )
        return self._call_result.UpdateDynamicSchedule(
            status=status, status_info={"reason_code": reason} if reason else None
        )


# What GetVariables can read (component, variable) -> value.
_READABLE: dict[tuple[str, str], Callable[[Station], str]] = {
    ("OCPPCommCtrlr", "HeartbeatInterval"): lambda st: str(int(st.heartbeat_s)),
    ("SmartChargingCtrlr", "Enabled"): lambda st: "true",
    ("V2XChargingCtrlr", "Enabled"): lambda st: "true" if st.bpt else "false",
}


@dataclass(slots=True)
class Droop:
    """The LocalFrequency curves of the stations, one row each (in force until ``until``;
    -inf: none), curves padded to MAX_CURVE_POINTS by repeating their last point."""

    base_kw: NDArray[np.float64]
    hz: NDArray[np.float64]
    kw: NDArray[np.float64]
    low_kw: NDArray[np.float64]
    high_kw: NDArray[np.float64]
    until: NDArray[np.float64]

    @classmethod
    def empty(cls, n: int) -> Droop:
        return cls(
            base_kw=np.zeros(n),
            hz=np.full((n, MAX_CURVE_POINTS), NOMINAL_HZ),
            kw=np.zeros((n, MAX_CURVE_POINTS)),
            low_kw=np.zeros(n),
            high_kw=np.zeros(n),
            until=np.full(n, -np.inf),
        )


class OcppStations:
    """N simulated stations with their cars, run against a CSMS until cancelled."""

    def __init__(
        self,
        *,
        url: str,
        fleet: SimFleet,
        plan: StationPlan,
        clock: Clock,
        telemetry_interval_s: float = 5.0,
        password: str | None = None,
        response_timeout_s: float = 30.0,
        open_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        react_wall_s: float = 0.05,
        validate: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """``password``: HTTP Basic (OCPP Security Profile 1), user = the station id.
        ``validate=False`` skips the ``ocpp`` library's JSON-schema checks of what the
        stations send and receive (a benchmark's reference; a real station checks).
        ``ssl_context``: for a ``wss://`` CSMS with its own CA (Security Profile 2);
        without it ``wss://`` uses the system's trust store."""
        if len(plan.station_ids) != len(fleet):
            raise ValueError(f"{len(plan.station_ids)} stations for {len(fleet)} cars")
        self.url = url.rstrip("/")
        self.fleet = fleet
        self.plan = plan
        self.clock = clock
        self.interval = telemetry_interval_s
        self.password = password
        self.response_timeout_s = response_timeout_s
        self.open_timeout_s = open_timeout_s
        self.reconnect = (reconnect_min_s, reconnect_max_s)
        self.react_wall_s = react_wall_s
        self.validate = validate
        self.ssl_context = ssl_context
        self.log = logger or structlog.get_logger("ocpp_stations")
        n = len(fleet)
        self.stations = [
            Station(
                index=i,
                station_id=plan.station_ids[i],
                version=plan.version(i),
                bpt=bool(plan.bpt[i]),
                token=plan.tokens[i],
            )
            for i in range(n)
        ]
        self.by_id = {s.station_id: s for s in self.stations}
        self.import_kwh = np.zeros(n)
        self.export_kwh = np.zeros(n)
        self.offline_since = np.full(n, np.nan)
        self.max_offline_s = np.full(n, np.inf)
        self.next_period_at = np.full(n, np.inf)  # when a station's next period starts
        self._was_plugged = np.zeros(n, dtype=bool)
        # LocalFrequency: the grid frequency every station measures (one grid), and the
        # curve each station in that mode holds (made at the first such profile).
        self.frequency_hz = NOMINAL_HZ
        self.droop: Droop | None = None
        self.violations: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._heard = asyncio.Event()

    # -- the physics, for all stations at once ------------------------------------------
    def advance(self, now: float) -> None:
        """Meter the power held since the last step, move the fleet to ``now``, drop
        profiles whose station was offline past their maxOfflineDuration, and open and
        close sessions at plug-in and departure."""
        f = self.fleet
        now = max(now, f.now)
        dt_h = (now - f.now) / 3600.0
        if dt_h > 0:
            self.import_kwh += np.maximum(f.power, 0.0) * dt_h
            self.export_kwh += np.maximum(-f.power, 0.0) * dt_h
        lapsed = (now - self.offline_since) > self.max_offline_s  # False while online (NaN)
        if lapsed.any():
            rows = np.flatnonzero(lapsed)
            f.setpoint_until[rows] = -np.inf
            f.cap_until[rows] = -np.inf
            self.max_offline_s[rows] = np.inf
            if self.droop is not None:
                self.droop.until[rows] = -np.inf
            self.counts["profiles_lapsed_offline"] += int(rows.size)
            self.log.warning("profiles_lapsed_offline", stations=int(rows.size))
        self._next_periods(now)
        self._follow_frequency(now)
        f.tick(now)
        plugged = f.plugged
        for i in np.flatnonzero(plugged & ~self._was_plugged).tolist():
            self._session_started(self.stations[i], now)
        for i in np.flatnonzero(~plugged & self._was_plugged).tolist():
            self._session_ended(self.stations[i], now)
        self._was_plugged = plugged.copy()

    def set_frequency(self, hz: float) -> None:
        """The grid frequency the stations measure from now on: a station in LocalFrequency
        follows it within ``react_wall_s``, with no message to or from the CSMS."""
        self.frequency_hz = float(hz)
        self._heard.set()

    def _follow_frequency(self, now: float) -> None:
        """Stations in LocalFrequency: hold their curve at the local frequency (one
        vectorised pass over those stations)."""
        d = self.droop
        if d is None:
            return
        rows = np.flatnonzero(d.until > now)
        if rows.size == 0:
            return
        power = droop_power(
            d.base_kw[rows], d.hz[rows], d.kw[rows], d.low_kw[rows], d.high_kw[rows],
            self.frequency_hz,
        )  # fmt: skip
        self.fleet.setpoint_kw[rows] = power
        self.fleet.setpoint_until[rows] = d.until[rows]

    def _next_periods(self, now: float) -> None:
        """Move the (few) stations whose next profile period is due to it."""
        for i in np.flatnonzero(self.next_period_at <= now).tolist():
            self._take_due(self.stations[i], now)

    def _take_due(self, st: Station, now: float) -> None:
        """Hold the latest period of ``st``'s profile that has started; note when the
        next one starts (inf: none)."""
        due = None
        while st.pending and st.pending[0].start <= now:
            due = st.pending.pop(0)
        if due is not None and due.until > now:
            self._hold(st, due)
        self.next_period_at[st.index] = st.pending[0].start if st.pending else np.inf

    def car(self, i: int) -> CarState:
        f = self.fleet
        b = f.bat
        return CarState(
            energy_kwh=float(f.energy[i]),
            capacity_kwh=float(b.capacity_kwh[i]),
            max_charge_kw=float(b.max_charge_kw[i]),
            max_discharge_kw=float(b.max_discharge_kw[i]),
            min_soc=float(b.min_soc[i]),
            target_soc=float(b.target_soc[i]),
            departure=float(f.departure[i]) if f.plugged[i] else math.nan,
        )

    def meter(self, i: int) -> list[dict[str, Any]]:
        f = self.fleet
        return [
            {
                "timestamp": iso(f.now),
                "sampled_value": sampled_values(
                    float(f.energy[i] / f.bat.capacity_kwh[i]),
                    float(f.power[i]),
                    float(self.import_kwh[i]),
                    float(self.export_kwh[i]),
                ),
            }
        ]

    # -- sessions -----------------------------------------------------------------------
    def _enqueue(self, st: Station, kind: str, data: dict[str, Any] | None = None) -> None:
        try:
            st.outbox.put_nowait((kind, data or {}))
        except asyncio.QueueFull:
            self.counts["outbox_full"] += 1
            self.log.warning("station_outbox_full", station=st.station_id, dropped=kind)

    def _session_started(self, st: Station, now: float) -> None:
        st.tx_count += 1
        st.tx_id = f"{st.station_id}-tx{st.tx_count}-{int(now)}"[:36]
        st.tx_seq = 0
        st.tx_announced = False
        st.allowed = frozenset()
        self._enqueue(st, "started", {"tx_id": st.tx_id, "offline": not st.connected})
        self._enqueue(st, "needs")

    def _session_ended(self, st: Station, now: float) -> None:
        if st.tx_id is None:
            return
        self._enqueue(
            st,
            "ended",
            {"tx_id": st.tx_id, "meter": self.meter(st.index), "offline": not st.connected},
        )
        st.tx_id = None
        st.profile = None
        st.pending = []
        self.next_period_at[st.index] = np.inf
        self.max_offline_s[st.index] = np.inf
        if self.droop is not None:  # the curve was the session's, not the next car's
            self.droop.until[st.index] = -np.inf

    # -- what the CSMS asks -----------------------------------------------------------
    def may_discharge(self, st: Station) -> bool:
        return st.bpt and bool(st.allowed & BPT_MODES)

    def _violation(self, st: Station, reason: str, what: Any) -> None:
        self.violations[reason] += 1
        self.log.error(
            "DISCHARGE_VIOLATION",
            station=st.station_id,
            version=st.version,
            bpt=st.bpt,
            allowed=",".join(sorted(st.allowed)),
            reason=reason,
            received=str(what)[:300],
        )

    def screen(self, st: Station, action: str, payload: Any) -> None:
        """Count a violation when a message to this station holds a negative setpoint,
        limit or discharge limit (any phase) and the station may not discharge."""
        if self.may_discharge(st) or not has_negative(payload):
            return
        reason = "discharge_to_non_bpt" if not st.bpt else "discharge_not_allowed"
        self._violation(st, reason, {"action": action, **payload})

    def apply_profile(self, st: Station, profile: dict[str, Any]) -> tuple[str, str | None]:
        """A SetChargingProfile: (status, reasonCode)."""
        self.counts["profiles_received"] += 1
        now = self.clock.now()
        try:
            read = read_profile(profile, now=now, volts_per_amp=self.plan.volts_per_amp(st.index))
        except ProfileRefused as err:
            self.counts["profiles_rejected"] += 1
            self.log.warning("profile_rejected", station=st.station_id, reason=str(err))
            return "Rejected", "UnsupportedRequest"
        if read.negative and not self.may_discharge(st):  # counted by screen()
            self.counts["profiles_rejected"] += 1
            return "Rejected", "NoDischarge"
        if st.tx_id is None and profile.get("charging_profile_purpose") == "TxProfile":
            self.counts["profiles_rejected"] += 1
            return "Rejected", "TxNotFound"
        st.profile = read
        st.pending = list(read.orders)
        self.max_offline_s[st.index] = read.max_offline_s if read.invalid_after_offline else np.inf
        f = self.fleet
        f.setpoint_until[st.index] = -np.inf
        f.cap_until[st.index] = -np.inf
        self._take_due(st, now)
        self.counts["profiles_applied"] += 1
        self._heard.set()
        return "Accepted", None

    def _hold(self, st: Station, order: Order) -> None:
        f = self.fleet
        if self.droop is not None:
            self.droop.until[st.index] = -np.inf
        if order.mode == "frequency":
            d = self.droop = self.droop or Droop.empty(len(self.stations))
            i, k = st.index, len(order.curve_hz)
            d.hz[i, :k], d.kw[i, :k] = order.curve_hz, order.curve_kw
            d.hz[i, k:], d.kw[i, k:] = order.curve_hz[-1], order.curve_kw[-1]
            d.base_kw[i] = order.power_kw
            # a station that may not discharge never does, whatever the curve says
            d.low_kw[i] = order.low_kw if self.may_discharge(st) else max(order.low_kw, 0.0)
            d.high_kw[i] = order.high_kw
            d.until[i] = order.until
            f.cap_until[i] = -np.inf
            self._follow_frequency(self.clock.now())
            self.counts["frequency_profiles"] += 1
        elif order.mode == "setpoint":
            f.cap_until[st.index] = -np.inf
            f.set_setpoint(st.index, order.power_kw, order.until)
        else:
            f.setpoint_until[st.index] = -np.inf
            f.set_cap(st.index, order.power_kw, order.until)

    def update_dynamic(
        self, st: Station, profile_id: int, update: dict[str, Any]
    ) -> tuple[str, str | None]:
        """An UpdateDynamicSchedule (2.1) for the Dynamic profile in force."""
        self.counts["updates_received"] += 1
        prof = st.profile
        if prof is None or prof.profile_id != profile_id or not prof.orders:
            return "Rejected", "UnknownProfile"
        if asks_discharge(update) and not self.may_discharge(st):  # counted by screen()
            return "Rejected", "NoDischarge"
        first = prof.orders[0]
        if first.mode == "frequency":  # a curve is not updated by a setpoint or a limit
            return "Rejected", "UnsupportedRequest"
        mode = "CentralSetpoint" if first.mode == "setpoint" else "ChargingOnly"
        try:
            order = period_order(
                {"operation_mode": mode, **update},
                w_per_unit=1.0,  # a Dynamic profile made here is in W (see docs)
                start=self.clock.now(),
                until=first.until,
            )
        except ProfileRefused:
            return "Rejected", "UnsupportedRequest"
        self._hold(st, order)
        self.counts["updates_applied"] += 1
        self._heard.set()
        return "Accepted", None

    def clear_profile(self, st: Station) -> bool:
        had = st.profile is not None
        st.profile = None
        st.pending = []
        self.next_period_at[st.index] = np.inf
        self.fleet.setpoint_until[st.index] = -np.inf
        self.fleet.cap_until[st.index] = -np.inf
        self.max_offline_s[st.index] = np.inf
        if self.droop is not None:
            self.droop.until[st.index] = -np.inf
        self._heard.set()
        return had

    def allow_transfer(self, st: Station, modes: list[str], transaction_id: str) -> str:
        """NotifyAllowedEnergyTransfer: Accepted when a mode the car offers is among them."""
        _, available = self.plan.modes(st.index)
        ok = frozenset(modes) & frozenset(available)
        if transaction_id != st.tx_id or not ok:
            return "Rejected"
        st.allowed = ok
        return "Accepted"

    def trigger(self, st: Station, message: str, custom: str | None) -> str:
        kinds = {
            "BootNotification": "boot",
            "Heartbeat": "heartbeat",
            "StatusNotification": "status",
            "MeterValues": "meter",
            "TransactionEvent": "updated",
        }
        kind = kinds.get(message)
        if message == "CustomTrigger" and custom == "NotifyEVChargingNeeds":
            kind = "needs"
        if kind is None:
            return "NotImplemented"
        if kind in ("updated", "needs") and st.tx_id is None:
            return "Rejected"
        self._enqueue(st, kind, {"trigger": True})
        return "Accepted"

    def get_variable(self, st: Station, data: dict[str, Any]) -> dict[str, Any]:
        component, variable = data["component"], data["variable"]
        key = (component["name"], variable["name"])
        value = _READABLE[key](st) if key in _READABLE else None
        out: dict[str, Any] = {
            "attribute_status": "Accepted" if value is not None else "UnknownVariable",
            "component": component,
            "variable": variable,
        }
        if value is not None:
            out["attribute_value"] = value
        return out

    def set_variable(self, st: Station, data: dict[str, Any]) -> dict[str, Any]:
        """SetVariables: only OCPPCommCtrlr.HeartbeatInterval (seconds > 0) is writable."""
        component, variable = data["component"], data["variable"]
        status = "Rejected"
        if (component["name"], variable["name"]) == ("OCPPCommCtrlr", "HeartbeatInterval"):
            try:
                seconds = float(data["attribute_value"])
            except ValueError:
                seconds = 0.0
            if math.isfinite(seconds) and seconds > 0:
                st.heartbeat_s = seconds
                status = "Accepted"
        elif (component["name"], variable["name"]) not in _READABLE:
            status = "UnknownVariable"
        return {"attribute_status": status, "component": component, "variable": variable}

    # -- the connections ----------------------------------------------------------------
    def _headers(self, st: Station) -> dict[str, str]:
        if self.password is None:
            return {}
        raw = f"{st.station_id}:{self.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    async def _station_loop(self, st: Station) -> None:
        """Connect, converse, and come back with capped, jittered backoff when dropped;
        give up on refused credentials (retrying would only hammer the CSMS)."""
        delays = backoff_delays(*self.reconnect)
        while True:
            started = time.monotonic()
            try:
                await self._connect_once(st)
            except StationAuthError as err:
                st.given_up = str(err)
                self.counts["auth_refused"] += 1
                self.log.error("station_auth_refused", station=st.station_id, error=str(err))
                return
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as err:
                self.log.info(
                    "station_disconnected", station=st.station_id, error=type(err).__name__
                )
            except Exception as err:  # a bug here must not take the other stations down
                self.counts["station_errors"] += 1
                self.log.exception("station_error", station=st.station_id, error=str(err)[:300])
            finally:
                if st.connected:
                    st.connected = False
                    self.offline_since[st.index] = self.clock.now()
                    self.counts["disconnects"] += 1
            raise_if_cancelled()
            if time.monotonic() - started > 30.0:
                delays = backoff_delays(*self.reconnect)  # it had been up: start over
            await asyncio.sleep(next(delays))

    async def _connect_once(self, st: Station) -> None:
        # ssl only when given: websockets refuses it for ws://, and for wss:// without it
        # uses the system's trust store.
        tls: dict[str, Any] = {} if self.ssl_context is None else {"ssl": self.ssl_context}
        try:
            ws = await connect(
                f"{self.url}/{st.station_id}",
                subprotocols=[Subprotocol(st.subprotocol)],
                additional_headers=self._headers(st),
                open_timeout=self.open_timeout_s,
                max_size=2**20,
                # No permessage-deflate: OCPP messages are small, and compressing each
                # costs more CPU than it saves on loopback or a LAN.
                compression=None,
                **tls,
            )
        except InvalidStatus as err:
            code = err.response.status_code
            if code in (401, 403):
                raise StationAuthError(f"HTTP {code} from {self.url}") from None
            raise
        async with ws:
            if ws.subprotocol != st.subprotocol:
                self.log.error(
                    "station_subprotocol_refused",
                    station=st.station_id,
                    asked=st.subprotocol,
                    got=ws.subprotocol,
                )
                raise ConnectionRefusedError(f"CSMS did not accept {st.subprotocol}")
            cls = _Station21 if st.version == "2.1" else _Station201
            cp = cls(st.station_id, ws, response_timeout=self.response_timeout_s)
            cp.runtime, cp.station = self, st
            if not self.validate:
                for route in cp.route_map.values():
                    route["_skip_schema_validation"] = True
            # Both halves are owned here: the first to end (a closed socket, a timeout)
            # ends the other, and its error is what happened to the connection. Not a
            # TaskGroup: its cancellation of this task would outlive the connection.
            recv = asyncio.create_task(cp.start(), name=f"ocpp-recv-{st.station_id}")
            send = asyncio.create_task(
                self._converse(st, cp, ws), name=f"ocpp-send-{st.station_id}"
            )
            try:
                done, _ = await asyncio.wait({recv, send}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                recv.cancel()
                send.cancel()
                await asyncio.gather(recv, send, return_exceptions=True)
            for task in done:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure

    async def _converse(self, st: Station, cp: Any, ws: ClientConnection) -> None:
        call = cp._call
        resumed = st.booted
        while not st.booted:
            res = await self._call(
                cp,
                call.BootNotification(
                    charging_station={"model": MODEL, "vendor_name": VENDOR},
                    reason="PowerUp",
                ),
                suppress=False,
            )
            st.heartbeat_s = float(res.interval) if res.interval > 0 else 60.0
            if res.status == "Accepted":
                st.booted = True
            else:
                await asyncio.sleep(st.heartbeat_s)
        st.connected = True
        st.connects += 1
        self.offline_since[st.index] = np.nan
        self.counts["connects"] += 1
        await self._send(st, cp, "status", {})
        if resumed and st.tx_id is not None and st.tx_announced:
            await self._send(st, cp, "updated", {"resumed": True})
        while True:
            # The ocpp library waits for answers with asyncio.wait_for, which on Python
            # 3.11 can swallow a cancellation that lands as the answer arrives: without
            # this the send half of a closed connection would wait on its outbox for ever.
            raise_if_cancelled()
            try:
                async with asyncio.timeout(st.heartbeat_s):
                    kind, data = await st.outbox.get()
            except TimeoutError:
                raise_if_cancelled()
                kind, data = "heartbeat", {}
            try:
                await self._send(st, cp, kind, data)
            except OCPPError as err:  # refused by the schema or answered with a CALLERROR
                self.counts[f"failed_{kind}"] += 1
                self.log.warning(
                    "station_message_failed", station=st.station_id, kind=kind, error=str(err)[:300]
                )

    async def _call(self, cp: Any, payload: Any, *, suppress: bool = True) -> Any:
        return await cp.call(payload, suppress=suppress, skip_schema_validation=not self.validate)

    async def _send(self, st: Station, cp: Any, kind: str, data: dict[str, Any]) -> None:
        """Send one message of ``kind``, built from the fleet's state now."""
        call = cp._call
        i = st.index
        now = self.clock.now()
        evse = {"id": 1, "connector_id": 1}
        plugged = bool(self.fleet.plugged[i])
        if kind == "boot":
            await self._call(
                cp,
                call.BootNotification(
                    charging_station={"model": MODEL, "vendor_name": VENDOR}, reason="Triggered"
                ),
            )
        elif kind == "heartbeat":
            await self._call(cp, call.Heartbeat())
        elif kind == "status":
            await self._call(
                cp,
                call.StatusNotification(
                    timestamp=iso(now),
                    connector_status="Occupied" if plugged else "Available",
                    evse_id=1,
                    connector_id=1,
                ),
            )
        elif kind == "meter":
            st.meter_pending = False
            if st.tx_id is None:
                return  # the session ended while the reading waited: nothing to meter
            await self._call(cp, call.MeterValues(evse_id=1, meter_value=self.meter(i)))
        elif kind == "needs":
            if st.tx_id is None:
                return
            await self._call(
                cp,
                call.NotifyEVChargingNeeds(
                    evse_id=1, charging_needs=charging_needs(self.plan, i, self.car(i))
                ),
            )
        elif kind in ("started", "updated", "ended"):
            tx_id = data.get("tx_id", st.tx_id)
            if tx_id is None:
                return
            seq = st.tx_seq
            st.tx_seq += 1
            reason = {
                "started": "Authorized",
                "updated": "Trigger" if data.get("trigger") else "MeterValuePeriodic",
                "ended": "EVDeparted",
            }[kind]
            info: dict[str, Any] = {"transaction_id": tx_id}
            if kind == "ended":
                info["stopped_reason"] = "EVDisconnected"
                info["charging_state"] = "Idle"
            else:
                info["charging_state"] = "Charging"
            token, token_type = st.token
            await self._call(
                cp,
                call.TransactionEvent(
                    event_type=kind.capitalize(),
                    timestamp=iso(now),
                    trigger_reason=reason,
                    seq_no=seq,
                    transaction_info=info,
                    evse=evse,
                    id_token=None if kind == "ended" else {"id_token": token, "type": token_type},
                    meter_value=data.get("meter") or self.meter(i),
                    offline=bool(data.get("offline", False)),
                ),
            )
            if kind == "started":
                st.tx_announced = True
        self.counts[f"sent_{kind}"] += 1

    # -- running ------------------------------------------------------------------------
    async def run(self) -> None:
        """Start every station and the physics; run until cancelled."""
        now = self.clock.now()
        self.fleet.tick(max(now, self.fleet.now))
        self._was_plugged = np.zeros(len(self.fleet), dtype=bool)
        self.advance(now)  # opens the sessions of the cars plugged in at the start
        self.log.info(
            "ocpp_stations_starting",
            url=self.url,
            stations=len(self.stations),
            v21_bpt=int(self.plan.bpt.sum()),
            v201=sum(s.version == "2.0.1" for s in self.stations),
            plugged=int(self.fleet.plugged.sum()),
        )
        async with asyncio.TaskGroup() as tg:
            for st in self.stations:
                tg.create_task(self._station_loop(st), name=f"station-{st.station_id}")
            tg.create_task(self._react_loop(), name="stations-react")
            await self._tick_loop()

    async def _react_loop(self) -> None:
        """Apply new profiles to the physics within ``react_wall_s``, as a charger does,
        one vectorised step per burst."""
        while True:
            await self._heard.wait()
            await asyncio.sleep(self.react_wall_s)
            self._heard.clear()
            self.advance(self.clock.now())

    async def _tick_loop(self) -> None:
        next_t = self.clock.now()
        while True:
            self.advance(self.clock.now())
            for st in self.stations:
                if st.connected and st.tx_id is not None and not st.meter_pending:
                    st.meter_pending = True
                    self._enqueue(st, "meter")
            raise_if_cancelled()
            next_t += self.interval
            now = self.clock.now()
            next_t = max(next_t, now)
            await self.clock.sleep(next_t - now)

    def summary(self) -> dict[str, int]:
        """Counts: stations connected, sessions, profiles, violations."""
        return {
            "stations": len(self.stations),
            "connected": sum(s.connected for s in self.stations),
            "in_session": sum(s.tx_id is not None for s in self.stations),
            "violations": sum(self.violations.values()),
            **dict(sorted(self.counts.items())),
        }


def build_stations(
    *,
    url: str,
    count: int,
    clock: Clock,
    seed: int = 1,
    mix: str = "",
    id_prefix: str = "ev",
    station_prefix: str = "cs",
    daily: bool = False,
    telemetry_interval_s: float = 5.0,
    **options: Any,
) -> OcppStations:
    """``count`` stations with their cars (seeded), kinds from ``mix`` (see
    :func:`agents.ocpp_model.parse_mix`). Every car is plugged in at the start unless
    ``daily``: then the cars come and go on their daily patterns (agents/profiles.py).
    ``options`` go to :class:`OcppStations`."""
    now = clock.now()
    profile = generate_fleet(count, seed, id_prefix=id_prefix)
    if not daily:
        profile = plugged_at(profile, now, seed)
    kinds = assign_kinds(count, parse_mix(mix), seed)
    plan = plan_stations(profile.ids, profile.batteries.max_charge_kw, kinds, prefix=station_prefix)
    profile = replace(profile, batteries=station_batteries(profile.batteries, plan.bpt))
    fleet = SimFleet(profile, now, step_s=telemetry_interval_s, warm_start=daily)
    return OcppStations(
        url=url,
        fleet=fleet,
        plan=plan,
        clock=clock,
        telemetry_interval_s=telemetry_interval_s,
        **options,
    )
