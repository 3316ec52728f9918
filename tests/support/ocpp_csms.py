"""A minimal CSMS on loopback: the ``ocpp`` library's CSMS side over ``websockets.serve``.

Enough to test the simulated stations (agents/ocpp_stations.py) and to bench them: it
accepts ``ocpp2.1`` and ``ocpp2.0.1`` (and refuses a connection without either), checks
HTTP Basic credentials when given a password, answers every CALL a station sends,
records what each station said, and sends SetChargingProfile, UpdateDynamicSchedule,
ClearChargingProfile, NotifyAllowedEnergyTransfer and TriggerMessage on demand. Not the
gateway (that is ``v2g ocpp``): no fleet, no allocation. Imports no pytest, so the
benchmarks use it too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from ocpp.v21 import ChargePoint as Cp21
from ocpp.v21 import call as call21
from ocpp.v201 import ChargePoint as Cp201
from ocpp.v201 import call as call201
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from agents.ocpp_stations import on

HOST = "127.0.0.1"
SUBPROTOCOLS = [Subprotocol("ocpp2.1"), Subprotocol("ocpp2.0.1")]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Seen:
    """What one station said: (action, payload in snake_case) in order of arrival."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def of(self, action: str) -> list[dict[str, Any]]:
        return [p for a, p in self.messages if a == action]


class _Answers:
    """Every CALL a station sends gets a schema-valid answer, and is recorded."""

    id: str
    csms: MiniCsms
    _call_result: Any

    def _saw(self, action: str, payload: dict[str, Any]) -> None:
        self.csms.seen[self.id].messages.append((action, payload))
        self.csms.changed.set()

    @on("BootNotification")
    def boot(self, **kw: Any) -> Any:
        self._saw("BootNotification", kw)
        return self._call_result.BootNotification(
            current_time=now_iso(), interval=self.csms.heartbeat_s, status="Accepted"
        )

    @on("Heartbeat")
    def heartbeat(self, **kw: Any) -> Any:
        self._saw("Heartbeat", kw)
        return self._call_result.Heartbeat(current_time=now_iso())

    @on("StatusNotification")
    def status(self, **kw: Any) -> Any:
        self._saw("StatusNotification", kw)
        return self._call_result.StatusNotification()

    @on("TransactionEvent")
    def transaction(self, **kw: Any) -> Any:
        self._saw("TransactionEvent", kw)
        return self._call_result.TransactionEvent()

    @on("MeterValues")
    def meter_values(self, **kw: Any) -> Any:
        self._saw("MeterValues", kw)
        return self._call_result.MeterValues()

    @on("NotifyEVChargingNeeds")
    def needs(self, **kw: Any) -> Any:
        self._saw("NotifyEVChargingNeeds", kw)
        return self._call_result.NotifyEVChargingNeeds(status="Accepted")


class _Csms21(_Answers, Cp21):  # type: ignore[misc]  # ocpp ships no types
    pass


class _Csms201(_Answers, Cp201):  # type: ignore[misc]
    pass


class MiniCsms:
    """Run with ``async with MiniCsms() as csms``; stations connect to ``csms.url``."""

    def __init__(
        self,
        *,
        password: str | None = None,
        heartbeat_s: int = 60,
        response_timeout_s: float = 10,
        validate: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``validate=False``: no JSON-schema checks either way (a benchmark's reference);
        ``ssl_context``: serve ``wss://`` (Security Profile 2)."""
        self.ssl_context = ssl_context
        self.password = password
        self.validate = validate
        self.heartbeat_s = heartbeat_s
        self.response_timeout_s = response_timeout_s
        self.seen: defaultdict[str, Seen] = defaultdict(Seen)
        self.points: dict[str, Any] = {}
        self.sockets: dict[str, ServerConnection] = {}
        self.refused: list[tuple[str, int]] = []
        self.changed = asyncio.Event()
        self._server: Server | None = None
        self._profile_id = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://{HOST}:{self.port}"

    async def __aenter__(self) -> MiniCsms:
        self._server = await serve(
            self._handle,
            HOST,
            0,
            subprotocols=SUBPROTOCOLS,
            process_request=self._check,
            max_size=2**20,
            ssl=self.ssl_context,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._server.wait_closed()

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        """Credentials first (401), then the subprotocol (400), as a CSMS must."""
        station = request.path.strip("/")
        if self.password is not None:
            want = base64.b64encode(f"{station}:{self.password}".encode()).decode()
            if request.headers.get("Authorization") != f"Basic {want}":
                self.refused.append((station, 401))
                return conn.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
        offered = [
            p.strip()
            for h in request.headers.get_all("Sec-WebSocket-Protocol")
            for p in h.split(",")
        ]
        if not set(offered) & set(SUBPROTOCOLS):
            self.refused.append((station, 400))
            return conn.respond(HTTPStatus.BAD_REQUEST, "subprotocol ocpp2.1 or ocpp2.0.1\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        station = ws.request.path.strip("/")
        cls = _Csms21 if ws.subprotocol == "ocpp2.1" else _Csms201
        cp = cls(station, ws, response_timeout=self.response_timeout_s)
        cp.csms = self
        if not self.validate:
            for route in cp.route_map.values():
                route["_skip_schema_validation"] = True
        self.points[station] = cp
        self.sockets[station] = ws
        self.seen[station]  # a station that connects is seen, even silent
        self.changed.set()
        with contextlib.suppress(Exception):
            await cp.start()
        if self.sockets.get(station) is ws:
            del self.sockets[station]
            del self.points[station]

    # -- waiting ----------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until ``predicate()`` holds (checked at every message), or TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self.changed.wait()

    def last(self, station: str, action: str) -> dict[str, Any] | None:
        got = self.seen[station].of(action)
        return got[-1] if got else None

    def transaction_id(self, station: str) -> str:
        events = self.seen[station].of("TransactionEvent")
        started = [e for e in events if e["event_type"] in ("Started", "Updated")]
        return str(started[-1]["transaction_info"]["transaction_id"])

    # -- sending ----------------------------------------------------------------------
    def _call(self, station: str) -> Any:
        return call21 if self.points[station]._ocpp_version == "2.1" else call201

    def profile(
        self,
        station: str,
        *,
        setpoint_w: float | None = None,
        limit_w: float | None = None,
        discharge_limit_w: float | None = None,
        mode: str | None = None,
        duration_s: int | None = None,
        kind: str = "Absolute",
        max_offline_s: int | None = None,
        unit: str = "W",
    ) -> dict[str, Any]:
        """A TxProfile with one period from now (snake_case, for the ``ocpp`` dataclasses)."""
        self._profile_id += 1
        period: dict[str, Any] = {"start_period": 0}
        if limit_w is not None:
            period["limit"] = limit_w
        if setpoint_w is not None:
            period["setpoint"] = setpoint_w
        if discharge_limit_w is not None:
            period["discharge_limit"] = discharge_limit_w
        if mode is not None:
            period["operation_mode"] = mode
        schedule: dict[str, Any] = {
            "id": self._profile_id,
            "charging_rate_unit": unit,
            "charging_schedule_period": [period],
        }
        if kind != "Relative":
            schedule["start_schedule"] = now_iso()
        if duration_s is not None:
            schedule["duration"] = duration_s
        prof: dict[str, Any] = {
            "id": self._profile_id,
            "stack_level": 0,
            "charging_profile_purpose": "TxProfile",
            "charging_profile_kind": kind,
            "charging_schedule": [schedule],
            "transaction_id": self.transaction_id(station),
        }
        if max_offline_s is not None:
            prof["max_offline_duration"] = max_offline_s
            prof["invalid_after_offline_duration"] = True
        return prof

    async def set_profile(self, station: str, profile: dict[str, Any]) -> Any:
        """SetChargingProfile; the answer (raises on a CALLERROR)."""
        return await self.points[station].call(
            self._call(station).SetChargingProfile(evse_id=1, charging_profile=profile),
            suppress=False,
            skip_schema_validation=not self.validate,
        )

    async def timed_profile(self, station: str, profile: dict[str, Any]) -> tuple[Any, float]:
        """SetChargingProfile and the seconds from send to answer."""
        t = time.perf_counter()
        res = await self.set_profile(station, profile)
        return res, time.perf_counter() - t

    async def update_dynamic(self, station: str, profile_id: int, **update: float) -> Any:
        return await self.points[station].call(
            call21.UpdateDynamicSchedule(charging_profile_id=profile_id, schedule_update=update),
            suppress=False,
            skip_schema_validation=not self.validate,
        )

    async def clear_profile(self, station: str) -> Any:
        return await self.points[station].call(
            self._call(station).ClearChargingProfile(), suppress=False
        )

    async def allow(self, station: str, modes: list[str]) -> Any:
        return await self.points[station].call(
            call21.NotifyAllowedEnergyTransfer(
                allowed_energy_transfer=modes, transaction_id=self.transaction_id(station)
            ),
            suppress=False,
            skip_schema_validation=not self.validate,
        )

    async def trigger(self, station: str, message: str, custom: str | None = None) -> Any:
        return await self.points[station].call(
            self._call(station).TriggerMessage(
                requested_message=message, **({"custom_trigger": custom} if custom else {})
            ),
            suppress=False,
            skip_schema_validation=not self.validate,
        )

    async def drop(self, station: str) -> None:
        """Close a station's websocket from the CSMS side (the station should come back)."""
        await self.sockets[station].close(code=1011, reason="test drop")


@contextlib.asynccontextmanager
async def running(task_coro: Any, name: str = "stations") -> AsyncIterator[asyncio.Task[Any]]:
    """Run a coroutine as a task for the block, cancel and await it after."""
    task = asyncio.create_task(task_coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10.0):
                await task
