"""Telemetry and status payloads for a whole simulated fleet at once."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from agents.fleet import SimFleet
from broker import codec
from broker.columns import TelemetryArrays
from broker.models import MAX_BATCH_VEHICLES, VehicleStatus, from_epoch


def _reports(fleet: SimFleet, now: float, rows: NDArray[np.intp] | None) -> TelemetryArrays:
    """What the vehicles in ``rows`` (all if None) report at ``now``, as columns."""
    bat = fleet.bat
    # A vehicle with a wrong clock stamps its own time.
    own = np.where(
        fleet.faults.clock_frozen, fleet.clock_stopped_at, now + fleet.faults.clock_skew_s
    )
    plugged = fleet.plugged
    columns = {
        "soc": np.clip(fleet.soc(), 0.0, 1.0),
        "capacity_kwh": bat.capacity_kwh,
        "power_kw": fleet.power,
        "max_charge_kw": bat.max_charge_kw,
        "max_discharge_kw": bat.max_discharge_kw,
        "charge_efficiency": bat.charge_efficiency,
        "discharge_efficiency": bat.discharge_efficiency,
        "min_soc": bat.min_soc,
        "target_soc": bat.target_soc,
        "departure": np.where(plugged, fleet.departure, np.nan),  # unknown while unplugged
    }
    node = fleet.node
    if rows is None:
        return TelemetryArrays(
            list(fleet.ids),
            fleet.seq.copy(),
            own,
            plugged.copy(),
            columns,
            None if node is None else list(node),
        )
    return TelemetryArrays(
        list(map(fleet.ids.__getitem__, rows.tolist())),
        fleet.seq[rows],
        own[rows],
        plugged[rows],
        {k: v[rows] for k, v in columns.items()},
        None if node is None else list(map(node.__getitem__, rows.tolist())),
    )


def telemetry_payloads(
    fleet: SimFleet, now: float, rows: NDArray[np.intp] | None = None
) -> list[bytes]:
    """One Telemetry JSON payload per vehicle (or per vehicle in ``rows``), in fleet order,
    formatted by :func:`broker.codec.telemetry_payloads`; each vehicle's seq then advances."""
    out = codec.telemetry_payloads(_reports(fleet, now, rows))
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
    bridge, split at ``max_vehicles`` (one message unless the bridge carries more),
    formatted by :func:`broker.codec.telemetry_batch_payloads`."""
    out = codec.telemetry_batch_payloads(bridge_id, now, _reports(fleet, now, rows), max_vehicles)
    fleet.seq[rows] += 1
    return out


def status_payload(vehicle_id: str, online: bool, now: float) -> bytes:
    """The retained status (birth or will) of one vehicle."""
    return VehicleStatus(vehicle_id=vehicle_id, online=online, ts=from_epoch(now)).to_json()
