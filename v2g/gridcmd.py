"""``v2g grid``: the grid topology a fleet sits under (issue 11).

``v2g grid show FILE`` validates a grid file (the one ``--grid`` takes) and prints the
tree with each node's static limits, or the errors that say what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from aggregator.grid import GridError, load_grid, render_tree

grid_app = typer.Typer(
    help="The grid under the fleet: check and show a grid topology file (--grid FILE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _limit(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


@grid_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(help="A grid topology file (YAML, 'nodes:').")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: the nodes in tree order.")
    ] = False,
) -> None:
    """Validate FILE and print its tree, each node with its kind and static limits.

    A node is {id, parent, kind, import_kw, export_kw}: one root without parent; kind is
    substation, feeder, transformer or site; limits are magnitudes in kW (absent: none).

    Example: v2g grid show scenarios/grids/example.yaml
    """
    try:
        grid = load_grid(file)
    except GridError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        nodes = [
            {
                "id": nid,
                "parent": None if grid.parent[k] < 0 else grid.ids[grid.parent[k]],
                "kind": grid.kinds[k],
                "depth": int(grid.depth[k]),
                "import_kw": _limit(grid.import_kw[k]),
                "export_kw": _limit(grid.export_kw[k]),
            }
            for k, nid in enumerate(grid.ids)
        ]
        typer.echo(json.dumps({"nodes": nodes}))
        return
    typer.echo(render_tree(grid))
    typer.echo(f"{len(grid)} nodes, {len(grid.levels)} levels, root {grid.root}")
