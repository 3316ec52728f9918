"""Run the web view: one operator connection reads the broker into the fleet view, and
uvicorn serves the page, in one TaskGroup; a signal stops both cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn
from pydantic import ValidationError

from broker.link import MqttLink
from broker.models import Capability, DispatchProgress, FleetStatus
from broker.settings import Settings
from core.errors import InvalidMessage, V2GError
from v2g import logs
from v2g.operator import Event, answer_of, operator_link
from v2g.web.app import Live, create_app
from v2g.web.options import parse_listen

log = structlog.get_logger("v2g.web")


class ListenError(V2GError):
    """The web view cannot listen on the address it was given (in use, not ours)."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or ListenError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ListenError(f"cannot listen on {host}:{port}: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; is another server on"
            " it? Give another --listen HOST:PORT"
        ) from None
    sock.setblocking(False)
    return sock


def apply(live: Live, settings: Settings, ev: Event) -> bool:
    """Fold one broker message into the view; False when it could not be read: such a
    message is counted (the page shows the count), logged and dropped, never fatal."""
    t = settings.topics
    if not ev.payload:  # a cleared retained topic
        return True
    view = live.view
    try:
        if ev.topic == t.fleet_status:
            view.on_status(FleetStatus.model_validate_json(ev.payload))
        elif ev.topic == t.fleet_capability:
            view.on_capability(Capability.model_validate_json(ev.payload))
        else:
            kind, rid = t.parse(ev.topic)
            if kind == "result":
                view.on_result(answer_of(ev.payload, rid))
            elif kind == "progress":
                view.on_progress(DispatchProgress.model_validate_json(ev.payload))
            else:
                return True
    except (ValidationError, InvalidMessage) as err:
        view.unreadable += 1
        view.version += 1
        log.warning("web_message_dropped", topic=ev.topic[:120], error=str(err)[:200])
        live.changed()
        return False
    live.changed()
    return True


async def _feed(live: Live, settings: Settings, queue: asyncio.Queue[Event]) -> None:
    while True:
        apply(live, settings, await queue.get())


async def _watch(live: Live, link: MqttLink) -> None:
    """Tell the page when the broker link drops or comes back (it reconnects by itself)."""
    while True:
        if live.view.on_broker(link.connected):
            live.changed()
        await asyncio.sleep(LINK_CHECK_S)


LINK_CHECK_S = 1.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the ``v2g`` command owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_web(
    settings: Settings,
    *,
    listen: str,
    token: str | None,
    answer_timeout_s: float = 15.0,
) -> None:
    """Serve the view on ``listen`` (HOST:PORT) until cancelled; ListenError if it cannot."""
    try:
        host, port = parse_listen(listen)
    except ValueError as err:
        raise ListenError(str(err)) from None
    t = settings.topics
    subs = [
        (t.fleet_status, 1),
        (t.fleet_capability, 1),
        (t.all_results, 1),
        (t.all_progress, 0),
    ]
    live = Live()
    app = create_app(settings, live, token=token, answer_timeout_s=answer_timeout_s)
    config = uvicorn.Config(
        app,
        log_config=None,  # ours: structlog lines, library loggers at warning
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    with contextlib.closing(listen_socket(host, port)) as sock:
        port = sock.getsockname()[1]
        async with operator_link(settings, subs) as (link, queue), asyncio.TaskGroup() as tg:
            feed = tg.create_task(_feed(live, settings, queue), name="web-feed")
            watch = tg.create_task(_watch(live, link), name="web-link-watch")
            http = tg.create_task(server.serve(sockets=[sock]), name="web-http")
            # The socket listens already: connections wait in its backlog until uvicorn runs.
            logs.lifecycle().info(
                "web_listening", url=f"http://{host}:{port}/", read_only=token is None
            )
            try:
                await asyncio.wait({feed, http}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Close the streams first: uvicorn's graceful shutdown then waits on nothing.
                live.close()
                server.should_exit = True
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(5.0):
                        await asyncio.wait({http})
                feed.cancel()
                watch.cancel()
