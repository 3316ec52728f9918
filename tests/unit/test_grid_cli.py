"""``v2g grid show FILE``: the tree with its limits, or one error line saying what to fix."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from v2g.cli import app

runner = CliRunner()
EXAMPLE = str(Path(__file__).parents[2] / "scenarios" / "grids" / "example.yaml")


def test_grid_show_prints_the_tree_indented_with_its_limits() -> None:
    out = runner.invoke(app, ["grid", "show", EXAMPLE])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "substation (substation)  import 2000 kW  export 1000 kW"
    assert "      solar-plant (site)  import none  export 300 kW" in lines
    assert lines[-1] == "8 nodes, 4 levels, root substation"


def test_grid_show_json_lists_the_nodes_in_tree_order() -> None:
    out = runner.invoke(app, ["grid", "show", EXAMPLE, "--json"])
    assert out.exit_code == 0, out.output
    nodes = json.loads(out.output)["nodes"]
    assert nodes[0] == {
        "id": "substation",
        "parent": None,
        "kind": "substation",
        "depth": 0,
        "import_kw": 2000.0,
        "export_kw": 1000.0,
    }
    assert {n["id"]: n["parent"] for n in nodes}["solar-plant"] == "tx-business-park"


def test_grid_show_refuses_a_bad_file_in_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "grid.yaml"
    bad.write_text("nodes:\n  - {id: a, kind: site}\n  - {id: b, parent: c, kind: site}\n")
    out = runner.invoke(app, ["grid", "show", str(bad)])
    assert out.exit_code == 1
    assert "node 'b' has parent 'c', which is not a node of the file" in out.output
