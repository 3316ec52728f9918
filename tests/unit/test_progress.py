"""Progress bars show on a terminal and nowhere else: ``v2g simulate`` run with stderr on
a pipe prints no bar, run with stderr on a pseudo-terminal (python's ``pty``) draws one."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from tests.support.terminal import run_on_pipe, run_on_pty
from v2g import progress

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "residential-evening-peak.yaml"
BAR = "━"  # rich's bar glyph


def _simulate(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "v2g.cli",
        "simulate",
        str(SCENARIO),
        "--vehicles",
        "40",
        "--no-plot",
        "--out",
        str(out),
    ]


def test_simulate_prints_no_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    code, err, out = run_on_pipe(_simulate(tmp_path), cwd=ROOT)
    assert code == 0, err
    assert BAR not in err and "vehicles)" not in err, err
    assert BAR not in out
    assert (tmp_path / "summary.json").exists()


def test_simulate_draws_a_bar_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    code, text, out = run_on_pty(_simulate(tmp_path), cwd=ROOT)
    assert code == 0, text
    assert BAR in text and "residential-evening-peak (40 vehicles)" in text, text[:2000]
    assert BAR.encode() not in out, "the bar went to stdout"
    assert out.startswith(b"residential-evening-peak: 40 vehicles"), "the summary stays on stdout"


def test_the_bar_is_off_without_a_terminal_and_on_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert not progress.on_terminal()
    with progress.bar("work", 10) as at:
        at(5)
        at(10, 10)
    assert quiet.getvalue() == ""
    with progress.bar("forced", 4, show=True) as at:
        at(4)
    assert "forced" in quiet.getvalue()
