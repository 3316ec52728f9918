"""Figures the fault and security tests measure, gathered into one table at the end of a run.

A test takes the ``figure`` fixture and calls ``figure("what", value, "unit", limit="< 1 s")``
once per figure it asserts on; the table (and, with ``TEST_FIGURES_JSON=path``, a JSON file)
comes after pytest's own summary, so a CI log carries the numbers next to the verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass

import pytest


@dataclass(frozen=True, slots=True)
class Figure:
    test: str
    what: str
    value: float
    unit: str
    limit: str
    outcome: str = ""


Recorder = Callable[..., None]
_FIGURES = pytest.StashKey[list[Figure]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_FIGURES] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Recorder:
    """Record a measured figure of this test for the end-of-run table."""
    figures = request.config.stash[_FIGURES]
    test = request.node.name

    def record(what: str, value: float, unit: str = "", *, limit: str = "") -> None:
        figures.append(Figure(test, what, float(value), unit, limit))

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        figures = item.config.stash[_FIGURES]
        for i, f in enumerate(figures):
            if f.test == item.name and not f.outcome:
                figures[i] = Figure(f.test, f.what, f.value, f.unit, f.limit, report.outcome)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(_FIGURES, [])
    if not figures:
        return
    terminalreporter.section("measured figures (faults, security, load)")
    rows = [(f.what, _fmt(f.value), f.unit, f.limit, f.outcome or "?", f.test) for f in figures]
    head = ("figure", "value", "unit", "limit", "result", "test")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join
    for r in [head, *rows]:
        cells = (str(c).ljust(w) for c, w in zip(r, widths, strict=True))
        terminalreporter.write_line(line(cells).rstrip())
    path = os.environ.get("TEST_FIGURES_JSON")
    if path:
        with open(path, "w") as fh:
            json.dump([asdict(f) for f in figures], fh, indent=1)
        terminalreporter.write_line(f"figures written to {path}")


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
