"""From OCPP messages to a vehicle of the fleet: pure, no I/O (DESIGN.md, "Extension: OCPP").

One EVSE with an EV session is one vehicle. Its state is an :class:`EvseSession`, updated
by the station's messages (``NotifyEVChargingNeeds``, meter values in ``MeterValues`` or
``TransactionEvent``) and read out as the fields of the platform's ``Telemetry``.
Payloads are the OCPP JSON as sent (camelCase), already validated against the schema.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.models import MAX_CAPACITY_KWH, MAX_VEHICLE_KW
from broker.topics import ID_PATTERN

Json = Mapping[str, Any]

_ID_RE = re.compile(ID_PATTERN)
# Energy transfer modes that can discharge (OCPP 2.1 EnergyTransferModeEnumType).
BPT_MODES = frozenset({"AC_BPT", "AC_BPT_DER", "DC_BPT", "DC_ACDP_BPT"})


@dataclass(frozen=True, slots=True)
class Assumptions:
    """What the gateway assumes when a station does not say (documented in DESIGN.md)."""

    capacity_kwh: float = 60.0  # a mid-size EV battery: 2.0.1 AC carries no capacity
    soc: float = 0.5  # AC sessions without an SoC measurand and no capacity hints
    target_soc: float = 1.0  # no target: a charger's own default is to fill the battery
    max_charge_kw: float = 11.0  # 16 A three-phase, the common AC wallbox
    efficiency: float = 0.95  # charge and discharge, each way
    ac_phases: int = 3  # AC charging parameters give the per-phase current and voltage


def vehicle_id_of(station_id: str, evse_id: int, id_token: Json | None) -> str:
    """The vehicle's id: its idToken when that names the car (MacAddress: lower-case hex
    without separators; eMAID: upper case without dashes), so a car keeps its identity
    from station to station; else ``{station_id}.{evse_id}``."""
    if id_token:
        kind, token = id_token.get("type"), str(id_token.get("idToken", ""))
        vid = None
        if kind == "MacAddress":
            vid = re.sub(r"[^0-9a-fA-F]", "", token).lower()
        elif kind == "eMAID":
            vid = token.replace("-", "").upper()
        if vid and _ID_RE.fullmatch(vid):
            return vid
    return f"{station_id}.{evse_id}"


def epoch_of(text: str) -> float | None:
    """Epoch seconds of an OCPP date-time (RFC 3339), None if it cannot be read."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return None if moment.tzinfo is None else moment.timestamp()


@dataclass(slots=True)
class EvseSession:
    """One EVSE's EV session, as the gateway knows it. Energies in kWh, powers in kW."""

    station_id: str
    evse_id: int
    version: str  # "2.1" or "2.0.1"
    vehicle_id: str
    transaction_id: str | None = None
    plugged: bool = True
    soc: float | None = None
    capacity_kwh: float | None = None
    capacity_source: str = "assumed"
    power_kw: float = 0.0
    ev_max_charge_kw: float | None = None
    ev_max_discharge_kw: float = 0.0
    floor_kwh: float | None = None  # the V2X floor as an energy level
    target_soc: float | None = None
    departure: float | None = None
    bpt_modes: tuple[str, ...] = ()
    bpt_allowed: bool = False  # the station answered Accepted to NotifyAllowedEnergyTransfer
    bpt_asked: bool = False
    import_wh: float | None = None  # the latest Energy.Active.Import.Register
    export_wh: float | None = None
    seq: int = 0
    saw_soc: bool = False
    phases: int = 3  # AC phases in use (for limits in A at the nominal voltage)

    @property
    def can_discharge(self) -> bool:
        """OCPP 2.1, an EV offering a BPT mode, and the station accepted it."""
        return self.version == "2.1" and bool(self.bpt_modes) and self.bpt_allowed

    def energy_kwh(self, a: Assumptions) -> float:
        return self.soc_or(a) * self.capacity_or(a)

    def soc_or(self, a: Assumptions) -> float:
        return a.soc if self.soc is None else self.soc

    def capacity_or(self, a: Assumptions) -> float:
        return a.capacity_kwh if self.capacity_kwh is None else self.capacity_kwh


def apply_charging_needs(s: EvseSession, needs: Json, a: Assumptions) -> None:
    """Fold ``chargingNeeds`` of NotifyEVChargingNeeds (2.1 or 2.0.1) into the session."""
    if (dep := needs.get("departureTime")) is not None:
        s.departure = epoch_of(str(dep))
    modes = [str(m) for m in needs.get("availableEnergyTransfer") or []]
    modes.append(str(needs.get("requestedEnergyTransfer", "")))
    s.bpt_modes = tuple(sorted({m for m in modes if m in BPT_MODES}))
    requested = str(needs.get("requestedEnergyTransfer", ""))
    s.phases = {"AC_single_phase": 1, "AC_two_phase": 2}.get(requested, a.ac_phases)
    dc = needs.get("dcChargingParameters") or {}
    ac = needs.get("acChargingParameters") or {}
    v2x = needs.get("v2xChargingParameters") or {}
    if dc.get("stateOfCharge") is not None:
        s.soc = _fraction(dc["stateOfCharge"] / 100.0)
    if dc.get("evEnergyCapacity"):
        s.capacity_kwh, s.capacity_source = _capacity(dc["evEnergyCapacity"] / 1000.0), "ev"
    # Power limits: V2X parameters first (W), then DC, then AC (A x V x phases).
    if v2x.get("maxChargePower") is not None:
        s.ev_max_charge_kw = _power(v2x["maxChargePower"] / 1000.0)
    elif dc.get("evMaxPower") is not None:
        s.ev_max_charge_kw = _power(dc["evMaxPower"] / 1000.0)
    elif dc:
        s.ev_max_charge_kw = _power(dc["evMaxCurrent"] * dc["evMaxVoltage"] / 1000.0)
    elif ac:
        s.ev_max_charge_kw = _power(ac["evMaxCurrent"] * ac["evMaxVoltage"] * a.ac_phases / 1000.0)
    s.ev_max_discharge_kw = (
        _power(abs(v2x["maxDischargePower"]) / 1000.0)
        if v2x.get("maxDischargePower") is not None
        else 0.0
    )
    soc = s.soc
    # Capacity from what the EV asks, when it said no capacity: the energy to its target
    # (or to full) over the SoC still missing to get there.
    if s.capacity_source != "ev" and soc is not None:
        if v2x.get("targetSoC") is not None and v2x.get("evTargetEnergyRequest") is not None:
            gap = v2x["targetSoC"] / 100.0 - soc
            if gap > 0.05:
                s.capacity_kwh = _capacity(v2x["evTargetEnergyRequest"] / 1000.0 / gap)
                s.capacity_source = "derived"
        elif v2x.get("evMaxEnergyRequest") is not None and soc < 0.95:
            s.capacity_kwh = _capacity(v2x["evMaxEnergyRequest"] / 1000.0 / (1.0 - soc))
            s.capacity_source = "derived"
    cap = s.capacity_or(a)
    energy = s.soc_or(a) * cap
    if v2x.get("targetSoC") is not None:
        s.target_soc = _fraction(v2x["targetSoC"] / 100.0)
    elif v2x.get("evTargetEnergyRequest") is not None:
        s.target_soc = _fraction((energy + v2x["evTargetEnergyRequest"] / 1000.0) / cap)
    elif (amount := dc.get("energyAmount", ac.get("energyAmount"))) is not None:
        s.target_soc = _fraction((energy + float(amount) / 1000.0) / cap)
    # The V2X floor, re-derived at every NotifyEVChargingNeeds and held as an energy level
    # in between (so it moves with the SoC as min_soc stays put).
    if v2x.get("evMinV2XEnergyRequest") is not None:
        s.floor_kwh = max(0.0, energy + v2x["evMinV2XEnergyRequest"] / 1000.0)


def apply_meter_values(s: EvseSession, meter_values: Iterable[Json], a: Assumptions) -> None:
    """Fold sampled values (MeterValues or TransactionEvent ``meterValue``), oldest first."""
    for mv in sorted(meter_values, key=lambda m: str(m.get("timestamp", ""))):
        imp = exp = None
        for sv in mv.get("sampledValue") or []:
            measurand = sv.get("measurand", "Energy.Active.Import.Register")
            if sv.get("phase") not in (None, "N") and measurand.startswith("Power"):
                continue  # per-phase readings: the total is sent alongside
            value = float(sv["value"]) * _scale(sv.get("unitOfMeasure"))
            if not math.isfinite(value):
                continue
            if measurand == "SoC":
                s.soc = _fraction(float(sv["value"]) / 100.0)
                s.saw_soc = True
            elif measurand == "Power.Active.Import":
                imp = value
            elif measurand == "Power.Active.Export":
                exp = value
            elif measurand == "Energy.Active.Import.Register":
                _track_energy(s, a, "import", value)
            elif measurand == "Energy.Active.Export.Register":
                _track_energy(s, a, "export", value)
        if imp is not None or exp is not None:
            s.power_kw = _signed_power(((imp or 0.0) - abs(exp or 0.0)) / 1000.0)


def _track_energy(s: EvseSession, a: Assumptions, way: str, wh: float) -> None:
    """Without an SoC measurand (most AC stations) the SoC follows the energy registers."""
    last = s.import_wh if way == "import" else s.export_wh
    if way == "import":
        s.import_wh = wh
    else:
        s.export_wh = wh
    if last is None or s.saw_soc or wh < last:
        return
    delta_kwh = (wh - last) / 1000.0
    stored = delta_kwh * a.efficiency if way == "import" else -delta_kwh / a.efficiency
    s.soc = _fraction(s.soc_or(a) + stored / s.capacity_or(a))


def _scale(unit: Json | None) -> float:
    """W (or Wh) per reported unit: kW and kWh are x1000, and the 10^multiplier."""
    if not unit:
        return 1.0
    base = 1000.0 if str(unit.get("unit", "")).lower() in ("kw", "kwh") else 1.0
    return base * 10.0 ** int(unit.get("multiplier", 0))


def telemetry_fields(s: EvseSession, a: Assumptions) -> dict[str, float | bool | None]:
    """The session as ``Telemetry`` fields (without vehicle_id, seq and ts)."""
    cap = s.capacity_or(a)
    soc = s.soc_or(a)
    max_charge = s.ev_max_charge_kw if s.ev_max_charge_kw is not None else a.max_charge_kw
    target = s.target_soc if s.target_soc is not None else a.target_soc
    floor = 0.0 if s.floor_kwh is None else _fraction(s.floor_kwh / cap)
    return {
        "plugged_in": s.plugged,
        "soc": soc,
        "capacity_kwh": cap,
        "power_kw": s.power_kw,
        "max_charge_kw": max_charge,
        "max_discharge_kw": s.ev_max_discharge_kw if s.can_discharge else 0.0,
        "charge_efficiency": a.efficiency,
        "discharge_efficiency": a.efficiency,
        "min_soc": floor,
        "target_soc": max(target, floor),
        "departure": s.departure,
    }


def _fraction(x: float) -> float:
    return min(1.0, max(0.0, float(x))) if math.isfinite(x) else 0.0


def _power(kw: float) -> float:
    return min(MAX_VEHICLE_KW, max(0.0, float(kw))) if math.isfinite(kw) else 0.0


def _signed_power(kw: float) -> float:
    return min(MAX_VEHICLE_KW, max(-MAX_VEHICLE_KW, kw)) if math.isfinite(kw) else 0.0


def _capacity(kwh: float) -> float:
    return min(MAX_CAPACITY_KWH, max(1.0, kwh)) if math.isfinite(kwh) else 60.0
