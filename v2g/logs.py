"""Structured logs: one event a line, logfmt (key=value) or JSON, on stderr."""

from __future__ import annotations

import logging
import sys

import structlog


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was set up: a
    test runner that swaps and closes it must not leave the process logging into a closed
    file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: str = "kv", level: str = "info") -> None:
    """Set up structlog for the process; call once, first thing."""
    lvl = logging.getLevelNamesMapping().get(level.upper())
    if lvl is None:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.processors.LogfmtRenderer(
            key_order=["ts", "level", "event"], drop_missing=True
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Library loggers (aiomqtt, amqtt) speak only when something is wrong.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    # aiomqtt warns on every publish while more than 10 are pending: a burst of setpoints
    # is exactly that, by design.
    logging.getLogger("aiomqtt").setLevel(logging.ERROR)


def lifecycle() -> structlog.typing.FilteringBoundLogger:
    """A logger for a process's start and stop lines, written whatever the log level (the
    demo runs at warning): why a process ended is always worth its one line."""
    if not structlog.is_configured():
        configure()
    # The configured logger factory and processors; only the level filter is its own.
    return structlog.wrap_logger(  # type: ignore[no-any-return]
        None, wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )
