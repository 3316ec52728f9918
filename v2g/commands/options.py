"""The flags and parsers the ``v2g`` commands share: a flag per setting (its V2G_* variable
and default shown from Settings), URL checks, durations and start times, and the settings
a command runs with (flags, then V2G_* variables, then defaults)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from broker.models import from_epoch
from broker.settings import Settings, check_broker_url, check_redis_url
from core.settings import listen_address
from v2g import logs, units
from v2g.commands.running import fail


def parse_duration(text: str | float, flag: str | None = None) -> float:
    """'900', '900s', '15m', '1.5h', '1d' -> seconds, as scenario files write them; a bad
    one is a usage error of ``flag``."""
    if isinstance(text, int | float):  # a default typer hands through the parser as is
        return float(text)
    try:
        return units.seconds(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=flag) from None


def every(seconds: float) -> Callable[[float], bool]:
    """A filter that passes a message stamped ``ts`` (platform epoch s) when ``seconds``
    have gone by since the last one it passed; 0 passes every one."""
    last = -math.inf

    def due(ts: float) -> bool:
        nonlocal last
        if ts - last < seconds:
            return False
        last = ts
        return True

    return due


# The flag that sets each Settings field, for errors that name what the user typed.
FLAG_OF: dict[str, str] = {}


def checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """A typer parser from a ``ValueError``-raising check: a bad value is a usage error."""

    def parse(text: str) -> str:
        try:
            return check(text)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None

    return parse


def setting_option(
    flag: str,
    field: str,
    help: str,
    *,
    metavar: str,
    parser: Callable[[str], Any] | None = None,
    default: str | None = None,
) -> Any:
    """A flag for ``Settings.<field>``. Its help shows the V2G_* variable and the default,
    both taken from Settings so neither can drift from what the process does; typer reads
    the variable too, so a bad value in it is named like a bad flag."""
    FLAG_OF[field] = flag
    if default is None:
        value = Settings.model_fields[field].default
        default = "none" if value is None else str(value)
    return typer.Option(
        flag,
        help=help,
        envvar=f"V2G_{field.upper()}",
        show_envvar=True,
        show_default=default,
        metavar=metavar,
        parser=parser,
    )


def listen_address_text(text: str) -> str:
    """``HOST:PORT`` or ``PORT`` -> ``HOST:PORT`` (host 127.0.0.1); ValueError otherwise."""
    host, port = listen_address(text)
    return f"{host}:{port}"


def url_option(flag: str, check: Callable[[str], str], help: str, shown_default: str) -> Any:
    """A URL flag that is not a setting (no V2G_* variable): checked as the setting is."""
    return typer.Option(
        flag, help=help, metavar="URL", parser=checked(check), show_default=shown_default
    )


Broker = Annotated[
    str | None,
    setting_option(
        "--broker",
        "broker_url",
        "MQTT broker URL",
        metavar="URL",
        parser=checked(check_broker_url),
    ),
]
Redis = Annotated[
    str | None,
    setting_option(
        "--redis", "redis_url", "Redis URL", metavar="URL", parser=checked(check_redis_url)
    ),
]
Prefix = Annotated[
    str | None, setting_option("--topic-prefix", "topic_prefix", "topic prefix", metavar="PREFIX")
]
RedisPrefix = Annotated[
    str | None,
    setting_option(
        "--redis-prefix",
        "redis_prefix",
        "Redis keys go under PREFIX:",
        metavar="PREFIX",
        default="the topic prefix",
    ),
]
ClientId = Annotated[
    str | None,
    setting_option(
        "--client-id",
        "client_id",
        "MQTT client id of the main connection; each process needs its own",
        metavar="ID",
        default="TOPIC_PREFIX-aggregator",
    ),
]
Speed = Annotated[
    float | None,
    setting_option(
        "--speed",
        "speed",
        "simulated seconds per wall second, the same for every process",
        metavar="X",
    ),
]
SimStart = Annotated[
    str | None,
    setting_option(
        "--sim-start",
        "sim_start",
        "simulated time the clock starts at, ISO 8601 or epoch s",
        metavar="TIME",
        default="the fleet's on the bus, else now",
    ),
]
LogFormat = Annotated[
    str | None, setting_option("--log-format", "log_format", "kv (logfmt) or json", metavar="FMT")
]
ColdStart = Annotated[
    bool,
    typer.Option(
        "--cold-start",
        help="start every plugged-in car at its arrival energy, as if it had just plugged in"
        " (default: with what its baseline charging since arrival put in it)",
    ),
]
AnswerTimeout = Annotated[
    float, typer.Option(min=0.1, help="wait this many wall seconds for the answer")
]
Json = Annotated[bool, typer.Option("--json", help="print each answer as one JSON object per line")]
Every = Annotated[
    float,
    typer.Option(
        "--every",
        parser=parse_duration,
        metavar="SECONDS",
        help="print at most one line per this much platform time (e.g. 60, 5m); 0: every one",
    ),
]


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (``\\b`` stops rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def is_relative(text: str) -> bool:
    """True for a start like '+10m', counted from the platform clock's now."""
    return text.strip().startswith("+")


def parse_start(text: str, *, now: float | None = None) -> datetime:
    """An ISO 8601 time with a zone ('2026-11-26T18:00:00Z'), or '+10m' from ``now``, the
    platform clock's time (simulated when the clock is accelerated), never the wall's."""
    if is_relative(text):
        if now is None:
            raise ValueError("a relative start needs the platform clock's time")
        return from_epoch(round(now)) + timedelta(seconds=parse_duration(text.strip()[1:]))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time; use ISO 8601 with a zone or +15m"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no time zone; add Z or +00:00")
    return moment


def settings_from(**overrides: Any) -> Settings:
    """Flags win over V2G_* variables, which win over defaults."""
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
        msg = str(first["msg"]).removeprefix("Value error, ")
        fail(f"{flag} (or V2G_{name.upper()}): {msg}")
    logs.configure(settings.log_format, settings.log_level)
    return settings
