"""The import contract of docs/ARCHITECTURE.md holds: layers import downward only
(v2g ; aggregator | agents ; broker ; core), no package has an import cycle, scale-out
sits below the service (scaleout, lease and fence never import it, even indirectly), the
CLI's audience modules (v2g/commands/serve, operate, tools) never import each other and
sit above its shared helpers, inside aggregator/dispatch/ the facade sits on top of its
parts, which import downward only, and the test packages share only through
tests/support and tests/conftest.py.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on
grimp's import graph, TYPE_CHECKING imports included.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports() -> str:
    """The lint-imports of the interpreter running the tests (the project's venv)."""
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: install the dev extras (pip install -e '.[dev]')")
    return found


def run_lint_imports(cwd: Path, *args: str, pythonpath: Path | None = None) -> tuple[int, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [lint_imports(), "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_the_tree_keeps_the_import_contract() -> None:
    code, output = run_lint_imports(ROOT)
    assert code == 0, f"lint-imports found a broken import contract:\n{output}"
    assert "Contracts: 7 kept, 0 broken." in output, output


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("core", "broker"),  # the neutral layer reaching up to the bus edge
        ("broker", "aggregator"),  # the bus edge reaching up to a service
        ("aggregator", "agents"),  # the production aggregator importing the simulator
        ("agents", "v2g"),  # a service importing the command line
    ],
)
def test_the_contract_refuses_an_upward_or_sideways_import(
    tmp_path: Path, importer: str, imported: str
) -> None:
    """The same contract, over a toy tree with one bad import, is broken: the check can fail."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in ("aggregator", "agents", "broker", "core", "v2g", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / importer / "bad.py").write_text(f"import {imported}\n")

    code, output = run_lint_imports(tmp_path, "--contract", "layers", pythonpath=tmp_path)

    assert code != 0, output
    assert f"{importer}.bad -> {imported}" in output, output


HIDDEN_IMPORT = (  # the cycle scale-out had: the service imported for type checking only
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
    "    from aggregator.service import AggregatorService\n"
)


@pytest.mark.parametrize(
    ("contract", "module", "source", "said"),
    [
        ("acyclic", "scaleout", HIDDEN_IMPORT, "No cycles are allowed in aggregator"),
        ("scaleout", "scaleout", HIDDEN_IMPORT, "aggregator.scaleout -> aggregator.service"),
        ("scaleout", "fence", "from aggregator import service\n", "aggregator.fence ->"),
    ],
)
def test_the_contract_refuses_scale_out_importing_the_service(
    tmp_path: Path, contract: str, module: str, source: str, said: str
) -> None:
    """A toy aggregator whose scale-out side imports the service breaks the contracts."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in ("aggregator", "agents", "broker", "core", "v2g", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name in ("scaleout", "lease", "fence"):
        (tmp_path / "aggregator" / f"{name}.py").write_text("")
    (tmp_path / "aggregator" / "service.py").write_text("import aggregator.scaleout\n")
    (tmp_path / "aggregator" / f"{module}.py").write_text(source)

    code, output = run_lint_imports(tmp_path, "--contract", contract, pythonpath=tmp_path)

    assert code != 0, output
    assert said in output, output


@pytest.mark.parametrize(
    ("contract", "module", "source", "said"),
    [
        ("commands", "tools", "from v2g.commands import operate\n", "v2g.commands.tools ->"),
        ("commands-helpers", "running", "from v2g.commands import options\n", "running ->"),
    ],
)
def test_the_contract_refuses_a_command_module_importing_another(
    tmp_path: Path, contract: str, module: str, source: str, said: str
) -> None:
    """A toy CLI whose offline tools import the operator commands (or whose runner imports
    the flags above it) breaks the contracts."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in ("aggregator", "agents", "broker", "core", "v2g", "tests", "v2g/commands"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "v2g" / "cli.py").write_text("")
    for name in ("serve", "operate", "tools", "options", "output", "running"):
        (tmp_path / "v2g" / "commands" / f"{name}.py").write_text("")
    (tmp_path / "v2g" / "commands" / f"{module}.py").write_text(source)

    code, output = run_lint_imports(tmp_path, "--contract", contract, pythonpath=tmp_path)

    assert code != 0, output
    assert said in output, output


def test_every_path_docs_architecture_names_exists() -> None:
    """The map stays true when code moves: each file or folder it names is in the tree."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z0-9_]+/[A-Za-z0-9_./]*)`", text))
    assert len(named) > 20, named  # the table is still there
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == [], f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


DISPATCH_PARTS = (
    "dispatcher",
    "admission",
    "noderequests",
    "answers",
    "ahead",
    "books",
    "stack",
    "tracking",
    "gridcap",
    "setpoints",
    "ranges",
    "learning",
    "records",
)


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("stack", "dispatcher"),  # a part reaching up to the facade
        ("records", "setpoints"),  # the records reaching up to a part
        ("tracking", "stack"),  # two parts of one layer importing each other
    ],
)
def test_the_contract_keeps_the_parts_of_dispatch_layered(
    tmp_path: Path, module: str, imported: str
) -> None:
    """A toy dispatch package with one part importing upward or sideways breaks it."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in ("aggregator", "agents", "broker", "core", "v2g", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "aggregator" / "dispatch").mkdir()
    (tmp_path / "aggregator" / "dispatch" / "__init__.py").write_text("")
    for name in DISPATCH_PARTS:
        (tmp_path / "aggregator" / "dispatch" / f"{name}.py").write_text("")
    bad = f"import aggregator.dispatch.{imported}\n"
    (tmp_path / "aggregator" / "dispatch" / f"{module}.py").write_text(bad)

    code, output = run_lint_imports(tmp_path, "--contract", "dispatch", pythonpath=tmp_path)

    assert code != 0, output
    assert f"aggregator.dispatch.{module} -> aggregator.dispatch.{imported}" in output, output
