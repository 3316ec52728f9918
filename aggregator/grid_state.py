"""The last word from the grid, per node: its meter reading and its dynamic limits (pure).

The control step feeds it what arrived on ``v2g/grid/{node}/meter`` and
``v2g/grid/{node}/limits`` (checked and queued by the inbox router,
``ControlStep.apply_grid``), then asks it what is in force at ``t``
(:meth:`GridState.in_force`) and which node each vehicle of a view is under
(:meth:`GridState.vehicle_nodes`). No I/O, no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aggregator.fleet_state import FleetView
from aggregator.grid import GridTopology
from aggregator.grid_limits import (
    STALE_INTERVALS,
    DynamicLimits,
    compile_limits,
    limits_in_force,
    meters_in_force,
)
from broker.models import GridLimits, GridMeter

Floats = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class GridNow:
    """What holds at every node at one time: meters (NaN: none) and limits (inf: none)."""

    meter_kw: Floats
    source: NDArray[np.int8]
    stale: NDArray[np.bool_]
    import_kw: Floats
    export_kw: Floats


class GridState:
    """The topology, each node's last meter reading and its latest limits message."""

    def __init__(self, grid: GridTopology, *, telemetry_interval_s: float) -> None:
        self.grid = grid
        self.stale_after_s = STALE_INTERVALS * telemetry_interval_s
        n = len(grid)
        self.meter_kw: Floats = np.full(n, np.nan)
        self.meter_at: Floats = np.full(n, np.nan)
        self._messages: dict[int, GridLimits] = {}
        self.dynamic: DynamicLimits = DynamicLimits.empty(n)
        self._lookup_for = 0  # how many fleet node names the lookup covers
        self._lookup: NDArray[np.intp] = np.zeros(0, dtype=np.intp)

    def _node(self, node: str) -> int | None:
        return self.grid.index.get(node)

    def meter(self, node: str, msg: GridMeter) -> bool:
        """Take a meter reading; False if ``node`` is not in the grid (nothing kept). A
        reading older than the one held is ignored (QoS 0 may reorder nothing, but a
        replay must not move a meter back in time)."""
        j = self._node(node)
        if j is None:
            return False
        at = msg.ts.timestamp()
        if not at < self.meter_at[j]:  # NaN (none yet) compares False: taken
            self.meter_kw[j] = msg.power_kw
            self.meter_at[j] = at
        return True

    def limits(self, node: str, msg: GridLimits) -> bool:
        """Take a node's limits message (it replaces the node's previous one); False if
        ``node`` is not in the grid."""
        j = self._node(node)
        if j is None:
            return False
        self._messages[j] = msg
        self.dynamic = compile_limits(len(self.grid), self._messages)
        return True

    def in_force(self, t: float) -> GridNow:
        """Meters and limits in force at epoch ``t`` at every node."""
        meter, source, stale = meters_in_force(
            self.grid, self.meter_kw, self.meter_at, t, self.stale_after_s
        )
        imp, exp = limits_in_force(self.grid, self.dynamic, t)
        return GridNow(meter, source, stale, imp, exp)

    def vehicle_nodes(self, view: FleetView) -> NDArray[np.intp]:
        """Each vehicle's node index in the grid; -1 where it named none or one that is
        not in the grid (it is counted under the root, and as ``unknown_node``)."""
        if view.node is None:
            return np.full(len(view), -1, dtype=np.intp)
        names = view.node_names
        if self._lookup_for != len(names):  # names only ever grow
            self._lookup = np.append(self.grid.node_index(list(names)), -1).astype(np.intp)
            self._lookup_for = len(names)
        # -1 (none said) indexes the appended -1.
        return self._lookup[view.node]

    def stale_warnings(self, now: GridNow) -> list[str]:
        """One line per node whose own meter is stale: what it counts instead."""
        out = []
        for j in np.flatnonzero(now.stale).tolist():
            instead = (
                "the sum of its children's meters" if now.source[j] == 1 else "no meter at all"
            )
            out.append(
                f"grid node {self.grid.ids[j]}: meter stale (no reading for over"
                f" {self.stale_after_s:g} s); counting {instead} until it reports again"
            )
        return out
