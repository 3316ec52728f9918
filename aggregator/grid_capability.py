"""Each grid node's capability windows (issue 11), pure: what net power the vehicles under
a node can hold for each of the fleet's windows, within the headroom of the node and of
every ancestor.

A cheap vectorised bound, not the fleet's linear programme per node (one LP per window
per node is seconds at 1,000 nodes): a node's range is the sum over the vehicles in its
subtree of what each can hold alone for the window (``feasible_range``, counted for its
measured share of its setpoints, as the fleet envelope counts it). Every car holding its
own constant power is a schedule the vehicles can keep, so the range is achievable; the
fleet's LP can be wider (cars trading off over the window).

Headroom at an ancestor ``a`` (``a`` = the node itself included) for the vehicles under
node ``j``: ``import(a) - meter(a) - (power(a) - power(j))`` to import, ``export(a) +
meter(a) + (power(a) - power(j))`` to export, ``power(x)`` being what the vehicles under
``x`` draw now. With ``slack(a) = import(a) - meter(a) - power(a)`` that is
``power(j) + min over ancestors of slack``: one top-down pass per depth, never per node.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from aggregator.fleet_state import FleetView
from aggregator.grid import GridTopology
from aggregator.grid_alloc import subtree_sums
from aggregator.grid_state import GridNow
from broker.models import CapabilityWindow, NodeCapability, from_epoch
from core.physics import Array, feasible_range

Floats = NDArray[np.float64]


def headroom(
    grid: GridTopology,
    node_power_kw: Floats,
    meter_kw: Floats,
    import_kw: Floats,
    export_kw: Floats,
) -> tuple[Floats, Floats]:
    """Per node, the lowest and highest net power its vehicles may take together, the
    rest of the fleet as it draws now: within the limits (inf: none) minus the meters
    (NaN: 0) of the node and of every ancestor. ``low > high`` where a meter alone is
    already over a limit."""
    meter0 = np.nan_to_num(meter_kw, nan=0.0)
    slack_imp = import_kw - meter0 - node_power_kw
    slack_exp = export_kw + meter0 + node_power_kw
    for level in grid.levels[1:]:  # the root's slack is its own; each level takes its parent's
        up = grid.parent[level]
        slack_imp[level] = np.minimum(slack_imp[level], slack_imp[up])
        slack_exp[level] = np.minimum(slack_exp[level], slack_exp[up])
    return node_power_kw - slack_exp, node_power_kw + slack_imp


def clip_window(
    lo: Floats, hi: Floats, cap_lo: Floats, cap_hi: Floats
) -> tuple[Floats, Floats, NDArray[np.bool_]]:
    """The vehicles' range ``[lo, hi]`` within the headroom ``[cap_lo, cap_hi]``, per node.
    Where they do not meet, ``min = max`` = the power nearest the headroom the vehicles
    can hold, and ``feasible`` is False (as the fleet's window when no power holds)."""
    new_lo = np.maximum(lo, cap_lo)
    new_hi = np.minimum(hi, cap_hi)
    ok = new_lo <= new_hi
    nearest = np.clip(np.where(cap_hi < lo, cap_hi, cap_lo), lo, hi)
    return np.where(ok, new_lo, nearest), np.where(ok, new_hi, nearest), ok


def node_capabilities(
    grid: GridTopology,
    vehicle_node: NDArray[np.intp],
    view: FleetView,
    now: float,
    windows: tuple[float, ...],
    g: GridNow,
    scale: Array | None = None,
) -> list[NodeCapability]:
    """One :class:`NodeCapability` per node that has vehicles under it or a limit of its
    own, in tree order. ``vehicle_node``: each vehicle of ``view``'s node (-1: none or
    unknown, counted under the root as the status counts it)."""
    vnode = np.where(vehicle_node < 0, 0, vehicle_node).astype(np.intp)
    count = np.rint(subtree_sums(grid, vnode, np.ones(vnode.shape[0]))).astype(np.int64)
    power = subtree_sums(grid, vnode, np.asarray(view.power, dtype=np.float64))
    cap_lo, cap_hi = headroom(grid, power, g.meter_kw, g.import_kw, g.export_kw)
    keep = np.flatnonzero(
        (count > 0) | np.isfinite(g.import_kw) | np.isfinite(g.export_kw)
    ).tolist()
    per_node: list[list[CapabilityWindow]] = [[] for _ in keep]
    for w in windows:
        p_lo, p_hi = feasible_range(view.batteries, view.energy, view.departure, now, w)
        if scale is not None:
            p_lo, p_hi = p_lo * scale, p_hi * scale
        lo, hi, ok = clip_window(
            subtree_sums(grid, vnode, p_lo), subtree_sums(grid, vnode, p_hi), cap_lo, cap_hi
        )
        lo_l = (np.round(lo, 3) + 0.0).tolist()
        hi_l = (np.round(hi, 3) + 0.0).tolist()
        ok_l = ok.tolist()
        for out, j in zip(per_node, keep, strict=True):
            out.append(
                CapabilityWindow(
                    duration_s=w, min_power_kw=lo_l[j], max_power_kw=hi_l[j], feasible=ok_l[j]
                )
            )
    ts = from_epoch(now)
    ids, counts = grid.ids, count.tolist()
    return [
        NodeCapability(node=ids[j], ts=ts, windows=out, vehicles=counts[j])
        for out, j in zip(per_node, keep, strict=True)
    ]


class NodeCapabilities:
    """When to recompute the nodes' windows: at most once every ``every_s`` (the fleet
    envelope's full turn), not on every control step."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._at = -np.inf

    def due(self, now: float) -> bool:
        """True (and counted as done) when the last computation is ``every_s`` old."""
        if now - self._at < self.every_s:
            return False
        self._at = now
        return True
