"""bench/ is a package of modules run with ``python -m bench.NAME``: importing one runs
nothing, none patches sys.path or imports another bench file's private names, it is not
shipped in the wheel, and every result it writes carries the run's provenance."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench import common

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


def test_bench_is_a_package_of_the_expected_modules() -> None:
    assert (BENCH / "__init__.py").is_file()
    # The ones bench/run plans, plus the load generators and the shared module.
    assert {"common", "loadgen", "rawpub", "runall", "schedule_solve", "ingest"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_importing_a_bench_module_runs_nothing(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert capsys.readouterr() == ("", ""), f"importing bench.{name} printed something"
    if name != "common":
        assert callable(getattr(module, "main", None)), f"bench.{name} has no main()"
        source = (BENCH / f"{name}.py").read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in source


@pytest.mark.parametrize("path", [*sorted(BENCH.glob("*.py")), BENCH / "run"], ids=str)
def test_no_bench_file_touches_sys_path(path: Path) -> None:
    assert "sys.path" not in path.read_text(encoding="utf-8")
    assert "PYTHONPATH" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_files_import_no_private_name_of_another_bench_file(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            # Bare names (`from loadgen import ...`) worked only through sys.path patching.
            assert node.level == 0 and module.split(".")[0] not in MODULES, (
                f"{path.name}:{node.lineno} imports {module!r}: use `from bench.{module} ...`"
            )
            if module.startswith("bench"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports {private} from {module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in MODULES, f"{path.name} imports {alias.name}"


def test_subprocesses_are_started_as_modules_not_as_files() -> None:
    for path in BENCH.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"""["'][a-z_]+\.py["']""", source), (
            f"{path.name} names a bench script file: start it with common.module_argv"
        )
        assert "__file__).resolve()), " not in source
    assert "-m bench.runall" in (BENCH / "run").read_text(encoding="utf-8")
    assert common.module_argv("loadgen", "subscribe") == [
        sys.executable,
        "-m",
        "bench.loadgen",
        "subscribe",
    ]


def test_the_wheel_does_not_ship_bench() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = [p for p in include if fnmatch.fnmatch("bench", p) or fnmatch.fnmatch("bench.x", p)]
    assert not shipped, f"pyproject's packages.find includes bench through {shipped}"
    assert include, "packages.find must list what is shipped"
    # ...while the linters still read it.
    assert "bench" in config["tool"]["mypy"]["packages"]
    assert "bench/*" in config["tool"]["ruff"]["lint"]["per-file-ignores"]


def _check_stamp(stamp: dict[str, Any]) -> None:
    required = {"git_sha", "git_dirty", "versions", "cpu_model", "cpu_count"}
    required |= {"load_start", "load_end", "started", "finished"}
    assert stamp.keys() >= required | common.PROVENANCE_KEYS
    assert stamp["git_sha"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", stamp["git_sha"])
    assert stamp["git_dirty"] in (True, False, None)
    versions = stamp["versions"]
    for name in ("python", "numpy", "pydantic", "aiomqtt", "paho-mqtt", "redis", "scipy"):
        assert re.match(r"\d+\.\d+", versions[name]), f"{name}: {versions[name]!r}"
    assert "highspy" in versions
    assert "mosquitto" in versions
    assert versions["mosquitto"] is None or re.match(r"\d+\.\d+", versions["mosquitto"])
    assert isinstance(stamp["cpu_model"], str)
    assert stamp["cpu_model"]
    assert isinstance(stamp["cpu_count"], int)
    assert stamp["cpu_count"] >= 1
    for key in ("load_start", "load_end"):
        assert len(stamp[key]) == 3
        assert all(isinstance(x, float) and 0 <= x < 10_000 for x in stamp[key])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp["started"])
    assert stamp["started"] <= stamp["finished"]
    json.dumps(stamp)  # it goes into JSON as it is


def test_provenance_has_every_required_key_with_sane_values() -> None:
    stamp = common.provenance(common.start())
    _check_stamp(stamp)
    # This test runs in the project's checkout: the SHA is the checked-out commit.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if head.returncode == 0:
        assert stamp["git_sha"] == head.stdout.strip()
    assert str(stamp["versions"]["numpy"]) == importlib.import_module("numpy").__version__


def test_results_and_the_table_carry_the_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [common.row("solve", 1000, 12.5, 100.0, "ms", "budget", 100.0, lower_is_better=True)]
    assert rows[0]["pass"] is True
    stamp = common.provenance(common.start())
    common.print_table(rows, stamp)
    first = capsys.readouterr().out.splitlines()[0]
    assert stamp["git_sha"][:12] in first
    assert f"{stamp['load_start'][0]:.2f}" in first
    out = tmp_path / "r" / "x.json"
    common.write_results(rows, out, stamp, runs=[1])
    doc = json.loads(out.read_text())
    _check_stamp(doc["provenance"])
    assert doc["rows"] == rows
    assert doc["runs"] == [1]


def test_commands_that_cannot_run_give_unknown_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_run", lambda *_a, **_k: None)
    assert common.git_state() == ("unknown", None)
    assert common.mosquitto_version() is None
    _check_stamp(common.provenance(common.start()))
