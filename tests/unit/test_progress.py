"""Progress bars show on a terminal and nowhere else: ``v2g simulate`` run with stderr on
a pipe prints no bar, run with stderr on a pseudo-terminal (python's ``pty``) draws one."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    env |= {"TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    return env


def test_simulate_prints_no_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    proc = subprocess.run(
        _simulate(tmp_path), capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert BAR not in proc.stderr and "vehicles)" not in proc.stderr, proc.stderr
    assert BAR not in proc.stdout
    assert (tmp_path / "summary.json").exists()


def test_simulate_draws_a_bar_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            _simulate(tmp_path),
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            env=_env(),
            cwd=ROOT,
        )
        os.close(slave)
        slave = -1
        seen = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
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
