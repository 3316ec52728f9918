"""The inbox router: (topic, bytes) in, typed events out, with limits and counters.

Every message the aggregator receives comes through :meth:`InboxRouter.route`: its size
is bounded, its topic parsed against the contract, its sender held to a rate, its payload
decoded to a model (or, for telemetry, straight to a row) and its identity checked
against the topic. What passes is queued in the :class:`Inbox` the next control step
takes; what fails is counted by reason, logged (at most once a second per reason) and,
for an operator's message, queued as a :class:`Refusal` to be answered at the step.

With a grid (issue 11, ``--grid``), meters and limits from the grid's nodes are checked
here too (a node the grid file does not have is refused, a meter stamped ahead of the
clock too) and queued as typed events; the control step applies them to its
``GridState`` at the start of the step (``ControlStep.apply_grid``), so the router
keeps no grid state of its own.

Pure and synchronous: no MQTT client, no asyncio. The clock and the wall clock are
injected, so tests drive it with bytes and a manual clock.
"""

from __future__ import annotations

import difflib
import re
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import structlog
from pydantic import ValidationError

from aggregator.answers import Budget, Kind, Refusal, payload_head, read_request_id
from aggregator.fleet_state import check_not_ahead
from broker.codec import telemetry_row
from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import (
    DispatchAmend,
    DispatchCancel,
    DispatchRequest,
    DispatchSignal,
    GridLimits,
    GridMeter,
    Telemetry,
    TelemetryBatch,
    VehicleStatus,
)
from broker.replies import ReplyTo, reply_of
from broker.topics import ID_PATTERN, Topics
from core.clock import Clock
from core.errors import InvalidMessage

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties

MAX_PAYLOAD_BYTES = 64 * 1024
# A bridge's batch: MAX_BATCH_VEHICLES vehicles at ~100-200 bytes each.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# A bridge may send this many times more messages per second than a vehicle: it splits
# a big fleet into several batches, and reports changes between its regular batches.
BRIDGE_RATE_FACTOR = 20
# The hold's payloads (an extension): Home Assistant's switch sends ON and OFF; an empty
# retained message (the hold cleared from the broker) releases it too.
NO_V2G_PAYLOADS = frozenset({b"ON", b"OFF", b""})
TOPIC_CACHE = 250_000  # parsed topics remembered (a fleet's telemetry topics, and more)
LOG_PAYLOAD_CHARS = 200
REFUSALS_PER_S = 20.0  # refused operator messages answered a second, on average
_ID = re.compile(ID_PATTERN)


@dataclass(slots=True)
class Inbox:
    """What arrived since the last control step, validated and typed."""

    # Vehicles' own reports, validated: decoded to rows as they arrive (a Telemetry model
    # is taken too, for tests and tools that queue reports by hand).
    telemetry: list[Telemetry | TelemetryRow] = field(default_factory=list)
    status: list[VehicleStatus] = field(default_factory=list)
    # Operator messages, each with where its sender wants answers (MQTT 5), if anywhere;
    # and those refused before the dispatcher saw them, to be answered at the step.
    requests: list[tuple[DispatchRequest, ReplyTo | None]] = field(default_factory=list)
    cancels: list[tuple[str, ReplyTo | None]] = field(default_factory=list)
    amends: list[tuple[str, DispatchAmend, ReplyTo | None]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # Bridges' batches, decoded to columns: (bridge_id, reports).
    batches: list[tuple[str, TelemetryArrays]] = field(default_factory=list)
    # Owners' holds out of V2G (Home Assistant's switch): (vehicle_id, on, platform time).
    holds: list[tuple[str, bool, float]] = field(default_factory=list)
    # The grid's word, per node of the grid file, in arrival order: (node, message).
    grid_meters: list[tuple[str, GridMeter]] = field(default_factory=list)
    grid_limits: list[tuple[str, GridLimits]] = field(default_factory=list)


class Refusals:
    """How many refused operator messages are answered: at most ``per_s`` a second on
    average (wall time); past it they are only counted, in ``unanswered``."""

    def __init__(self, per_s: float, wall: Callable[[], float] = time.monotonic) -> None:
        self._budget = Budget(per_s)
        self._wall = wall
        self.unanswered = 0

    def may_answer(self) -> bool:
        """Spend one answer: False past the budget (the refusal is only counted)."""
        if self._budget.take(self._wall()):
            return True
        self.unanswered += 1
        return False


class InboxRouter:
    """Turns received (topic, payload, MQTT 5 properties) into the typed :class:`Inbox`.

    Counters: ``received == accepted + ignored + sum(rejected)`` (but "stale", which the
    control step finds at the fold); ``rejected_rows`` counts rows dropped from batches
    that were accepted; ``batched_updates`` the vehicle updates batches carried."""

    def __init__(
        self,
        *,
        topics: Topics,
        clock: Clock,
        telemetry_interval_s: float,
        speed: float,
        refusals: Refusals,
        logger: structlog.typing.FilteringBoundLogger,
        on_signal: Callable[[], None] | None = None,
        wall: Callable[[], float] = time.monotonic,
        grid_nodes: Collection[str] | None = None,
    ) -> None:
        """``on_signal``: called when a signal sample is queued in :attr:`signals` (the
        service wakes its signal loop with it). ``wall``: monotonic seconds, for the rate
        limits and the log throttle. ``grid_nodes``: the grid file's node ids (None: no
        grid; its messages are then ignored)."""
        self.topics = topics
        self.clock = clock
        self.tolerance_s = telemetry_interval_s
        self.refusals = refusals
        self.log = logger
        self.on_signal = on_signal
        self._wall = wall
        self.grid_nodes = None if grid_nodes is None else frozenset(grid_nodes)
        self.inbox = Inbox()
        # Signal samples waiting to be followed (the latest per request wins), with when
        # each came in (perf_counter, for the arrival-to-wire latency).
        self.signals: dict[str, tuple[DispatchSignal, float]] = {}
        self.received = 0
        self.accepted = 0
        self.ignored = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_rows: Counter[str] = Counter()
        self.batched_updates = 0
        # Per vehicle, per wall second: five reports per telemetry interval of wall time.
        per_interval = telemetry_interval_s / speed
        self.rate_limit = max(10, int(5.0 / per_interval))
        self._rate: dict[str, tuple[float, int]] = {}
        self._bridge_head = f"{topics.prefix}/bridges/"
        # Parsed topics: a vehicle's topic is the same every report, and parsing it (split,
        # id check) was a seventh of the per-message cost (py-spy, bench/ingest.py).
        self._parsed: dict[str, tuple[str, str]] = {}
        self._last_reject_log: dict[str, float] = {}

    def take(self) -> Inbox:
        """The inbox so far; a fresh one collects from now on."""
        inbox, self.inbox = self.inbox, Inbox()
        return inbox

    def route(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """Validate one message and queue it; bad input is counted and logged, never raised
        (and, from an operator, queued to be answered)."""
        self.received += 1
        try:
            limit = MAX_BATCH_BYTES if topic.startswith(self._bridge_head) else MAX_PAYLOAD_BYTES
            if len(payload) > limit:
                raise InvalidMessage("size", f"{len(payload)} bytes, over the {limit}-byte limit")
            parsed = self._parsed.get(topic)
            if parsed is None:
                parsed = self.topics.parse(topic)  # raises for a topic outside the contract
                if len(self._parsed) >= TOPIC_CACHE:  # made-up topics must not grow memory
                    self._parsed.clear()
                self._parsed[topic] = parsed
            kind, ident = parsed
            if kind == "telemetry":
                self._within_rate(ident)
                row = telemetry_row(payload, ident)
                if row is None:  # not the common form, or invalid: the model judges and says why
                    t = decode(Telemetry, payload)
                    same_vehicle(ident, t.vehicle_id)
                    row = TelemetryRow.of(t)
                check_not_ahead(row.ts, self.clock.now(), self.tolerance_s)
                self.inbox.telemetry.append(row)
            elif kind == "bridge_telemetry":
                self._on_batch(ident, payload)
            elif kind == "status":
                if not payload:  # a cleared retained status
                    self.ignored += 1
                    return
                s = decode(VehicleStatus, payload)
                same_vehicle(ident, s.vehicle_id)
                self.inbox.status.append(s)
            elif kind == "requests":
                reply = self._reply_of(properties)
                self.inbox.requests.append((decode(DispatchRequest, payload), reply))
            elif kind == "cancel":
                reply = self._reply_of(properties)
                if payload:  # an empty cancel is the same as {}
                    decode(DispatchCancel, payload)
                self.inbox.cancels.append((ident, reply))
            elif kind == "amend":
                reply = self._reply_of(properties)
                self.inbox.amends.append((ident, decode(DispatchAmend, payload), reply))
            elif kind == "no_v2g":
                # The owner's hold (retained ON/OFF), folded at the next step.
                if payload not in NO_V2G_PAYLOADS:
                    raise InvalidMessage("schema", "a no_v2g hold is ON or OFF")
                self.inbox.holds.append((ident, payload == b"ON", self.clock.now()))
            elif kind == "signal":
                # Followed at once, out of the control step: a signal comes every 2-4 s.
                self.signals[ident] = (decode(DispatchSignal, payload), time.perf_counter())
                if self.on_signal is not None:
                    self.on_signal()
            elif kind == "grid_meter" and self.grid_nodes is not None:
                meter = decode(GridMeter, payload)
                # Stamped ahead, it would look fresh for ever: refused as telemetry is.
                check_not_ahead(meter.ts.timestamp(), self.clock.now(), self.tolerance_s)
                self._grid_node(ident)
                self.inbox.grid_meters.append((ident, meter))
            elif kind == "grid_limits" and self.grid_nodes is not None:
                if not payload:  # a cleared retained message
                    self.ignored += 1
                    return
                limits = decode(GridLimits, payload)
                self._grid_node(ident)
                self.inbox.grid_limits.append((ident, limits))
            else:
                self.ignored += 1  # our own results and progress, echoed by a wide subscription
                return
            self.accepted += 1
        except InvalidMessage as err:
            self._reject(err, topic, payload)
            self._refused(err, topic, payload, properties)

    def _grid_node(self, node: str) -> None:
        """Refuse a grid message about a node the grid file does not have."""
        if self.grid_nodes is None or node not in self.grid_nodes:
            raise InvalidMessage("node", f"{node!r} is not a node of the grid file")

    def _reply_of(self, properties: Properties | None) -> ReplyTo | None:
        """Where the sender wants its answers; a response topic we may not answer on
        refuses the message (its sender would wait there for ever)."""
        try:
            return reply_of(properties, self.topics.prefix)
        except ValueError as err:
            raise InvalidMessage("reply", str(err)) from None

    def _refused(
        self, err: InvalidMessage, topic: str, payload: bytes, properties: Properties | None
    ) -> None:
        """Queue the answer to a refused request, amendment or cancel (other messages are
        only counted): on its request's result topic when its id can be read, else on
        ``dispatch/rejected``; within the refusal budget, the rest only counted."""
        t = self.topics
        rid: str | None
        if topic == t.dispatch_requests:
            kind: Kind = "requests"
            rid = read_request_id(payload, parse=len(payload) <= MAX_PAYLOAD_BYTES)
        else:
            head, _, rest = topic.partition(f"{t.prefix}/dispatch/")
            ident, _, what = rest.rpartition("/")
            if head or "/" in ident or what not in ("cancel", "amend"):
                return
            kind = "cancel" if what == "cancel" else "amend"
            rid = ident if _ID.fullmatch(ident) else None
        if not self.refusals.may_answer():
            return
        try:
            reply = reply_of(properties, t.prefix) if err.reason != "reply" else None
        except ValueError:
            reply = None
        what = {"requests": "request", "cancel": "cancel", "amend": "amendment"}[kind]
        self.inbox.refusals.append(
            Refusal(
                kind=kind,
                request_id=rid,
                reason=f"invalid {what} ({err.reason}): {err.detail}",
                topic=topic,
                payload_head=payload_head(payload),
                reply=reply,
            )
        )

    def _on_batch(self, bridge_id: str, payload: bytes) -> None:
        """A bridge's batch: validated whole (any bad column refuses it), decoded to
        columns; reports stamped ahead of the clock are dropped on their own, counted
        under ``rejected_rows["future"]``, so one vehicle's bad clock costs only its row."""
        self._within_rate(f"bridges/{bridge_id}", self.rate_limit * BRIDGE_RATE_FACTOR)
        batch = decode(TelemetryBatch, payload)
        if batch.bridge_id != bridge_id:
            raise InvalidMessage(
                "identity", f"topic names bridge {bridge_id!r} but payload says {batch.bridge_id!r}"
            )
        reports = TelemetryArrays.from_batch(batch)
        now = self.clock.now()
        tolerance = self.tolerance_s
        ahead = reports.ts > now + tolerance
        if ahead.any():
            if ahead.all():
                check_not_ahead(float(reports.ts.max()), now, tolerance)
            reports = reports.take(np.flatnonzero(~ahead))
            self.rejected_rows["future"] += int(ahead.sum())
        self.batched_updates += len(reports)
        self.inbox.batches.append((bridge_id, reports))

    def _within_rate(self, key: str, limit: int | None = None) -> None:
        """A vehicle may report a few times per telemetry interval, not flood the service."""
        limit = limit or self.rate_limit
        now = self._wall()
        window = self._rate.get(key)
        start, count = (now, 0) if window is None or now - window[0] >= 1.0 else window
        if count >= limit:
            raise InvalidMessage("rate", f"{key} sent over {limit} msg/s")
        if len(self._rate) > 1_000_000:  # a flood of made-up ids must not grow memory for ever
            self._rate.clear()
        self._rate[key] = (start, count + 1)

    def _reject(self, err: InvalidMessage, topic: str, payload: bytes) -> None:
        self.rejected[err.reason] += 1
        now = self._wall()
        # One line per reason per second: a flood of garbage must not flood the log.
        if now - self._last_reject_log.get(err.reason, 0.0) >= 1.0:
            self._last_reject_log[err.reason] = now
            self.log.warning(
                "message_rejected",
                reason=err.reason,
                detail=err.detail[:300],
                topic=topic[:120],
                payload=payload[:LOG_PAYLOAD_CHARS].decode("utf-8", "replace"),
                rejected_total=self.rejected[err.reason],
                unanswered_total=self.refusals.unanswered,
            )


M = TypeVar(
    "M",
    Telemetry,
    VehicleStatus,
    DispatchRequest,
    TelemetryBatch,
    DispatchAmend,
    DispatchSignal,
    DispatchCancel,
    GridMeter,
    GridLimits,
)


def decode(model: type[M], payload: bytes) -> M:
    """``payload`` as ``model``, or InvalidMessage saying what was wrong (an unknown
    field named with the known one it was probably meant to be)."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as err:
        errors = err.errors()
        unknown = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden" and e["loc"]]
        if unknown:  # an operator's typo must not pass for a default (start: now)
            raise InvalidMessage("unknown_field", _unknown_fields(model, unknown)) from None
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        kind = "json" if first.get("type") == "json_invalid" else "schema"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidMessage(kind, f"{model.__name__}.{where}: {first.get('msg')}{more}") from None


def _unknown_fields(model: type[M], names: list[str]) -> str:
    """Name the unknown fields, with the known one each was probably meant to be."""
    known = list(model.model_fields)
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"{model.__name__} has no field {', '.join(parts)}; its fields are {', '.join(known)}"


def same_vehicle(topic_id: str, payload_id: str) -> None:
    """Refuse a payload that names another vehicle than its topic."""
    if topic_id != payload_id:
        raise InvalidMessage(
            "identity", f"topic names vehicle {topic_id!r} but payload says {payload_id!r}"
        )
