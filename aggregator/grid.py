"""The grid under the fleet: a topology file read once into flat numpy arrays.

``--grid FILE`` is YAML: ``nodes:`` a list of ``{id, parent, kind, import_kw, export_kw}``
(issue 11). The root has no ``parent``; ``import_kw`` and ``export_kw`` are static limits
(magnitudes, kW; absent = none). The tree is kept in depth-first preorder, so that the
subtree of node ``j`` is the index range ``[j, end[j])``: "is ``i`` under ``j``" is two
comparisons, and every per-node sum over a subtree is a difference of cumulative sums.
The bottom-up and top-down passes of the nested limits (aggregator/grid_alloc.py) walk
``levels`` (the nodes of each depth), one numpy call per level, never per node.

Parsing is pure (:func:`parse_grid` on an already-loaded document); :func:`load_grid`
reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.models import MAX_NODE_KW, NodeId
from core.errors import V2GError

NodeKind = Literal["substation", "feeder", "transformer", "site"]
KINDS: tuple[str, ...] = ("substation", "feeder", "transformer", "site")
MAX_NODES = 100_000
"""At most this many nodes in one grid file (a sanity bound, far above a real feeder)."""


class GridError(V2GError):
    """A grid topology file that does not validate: the message says which node and why."""


class _NodeSpec(BaseModel):
    """One entry of ``nodes:`` as written in the file."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    id: NodeId
    parent: NodeId | None = None
    kind: NodeKind
    import_kw: Annotated[float, Field(ge=0.0, le=MAX_NODE_KW)] | None = None
    export_kw: Annotated[float, Field(ge=0.0, le=MAX_NODE_KW)] | None = None


class _GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    nodes: Annotated[list[_NodeSpec], Field(min_length=1, max_length=MAX_NODES)]


@dataclass(frozen=True, slots=True, eq=False)
class GridTopology:
    """A validated grid tree in depth-first preorder (index 0 is the root).

    Limits are magnitudes in kW, ``inf`` where the file gives none."""

    ids: tuple[str, ...]
    kinds: tuple[str, ...]
    parent: NDArray[np.intp]  # -1 for the root
    depth: NDArray[np.intp]
    end: NDArray[np.intp]  # the subtree of j is [j, end[j])
    import_kw: NDArray[np.float64]
    export_kw: NDArray[np.float64]
    levels: tuple[NDArray[np.intp], ...]  # node indices of each depth, root first
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def root(self) -> str:
        return self.ids[0]

    def node_index(self, ids: list[str | None]) -> NDArray[np.intp]:
        """Each id's node index; None or an id not in the grid maps to -1 (the caller
        counts those vehicles under the root and as ``unknown_node``)."""
        get = self.index.get
        return np.fromiter(
            (-1 if i is None else get(i, -1) for i in ids), dtype=np.intp, count=len(ids)
        )

    def ancestors(self, j: int) -> list[int]:
        """``j`` and every node above it, nearest first."""
        out = [j]
        while (p := int(self.parent[out[-1]])) >= 0:
            out.append(p)
        return out


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_grid(doc: Any, source: str = "grid") -> GridTopology:
    """Validate a loaded grid document (the YAML's mapping) into a :class:`GridTopology`.

    Raises GridError naming the node and the rule: one root, every parent a node of the
    file, no cycle, unique ids in the platform's id pattern, kind one of
    substation/feeder/transformer/site, limits >= 0 (absent = none)."""
    if not isinstance(doc, dict):
        raise GridError(f"{source}: expected a mapping with 'nodes:', got {type(doc).__name__}")
    try:
        spec = _GridSpec.model_validate(doc)
    except ValidationError as err:
        raise GridError(f"{source} is not a valid grid:\n{_describe(err)}") from None
    nodes = spec.nodes
    by_id: dict[str, _NodeSpec] = {}
    for n in nodes:
        if n.id in by_id:
            raise GridError(f"{source}: node {n.id!r} appears twice: node ids must be unique")
        by_id[n.id] = n
    roots = [n.id for n in nodes if n.parent is None]
    if len(roots) != 1:
        named = ", ".join(repr(r) for r in roots[:5]) or "none"
        raise GridError(
            f"{source}: a grid has exactly one root (a node without 'parent'); found"
            f" {len(roots)} ({named}): give every other node a parent"
        )
    children: dict[str, list[str]] = {n.id: [] for n in nodes}
    for n in nodes:
        if n.parent is None:
            continue
        if n.parent not in by_id:
            raise GridError(
                f"{source}: node {n.id!r} has parent {n.parent!r}, which is not a node of the"
                " file: add it or fix the name"
            )
        if n.parent == n.id:
            raise GridError(f"{source}: node {n.id!r} is its own parent")
        children[n.parent].append(n.id)
    # Depth-first preorder from the root (iterative: a deep chain must not hit the
    # recursion limit); children in file order.
    order: list[str] = []
    depth_of: dict[str, int] = {}
    stack = [(roots[0], 0)]
    while stack:
        nid, d = stack.pop()
        order.append(nid)
        depth_of[nid] = d
        stack.extend((c, d + 1) for c in reversed(children[nid]))
    if len(order) != len(nodes):
        stray = next(n.id for n in nodes if n.id not in depth_of)
        raise GridError(
            f"{source}: node {stray!r} is not under the root {roots[0]!r}: its parents form a"
            " cycle; every chain of parents must end at the root"
        )
    index = {nid: k for k, nid in enumerate(order)}
    n_nodes = len(order)
    parent = np.array(
        [-1 if (p := by_id[i].parent) is None else index[p] for i in order], dtype=np.intp
    )
    depth = np.array([depth_of[i] for i in order], dtype=np.intp)
    # In preorder a subtree is contiguous: it ends at the next node no deeper than its root.
    end = np.full(n_nodes, n_nodes, dtype=np.intp)
    open_: list[int] = []
    for k in range(n_nodes):
        while open_ and depth[open_[-1]] >= depth[k]:
            end[open_.pop()] = k
        open_.append(k)

    def limit(v: float | None) -> float:
        return np.inf if v is None else v

    levels = tuple(np.flatnonzero(depth == d).astype(np.intp) for d in range(int(depth.max()) + 1))
    return GridTopology(
        ids=tuple(order),
        kinds=tuple(by_id[i].kind for i in order),
        parent=parent,
        depth=depth,
        end=end,
        import_kw=np.array([limit(by_id[i].import_kw) for i in order], dtype=np.float64),
        export_kw=np.array([limit(by_id[i].export_kw) for i in order], dtype=np.float64),
        levels=levels,
        index=index,
    )


def load_grid(path: Path) -> GridTopology:
    """Read and validate a grid topology file (YAML)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise GridError(f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path} is not valid YAML: {err}") from None
    return parse_grid(doc, str(path))


def _kw(v: float) -> str:
    return "none" if not np.isfinite(v) else f"{v:g} kW"


def render_tree(grid: GridTopology) -> str:
    """The tree as text, one node a line, indented by depth, with its static limits."""
    lines = []
    for k, nid in enumerate(grid.ids):
        pad = "  " * int(grid.depth[k])
        lines.append(
            f"{pad}{nid} ({grid.kinds[k]})  import {_kw(float(grid.import_kw[k]))}"
            f"  export {_kw(float(grid.export_kw[k]))}"
        )
    return "\n".join(lines)
