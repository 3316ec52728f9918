"""What holds at each grid node at time t: its limits in force and its meter (pure).

- Limits: the static limits of the grid file, tightened by the node's latest dynamic
  limits message (``v2g/grid/{node}/limits``): within one of its intervals that
  interval's limits, outside every interval its safe values; a null is no limit, and the
  tighter of static and dynamic holds. Messages are compiled into flat arrays when they
  arrive (:func:`compile_limits`), so each step's look-up is a few numpy calls whatever
  the number of nodes and intervals.
- Meters: a node's own meter while it is fresh (no older than three telemetry intervals,
  the caller's ``stale_after_s``), else the sum of its children's meters in force, else
  none (NaN). Bottom-up over the depth levels of the tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from aggregator.grid import GridTopology
from broker.models import GridLimits

Floats = NDArray[np.float64]

METER_NONE = 0
"""Meter source of a node: no meter in force, own or below (meter_kw NaN)."""
METER_CHILDREN = 1
"""The sum of the meters in force of its children (its own is absent or stale)."""
METER_OWN = 2
"""Its own meter, fresh."""
STALE_INTERVALS = 3
"""A meter is stale after this many telemetry intervals without a new reading (issue 11)."""


def _none_inf(v: float | None) -> float:
    return np.inf if v is None else v


@dataclass(frozen=True, slots=True)
class DynamicLimits:
    """Every node's latest dynamic limits, flattened: one entry per interval."""

    node: NDArray[np.intp]  # the node of each interval
    start: Floats  # epoch seconds
    end: Floats
    import_kw: Floats  # inf: none
    export_kw: Floats
    has_message: NDArray[np.bool_]  # per node
    safe_import_kw: Floats  # per node; inf: none (or no message)
    safe_export_kw: Floats

    @classmethod
    def empty(cls, n_nodes: int) -> DynamicLimits:
        return compile_limits(n_nodes, {})


def compile_limits(n_nodes: int, messages: Mapping[int, GridLimits]) -> DynamicLimits:
    """The latest message of each node (by node index) as flat arrays. Runs when a
    message arrives, not every step."""
    node: list[int] = []
    start: list[float] = []
    end: list[float] = []
    imp: list[float] = []
    exp: list[float] = []
    has = np.zeros(n_nodes, dtype=np.bool_)
    safe_imp = np.full(n_nodes, np.inf)
    safe_exp = np.full(n_nodes, np.inf)
    for j, msg in messages.items():
        has[j] = True
        safe_imp[j] = _none_inf(msg.safe_import_kw)
        safe_exp[j] = _none_inf(msg.safe_export_kw)
        for iv in msg.intervals:
            s = iv.start.timestamp()
            node.append(j)
            start.append(s)
            end.append(s + iv.duration_s)
            imp.append(_none_inf(iv.import_kw))
            exp.append(_none_inf(iv.export_kw))
    return DynamicLimits(
        node=np.array(node, dtype=np.intp),
        start=np.array(start, dtype=np.float64),
        end=np.array(end, dtype=np.float64),
        import_kw=np.array(imp, dtype=np.float64),
        export_kw=np.array(exp, dtype=np.float64),
        has_message=has,
        safe_import_kw=safe_imp,
        safe_export_kw=safe_exp,
    )


def limits_in_force(grid: GridTopology, dynamic: DynamicLimits, t: float) -> tuple[Floats, Floats]:
    """(import_kw, export_kw) of every node at epoch ``t``: magnitudes, inf = none.

    A node with a message: the interval containing ``t`` (intervals of one message never
    overlap), else the message's safe values; the tighter of that and the static limit."""
    dyn_imp = dynamic.safe_import_kw.copy()
    dyn_exp = dynamic.safe_export_kw.copy()
    now = (dynamic.start <= t) & (t < dynamic.end)
    at = dynamic.node[now]
    dyn_imp[at] = dynamic.import_kw[now]
    dyn_exp[at] = dynamic.export_kw[now]
    return np.minimum(grid.import_kw, dyn_imp), np.minimum(grid.export_kw, dyn_exp)


def meters_in_force(
    grid: GridTopology, power_kw: Floats, at: Floats, t: float, stale_after_s: float
) -> tuple[Floats, NDArray[np.int8], NDArray[np.bool_]]:
    """(meter_kw, source, stale) of every node at epoch ``t``.

    ``power_kw`` and ``at`` are each node's last reading and its time (NaN: none yet). A
    reading older than ``stale_after_s`` is stale: the node then counts its children's
    meters in force (their sum, over those that have one), or none (NaN); ``source`` says
    which (METER_OWN, METER_CHILDREN, METER_NONE), ``stale`` flags the stale ones."""
    n = len(grid)
    has = ~np.isnan(power_kw)
    with np.errstate(invalid="ignore"):
        fresh = has & (t - at <= stale_after_s)
    stale = has & ~fresh
    meter = np.where(fresh, power_kw, np.nan)
    source = np.where(fresh, METER_OWN, METER_NONE).astype(np.int8)
    below = np.zeros(n)  # sum of the children's meters in force
    counted = np.zeros(n, dtype=np.bool_)  # some child has one
    for level in reversed(grid.levels):
        own = fresh[level]
        use_children = ~own & counted[level]
        j = level[use_children]
        meter[j] = below[j]
        source[j] = METER_CHILDREN
        if level[0] == 0:  # the root's level: no parent to pass to
            break
        value = meter[level]
        known = ~np.isnan(value)
        np.add.at(below, grid.parent[level[known]], value[known])
        counted[grid.parent[level[known]]] = True
    return meter, source, stale
