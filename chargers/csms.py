"""The OCPP-J server side: websocket handshake (auth, subprotocol) and per-station framing.

Each station connects to ``ws://HOST:PORT/{station_id}`` with subprotocol ``ocpp2.1`` or
``ocpp2.0.1``. Authentication comes first (HTTP 401 before the upgrade), then the
subprotocol (HTTP 400). After the upgrade a :class:`Station` reads frames: a CALL is
validated against the ocpp library's schemas and answered (by the :class:`Handlers`, or
with a schema-valid default), a malformed one gets the OCPP-J CALLERROR that names what
was wrong, and nothing a station sends ends its connection or touches another station.

The ocpp library's ChargePoint does the outgoing side (one CALL in flight per station,
responses matched by id); its incoming side is replaced here, because ocpp 2.1.0 answers
nothing to an unhandled action on 2.1 and drops frames that are not JSON silently.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import structlog
from jsonschema.exceptions import best_match
from ocpp.charge_point import ChargePoint
from ocpp.messages import Call, CallError, CallResult, get_validator
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chargers.auth import STATION_ID_RE, StationStore, Verdict, authenticate
from core.errors import V2GError

SUBPROTOCOLS = {"ocpp2.1": "2.1", "ocpp2.0.1": "2.0.1"}
CALL, CALLRESULT, CALLERROR, SEND = 2, 3, 4, 6
MAX_FRAME_BYTES = 1 << 20  # the largest OCPP message is a few kB; a megabyte is hostile
# Credential checks at once: a reconnect storm of thousands of stations queues here rather
# than exhausting the store's connection pool (and the CPU, with scrypt).
AUTH_CONCURRENCY = 16
AUTH_TIMEOUT_S = 10.0

# What a charging station may send to a CSMS (OCPP 2.0.1 Part 2, and the 2.1 additions).
# Anything else the version knows is a CSMS-to-station action: NotSupported. An action the
# version does not know at all: NotImplemented.
FROM_STATION_201 = frozenset(
    {
        "Authorize",
        "BootNotification",
        "ClearedChargingLimit",
        "DataTransfer",
        "FirmwareStatusNotification",
        "Get15118EVCertificate",
        "GetCertificateStatus",
        "Heartbeat",
        "LogStatusNotification",
        "MeterValues",
        "NotifyChargingLimit",
        "NotifyCustomerInformation",
        "NotifyDisplayMessages",
        "NotifyEVChargingNeeds",
        "NotifyEVChargingSchedule",
        "NotifyEvent",
        "NotifyMonitoringReport",
        "NotifyReport",
        "PublishFirmwareStatusNotification",
        "ReportChargingProfiles",
        "ReservationStatusUpdate",
        "SecurityEventNotification",
        "SignCertificate",
        "StatusNotification",
        "TransactionEvent",
    }
)
FROM_STATION_21 = FROM_STATION_201 | {
    "BatterySwap",
    "ClosePeriodicEventStream",
    "GetCertificateChainStatus",
    "NotifyDERAlarm",
    "NotifyDERStartStop",
    "NotifyPriorityCharging",
    "NotifySettlement",
    "OpenPeriodicEventStream",
    "PullDynamicScheduleUpdate",
    "ReportDERControl",
    "VatNumberValidation",
}
FROM_STATION = {"2.1": FROM_STATION_21, "2.0.1": FROM_STATION_201}

Json = dict[str, Any]


class CallErrorReceived(V2GError):
    """The station answered a CALL of ours with a CALLERROR."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_answer(action: str, version: str, payload: Json, *, heartbeat_s: int) -> Json:
    """A schema-valid answer to any CALL a station may send: what a CSMS that has nothing
    to say answers (Accepted where there is a status, the empty object where there is none)."""
    if action == "BootNotification":
        return {"currentTime": now_iso(), "interval": heartbeat_s, "status": "Accepted"}
    if action == "Heartbeat":
        return {"currentTime": now_iso()}
    if action == "Authorize":
        return {"idTokenInfo": {"status": "Accepted"}}
    if action == "TransactionEvent":
        return {"idTokenInfo": {"status": "Accepted"}} if payload.get("idToken") else {}
    if action == "DataTransfer":
        return {"status": "UnknownVendorId"}
    if action == "Get15118EVCertificate":
        return {"status": "Failed", "exiResponse": ""}
    if action in ("SignCertificate", "VatNumberValidation"):
        base: Json = {"status": "Rejected"}
        if action == "VatNumberValidation":
            base["vatNumber"] = str(payload.get("vatNumber", ""))
        return base
    if action == "GetCertificateStatus":
        return {"status": "Failed"}
    answer: Json = minimal_instance(get_validator(CALLRESULT, action, version).schema)
    return answer


def minimal_instance(schema: Json, root: Json | None = None) -> Any:
    """The smallest instance of a JSON schema (required properties only; an enum takes
    "Accepted" when it has it, else its first value)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        return minimal_instance(root["definitions"][name], root)
    if "enum" in schema:
        return "Accepted" if "Accepted" in schema["enum"] else schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: minimal_instance(props[k], root) for k in schema.get("required", [])}
    if kind == "array":
        return [minimal_instance(schema["items"], root) for _ in range(schema.get("minItems", 0))]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0.0))
    if kind == "boolean":
        return False
    return "x" * int(schema.get("minLength", 0))


def schema_error(action: str, version: str, payload: Any) -> tuple[str, str] | None:
    """(OCPP-J error code, description) if ``payload`` breaks the action's request schema."""
    validator = get_validator(CALL, action, version)
    err = best_match(validator.iter_errors(payload))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "payload"
    if err.validator == "required":
        code = "OccurrenceConstraintViolation"
    elif err.validator in ("type", "maxLength", "minLength", "enum"):
        code = (
            "TypeConstraintViolation" if err.validator != "enum" else "PropertyConstraintViolation"
        )
    else:
        code = "FormatViolation"
    return code, f"{where}: {err.message}"[:255]


class Handlers(Protocol):
    """What the gateway does with a station's CALLs and its connection."""

    def connected(self, station: Station) -> None: ...

    def disconnected(self, station: Station) -> None: ...

    def on_call(self, station: Station, action: str, payload: Json) -> Json | None:
        """Fold the CALL into the gateway's state; return the answer, or None for the
        default. Never awaits: an outgoing CALL goes through ``station.post``."""
        ...


class Station(ChargePoint):  # type: ignore[misc]
    """One connected station: the library's ChargePoint (outgoing CALLs) with our own
    handling of everything the station sends."""

    def __init__(
        self,
        station_id: str,
        connection: ServerConnection,
        version: str,
        handlers: Handlers,
        *,
        heartbeat_s: int,
        response_timeout: float,
        logger: structlog.typing.FilteringBoundLogger,
        call_errors: Counter[str] | None = None,
    ) -> None:
        super().__init__(station_id, connection, response_timeout=response_timeout)
        # CALLERRORs sent, by code, for the whole process (the station's own go with it)
        self.call_errors: Counter[str] = Counter() if call_errors is None else call_errors
        self._ocpp_version = version
        self.version = version
        self.handlers = handlers
        self.heartbeat_s = heartbeat_s
        self.log = logger.bind(station=station_id, ocpp=version)
        self.counts: Counter[str] = Counter()
        self.booted = False
        self._jobs: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()

    # -- outgoing ------------------------------------------------------------------------

    def post(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` (which may CALL the station) on this station's sender task, in order."""
        self._jobs.put_nowait(job)

    async def call_raw(
        self, action: str, payload: Json, *, timeout: float | None = None, validate: bool = True
    ) -> Json:
        """Send a CALL (payload in OCPP's own camelCase), validated both ways against the
        schema; return the CALLRESULT's payload. Raises CallErrorReceived or TimeoutError.

        ``validate=False`` skips the check of our own payload (the answer is always
        checked): for the hot path whose builder is held to the schema by tests."""
        call = Call(unique_id=str(uuid.uuid4()), action=action, payload=payload)
        if validate:
            get_validator(CALL, action, self.version).validate(payload)
        async with self._call_lock:
            await self._send(call.to_json())
            response = await self._get_specific_response(
                call.unique_id, timeout or self._response_timeout
            )
        if response.message_type_id == CALLERROR:
            raise CallErrorReceived(response.error_code, response.error_description)
        get_validator(CALLRESULT, action, self.version).validate(response.payload)
        result: Json = response.payload
        return result

    async def _sender(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                await job()
            except ConnectionClosed:
                return
            except (TimeoutError, CallErrorReceived) as err:
                self.counts["call_failed"] += 1
                self.log.warning("ocpp_call_failed", error=str(err)[:200])
            except Exception as err:  # an answer that breaks its schema, or our bug
                self.counts["call_failed"] += 1
                self.log.warning("ocpp_call_failed", error=repr(err)[:200])

    async def close(self, reason: str) -> None:
        """Close the websocket (the station reconnects, wherever the balancer sends it)."""
        await self._connection.close(1001, reason[:120])

    # -- incoming ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read and answer frames until the connection closes; the sender runs beside."""
        async with asyncio.TaskGroup() as tg:
            sender = tg.create_task(self._sender(), name=f"ocpp-sender-{self.id}")
            try:
                while True:
                    raw = await self._connection.recv()
                    await self.route_message(raw)
            except ConnectionClosed:
                pass
            finally:
                sender.cancel()

    async def route_message(self, raw: str | bytes) -> None:
        """One frame: a CALL is answered, a CALLRESULT/CALLERROR goes to the waiting call,
        anything malformed is answered with the CALLERROR OCPP-J names for it."""
        if isinstance(raw, bytes):
            await self._error("-1", "RpcFrameworkError", "binary frames are not OCPP-J")
            return
        try:
            frame = json.loads(raw)
        except ValueError:
            await self._error("-1", "RpcFrameworkError", "the frame is not JSON")
            return
        if not isinstance(frame, list) or len(frame) < 3 or type(frame[0]) is not int:
            uid = frame[1] if isinstance(frame, list) and len(frame) > 1 else "-1"
            await self._error(
                uid if isinstance(uid, str) else "-1",
                "RpcFrameworkError",
                "a frame is [MessageTypeId, MessageId, ...]",
            )
            return
        kind, uid = frame[0], frame[1]
        if not isinstance(uid, str) or not 0 < len(uid) <= 36:
            await self._error("-1", "RpcFrameworkError", "MessageId must be a string of 1-36")
            return
        if kind == CALL:
            await self._on_call(frame)
        elif kind in (CALLRESULT, CALLERROR) and not self._call_lock.locked():
            self.counts["unsolicited"] += 1  # no CALL of ours waits: nothing to match it
        elif kind == CALLRESULT and len(frame) == 3:
            self._response_queue.put_nowait(CallResult(uid, frame[2]))
        elif kind == CALLERROR and len(frame) >= 4:
            self._response_queue.put_nowait(
                CallError(uid, frame[2], frame[3], frame[4] if len(frame) > 4 else {})
            )
        elif kind == SEND and self.version == "2.1":
            self.counts["send"] += 1  # SEND (2.1) is never answered
        else:
            await self._error(uid, "MessageTypeNotSupported", f"MessageTypeId {kind}")

    async def _on_call(self, frame: list[Any]) -> None:
        uid = frame[1]
        if len(frame) != 4 or not isinstance(frame[2], str) or not isinstance(frame[3], dict):
            await self._error(uid, "RpcFrameworkError", "a CALL is [2, id, action, {payload}]")
            return
        action, payload = frame[2], frame[3]
        if action not in FROM_STATION[self.version]:
            known = self._knows(action)
            await self._error(
                uid,
                "NotSupported" if known else "NotImplemented",
                f"{action} is {'not sent by a charging station' if known else 'unknown'}"
                f" in OCPP {self.version}",
            )
            return
        problem = schema_error(action, self.version, payload)
        if problem is not None:
            await self._error(uid, *problem)
            return
        self.counts[action] += 1
        if action == "BootNotification":
            self.booted = True
        try:
            answer = self.handlers.on_call(self, action, payload)
            if answer is None:
                answer = default_answer(action, self.version, payload, heartbeat_s=self.heartbeat_s)
            get_validator(CALLRESULT, action, self.version).validate(answer)
        except Exception as err:  # our bug: answer it, log it, keep the station
            self.log.exception("ocpp_handler_error", action=action, error=repr(err)[:200])
            await self._error(uid, "InternalError", "the CSMS failed to handle this CALL")
            return
        await self._send(json.dumps([CALLRESULT, uid, answer], separators=(",", ":")))

    def _knows(self, action: str) -> bool:
        try:
            get_validator(CALL, action, self.version)
        except Exception:
            return False
        return True

    async def _error(self, uid: str, code: str, description: str) -> None:
        self.counts[f"error:{code}"] += 1
        self.call_errors[code] += 1
        self.log.warning("ocpp_call_error_sent", code=code, message_id=uid, reason=description)
        await self._send(json.dumps([CALLERROR, uid, code, description, {}]))

    async def _send(self, message: str) -> None:
        await self._connection.send(message)


class Csms:
    """The websocket server: auth, subprotocol, one :class:`Station` per connection."""

    def __init__(
        self,
        *,
        handlers: Handlers,
        stations: StationStore,
        open_mode: bool = False,
        heartbeat_s: int = 60,
        response_timeout_s: float = 10.0,
        ping_s: float = 5.0,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.handlers = handlers
        self.stations_store = stations
        self.open_mode = open_mode
        self.heartbeat_s = heartbeat_s
        self.response_timeout_s = response_timeout_s
        # A station whose link died without a close is found out by the pings: within
        # 2 x ping_s, inside the fleet's stale bound at the default of one per 5 s.
        self.ping_s = ping_s
        self.log = logger or structlog.get_logger("ocpp")
        self.refused: Counter[str] = Counter()
        self.call_errors: Counter[str] = Counter()  # CALLERRORs sent to stations, by code
        self.connected: dict[str, Station] = {}
        self._auth_slots = asyncio.Semaphore(AUTH_CONCURRENCY)

    @staticmethod
    def station_id_of(path: str) -> str:
        return unquote(path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Authenticate before the upgrade: 401 for no, unknown or wrong credentials."""
        station_id = self.station_id_of(request.path)
        if not STATION_ID_RE.fullmatch(station_id):
            self.refused["station_id"] += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "connect to /{station_id}\n")
        try:
            verdict = await self._authenticate(station_id, request.headers.get("Authorization"))
        except Exception as err:  # the store is down or slow: the station retries later
            self.refused["store_unavailable"] += 1
            self.log.error("ocpp_auth_store_unavailable", station=station_id, error=repr(err)[:200])
            response = connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, "credential store unavailable; retry later\n"
            )
            response.headers["Retry-After"] = "30"
            return response
        if verdict not in ("ok", "unprovisioned"):
            self.refused[verdict] += 1
            self.log.warning(
                "ocpp_auth_refused",
                station=station_id,
                reason=verdict,
                peer=str(connection.remote_address[0]) if connection.remote_address else "",
            )
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="v2g-ocpp", charset="UTF-8"'
            return response
        if verdict == "unprovisioned":
            self.log.warning("ocpp_unprovisioned_station_accepted", station=station_id)
        offered = _offered(request.headers)
        if not any(p in SUBPROTOCOLS for p in offered):
            self.refused["subprotocol"] += 1
            self.log.warning("ocpp_subprotocol_refused", station=station_id, offered=offered)
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                "offer the websocket subprotocol ocpp2.1 or ocpp2.0.1\n",
            )
        return None

    async def _authenticate(self, station_id: str, header: str | None) -> Verdict:
        async with self._auth_slots, asyncio.timeout(AUTH_TIMEOUT_S):
            return await authenticate(
                self.stations_store, station_id, header, open_mode=self.open_mode
            )

    async def serve_connection(self, connection: ServerConnection) -> None:
        station_id = self.station_id_of(connection.request.path if connection.request else "/")
        version = SUBPROTOCOLS[connection.subprotocol or "ocpp2.0.1"]
        old = self.connected.get(station_id)
        if old is not None:  # the station reconnected before we saw its old socket go
            await old.close("replaced by a new connection")
        station = Station(
            station_id,
            connection,
            version,
            self.handlers,
            heartbeat_s=self.heartbeat_s,
            response_timeout=self.response_timeout_s,
            logger=self.log,
            call_errors=self.call_errors,
        )
        self.connected[station_id] = station
        started = time.monotonic()
        station.log.info("ocpp_station_connected")
        self.handlers.connected(station)
        try:
            await station.start()
        finally:
            if self.connected.get(station_id) is station:
                del self.connected[station_id]
            self.handlers.disconnected(station)
            station.log.info(
                "ocpp_station_disconnected", connected_s=round(time.monotonic() - started, 1)
            )

    def server(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> Any:
        """The ``websockets`` server (an async context manager); ``port`` 0 picks one."""
        return serve(
            self.serve_connection,
            host,
            port,
            subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
            process_request=self.process_request,
            ssl=tls,
            max_size=MAX_FRAME_BYTES,
            ping_interval=self.ping_s,
            ping_timeout=self.ping_s,
        )


def listening_port(server: Server) -> int:
    """The port a server listens on (after ``port=0``)."""
    sock = next(iter(server.sockets))
    port: int = sock.getsockname()[1]
    return port


def _offered(headers: Headers) -> list[str]:
    return [
        p.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for p in value.split(",")
        if p.strip()
    ]
