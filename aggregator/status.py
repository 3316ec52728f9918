"""Fleet status: the summary published every control step and logged as one line."""

from __future__ import annotations

from typing import Any

from aggregator.fleet_state import FleetView
from broker.models import ActiveDispatch, CapabilityWindow, FleetStatus, NodeStatus, from_epoch


def fleet_status(
    *,
    now: float,
    online: int,
    plugged: int,
    view: FleetView,
    capability: CapabilityWindow,
    available_charge_kw: float,
    available_discharge_kw: float,
    dispatches: list[ActiveDispatch],
    degraded: bool,
    rejected: dict[str, int],
    warnings: list[str] | None = None,
    nodes: list[NodeStatus] | None = None,
    unknown_node: int = 0,
) -> FleetStatus:
    """Build the FleetStatus message from the step's view and envelope."""
    return FleetStatus(
        ts=from_epoch(now),
        vehicles_online=online,
        vehicles_plugged_in=plugged,
        energy_kwh=round(float(view.energy.sum()), 3),
        power_kw=round(float(view.power.sum()), 3),
        capability=capability,
        available_charge_kw=round(available_charge_kw, 3),
        available_discharge_kw=round(available_discharge_kw, 3),
        dispatches=dispatches,
        degraded=degraded,
        rejected=dict(rejected),
        warnings=list(warnings or []),
        nodes=list(nodes or []),
        unknown_node=unknown_node,
    )


def log_fields(status: FleetStatus) -> dict[str, Any]:
    """The status as flat key=value fields for one log line."""
    fields: dict[str, Any] = {
        "sim_time": status.ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "online": status.vehicles_online,
        "plugged": status.vehicles_plugged_in,
        "energy_kwh": round(status.energy_kwh, 1),
        "power_kw": round(status.power_kw, 1),
    }
    if status.capability is not None:
        fields["capability_15min_kw"] = (
            f"{status.capability.min_power_kw:.0f}..{status.capability.max_power_kw:.0f}"
        )
    for d in status.dispatches:
        fields[f"req[{d.request_id}]"] = f"{d.requested_kw:.0f}/{d.delivered_kw:.0f}kW"
    if status.degraded:
        fields["degraded"] = True
    if status.rejected:
        fields["rejected"] = sum(status.rejected.values())
    if status.warnings:
        fields["warnings"] = len(status.warnings)
    over = [n for n in status.nodes if n.over_limit_kw > 0.0]
    if over:
        fields["over_limit"] = ",".join(f"{n.node}:{n.over_limit_kw:.1f}kW" for n in over)
    held = sum(len(n.conflicts) for n in status.nodes)
    if held:
        fields["grid_conflicts"] = held
    if status.unknown_node:
        fields["unknown_node"] = status.unknown_node
    return fields
