"""The ``v2g`` command line. ``v2g --help`` lists the commands, ``v2g CMD --help`` their flags.

Every command reads its settings from flags, then ``V2G_*`` environment variables, then
defaults (DESIGN.md, "Configuration"). This module only assembles the app; the commands
live in v2g/commands/ by audience (serve, operate, tools).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from typing import Annotated, Any, cast

import typer
from typer.core import TyperGroup

from v2g.commands import operate, serve, tools

# typer exports BadParameter but not its base, click's UsageError (of whichever copy of
# click this typer carries); every attribute used below is UsageError's own.
_UsageError = cast("type[typer.BadParameter]", typer.BadParameter.__mro__[1])


class _OneLineErrors(TyperGroup):
    """The ``v2g`` group: a bad flag is one line, what was wrong and where the flags are
    listed, instead of click's usage block around it."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except _UsageError as err:
            if err.ctx is None or type(err).__name__ == "NoArgsIsHelpError":
                err.show()  # the help page itself (no command given), or a bare message
            else:
                typer.echo(
                    f"error: {err.format_message()} (see {err.ctx.command_path} --help)",
                    err=True,
                )
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help=(
        "V2G fleet aggregation: simulated EVs, an aggregator and a dispatcher over MQTT.\n\n"
        "Sign convention: power_kw > 0 charges the vehicles (grid import), < 0 discharges"
        " them into the grid (export)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("v2g-fleet")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown (run from a source tree that is not installed: pip install -e .)"
        typer.echo(f"v2g {version}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    pass


# Grouped by audience; the order here is the order `v2g --help` lists the commands in.
serve.register(app)  # the processes: demo, broker, aggregator, agents, web, homeassistant, ocpp
operate.register(app)  # a live fleet: dispatch, cancel, amend, status, capability, report, reset
tools.register(app)  # offline: provision, simulate, grid show


def main() -> None:
    """Entry point of the ``v2g`` console script."""
    with contextlib.suppress(BrokenPipeError):
        app()


if __name__ == "__main__":
    main()
