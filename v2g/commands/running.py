"""Running a command: one-line errors with their exit code, a coroutine run to its end
(a long-running process also stops cleanly on SIGTERM), the platform clock read once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import typer

from broker.clocklink import SharedClock, shared_clock
from broker.settings import Settings
from core.errors import V2GError
from v2g import logs


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and end the command with ``code`` (2: usage)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


async def read_clock(settings: Settings) -> SharedClock:
    """The fleet's platform clock, read once (a command that publishes no anchor)."""
    async with shared_clock(settings, create=False) as shared:
        return shared


def run(coro: Any, process: str | None = None) -> Any:
    """Run ``coro`` to its end; our own errors end the command with one line. A
    ``process`` (a long-running service) also stops cleanly on SIGTERM as on Ctrl-C, and
    logs one ``process_stopped`` line saying why: signal, error or end."""
    stop: list[str] = []
    error: str | None = None
    try:
        return asyncio.run(until_signal(coro, stop) if process else coro)
    except KeyboardInterrupt:
        stop.append("SIGINT")
        return None
    except V2GError as err:
        error = str(err)
        fail(error, 1)
    except ExceptionGroup as group:  # from a TaskGroup: report our own errors plainly
        error = str(_first_leaf(group))
        ours = group.subgroup(V2GError)
        if ours is None:
            raise
        fail(str(_first_leaf(ours)), 1)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if process is not None:
            log = logs.lifecycle()
            if error is not None:
                log.error("process_stopped", process=process, reason="error", error=error)
            elif stop:
                log.info("process_stopped", process=process, reason="signal", signal=stop[0])
            else:
                log.info("process_stopped", process=process, reason="end")


async def until_signal(coro: Coroutine[Any, Any, Any], stop: list[str]) -> Any:
    """Await ``coro``; SIGINT or SIGTERM cancels it, so its cleanup runs (offline status,
    closed connections), and records which signal in ``stop``."""
    loop = asyncio.get_running_loop()
    task: asyncio.Task[Any] = asyncio.ensure_future(coro)

    def on_signal(sig: signal.Signals) -> None:
        stop.append(sig.name)
        task.cancel()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if stop:
            return None
        raise
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _first_leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err
