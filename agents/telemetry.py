"""Telemetry and status payloads for a whole simulated fleet at once."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray

from agents.fleet import SimFleet
from broker.models import MAX_BATCH_VEHICLES, VehicleStatus, from_epoch


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def telemetry_payloads(
    fleet: SimFleet, now: float, rows: NDArray[np.intp] | None = None
) -> list[bytes]:
    """One Telemetry JSON payload per vehicle (or per vehicle in ``rows``), in fleet order.

    Formatted directly rather than through the pydantic model: this runs for every vehicle
    every interval. A unit test holds it to the model (every payload validates and
    round-trips).
    """
    bat = fleet.bat
    stamp = _iso(now)
    # A vehicle with a wrong clock stamps its own time; the rest share one string.
    own = np.where(
        fleet.faults.clock_frozen, fleet.clock_stopped_at, now + fleet.faults.clock_skew_s
    )
    ts = [stamp] * len(fleet.ids)
    for i in np.flatnonzero(own != now).tolist():
        ts[i] = _iso(float(own[i]))
    soc = np.clip(fleet.soc(), 0.0, 1.0).tolist()
    power = fleet.power.tolist()
    plugged = fleet.plugged.tolist()
    departure = fleet.departure.tolist()
    seq = fleet.seq.tolist()
    cap, mch, mdis = (
        bat.capacity_kwh.tolist(),
        bat.max_charge_kw.tolist(),
        bat.max_discharge_kw.tolist(),
    )
    ech, edis = bat.charge_efficiency.tolist(), bat.discharge_efficiency.tolist()
    mins, tgt = bat.min_soc.tolist(), bat.target_soc.tolist()
    out = []
    picked = range(len(fleet.ids)) if rows is None else rows.tolist()
    ids = fleet.ids
    for i in picked:
        vid = ids[i]
        dep = f'"{_iso(departure[i])}"' if plugged[i] else "null"
        out.append(
            (
                f'{{"vehicle_id":"{vid}","seq":{seq[i]},"ts":"{ts[i]}",'
                f'"plugged_in":{"true" if plugged[i] else "false"},"soc":{soc[i]:.6f},'
                f'"capacity_kwh":{cap[i]!r},"power_kw":{power[i]:.4f},'
                f'"max_charge_kw":{mch[i]!r},"max_discharge_kw":{mdis[i]!r},'
                f'"charge_efficiency":{ech[i]!r},"discharge_efficiency":{edis[i]!r},'
                f'"min_soc":{mins[i]!r},"target_soc":{tgt[i]!r},"departure":{dep}}}'
            ).encode()
        )
    if rows is None:
        fleet.seq += 1
    else:
        fleet.seq[rows] += 1
    return out


def telemetry_batch_payloads(
    fleet: SimFleet,
    now: float,
    rows: NDArray[np.intp],
    bridge_id: str,
    max_vehicles: int = MAX_BATCH_VEHICLES,
) -> list[bytes]:
    """The telemetry of the vehicles in ``rows`` as ``TelemetryBatch`` messages of a
    bridge, split at ``max_vehicles`` (one message unless the bridge carries more).

    Columns come straight from the fleet's arrays; a unit test holds the output to the
    model and to :func:`telemetry_payloads` (same values, vehicle by vehicle).
    """
    bat = fleet.bat
    own = np.where(
        fleet.faults.clock_frozen, fleet.clock_stopped_at, now + fleet.faults.clock_skew_s
    )
    sent_at = _iso(now)
    out = []
    for k in range(0, rows.shape[0], max_vehicles):
        r = rows[k : k + max_vehicles]
        plugged = fleet.plugged[r]
        departure: list[float | None] = fleet.departure[r].tolist()
        for i in np.flatnonzero(~plugged).tolist():
            departure[i] = None
        columns = {
            "bridge_id": bridge_id,
            "sent_at": sent_at,
            "vehicle_id": list(map(fleet.ids.__getitem__, r.tolist())),
            "seq": fleet.seq[r].tolist(),
            "ts": np.round(own[r], 6).tolist(),
            "plugged_in": plugged.tolist(),
            "soc": np.round(np.clip(fleet.soc()[r], 0.0, 1.0), 6).tolist(),
            "capacity_kwh": bat.capacity_kwh[r].tolist(),
            "power_kw": np.round(fleet.power[r], 4).tolist(),
            "max_charge_kw": bat.max_charge_kw[r].tolist(),
            "max_discharge_kw": bat.max_discharge_kw[r].tolist(),
            "charge_efficiency": bat.charge_efficiency[r].tolist(),
            "discharge_efficiency": bat.discharge_efficiency[r].tolist(),
            "min_soc": bat.min_soc[r].tolist(),
            "target_soc": bat.target_soc[r].tolist(),
            "departure": departure,
        }
        out.append(json.dumps(columns, separators=(",", ":")).encode())
    fleet.seq[rows] += 1
    return out


def status_payload(vehicle_id: str, online: bool, now: float) -> bytes:
    """The retained status (birth or will) of one vehicle."""
    return VehicleStatus(vehicle_id=vehicle_id, online=online, ts=from_epoch(now)).to_json()
