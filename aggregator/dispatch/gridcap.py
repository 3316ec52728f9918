"""The grid's limits on each control step's setpoints (issue 11): after the stack is
planned (or, with nothing running, on plain charging), the nested allocation clips every
vehicle's power so that each node's meter plus its vehicles stays within the limits in
force of the node and of every ancestor (aggregator/grid_alloc.py).

Owns which rows it holds on plain charging (so it can let them go when the limit
loosens) and the last step's allocation, for the status.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.setpoints import RESEND_DEADBAND_KW, Setpoints
from aggregator.fleet_state import FleetView
from aggregator.grid_alloc import NestedAllocation, allocate_nested
from aggregator.grid_state import GridNow, GridState
from aggregator.grid_status import node_statuses
from broker.models import NodeStatus
from core.physics import Array, baseline_power


@dataclass(frozen=True, slots=True)
class GridStep:
    """One step's allocation under the limits, and what was in force."""

    rows: NDArray[np.intp]  # the view's fleet rows, in the allocation's order
    vehicle_node: NDArray[np.intp]  # as the view named them (-1: none or unknown)
    alloc: NestedAllocation
    now: GridNow
    cut_kw: float  # what the limits took off the total wanted (+: less charge)


class GridCap:
    """Clips setpoints under the grid's limits, one control step at a time."""

    def __init__(
        self,
        grid: GridState,
        setpoints: Setpoints,
        ranges: FleetRanges,
        *,
        control_step_s: float,
        setpoint_ttl_s: float,
    ) -> None:
        self.grid = grid
        self.setpoints = setpoints
        self.ranges = ranges
        self.control_step_s = control_step_s
        self.setpoint_ttl_s = setpoint_ttl_s
        self.held: NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)  # per fleet row
        self.last: GridStep | None = None
        # Bands on nodes' net power this step (node-targeted requests), or None.
        self.bands: tuple[Array, Array] | None = None

    def _fit(self, n_rows: int) -> None:
        if n_rows > self.held.shape[0]:
            grow = max(n_rows, 2 * self.held.shape[0]) - self.held.shape[0]
            self.held = np.concatenate([self.held, np.zeros(grow, dtype=np.bool_)])

    def _allocate(self, now: float, view: FleetView, desired: Array) -> NestedAllocation:
        g = self.grid.in_force(now)
        vnode = self.grid.vehicle_nodes(view)
        lo, hi = self.ranges.ranges(view, now, self.control_step_s)
        band_lo, band_hi = (None, None) if self.bands is None else self.bands
        alloc = allocate_nested(
            self.grid.grid,
            vnode,
            lo,
            hi,
            desired,
            g.meter_kw,
            g.import_kw,
            g.export_kw,
            band_low_kw=band_lo,
            band_high_kw=band_hi,
        )
        self.last = GridStep(
            view.rows, vnode, alloc, g, float(np.clip(desired, lo, hi).sum() - alloc.power_kw.sum())
        )
        return alloc

    def clip_planned(
        self, now: float, view: FleetView, rows: NDArray[np.intp]
    ) -> tuple[NDArray[np.intp], float]:
        """A plan was just made (every vehicle of the view holds a live setpoint): clip
        them under the limits. Returns the rows to send (``rows``, the plan's, and those
        the limits moved) and the kW the limits took off the planned total."""
        sp = self.setpoints
        self._fit(int(view.rows.max()) + 1 if len(view) else 0)
        self.held[view.rows] = False  # a running request owns them now
        planned = sp.sent_kw[view.rows]
        alloc = self._allocate(now, view, planned)
        moved = np.abs(alloc.power_kw - planned) > 1e-6
        if moved.any():
            at = view.rows[moved]
            sp.sent_kw[at] = alloc.power_kw[moved]  # the plan made them all live
        send = np.union1d(rows, view.rows[moved]).astype(np.intp)
        return send, float(planned.sum() - alloc.power_kw.sum())

    def clip_baseline(
        self, now: float, view: FleetView, live_rows: NDArray[np.intp]
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Nothing runs: the vehicles charge as they would by themselves, except where a
        limit says otherwise. Returns the rows to send a setpoint to (held by a limit)
        and the rows to release (``live_rows``, setpoints of a request now over, and
        those no limit holds any more)."""
        sp = self.setpoints
        self._fit(max(int(view.rows.max()) + 1 if len(view) else 0, len(sp.sent_kw)))
        plain = baseline_power(view.batteries, view.energy, self.control_step_s)
        alloc = self._allocate(now, view, plain)
        hold = np.abs(alloc.power_kw - plain) > RESEND_DEADBAND_KW
        rows = view.rows
        was = self.held[rows]
        until = sp.sent_until[rows]
        due = hold & (
            ~was
            | (np.abs(alloc.power_kw - sp.sent_kw[rows]) > RESEND_DEADBAND_KW)
            | (until - now < 1.5 * self.control_step_s)
        )
        send = rows[due]
        sp.sent_kw[send] = alloc.power_kw[due]
        sp.sent_until[send] = now + self.setpoint_ttl_s
        sp.sent_at[rows[due & ~was]] = now
        self.held[rows] = hold
        # Released: what a request left live, and what the limits held and hold no more
        # (a vehicle gone from the view is let go too: its setpoint simply expires).
        free = np.zeros(self.held.shape[0], dtype=np.bool_)
        free[live_rows] = True
        free[rows[was & ~hold]] = True
        free[rows[hold]] = False
        release = np.flatnonzero(free).astype(np.intp)
        sp.sent_until[release] = -np.inf
        return send, release

    def statuses(self, ids: list[str]) -> tuple[list[NodeStatus], int]:
        """Each node's status from the last step, and how many vehicles named no node of
        the grid (counted under the root)."""
        last = self.last
        if last is None:
            return [], 0
        g = last.now
        nodes = node_statuses(
            self.grid.grid, last.alloc, self.conflicts(ids), g.meter_kw, g.import_kw, g.export_kw
        )
        return nodes, int((last.vehicle_node < 0).sum())

    def conflicts(self, ids: list[str]) -> list[str]:
        """The ids of the vehicles the limits held below their floor at the last step."""
        last = self.last
        if last is None:
            return []
        return [ids[r] for r in last.rows[last.alloc.conflicts].tolist()]
