"""The command line documents itself and explains bad input."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

import pytest
import typer
import typer.core
import typer.main
from typer.testing import CliRunner

from v2g.cli import app
from v2g.commands.options import every, parse_duration, parse_start

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


def _options() -> list[tuple[str, Any, tuple[str, str]]]:
    """(command, option, help record) for every option of every command."""
    cli = typer.main.get_command(app)
    assert isinstance(cli, typer.core.TyperGroup)
    found = []
    for name, cmd in cli.commands.items():
        ctx = typer.Context(cmd, info_name=name)
        for param in cmd.get_params(ctx):
            if param.param_type_name != "option" or param.name == "help":
                continue
            record = param.get_help_record(ctx)
            assert record is not None, (name, param.name)
            found.append((name, param, record))
    return found


def test_help_shows_every_options_default_and_its_environment_variable() -> None:
    options = _options()
    assert len(options) > 60
    for cmd, param, (flags, text) in options:
        if not param.is_flag:
            assert "default: " in text or "required" in text, (
                f"v2g {cmd} {flags}: no default in {text!r}"
            )
    by_flag = {(cmd, flags.split()[0]): text for cmd, _, (flags, text) in options}
    assert (
        "env var: V2G_BROKER_URL; default: (mqtt://127.0.0.1:1883)"
        in by_flag[("dispatch", "--broker")]
    )
    for cmd, flag, var in (
        ("aggregator", "--redis", "V2G_REDIS_URL"),
        ("aggregator", "--speed", "V2G_SPEED"),
        ("aggregator", "--share-group", "V2G_SHARE_GROUP"),
        ("aggregator", "--lease-ttl", "V2G_LEASE_TTL_S"),
        ("agents", "--topic-prefix", "V2G_TOPIC_PREFIX"),
        ("status", "--broker", "V2G_BROKER_URL"),
        ("report", "--redis", "V2G_REDIS_URL"),
    ):
        assert f"env var: {var}" in by_flag[(cmd, flag)], (cmd, flag)
    # The help formatter must not eat bracketed text as markup.
    page = " ".join(runner.invoke(app, ["aggregator", "--help"]).output.split())
    assert "[env var: V2G_BROKER_URL; default: (mqtt://127.0.0.1:1883)]" in page


def test_boolean_flags_do_not_look_like_they_take_a_value() -> None:
    flags = [(cmd, p, rec) for cmd, p, rec in _options() if p.is_flag]
    assert {"--wait", "--json", "--follow", "--memory", "--cold-start"} <= {
        name for _, p, _ in flags for name in p.opts
    }
    for cmd, _, (names, _) in flags:
        assert not re.search(r"<bool>|BOOLEAN|\s[A-Z]+$", names), (cmd, names)
    for cmd in ("dispatch", "status", "aggregator"):
        assert "<bool>" not in runner.invoke(app, [cmd, "--help"]).output


@pytest.mark.parametrize("cmd", ["dispatch", "status", "capability", "report"])
def test_operator_commands_show_an_example(cmd: str) -> None:
    page = runner.invoke(app, [cmd, "--help"]).output
    assert re.search(rf"^\s+v2g {cmd}\b", page, re.MULTILINE), page


def test_version_comes_from_the_package_metadata() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"v2g {importlib.metadata.version('v2g-fleet')}"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--broker", "localhost:1883"],
            "'localhost:1883' is not a broker URL; use mqtt://HOST:PORT",
        ),
        (["--broker", "mqtt://host:port"], "is not a broker URL"),
        (["--speed", "fast"], "--speed"),
        (["--speed", "0"], "--speed"),
        (["--duration", "soon"], "--duration: 'soon' is not a duration"),
        (["--duration", "1d", "--timeout", "-1"], "--timeout"),
        (["--every", "often", "--wait"], "'often' is not a duration"),
        (["--start", "tomorrow"], "'tomorrow' is not a time"),
    ],
)
def test_a_bad_flag_is_one_clean_error_line(args: list[str], says: str) -> None:
    # Nothing listens on port 9: should a bad flag slip through, nothing is sent anywhere.
    safe = ["--broker", "mqtt://127.0.0.1:9", "--topic-prefix", "t-cli-bad-flags"]
    result = runner.invoke(app, ["dispatch", "--power", "10", "--timeout", "1", *safe, *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert errors == result.output.strip().splitlines(), result.output  # that line alone
    assert len(errors) == 1
    assert says in errors[0]


def test_a_bad_broker_url_in_the_environment_is_named_too() -> None:
    result = runner.invoke(app, ["status"], env={"V2G_BROKER_URL": "localhost:1883"})
    assert result.exit_code == 2
    assert "V2G_BROKER_URL" in result.output
    assert "use mqtt://HOST:PORT" in result.output
    bad_redis = runner.invoke(app, ["report", "r1"], env={"V2G_REDIS_URL": "127.0.0.1:6379"})
    assert bad_redis.exit_code == 2
    assert "is not a Redis URL" in bad_redis.output


def test_durations_take_days_as_scenario_files_do() -> None:
    from v2g.scenario import parse_duration as scenario_duration

    for text in ("1d", "2h", "15m", "900", "1.5h"):
        assert parse_duration(text) == scenario_duration(text)
    assert parse_duration("1d") == 86_400.0


def test_every_passes_one_message_per_period_of_platform_time() -> None:
    due = every(60.0)
    passed = [t for t in range(0, 300, 5) if due(float(t))]
    assert passed == [0, 60, 120, 180, 240]
    everyone = every(0.0)
    assert all(everyone(float(t)) for t in (0, 0, 1))


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        ("dispatch", ["--speed", "--json", "--every", "--wait"]),
        ("status", ["--speed", "--json", "--every", "--follow"]),
        ("amend", ["--speed", "--json"]),
        ("cancel", ["--json"]),
        ("capability", ["--json"]),
        ("report", ["--json"]),
        ("simulate", ["--json"]),
        ("agents", ["--cold-start", "--speed"]),
        ("demo", ["--cold-start"]),
    ],
)
def test_commands_take_the_flags_their_work_needs(cmd: str, flags: list[str]) -> None:
    names = {name for c, p, _ in _options() if c == cmd for name in (*p.opts, *p.secondary_opts)}
    assert set(flags) <= names, (cmd, set(flags) - names)


def test_a_service_logs_why_it_stopped_signal_error_or_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio
    import os
    import signal

    from core.errors import TransportError
    from v2g.commands.running import run as _run

    async def ends() -> int:
        return 7

    async def fails() -> None:
        raise TransportError("the broker went away")

    cleaned: list[bool] = []

    async def terminated() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)  # a stop by signal still runs the service's cleanup

    assert _run(ends(), process="svc-a") == 7
    with pytest.raises(typer.Exit):
        _run(fails(), process="svc-b")
    assert _run(terminated(), process="svc-c") is None
    assert cleaned == [True]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "process_stopped" in ln]
    assert len(lines) == 3, lines
    assert "process=svc-a reason=end" in lines[0]
    assert "process=svc-b reason=error" in lines[1] and "the broker went away" in lines[1]
    assert "process=svc-c reason=signal signal=SIGTERM" in lines[2]
