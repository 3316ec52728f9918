"""The command line documents itself and explains bad input."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from v2g.cli import app, parse_duration, parse_start

runner = CliRunner()


def test_every_command_has_help() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for cmd in (
        "demo",
        "broker",
        "aggregator",
        "agents",
        "dispatch",
        "cancel",
        "amend",
        "status",
        "capability",
        "report",
        "simulate",
        "provision",
    ):
        assert cmd in top.output
        sub = runner.invoke(app, [cmd, "--help"])
        assert sub.exit_code == 0, sub.output
    disp = runner.invoke(app, ["dispatch", "--help"]).output
    for flag in (
        "--power",
        "--duration",
        "--service",
        "--start",
        "--wait",
        "--broker",
        "--topic-prefix",
    ):
        assert flag in disp
    agg = runner.invoke(app, ["aggregator", "--help"]).output
    for flag in ("--broker", "--redis", "--topic-prefix", "--speed"):
        assert flag in agg


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900), ("900s", 900), ("15m", 900), ("1.5h", 5400)]
)
def test_durations_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_and_naive_start_are_explained() -> None:
    with pytest.raises(typer.BadParameter, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(typer.BadParameter, match="no time zone"):
        parse_start("2026-11-26T18:00:00")
    assert parse_start("2026-11-26T18:00:00Z").tzinfo is not None


def test_bad_setting_is_reported_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V2G_TOPIC_PREFIX", "v2g/#")
    result = runner.invoke(app, ["status", "--timeout", "1"])
    assert result.exit_code == 2
    assert "V2G_TOPIC_PREFIX" in result.output


def test_dispatch_without_a_broker_says_so() -> None:
    # Port 9 on loopback: nothing listens there, so the connection is refused at once.
    result = runner.invoke(
        app, ["dispatch", "--power", "-10", "--broker", "mqtt://127.0.0.1:9", "--timeout", "2"]
    )
    assert result.exit_code != 0
    assert "broker" in result.output.lower()


def test_logging_follows_stderr_after_a_runner_swapped_and_closed_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io
    import sys

    import structlog

    from v2g import logs

    real, swapped = sys.stderr, io.StringIO()
    sys.stderr = swapped
    try:
        logs.configure()
    finally:
        sys.stderr = real
        swapped.close()
    structlog.get_logger("t").info("after_the_swap", ok=1)  # no "I/O on closed file"
    assert "after_the_swap" in capsys.readouterr().err
