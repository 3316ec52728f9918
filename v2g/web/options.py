"""The flags of ``v2g web`` that are its own (the broker's are every command's): light
to import, since the CLI reads them at every start."""

from __future__ import annotations

from typing import Annotated

import typer

from core.settings import listen_address

DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); ValueError saying how."""
    return listen_address(text, bare_port=False)


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    return text


Listen = Annotated[
    str,
    typer.Option(
        "--listen",
        metavar="HOST:PORT",
        parser=_listen,
        help="serve the page here; keep it on loopback unless a proxy with TLS is in front",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="V2G_WEB_TOKEN",
        show_envvar=True,
        metavar="TOKEN",
        help="the login that lets the page send, amend and cancel requests (prefer the"
        " variable: a flag shows in the process list)",
        show_default="none: the page is read-only",
    ),
]
