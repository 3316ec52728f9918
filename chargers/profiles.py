"""From a setpoint to a ``SetChargingProfile``: pure, no I/O (DESIGN.md, "Extension: OCPP").

The one rule that matters most: a session that cannot discharge (OCPP 2.0.1, an EV without
a BPT mode, or a station that did not accept ``NotifyAllowedEnergyTransfer``) never gets a
negative number of any kind: its profile is ``ChargingOnly`` with a ``limit`` >= 0.
A session that can discharge gets ``CentralSetpoint`` with a signed ``setpoint`` inside
``limit`` and ``dischargeLimit``, and the OCPP 2.1 offline safeguards, so that a station
that loses the gateway stops discharging on its own. With frequency containment
(:class:`Fcr`) such a session gets ``LocalFrequency`` instead: its operating point as
``v2xBaseline`` and the FCR droop as a ``v2xFreqWattCurve``, which the station follows at
its own frequency measurement, with no round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Our TxProfile per EVSE: one id and stack level, so each new one replaces the last.
PROFILE_ID_BASE = 71_000
STACK_LEVEL = 1
# A discharging profile outlives a lost gateway by at most this: the station then drops it
# (invalidAfterOfflineDuration) and falls back to plain charging.
MAX_OFFLINE_S = 30


@dataclass(frozen=True, slots=True)
class Fcr:
    """A session's share of frequency containment: ``capacity_kw`` at full activation,
    0 inside ``deadband_hz`` of ``nominal_hz``, linear to full at ±``full_activation_hz``."""

    capacity_kw: float
    nominal_hz: float = 50.0
    deadband_hz: float = 0.01
    full_activation_hz: float = 0.2


def freq_watt_curve(fcr: Fcr) -> list[dict[str, float]]:
    """The droop as OCPP 2.1 ``v2xFreqWattCurve`` points (W on top of ``v2xBaseline``, in
    frequency order; flat beyond the ends): -capacity at nominal - full activation, 0 over
    the deadband, +capacity at nominal + full activation (above nominal: absorb)."""
    w = round(max(0.0, _finite(fcr.capacity_kw)) * 1000.0, 1)
    f0, db, full = fcr.nominal_hz, fcr.deadband_hz, fcr.full_activation_hz
    return [
        {"frequency": round(f0 - full, 4), "power": -w},
        {"frequency": round(f0 - db, 4), "power": 0.0},
        {"frequency": round(f0 + db, 4), "power": 0.0},
        {"frequency": round(f0 + full, 4), "power": w},
    ]


@dataclass(frozen=True, slots=True)
class Target:
    """What the profile builder needs to know of a session."""

    version: str  # "2.1" or "2.0.1"
    evse_id: int
    transaction_id: str | None
    can_discharge: bool
    max_charge_w: float
    max_discharge_w: float
    # W per A at the station's nominal voltage, for a station that takes limits in A only
    # (230 V x the phases in use; three unless the EV asked for single-phase AC).
    watts_per_amp: float = 690.0


def iso(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, as OCPP writes times."""
    return (
        datetime.fromtimestamp(epoch_s, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def profile_id(evse_id: int) -> int:
    return PROFILE_ID_BASE + evse_id


def set_charging_profile(
    t: Target,
    setpoint_kw: float | None,
    *,
    now: float,
    until: float | None,
    unit: str = "W",
    fcr: Fcr | None = None,
) -> dict[str, Any]:
    """The ``SetChargingProfileRequest`` payload that makes ``t`` hold ``setpoint_kw``
    (signed, + charges) from ``now`` (platform clock) until ``until``; ``None``: the
    baseline (charge at full power, no end). ``unit`` "A": the same in amperes at the
    nominal voltage (``watts_per_amp``), for a station that refuses W. ``fcr``: the
    session's share of frequency containment around ``setpoint_kw`` (its operating
    point), sent as LocalFrequency to a session that can discharge, in W only; any other
    session gets ``setpoint_kw`` as without it (the central path).

    An Absolute schedule starting at ``now``: when it ends the station falls back to its
    default, plain charging, so no setpoint lingers past its validity."""
    max_ch = _finite_nonneg(t.max_charge_w)
    max_dis = _finite_nonneg(t.max_discharge_w) if t.can_discharge else 0.0
    want_w = max_ch if setpoint_kw is None else _finite(setpoint_kw) * 1000.0
    period: dict[str, Any] = {"startPeriod": 0}
    discharging = False
    if t.version == "2.1" and t.can_discharge and setpoint_kw is not None:
        sp = round(min(max_ch, max(-max_dis, want_w)), 1)
        if fcr is not None and fcr.capacity_kw > 0 and unit == "W":
            period |= {
                "operationMode": "LocalFrequency",
                "v2xBaseline": sp,
                "v2xFreqWattCurve": freq_watt_curve(fcr),
            }
        else:
            period |= {"operationMode": "CentralSetpoint", "setpoint": sp}
        period |= {"limit": round(max_ch, 1), "dischargeLimit": -round(max_dis, 1)}
        discharging = sp < 0 or max_dis > 0
    else:
        limit = round(min(max_ch, max(0.0, want_w)), 1)
        period["limit"] = limit
        if t.version == "2.1":
            period["operationMode"] = "ChargingOnly"
    if unit == "A":
        per_amp = t.watts_per_amp if t.watts_per_amp > 0 else 690.0
        for k in ("setpoint", "limit", "dischargeLimit"):
            if k in period:
                period[k] = round(period[k] / per_amp, 1)
    schedule: dict[str, Any] = {
        "id": profile_id(t.evse_id),
        "chargingRateUnit": "A" if unit == "A" else "W",
        "startSchedule": iso(now),
        "chargingSchedulePeriod": [period],
    }
    if until is not None:
        schedule["duration"] = max(1, math.ceil(until - now))
    profile: dict[str, Any] = {
        "id": profile_id(t.evse_id),
        "stackLevel": STACK_LEVEL,
        "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [schedule],
    }
    if t.transaction_id is not None:
        profile["transactionId"] = t.transaction_id
    if discharging:
        profile["maxOfflineDuration"] = MAX_OFFLINE_S
        profile["invalidAfterOfflineDuration"] = True
    return {"evseId": t.evse_id, "chargingProfile": profile}


def negative_values(payload: Any, path: str = "") -> list[str]:
    """Every negative number in ``payload`` (paths), for the charge-only guard and tests."""
    if isinstance(payload, dict):
        return [p for k, v in payload.items() for p in negative_values(v, f"{path}.{k}")]
    if isinstance(payload, list):
        return [p for i, v in enumerate(payload) for p in negative_values(v, f"{path}[{i}]")]
    if isinstance(payload, int | float) and not isinstance(payload, bool) and payload < 0:
        return [path]
    return []


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def _finite_nonneg(x: float) -> float:
    return max(0.0, _finite(x))
