"""What a simulated OCPP charging station says and how it reads what it is told: pure.

The stations of ``agents/ocpp_stations.py`` are websocket clients; everything they decide
is here, without I/O: which station speaks which protocol (``--mix``), the identity of
each station's car, the payloads of NotifyEVChargingNeeds and MeterValues built from the
fleet's columns, and how a charging profile turns into power for the physics.

Units on the wire are W, Wh and percent; the physics (``core/physics.py``) works in kW
and kWh. OCPP signs power as the platform does: > 0 charges the car, < 0 discharges it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from agents.profiles import DAY_S, FleetProfile
from core.errors import InvalidMessage
from core.physics import Array, Batteries

Kind = Literal["v21bpt", "v21", "v201"]
KINDS: tuple[Kind, ...] = ("v21bpt", "v21", "v201")
# The subprotocol each kind asks for at the websocket handshake.
SUBPROTOCOL: dict[Kind, str] = {"v21bpt": "ocpp2.1", "v21": "ocpp2.1", "v201": "ocpp2.0.1"}
DEFAULT_MIX: dict[Kind, float] = {"v21bpt": 1.0}

# Nominal voltage for a limit in A: 230 V per phase on AC, 400 V on DC.
AC_PHASE_V = 230.0
DC_V = 400.0
DC_FROM_KW = 50.0  # chargers this strong are DC units (agents/profiles.py: 50 kW ones)
SINGLE_PHASE_UNDER_KW = 10.0  # a 7.4 kW wallbox is 32 A on one phase

_AC_MODE = {1: "AC_single_phase", 2: "AC_two_phase", 3: "AC_three_phase"}
BPT_MODES = frozenset({"AC_BPT", "AC_BPT_DER", "DC_BPT", "DC_ACDP_BPT"})
# Operation modes this station carries out; the others are refused (Rejected).
SETPOINT_MODES = frozenset({"CentralSetpoint", "ChargingOnly", "Idle", "LocalFrequency"})
MAX_CURVE_POINTS = 20  # v2xFreqWattCurve's maxItems in the OCPP 2.1 schema
PURPOSES = frozenset({"TxProfile", "TxDefaultProfile"})


def parse_mix(text: str) -> dict[Kind, float]:
    """``v21bpt=0.6,v21=0.2,v201=0.2`` as shares (any positive scale; normalised)."""
    if not text.strip():
        return dict(DEFAULT_MIX)
    out: dict[Kind, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise ValueError(
                f"bad mix entry {part.strip()!r}: write KIND=SHARE with KIND one of"
                f" {', '.join(KINDS)}, e.g. v21bpt=0.6,v21=0.2,v201=0.2"
            )
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"bad share {value.strip()!r} for {name}: a number >= 0") from None
        if not math.isfinite(share) or share < 0:
            raise ValueError(f"bad share {value.strip()!r} for {name}: a number >= 0")
        out[name] = share  # type: ignore[index,unused-ignore]  # checked against KINDS above
    if sum(out.values()) <= 0:
        raise ValueError(f"the mix {text!r} has no positive share")
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def assign_kinds(count: int, mix: Mapping[Kind, float], seed: int) -> NDArray[np.int8]:
    """Each station's kind (an index into KINDS), in the mix's exact proportions (largest
    remainder), shuffled by ``seed``: the same seed gives the same stations."""
    shares = np.array([mix.get(k, 0.0) for k in KINDS], dtype=float)
    shares = shares / shares.sum()
    exact = shares * count
    whole = np.floor(exact).astype(int)
    rest = count - int(whole.sum())
    whole[np.argsort(-(exact - whole), kind="stable")[:rest]] += 1
    kinds = np.repeat(np.arange(len(KINDS), dtype=np.int8), whole)
    np.random.default_rng(seed).shuffle(kinds)
    return kinds


def plugged_at(profile: FleetProfile, now: float, seed: int) -> FleetProfile:
    """The same fleet with every car plugged in at ``now``: each arrived 5-50% of its stay
    ago (a station simulator exists to be dispatched, not to wait for the evening)."""
    rng = np.random.default_rng(seed + 1)
    ago = rng.uniform(0.05, 0.5, size=len(profile.ids)) * profile.stay_s
    return replace(profile, arrival_tod_s=np.mod(now - ago, DAY_S))


def station_batteries(bat: Batteries, bpt: NDArray[np.bool_]) -> Batteries:
    """The batteries as the stations see them: a car without BPT cannot discharge."""
    return replace(bat, max_discharge_kw=np.where(bpt, bat.max_discharge_kw, 0.0))


def id_token(vehicle_id: str, index: int) -> tuple[str, str]:
    """The car's own identity, the same at every station it plugs into: a MAC address
    (its EVCCID, lower-case hex with colons) for even rows, an eMAID for odd ones."""
    digest = hashlib.sha256(vehicle_id.encode()).hexdigest()
    if index % 2 == 0:
        raw = "02" + digest[:10]  # 02: a locally administered address
        return ":".join(raw[i : i + 2] for i in range(0, 12, 2)), "MacAddress"
    return f"ZZ-V2G-C{digest[:8].upper()}-{int(digest[8], 16) % 10}", "eMAID"


@dataclass(frozen=True, slots=True)
class StationPlan:
    """Who each station is: its id, kind, protocol and its car's identity."""

    station_ids: list[str]
    kinds: NDArray[np.int8]
    bpt: NDArray[np.bool_]
    dc: NDArray[np.bool_]
    phases: NDArray[np.int64]
    tokens: list[tuple[str, str]]

    def kind(self, i: int) -> Kind:
        return KINDS[int(self.kinds[i])]

    def version(self, i: int) -> str:
        return "2.0.1" if self.kinds[i] == KINDS.index("v201") else "2.1"

    def volts_per_amp(self, i: int) -> float:
        """W per A of a limit in A: the nominal voltage times the phases."""
        return DC_V if self.dc[i] else AC_PHASE_V * float(self.phases[i])

    def modes(self, i: int) -> tuple[str, list[str]]:
        """(requestedEnergyTransfer, availableEnergyTransfer) of this station's car."""
        plain = "DC" if self.dc[i] else _AC_MODE[int(self.phases[i])]
        if self.bpt[i]:
            bpt = "DC_BPT" if self.dc[i] else "AC_BPT"
            return bpt, [plain, bpt]
        return plain, [plain]


def plan_stations(
    vehicle_ids: Sequence[str],
    max_charge_kw: Array,
    kinds: NDArray[np.int8],
    *,
    prefix: str = "cs",
) -> StationPlan:
    """One station per car: ``{prefix}-0000``, ... and what follows from the kinds."""
    n = len(vehicle_ids)
    width = max(4, len(str(max(n - 1, 0))))
    bpt = kinds == KINDS.index("v21bpt")
    dc = max_charge_kw >= DC_FROM_KW
    phases = np.where(max_charge_kw < SINGLE_PHASE_UNDER_KW, 1, 3).astype(np.int64)
    return StationPlan(
        station_ids=[f"{prefix}-{i:0{width}d}" for i in range(n)],
        kinds=kinds,
        bpt=bpt,
        dc=dc,
        phases=phases,
        tokens=[id_token(v, i) for i, v in enumerate(vehicle_ids)],
    )


# -- what a station says ------------------------------------------------------------
def iso(epoch: float) -> str:
    """An OCPP timestamp (UTC, millisecond, Z)."""
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class CarState:
    """One car's numbers as a message needs them (kW, kWh, fractions, epoch seconds)."""

    energy_kwh: float
    capacity_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    min_soc: float
    target_soc: float
    departure: float


def charging_needs(plan: StationPlan, i: int, car: CarState) -> dict[str, Any]:
    """The ``chargingNeeds`` of NotifyEVChargingNeeds (snake_case keys, as the ``ocpp``
    library takes them). 2.1: ``v2xChargingParameters`` with the energy requests in Wh
    relative to the energy in the battery now (the V2X floor is ``evMinV2XEnergyRequest``:
    negative means the car may give that much); 2.0.1: AC or DC charging parameters."""
    requested, available = plan.modes(i)
    wh = 1000.0
    to_target = (car.target_soc * car.capacity_kwh - car.energy_kwh) * wh
    to_full = (car.capacity_kwh - car.energy_kwh) * wh
    to_floor = (car.min_soc * car.capacity_kwh - car.energy_kwh) * wh
    needs: dict[str, Any] = {"requested_energy_transfer": requested}
    if math.isfinite(car.departure):
        needs["departure_time"] = iso(car.departure)
    if plan.version(i) == "2.1":
        needs["available_energy_transfer"] = available
        needs["control_mode"] = "DynamicControl"
        needs["mobility_needs_mode"] = "EVCC"
        needs["v2x_charging_parameters"] = {
            "min_charge_power": 0.0,
            "max_charge_power": round(car.max_charge_kw * wh, 1),
            "min_discharge_power": 0.0,
            "max_discharge_power": round(car.max_discharge_kw * wh, 1) if plan.bpt[i] else 0.0,
            "ev_target_energy_request": round(to_target, 1),
            "ev_min_energy_request": round(to_floor, 1),
            "ev_max_energy_request": round(to_full, 1),
            "ev_min_v2x_energy_request": round(to_floor, 1),
            "ev_max_v2x_energy_request": round(to_full, 1),
            "target_soc": round(car.target_soc * 100),
        }
        return needs
    volts = plan.volts_per_amp(i)
    amps = round(car.max_charge_kw * wh / volts)
    if plan.dc[i]:
        soc = car.energy_kwh / car.capacity_kwh
        needs["dc_charging_parameters"] = {
            "ev_max_current": amps,
            "ev_max_voltage": int(DC_V),
            "energy_amount": max(round(to_target), 0),
            "ev_max_power": round(car.max_charge_kw * wh),
            "state_of_charge": round(min(max(soc, 0.0), 1.0) * 100),
            "ev_energy_capacity": round(car.capacity_kwh * wh),
            "full_soc": round(car.target_soc * 100),
        }
    else:
        needs["ac_charging_parameters"] = {
            "energy_amount": max(round(to_target), 0),
            "ev_min_current": 6,
            "ev_max_current": amps,
            "ev_max_voltage": int(AC_PHASE_V),
        }
    return needs


def sampled_values(
    soc: float, power_kw: float, import_kwh: float, export_kwh: float
) -> list[dict[str, Any]]:
    """A meter reading: SoC in percent, power split into import and export (W, both >= 0,
    net = import - export) and the two energy registers (Wh)."""
    return [
        {"value": round(min(max(soc, 0.0), 1.0) * 100, 2), "measurand": "SoC",
         "unit_of_measure": {"unit": "Percent"}},
        {"value": round(max(power_kw, 0.0) * 1000, 1), "measurand": "Power.Active.Import",
         "unit_of_measure": {"unit": "W"}},
        {"value": round(max(-power_kw, 0.0) * 1000, 1), "measurand": "Power.Active.Export",
         "unit_of_measure": {"unit": "W"}},
        {"value": round(import_kwh * 1000, 1), "measurand": "Energy.Active.Import.Register",
         "unit_of_measure": {"unit": "Wh"}},
        {"value": round(export_kwh * 1000, 1), "measurand": "Energy.Active.Export.Register",
         "unit_of_measure": {"unit": "Wh"}},
    ]  # fmt: skip


# -- what a station is told -----------------------------------------------------------
class ProfileRefused(InvalidMessage):
    """A charging profile this station does not carry out (answered Rejected; the
    detail says why)."""

    def __init__(self, detail: str) -> None:
        super().__init__("profile", detail)


@dataclass(frozen=True, slots=True)
class Order:
    """One period of a profile, as the physics takes it: a signed setpoint (kW) or a
    charge-only cap (kW >= 0), in force over [start, until)."""

    mode: Literal["setpoint", "cap", "frequency"]
    power_kw: float
    start: float
    until: float
    # "frequency" (LocalFrequency): power_kw is the v2xBaseline, and the station holds it
    # plus the v2xFreqWattCurve at its local frequency (Hz -> kW, in frequency order),
    # inside [low_kw, high_kw] (dischargeLimit, limit).
    curve_hz: tuple[float, ...] = ()
    curve_kw: tuple[float, ...] = ()
    low_kw: float = -math.inf
    high_kw: float = math.inf


@dataclass(frozen=True, slots=True)
class ReadProfile:
    """A charging profile read: its periods in time order, whether any value in it asked
    for discharge (a negative setpoint, limit or discharge limit), and its offline rule."""

    profile_id: int
    orders: tuple[Order, ...]
    negative: bool
    max_offline_s: float  # inf: no rule
    invalid_after_offline: bool


_NEGATIVE_KEYS = ("setpoint", "limit", "discharge_limit", "v2x_baseline")
_PHASE = re.compile(r"_l[23]$")  # limit_L2 arrives as limit_l2


def _epoch(value: Any, what: str) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ProfileRefused(f"{what} {value!r} is not an ISO date-time") from None


def asks_discharge(values: Mapping[str, Any]) -> bool:
    """Whether a period (or a dynamic update) holds any negative value, on any phase."""
    return any(
        isinstance(v, int | float) and v < 0
        for k, v in values.items()
        if _PHASE.sub("", k) in _NEGATIVE_KEYS
    ) or any(
        isinstance(p, Mapping) and isinstance(p.get("power"), int | float) and p["power"] < 0
        for p in values.get("v2x_freq_watt_curve") or ()
    )


# ``power``: a point of a v2xFreqWattCurve (negative: discharge at that frequency).
_POWER_KEY = re.compile(r"^(setpoint|limit|dischargeLimit|v2xBaseline|power)(_L[23])?$")


def has_negative(payload: Any) -> bool:
    """Whether a raw (camelCase) message holds a negative setpoint, limit or discharge
    limit anywhere, whatever else is wrong with it."""
    if isinstance(payload, Mapping):
        return any(
            (_POWER_KEY.match(str(k)) and isinstance(v, int | float) and v < 0) or has_negative(v)
            for k, v in payload.items()
        )
    if isinstance(payload, list):
        return any(has_negative(v) for v in payload)
    return False


def period_order(
    period: Mapping[str, Any], *, w_per_unit: float, start: float, until: float
) -> Order:
    """One schedule period as an Order. CentralSetpoint: the setpoint clipped to
    [dischargeLimit, limit]; ChargingOnly (also when operationMode is absent, as OCPP
    says): a cap at the limit, never below 0; Idle: hold 0."""
    mode = period.get("operation_mode", "ChargingOnly")
    if mode not in SETPOINT_MODES:
        raise ProfileRefused(f"operationMode {mode} is not supported by this station")
    kw = w_per_unit / 1000.0
    limit = period.get("limit")
    if mode == "Idle":
        return Order("setpoint", 0.0, start, until)
    if mode == "LocalFrequency":
        return _frequency_order(period, kw, start, until)
    if mode == "CentralSetpoint":
        if period.get("setpoint") is None:
            raise ProfileRefused("operationMode CentralSetpoint without a setpoint")
        power = float(period["setpoint"]) * kw
        if limit is not None:
            power = min(power, float(limit) * kw)
        low = period.get("discharge_limit")
        if low is not None:
            power = max(power, float(low) * kw)
        return Order("setpoint", power, start, until)
    if limit is None:
        raise ProfileRefused("operationMode ChargingOnly without a limit")
    return Order("cap", max(float(limit) * kw, 0.0), start, until)


def _frequency_order(period: Mapping[str, Any], kw: float, start: float, until: float) -> Order:
    """LocalFrequency: v2xBaseline (absent: 0) plus the v2xFreqWattCurve at the local
    frequency, inside [dischargeLimit, limit] (OCPP 2.1: the curve's values are added on
    top of the baseline)."""
    points = period.get("v2x_freq_watt_curve") or []
    if not points:
        raise ProfileRefused("operationMode LocalFrequency without a v2xFreqWattCurve")
    if len(points) > MAX_CURVE_POINTS:
        raise ProfileRefused(f"a v2xFreqWattCurve of {len(points)} points (at most 20)")
    try:
        pairs = sorted((float(p["frequency"]), float(p["power"]) * kw) for p in points)
    except (KeyError, TypeError, ValueError):
        raise ProfileRefused("a v2xFreqWattCurve point without frequency and power") from None
    limit, low = period.get("limit"), period.get("discharge_limit")
    return Order(
        "frequency",
        float(period.get("v2x_baseline") or 0.0) * kw,
        start,
        until,
        curve_hz=tuple(f for f, _ in pairs),
        curve_kw=tuple(p for _, p in pairs),
        low_kw=-math.inf if low is None else float(low) * kw,
        high_kw=math.inf if limit is None else float(limit) * kw,
    )


def droop_power(
    base_kw: Array, curve_hz: Array, curve_kw: Array, low_kw: Array, high_kw: Array, hz: float
) -> Array:
    """Each row's LocalFrequency power at the local frequency ``hz``: its baseline plus
    its curve (rows of ``curve_hz``/``curve_kw``, in frequency order, padded by repeating
    the last point) interpolated at ``hz``, flat beyond the ends, clipped to its limits.
    Vectorised over the rows (one pass per curve segment, at most 19)."""
    hz_ = np.asarray(curve_hz, dtype=np.float64)
    kw_ = np.asarray(curve_kw, dtype=np.float64)
    add = np.where(hz <= hz_[:, 0], kw_[:, 0], kw_[:, -1])
    for j in range(hz_.shape[1] - 1):
        x0, x1 = hz_[:, j], hz_[:, j + 1]
        inside = (x0 < hz) & (hz <= x1) & (x1 > x0)
        if inside.any():
            share = (hz - x0[inside]) / (x1[inside] - x0[inside])
            add[inside] = kw_[inside, j] + share * (kw_[inside, j + 1] - kw_[inside, j])
    return np.clip(np.asarray(base_kw) + add, low_kw, high_kw)


def read_profile(profile: Mapping[str, Any], *, now: float, volts_per_amp: float) -> ReadProfile:
    """A ``chargingProfile`` (snake_case keys, as the ``ocpp`` library hands it over) as
    orders from ``now`` on. Absolute and Dynamic schedules start at startSchedule (or
    now), Relative ones now; a period lasts until the next one, the schedule's duration
    or validTo, whichever comes first (for ever without any). Raises ProfileRefused for
    what this station does not do (another purpose, Recurring, several schedules, an
    operation mode other than CentralSetpoint, ChargingOnly, Idle and LocalFrequency)."""
    purpose = profile.get("charging_profile_purpose")
    if purpose not in PURPOSES:
        raise ProfileRefused(f"chargingProfilePurpose {purpose} is not supported here")
    kind = profile.get("charging_profile_kind")
    if kind not in ("Absolute", "Relative", "Dynamic"):
        raise ProfileRefused(f"chargingProfileKind {kind} is not supported here")
    schedules = profile.get("charging_schedule") or []
    if len(schedules) != 1:
        raise ProfileRefused(f"{len(schedules)} charging schedules; this station takes one")
    schedule = schedules[0]
    unit = schedule.get("charging_rate_unit")
    if unit not in ("W", "A"):
        raise ProfileRefused(f"chargingRateUnit {unit} is neither W nor A")
    w_per_unit = 1.0 if unit == "W" else volts_per_amp
    start = now
    if kind != "Relative" and schedule.get("start_schedule") is not None:
        start = _epoch(schedule["start_schedule"], "startSchedule")
    end = math.inf
    if schedule.get("duration") is not None:
        end = start + float(schedule["duration"])
    if profile.get("valid_to") is not None:
        end = min(end, _epoch(profile["valid_to"], "validTo"))
    periods = sorted(schedule.get("charging_schedule_period") or [], key=_start_period)
    if not periods:
        raise ProfileRefused("a charging schedule without periods")
    starts = [start + float(p.get("start_period", 0)) for p in periods]
    orders = tuple(
        period_order(p, w_per_unit=w_per_unit, start=s, until=min(e, end))
        for p, s, e in zip(periods, starts, [*starts[1:], math.inf], strict=True)
        if s < end and min(e, end) > now
    )
    max_offline = profile.get("max_offline_duration")
    return ReadProfile(
        profile_id=int(profile.get("id", 0)),
        orders=orders,
        negative=any(asks_discharge(p) for p in periods),
        max_offline_s=math.inf if max_offline is None else float(max_offline),
        invalid_after_offline=bool(profile.get("invalid_after_offline_duration", False)),
    )


def _start_period(period: Mapping[str, Any]) -> float:
    return float(period.get("start_period", 0))
