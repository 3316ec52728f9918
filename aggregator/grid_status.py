"""Each grid node's entry of the fleet status, from one step's nested allocation (pure).

The numbers are arrays over the nodes; only the building of the entries (one small model
per node, at most a few thousand, once a step) is per node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from aggregator.grid import GridTopology
from aggregator.grid_alloc import NestedAllocation, subtree_sums
from broker.models import NodeStatus

Floats = NDArray[np.float64]


def _kw(values: Floats) -> list[float | None]:
    """Rounded to the watt; NaN and infinity (none) as None."""
    out: list[float | None] = (np.round(values, 3) + 0.0).tolist()  # + 0.0: no "-0.0"
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = None
    return out


def node_statuses(
    grid: GridTopology,
    alloc: NestedAllocation,
    held_ids: Sequence[str],
    meter_kw: Floats,
    import_kw: Floats,
    export_kw: Floats,
) -> list[NodeStatus]:
    """One entry per node, in tree order. ``power_kw`` is the net power of the vehicles
    under the node (its subtree); headroom is what is left to each limit after the meter
    (NaN: 0) and those vehicles, null where there is no limit; ``conflicts`` are the ids
    of the vehicles *at* the node (not below it) held below their floor by a limit:
    ``held_ids`` names them, one per ``alloc.conflicts`` in row order (only those: the
    fleet's ids are not copied every step)."""
    meter0 = np.nan_to_num(meter_kw, nan=0.0)
    net = meter0 + alloc.node_power_kw
    with np.errstate(invalid="ignore"):
        head_imp = import_kw - net
        head_exp = export_kw + net
    vehicles = np.rint(
        subtree_sums(grid, alloc.vehicle_node, np.ones(alloc.vehicle_node.shape[0]))
    ).astype(np.int64)
    held = np.flatnonzero(alloc.conflicts)
    by_node: dict[int, list[str]] = {}
    for vid, j in zip(held_ids, alloc.vehicle_node[held].tolist(), strict=True):
        by_node.setdefault(j, []).append(vid)
    power, meter = _kw(alloc.node_power_kw), _kw(meter_kw)
    imp, exp = _kw(import_kw), _kw(export_kw)
    h_imp, h_exp, over = _kw(head_imp), _kw(head_exp), _kw(alloc.over_limit_kw)
    count = vehicles.tolist()
    return [
        NodeStatus(
            node=nid,
            power_kw=power[k] or 0.0,
            meter_kw=meter[k],
            import_limit_kw=imp[k],
            export_limit_kw=exp[k],
            headroom_import_kw=h_imp[k],
            headroom_export_kw=h_exp[k],
            vehicles=count[k],
            over_limit_kw=over[k] or 0.0,
            conflicts=by_node.get(k, []),
        )
        for k, nid in enumerate(grid.ids)
    ]
