"""The web view's ASGI app (Starlette): the page, its assets, a server-sent event stream of
the fleet view, and the operator's actions behind a login.

Every action is the CLI's: the same validated wire messages (``DispatchRequest``,
``DispatchAmend``, a cancel) sent and answered by :mod:`v2g.operator`. Without a token
set at start the page is read-only and every action is refused with 403."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.clocklink import shared_clock
from broker.models import DispatchAmend, DispatchRequest, DispatchResult, Service, from_epoch
from broker.settings import Settings
from broker.topics import check_id
from core.errors import V2GError
from v2g import operator, units
from v2g.web.view import FleetView

STATIC = Path(__file__).parent / "static"
COOKIE = "v2g_session"
MAX_SESSIONS = 64  # logins kept; the oldest is logged out past this
MAX_BODY = 4096  # an action's JSON body is a few fields
KEEPALIVE_S = 15.0  # a comment line on a quiet stream, so proxies keep it open
MIN_SEND_GAP_S = 0.25  # at most 4 snapshots a second per stream
MAX_WRONG = 10  # wrong tokens (login or bearer) within WRONG_WINDOW_S before a lock
WRONG_WINDOW_S = 60.0

# The page loads nothing from anywhere else: every asset ships in the package.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

log = structlog.get_logger("v2g.web")


class Live:
    """The fleet view and a wake-up for the streams that send it."""

    def __init__(self, view: FleetView | None = None) -> None:
        self.view = view or FleetView()
        self.closing = False
        self._tick = asyncio.Event()
        self._json: tuple[int, str] = (-1, "")

    def snapshot_json(self) -> str:
        """The view as JSON, encoded once per version however many streams send it."""
        if self._json[0] != self.view.version:
            self._json = (self.view.version, json.dumps(self.view.snapshot()))
        return self._json[1]

    def changed(self) -> None:
        """Wake every stream (call after the view changed)."""
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self.closing = True
        self.changed()

    async def wait(self, version: int, timeout_s: float) -> None:
        """Return once the view is past ``version``, on close, or after ``timeout_s``."""
        if self.view.version != version or self.closing:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._tick.wait()


class _Sessions:
    """Logged-in browsers: random session ids in a bounded set; the token never leaves.
    Past MAX_WRONG wrong tokens within WRONG_WINDOW_S, no token is taken (not even the
    right one) until the oldest of them is that old: guessing gets nowhere fast."""

    def __init__(self, token: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token
        self._ids: deque[str] = deque(maxlen=MAX_SESSIONS)
        self._wrong: deque[float] = deque(maxlen=MAX_WRONG)
        self._clock = clock

    def locked_for(self) -> float:
        """Seconds until a token is taken again (0: now)."""
        if len(self._wrong) < MAX_WRONG:
            return 0.0
        return max(0.0, self._wrong[0] + WRONG_WINDOW_S - self._clock())

    def check(self, token: str) -> bool:
        if self.token is None or self.locked_for() > 0:
            return False
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return True
        self._wrong.append(self._clock())
        return False

    def open(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._ids.append(sid)
        return sid

    def close(self, sid: str | None) -> None:
        if sid is not None and sid in self._ids:
            self._ids.remove(sid)

    def allows(self, request: Request) -> bool:
        if self.token is None:
            return False
        sid = request.cookies.get(COOKIE)
        if sid is not None and any(hmac.compare_digest(sid, s) for s in self._ids):
            return True
        auth = request.headers.get("authorization", "")
        return auth.startswith("Bearer ") and self.check(auth[7:])


class ActionRefused(V2GError):
    """An action refused before it reaches the broker: the HTTP status and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _body(request: Request) -> dict[str, Any]:
    """The action's JSON object; JSON only, so a cross-site form cannot post one."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ActionRefused(415, "send the action as JSON (Content-Type: application/json)")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ActionRefused(413, f"an action is at most {MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ActionRefused(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ActionRefused(400, "the body must be a JSON object")
    return data


def _duration(value: Any, field: str) -> float:
    """'15m', '1h', '900' or a number of seconds, as the CLI reads ``--duration``."""
    try:
        return float(value) if isinstance(value, int | float) else units.seconds(str(value))
    except ValueError as err:
        raise ActionRefused(400, f"{field}: {err}") from None


def _number(data: dict[str, Any], field: str) -> float | None:
    value = data.get(field)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ActionRefused(400, f"{field}: {value!r} is not a number") from None


def is_relative(start: Any) -> bool:
    """A start like '+30m': from the platform clock's now, as ``v2g dispatch --start``."""
    return isinstance(start, str) and start.strip().startswith("+")


def _start(start: Any, now: float | None) -> datetime | None:
    if start is None or start == "":
        return None
    if is_relative(start):
        if now is None:
            raise ActionRefused(400, "a relative start needs the platform clock")
        return from_epoch(round(now)) + timedelta(
            seconds=_duration(str(start).strip()[1:], "start")
        )
    try:
        return datetime.fromisoformat(str(start).replace("Z", "+00:00"))
    except ValueError:
        raise ActionRefused(
            400, f"start: {start!r} is not +DURATION (e.g. +30m) or an ISO 8601 time with a zone"
        ) from None


def build_request(data: dict[str, Any], *, now: float | None = None) -> DispatchRequest:
    """A DispatchRequest from the page's form, validated as the CLI's is; ``now`` is the
    platform clock's time, for a start like '+30m'."""
    known = {"request_id", "service", "power_kw", "capacity_kw", "duration", "start", "priority"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ActionRefused(400, f"unknown fields {unknown}; a request takes {sorted(known)}")
    moment = _start(data.get("start"), now)
    priority = data.get("priority")
    try:
        return DispatchRequest(
            request_id=data.get("request_id") or f"web-{secrets.token_hex(5)}",
            service=Service(data.get("service") or Service.MANUAL),
            power_kw=_number(data, "power_kw"),
            capacity_kw=_number(data, "capacity_kw"),
            start=moment,
            duration_s=_duration(data.get("duration", "15m"), "duration"),
            priority=None if priority in (None, "") else int(priority),
        )
    except (ValidationError, ValueError) as err:
        raise ActionRefused(400, f"invalid request: {_first_error(err)}") from None


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(err)


def create_app(
    settings: Settings,
    live: Live,
    *,
    token: str | None,
    answer_timeout_s: float = 15.0,
) -> Starlette:
    """The ASGI app over ``live`` (fed by :func:`v2g.web.serve.run_web`)."""
    sessions = _Sessions(token)
    # An action opens its own operator connection, as the CLI's commands do; a client id
    # forced by V2G_CLIENT_ID would knock the page's own reader off the broker.
    acting = settings.model_copy(update={"client_id": None})

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def state(_: Request) -> Response:
        return JSONResponse(live.view.snapshot())

    async def whoami(request: Request) -> Response:
        return JSONResponse(
            {
                "read_only": token is None,
                "logged_in": sessions.allows(request),
                "topic_prefix": settings.topic_prefix,
            }
        )

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            sent = -1
            while not live.closing:
                if live.view.version != sent:
                    sent = live.view.version
                    yield f"data: {live.snapshot_json()}\n\n"
                    await asyncio.sleep(MIN_SEND_GAP_S)
                    continue
                await live.wait(sent, KEEPALIVE_S)
                if live.view.version == sent and not live.closing:
                    yield ": keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def login(request: Request) -> Response:
        try:
            data = await _body(request)
        except ActionRefused as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if token is None:
            return JSONResponse({"error": _READ_ONLY}, status_code=403)
        if (wait := sessions.locked_for()) > 0:
            return _locked(wait)
        if not sessions.check(str(data.get("token", ""))):
            log.warning("web_login_refused", client=_client(request))
            return JSONResponse({"error": "wrong token"}, status_code=401)
        response = JSONResponse({"logged_in": True})
        response.set_cookie(COOKIE, sessions.open(), httponly=True, samesite="strict")
        log.info("web_login", client=_client(request))
        return response

    async def logout(request: Request) -> Response:
        sessions.close(request.cookies.get(COOKIE))
        response = JSONResponse({"logged_in": False})
        response.delete_cookie(COOKIE)
        return response

    def action(
        what: str, run: Callable[[Request, dict[str, Any]], Awaitable[DispatchResult]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not sessions.allows(request):
                if token is not None and (wait := sessions.locked_for()) > 0:
                    return _locked(wait)
                message = _READ_ONLY if token is None else "log in first"
                return JSONResponse({"error": message}, status_code=403)
            try:
                data = await _body(request)
                answer = await run(request, data)
            except ActionRefused as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            except V2GError as err:  # no answer in time, broker unreachable
                log.warning("web_action_failed", action=what, error=str(err))
                return JSONResponse({"error": str(err)}, status_code=504)
            live.view.on_result(answer)
            live.changed()
            log.info("web_action", action=what, request_id=answer.request_id, status=answer.status)
            return JSONResponse(answer.model_dump(mode="json", exclude_none=True))

        return endpoint

    async def send(_: Request, data: dict[str, Any]) -> DispatchResult:
        now = None
        if is_relative(data.get("start")):
            # '+30m' is on the fleet's clock, read on the bus as the CLI reads it.
            async with shared_clock(acting, create=False) as shared:
                now = shared.clock.now()
        req = build_request(data, now=now)
        return await operator.dispatch(
            acting, req, wait=False, timeout_s=answer_timeout_s, on_result=lambda _: None
        )

    def _rid(request: Request) -> str:
        try:
            return check_id(request.path_params["request_id"], "request id")
        except ValueError as err:
            raise ActionRefused(400, str(err)) from None

    async def amend(request: Request, data: dict[str, Any]) -> DispatchResult:
        rid = _rid(request)
        unknown = sorted(set(data) - {"power_kw", "duration"})
        if unknown:
            raise ActionRefused(
                400, f"unknown fields {unknown}; an amendment takes power_kw, duration"
            )
        power = _number(data, "power_kw")
        duration = data.get("duration") or None
        if power is None and duration is None:
            raise ActionRefused(400, "give power_kw, duration or both")
        try:
            change = DispatchAmend(
                power_kw=power,
                duration_s=None if duration is None else _duration(duration, "duration"),
            )
        except ValidationError as err:
            raise ActionRefused(400, f"invalid amendment: {_first_error(err)}") from None
        return await operator.amend(acting, rid, change, timeout_s=answer_timeout_s)

    async def cancel(request: Request, _: dict[str, Any]) -> DispatchResult:
        return await operator.cancel(acting, _rid(request), timeout_s=answer_timeout_s)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/api/whoami", whoami),
            Route("/api/events", events),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/logout", logout, methods=["POST"]),
            Route("/api/dispatch", action("dispatch", send), methods=["POST"]),
            Route("/api/dispatch/{request_id}/amend", action("amend", amend), methods=["POST"]),
            Route("/api/dispatch/{request_id}/cancel", action("cancel", cancel), methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )


class _SecurityHeaders:
    """Adds the CSP and friends to every response (plain ASGI: the event stream passes
    through unbuffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, sending)


_READ_ONLY = "this view is read-only: start v2g web with --token or V2G_WEB_TOKEN to act from it"


def _locked(wait_s: float) -> Response:
    return JSONResponse(
        {"error": f"too many wrong tokens: no login for {wait_s:.0f} s"},
        status_code=429,
        headers={"Retry-After": str(max(1, round(wait_s)))},
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
