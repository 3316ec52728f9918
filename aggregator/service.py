"""The aggregator process: the thin async edge around fleet state and the dispatcher.

Messages are validated as they arrive and queued; everything else happens once per
control step, in order: fold telemetry → admit requests → allocate → publish setpoints,
results, progress, capability, status → persist.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import math
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import aiomqtt
import numpy as np
import structlog
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from aggregator.answers import (
    Budget,
    Kind,
    Refusal,
    Routed,
    messages,
    payload_head,
    read_request_id,
    replies,
)
from aggregator.capability import Envelopes, vehicle_ranges
from aggregator.clockwatch import ClockWatch, behind
from aggregator.dispatch import Dispatcher, StepOutput
from aggregator.fence import fence_writes
from aggregator.fleet_state import FleetState, FleetView, check_not_ahead
from aggregator.forecast import ForecastModel
from aggregator.grid import load_grid
from aggregator.grid_state import GridState
from aggregator.ledger import (
    GRID_STREAM,
    Entry,
    Ledger,
    LedgerWriter,
    answer_entry,
    departure_entry,
    grid_entry,
    step_entry,
    vehicles_entry,
)
from aggregator.scaleout import Rows, ScaleOut, shared_subscriptions
from aggregator.settlement import Settlement
from aggregator.status import fleet_status, log_fields
from aggregator.store import MemoryStore, Snapshot, StateStore
from broker.clientid import client_id as derive_client_id
from broker.clientid import main_client_id
from broker.codec import setpoint_batch_payload, setpoint_payloads, telemetry_row
from broker.columns import TelemetryArrays, TelemetryRow
from broker.fastlink import FastIngest
from broker.fastpub import Delivery, FastPublisher
from broker.link import TAKEN_OVER_HINT, TAKEOVER_WINDOW_S, MqttLink, Outgoing
from broker.models import (
    MAX_BATCH_VEHICLES,
    AnswerTo,
    Capability,
    CapabilityWindow,
    DispatchAmend,
    DispatchCancel,
    DispatchRejection,
    DispatchRequest,
    DispatchResult,
    DispatchSignal,
    FleetForecast,
    FleetStatus,
    ForecastPeriod,
    GridLimits,
    GridMeter,
    Telemetry,
    TelemetryBatch,
    VehicleStatus,
    from_epoch,
    to_epoch,
)
from broker.replies import ReplyTo, reply_from_record, reply_of, reply_record
from broker.settings import Settings
from broker.topics import ID_PATTERN
from core.clock import Clock, raise_if_cancelled
from core.errors import InvalidMessage, TransportError

MAX_PAYLOAD_BYTES = 64 * 1024
# A bridge's batch: MAX_BATCH_VEHICLES vehicles at ~100-200 bytes each.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# A bridge may send this many times more messages per second than a vehicle: it splits
# a big fleet into several batches, and reports changes between its regular batches.
BRIDGE_RATE_FACTOR = 20
TOPIC_CACHE = 250_000  # parsed topics remembered (a fleet's telemetry topics, and more)
LOG_PAYLOAD_CHARS = 200
FORECAST_PERIOD_S = 3600.0  # hourly market periods
FORECAST_EVERY_S = 900.0  # simulated seconds between forecasts
REFUSALS_PER_S = 20.0  # refused operator messages answered a second, on average
_ID = re.compile(ID_PATTERN)
CLOCK_WINDOW_STEPS = 12  # telemetry intervals over which the clock warnings count reports
WARN_LOG_EVERY_S = 30.0  # wall seconds between log lines of a standing warning
# A step at a request's end comes this much after it (simulated s): epoch seconds carry
# ~1e-7 s of rounding, and a step a hair early would leave the request for the next.
END_MARGIN_S = 1e-3
SAVE_GRACE_S = 5.0  # how long a cancelled aggregator lets an in-flight snapshot write finish


@dataclass(slots=True)
class StepReport:
    """What one control step did, for logs, tests and the demo."""

    now: float
    status: FleetStatus
    capability: Capability
    setpoints_sent: int
    results: list[DispatchResult]
    step_ms: float


@dataclass(slots=True)
class Inbox:
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


class AggregatorService:
    """Pools telemetry, dispatches requests and reports fleet status over MQTT."""

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Clock,
        store: StateStore,
        client_id: str | None = None,
        ledger: Ledger | None = None,
        fast_ingest: bool = False,
        fast_setpoints: bool = False,
        refusals_per_s: float = REFUSALS_PER_S,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """``fast_ingest``: receive telemetry (QoS 0) on a second connection through
        :class:`broker.fastlink.FastIngest` instead of the general client; everything else
        (statuses, requests, cancels, publishing) stays on the ``MqttLink``.

        ``fast_setpoints``: send the control step's setpoints (per vehicle and per bridge)
        on a second, publish-only connection through :class:`broker.fastpub.FastPublisher`
        (~20x the QoS 1 rate of the general client); results, progress, status and
        capability stay on the ``MqttLink``. A setpoint the broker did not acknowledge is
        decided and sent again at the next step.

        ``refusals_per_s``: how many refused operator messages a second (on average) are
        answered; past it they are only counted (``refusals_unanswered``) and logged."""
        self.settings = settings
        self.clock = clock
        self.store = store
        # broker/clientid.py: {prefix}-aggregator (per process in a share group), unless
        # given or set (V2G_CLIENT_ID); the lease names its holder by it too.
        self.client_id = client_id or main_client_id(
            settings, "aggregator", per_process=settings.share_group is not None
        )
        client_id = self.client_id
        self._in_memory = isinstance(store, MemoryStore)
        # Settlement records go to the ledger off the control path (see aggregator/ledger.py).
        self.ledger = None if ledger is None else LedgerWriter(ledger)
        self._ledger_task: asyncio.Task[bool] | None = None
        # Per-vehicle settlement while requests run: the requests it books for (with when
        # each ends), and the entries of this step.
        self.settlement = Settlement()
        self._settling: dict[str, float] = {}
        self._vehicle_books: list[tuple[str, Entry]] = []
        # Signal samples waiting to be followed (the latest per request wins), when each
        # came in, and how long each took from arrival to setpoints on the wire (ms).
        self._signals: dict[str, tuple[DispatchSignal, float]] = {}
        self._signal_ready = asyncio.Event()
        self._dispatch_lock = asyncio.Lock()
        self.signal_latency_ms: deque[float] = deque(maxlen=10_000)
        self.topics = settings.topics
        self.log = logger or structlog.get_logger("aggregator")
        self.state = FleetState()
        # The grid (issue 11, --grid): the last meter and limits per node, fed as they
        # arrive; kept across a takeover's new dispatcher (the retained limits come once).
        self.grid: GridState | None = None
        if settings.grid_file:
            self.grid = GridState(
                load_grid(Path(settings.grid_file)),
                telemetry_interval_s=settings.telemetry_interval_s,
            )
        self.dispatcher = self._new_dispatcher()
        self.forecaster = ForecastModel()
        self.envelopes = Envelopes(step_s=settings.control_step_s)
        self._forecast_at = -math.inf
        self.rejected: Counter[str] = Counter()
        # Refusals answered at most this fast; where each running request's sender wants
        # its answers (MQTT 5 response topic), kept with the snapshot.
        self._refusals = Budget(refusals_per_s)
        self.refusals_unanswered = 0
        self._replies: dict[str, ReplyTo] = {}
        # Reports far behind or ahead of the platform clock, for the status's warnings.
        self.clock_watch = ClockWatch(window_s=CLOCK_WINDOW_STEPS * settings.telemetry_interval_s)
        self._ahead_seen = 0
        self._warned_at = -math.inf
        # received == accepted + ignored + every rejection but "stale" (found at the fold).
        self.received = 0
        self.accepted = 0
        self.ignored = 0
        # Per vehicle, per wall second: five reports per telemetry interval of wall time.
        per_interval = settings.telemetry_interval_s / settings.speed
        self._rate_limit = max(10, int(5.0 / per_interval))
        self._rate: dict[str, tuple[float, int]] = {}
        # Vehicle updates that came in bridges' batches, and batch rows dropped on their own
        # (counted apart: the message they came in was accepted).
        self.batched_updates = 0
        self.rejected_rows: Counter[str] = Counter()
        # Which bridge carries each fleet row (-1: the vehicle talks for itself); rows
        # behind a bridge get their setpoints batched on the bridge's setpoints topic.
        self.bridges: list[str] = []
        self._bridge_index: dict[str, int] = {}
        self._bridge_of = np.full(0, -1, dtype=np.int32)
        self._bridge_head = f"{self.topics.prefix}/bridges/"
        # Parsed topics: a vehicle's topic is the same every report, and parsing it (split,
        # id check) was a seventh of the per-message cost (py-spy, bench/ingest.py).
        self._parsed: dict[str, tuple[str, str]] = {}
        self.degraded = False
        self._saving: asyncio.Task[None] | None = None
        self.saves_skipped = 0
        self.inbox = Inbox()
        self._owed: deque[Outgoing] = deque(maxlen=100_000)
        self._owed_logged = False
        self.reports: asyncio.Queue[StepReport] | None = None
        self.last_report: StepReport | None = None
        self.last_output: StepOutput | None = None
        self._last_log_wall = 0.0
        self._last_reject_log: dict[str, float] = {}
        # Scale-out (aggregator/scaleout.py, V2G_SHARE_GROUP): telemetry and status on a
        # shared subscription, one leader by a Redis lease, snapshots fenced by its token.
        self.scale: ScaleOut | None = None
        if settings.share_group:
            self.scale = ScaleOut(settings=settings, holder=client_id, logger=self.log)
            self.store, fenced_ledger = fence_writes(self.scale.fence, store, ledger)
            if self.ledger is not None and fenced_ledger is not None:
                self.ledger.ledger = fenced_ledger
        telemetry = [(self.topics.all_telemetry, 0), (self.topics.all_bridge_telemetry, 0)]
        self.ingest: FastIngest | None = None
        if fast_ingest:
            self.ingest = FastIngest(
                settings=settings,
                client_id=derive_client_id(settings.topic_prefix, "ingest", per_process=True),
                handler=self.on_payload,
                filters=[f for f, _ in shared_subscriptions(settings, telemetry)],
                logger=self.log,
            )
            telemetry = []
        self.setpoints: FastPublisher | None = None
        if fast_setpoints:
            self.setpoints = FastPublisher(
                settings=settings,
                client_id=derive_client_id(settings.topic_prefix, "setpoints", per_process=True),
                logger=self.log,
            )
        self.link = MqttLink(
            settings=settings,
            client_id=client_id,
            handler=self.on_message,
            subscriptions=shared_subscriptions(
                settings,
                [
                    *telemetry,
                    (self.topics.all_vehicle_status, 1),
                    (self.topics.dispatch_requests, 1),
                    (self.topics.all_cancels, 1),
                    (self.topics.all_amends, 1),
                    (self.topics.all_signals, 1),
                    *(
                        [(self.topics.all_grid_meters, 0), (self.topics.all_grid_limits, 1)]
                        if self.grid is not None
                        else []
                    ),
                ],
            ),
            logger=self.log,
        )

    # -- inbound ---------------------------------------------------------------------
    def on_message(self, message: aiomqtt.Message) -> None:
        """Validate one message and queue it; bad input is counted and logged, never raised
        (and, from an operator, answered)."""
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        self.on_payload(str(message.topic), bytes(payload), message.properties)

    def on_payload(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """:meth:`on_message` for a topic and payload (the fast ingest client's form), and
        the MQTT 5 properties the message came with, if any."""
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
                    t = _decode(Telemetry, payload)
                    _same_vehicle(ident, t.vehicle_id)
                    row = TelemetryRow.of(t)
                check_not_ahead(row.ts, self.clock.now(), self.settings.telemetry_interval_s)
                self.inbox.telemetry.append(row)
            elif kind == "bridge_telemetry":
                self._on_batch(ident, payload)
            elif kind == "status":
                if not payload:  # a cleared retained status
                    self.ignored += 1
                    return
                s = _decode(VehicleStatus, payload)
                _same_vehicle(ident, s.vehicle_id)
                self.inbox.status.append(s)
            elif kind == "requests":
                reply = self._reply_of(properties)
                self.inbox.requests.append((_decode(DispatchRequest, payload), reply))
            elif kind == "cancel":
                reply = self._reply_of(properties)
                if payload:  # an empty cancel is the same as {}
                    _decode(DispatchCancel, payload)
                self.inbox.cancels.append((ident, reply))
            elif kind == "amend":
                reply = self._reply_of(properties)
                self.inbox.amends.append((ident, _decode(DispatchAmend, payload), reply))
            elif kind == "signal":
                # Followed at once, out of the control step: a signal comes every 2-4 s.
                self._signals[ident] = (_decode(DispatchSignal, payload), time.perf_counter())
                self._signal_ready.set()
            elif kind == "grid_meter" and self.grid is not None:
                meter = _decode(GridMeter, payload)
                # Stamped ahead, it would look fresh for ever: refused as telemetry is.
                check_not_ahead(
                    meter.ts.timestamp(), self.clock.now(), self.settings.telemetry_interval_s
                )
                if not self.grid.meter(ident, meter):
                    raise InvalidMessage("node", f"{ident!r} is not a node of the grid file")
            elif kind == "grid_limits" and self.grid is not None:
                if not payload:  # a cleared retained message
                    self.ignored += 1
                    return
                if not self.grid.limits(ident, _decode(GridLimits, payload)):
                    raise InvalidMessage("node", f"{ident!r} is not a node of the grid file")
            else:
                self.ignored += 1  # our own results and progress, echoed by a wide subscription
                return
            self.accepted += 1
        except InvalidMessage as err:
            self._reject(err, topic, payload)
            self._refused(err, topic, payload, properties)

    def _may_refuse(self) -> bool:
        """Spend one answer to a refused operator message: False past ``refusals_per_s``
        (the refusal is then only counted, in ``refusals_unanswered``)."""
        if self._refusals.take(time.monotonic()):
            return True
        self.refusals_unanswered += 1
        return False

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
        ``dispatch/rejected``; at most ``refusals_per_s``, the rest only counted."""
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
        if not self._may_refuse():
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
        self._within_rate(f"bridges/{bridge_id}", self._rate_limit * BRIDGE_RATE_FACTOR)
        batch = _decode(TelemetryBatch, payload)
        if batch.bridge_id != bridge_id:
            raise InvalidMessage(
                "identity", f"topic names bridge {bridge_id!r} but payload says {batch.bridge_id!r}"
            )
        reports = TelemetryArrays.from_batch(batch)
        now = self.clock.now()
        tolerance = self.settings.telemetry_interval_s
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
        limit = limit or self._rate_limit
        now = time.monotonic()
        window = self._rate.get(key)
        start, count = (now, 0) if window is None or now - window[0] >= 1.0 else window
        if count >= limit:
            raise InvalidMessage("rate", f"{key} sent over {limit} msg/s")
        if len(self._rate) > 1_000_000:  # a flood of made-up ids must not grow memory for ever
            self._rate.clear()
        self._rate[key] = (start, count + 1)

    def _reject(self, err: InvalidMessage, topic: str, payload: bytes) -> None:
        self.rejected[err.reason] += 1
        now = time.monotonic()
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
                unanswered_total=self.refusals_unanswered,
            )

    # -- the loop --------------------------------------------------------------------
    async def run(self) -> None:
        """Restore state, then serve until cancelled."""
        self.log.info("deployment", role="aggregator", **self.deployment())
        await self.restore()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="aggregator-mqtt")
                if self.setpoints is not None:
                    tg.create_task(self.setpoints.run(), name="aggregator-setpoints")
                if self.ingest is not None:
                    tg.create_task(self.ingest.run(), name="aggregator-ingest")
                tg.create_task(self._control_loop(), name="aggregator-control")
                tg.create_task(self._signal_loop(), name="aggregator-signals")
                if self.scale is not None:
                    tg.create_task(self.scale.run(), name="aggregator-lease")
        finally:
            await self._finish_save()
            await self._finish_ledger()
            if self.scale is not None:  # a graceful stop hands the lease on at once
                await self.scale.close()

    def deployment(self) -> dict[str, object]:
        """Broker, Redis, both prefixes and every client id: the start line's fields."""
        fields: dict[str, object] = {**self.settings.deployment(), "client_id": self.client_id}
        if self._in_memory:
            del fields["redis"], fields["redis_prefix"]
            fields["store"] = "memory"
        if self.ingest is not None:
            fields["ingest_client_id"] = self.ingest.client_id
        if self.setpoints is not None:
            fields["setpoints_client_id"] = self.setpoints.client_id
        return fields

    async def restore(self) -> None:
        try:
            snap = await self.store.load()
        except TransportError as err:
            self.degraded = True
            self.log.error("state_restore_failed", error=str(err))
            return
        if self.scale is not None:  # forwarded rows on from what the snapshot includes
            self.scale.resume(snap.ingest_cursor if snap is not None else None)
        if snap is None:
            self.log.info("state_empty", note="starting with an empty fleet")
            return
        self.state = FleetState.restore(snap.ids, snap.columns)
        self.dispatcher.restore(snap.dispatches)
        self._replies = {
            r["request"]["request_id"]: reply
            for r in snap.dispatches
            if (reply := reply_from_record(r.get("reply_to"))) is not None
        }
        self.dispatcher.restore_learned(snap.columns, len(snap.ids))
        self.log.info(
            "state_restored",
            vehicles=len(snap.ids),
            dispatches=len(snap.dispatches),
            saved_at=from_epoch(snap.saved_at).isoformat() if snap.saved_at else None,
        )

    def _new_dispatcher(self) -> Dispatcher:
        s = self.settings
        return Dispatcher(
            control_step_s=s.control_step_s,
            setpoint_ttl_s=s.setpoint_ttl_s,
            max_request_kw=s.max_request_kw,
            max_duration_s=s.max_request_duration_s,
            allocation=s.allocation,
            grid=self.grid,
        )

    async def reset_for_takeover(self, term: int) -> None:
        """Scale-out: this process now leads. What it knew before is stale: it starts again
        from its own config and restores the last leader's snapshot (and the stream cursor
        with it); this term's ledger entries carry its fencing token."""
        self.state = FleetState()
        self.dispatcher = self._new_dispatcher()
        self._owed.clear()
        if self.ledger is not None:
            self.ledger.stamp = {"term": str(term)}
        await self.restore()

    async def lead(self) -> bool:
        """Scale-out, before each control step: True if this process steps as leader
        (reset and restored from the last leader's snapshot first if it just became one),
        else False after forwarding what it received to the leader."""
        assert self.scale is not None, "lead() is for a scaled-out service"
        role = self.scale.leadership()
        if role.took_over and role.term is not None:
            t0 = time.perf_counter()
            await self.reset_for_takeover(role.term)
            held = self.scale.promoted(
                vehicles=len(self.state),
                dispatches=len(self.dispatcher.dispatches),
                restore_ms=round((time.perf_counter() - t0) * 1e3, 1),
            )
            self.inbox.requests[:0] = held.requests
            self.inbox.cancels[:0] = held.cancels
        if not role.is_leader:
            inbox, self.inbox = self.inbox, Inbox()
            self.scale.hold(inbox.requests, inbox.cancels)
            await self.scale.forward(Rows.of(inbox.telemetry, inbox.status, inbox.batches))
        return role.is_leader

    async def _collect(self, inbox: Inbox) -> None:
        """Scale-out, at the start of a leader's step: fold the other processes' rows and
        the leader's own reports together, in one ``apply_arrays`` (so the newest report
        of a vehicle wins whoever received it); bridges' parts and statuses join
        ``inbox``."""
        assert self.scale is not None
        received = len(inbox.telemetry) + sum(len(a) for _, a in inbox.batches)
        forwarded = await self.scale.collect(received)
        own = [a for b, a in forwarded.parts if not b]
        inbox.batches[:0] = [(b, a) for b, a in forwarded.parts if b]
        if forwarded.status_ids:
            inbox.status[:0] = forwarded.statuses()
        if not own:
            return
        if inbox.telemetry:
            own.append(TelemetryArrays.from_telemetry(inbox.telemetry))
            inbox.telemetry = []
        reports = TelemetryArrays.concat(own)
        self._carried_by(reports.vehicle_id, -1)
        _, stale = self.state.apply_arrays(reports)
        if stale:
            self.rejected["stale"] += stale

    async def _control_loop(self) -> None:
        await self.link.wait_connected(self.settings.publish_timeout_s * 3)
        step = self.settings.control_step_s
        next_t = self.clock.now()
        while True:
            began = self.clock.now()
            # Scale-out: only the leader steps; a follower forwards its inbox to it.
            if self.scale is None or await self.lead():
                async with self._dispatch_lock:
                    report = await self.step()
                raise_if_cancelled()
                if self.reports is not None:
                    self.reports.put_nowait(report)
            now = self.clock.now()
            if next_t <= now:  # a regular step (not one at a request's end)
                next_t += step
                if next_t < now:  # fell behind: do not try to catch up with a burst
                    next_t = now
            # A request that ends before the next step is closed by a step at its end, so
            # its books stop there and the fleet is released on time.
            # Counted from when this step began: a request that ended while it ran (a long
            # step at high clock speed) is closed by a step at once, not one period later.
            end = self.dispatcher.next_end(began)
            wake = next_t
            if end is not None and end < next_t + END_MARGIN_S:
                wake = end + END_MARGIN_S  # a regular step due as close is this one
            await self.clock.sleep(max(0.0, wake - now))

    async def _signal_loop(self) -> None:
        """Follow signal samples as they come: the new target's setpoints go out at once."""
        while True:
            await self._signal_ready.wait()
            self._signal_ready.clear()
            raise_if_cancelled()
            pending, self._signals = self._signals, {}
            if self.scale is not None and not self.scale.leading:
                continue
            async with self._dispatch_lock:
                now = self.clock.now()
                view = self.state.view(now, self.settings.stale_s)
                samples = {rid: sample for rid, (sample, _) in pending.items()}
                out = self.dispatcher.follow(samples, now, view)
                if out is not None and out.rows.size:
                    msgs = self._setpoint_messages(
                        out.rows, out.power_kw, out.valid_until, out.request_id, now
                    )
                    if self.setpoints is not None:
                        await self._send_setpoints(msgs, out.rows)
                    elif not self.link.connected:
                        self.dispatcher.unsend(out.rows)  # decided again at the next step
                    else:
                        try:
                            await self.link.publish_many(msgs)
                        except TransportError:
                            self.dispatcher.unsend(out.rows)
                done = time.perf_counter()
                for _, arrived in pending.values():
                    self.signal_latency_ms.append((done - arrived) * 1e3)

    async def step(self) -> StepReport:
        """One control step; see the module docstring for the order."""
        wall0 = time.perf_counter()
        now = self.clock.now()
        inbox, self.inbox = self.inbox, Inbox()
        if self.scale is not None:  # scale-out: fold in what the other processes received
            await self._collect(inbox)
        # Telemetry first: a will that arrived after a vehicle's last report must win.
        applied, stale = self._fold(inbox, now)
        for s in inbox.status:
            self.state.apply_status(s.vehicle_id, s.online, to_epoch(s.ts))
        if stale:
            self.rejected["stale"] += stale
        view = self.state.view(now, self.settings.stale_s)
        answers, routed = self._answer(inbox, now, view)
        out = self.dispatcher.step(now, view, len(self.state))
        self.last_output = out
        self._vehicle_books = self._settle_vehicles(now, view, out)
        answers.extend(out.results)
        routed += [self._route(a) for a in out.results]
        # What the fleet offers is what it will deliver: partial followers count for
        # their measured share, as admission counts them.
        windows = self.envelopes.update(view, now, self.dispatcher.follow_ratio(view.rows))
        # The dispatcher's, for the same view: the step's learning or plan may have them.
        lo, hi = self.dispatcher.ranges(view, now, self.settings.control_step_s)
        online, plugged = self.state.counts(now, self.settings.stale_s)
        nodes, unknown_node = self.dispatcher.node_statuses(self.state.ids)
        status = fleet_status(
            now=now,
            online=online,
            plugged=plugged,
            view=view,
            capability=windows[0],
            available_charge_kw=float(np.maximum(hi, 0.0).sum()),
            available_discharge_kw=float(np.maximum(-lo, 0.0).sum()),
            dispatches=self.dispatcher.active(),
            degraded=self.degraded,
            # Rows dropped from accepted batches show apart: "future_rows" next to "future".
            rejected=self.rejected
            + Counter({f"{k}_rows": n for k, n in self.rejected_rows.items()}),
            warnings=self._warnings(now),
            nodes=nodes,
            unknown_node=unknown_node,
        )
        capability = Capability(ts=from_epoch(now), windows=windows, vehicles=len(view))
        sent = await self._publish(now, out, answers, routed, capability, status)
        self._record(answers, out, status)
        await self._forecast(now, view, windows)
        self._persist(now)
        report = StepReport(
            now, status, capability, sent, answers, (time.perf_counter() - wall0) * 1e3
        )
        self.last_report = report
        self._log_step(report, applied)
        return report

    def _answer(
        self, inbox: Inbox, now: float, view: FleetView
    ) -> tuple[list[DispatchResult], list[Routed]]:
        """Take this step's operator messages to the dispatcher, and answer each: the
        answers that go into a request's books (and on its result topic), and where every
        answer goes (refusals and answers to senders included)."""
        answers: list[DispatchResult] = []
        routed: list[Routed] = []
        for refusal in inbox.refusals:
            routed.append(self._refusal_answer(refusal, now))
        for req, reply in inbox.requests:
            if self.dispatcher.reuses_id(req):
                # Its id is a request already taken: the answer is this sender's alone,
                # never on the result topic that request's followers read.
                if not self._may_refuse():
                    continue
                refused = self.dispatcher.submit(req, now, view)
                routed.append(self._private(refused, reply, req.to_json(), now))
                self.log.info(
                    "dispatch_refused",
                    request_id=req.request_id,
                    reason=refused.reason,
                    to=reply.topic if reply else self.topics.dispatch_rejected,
                )
                continue
            answer = self.dispatcher.submit(req, now, view)
            if reply is not None and self.dispatcher.holds(req.request_id):
                self._replies[req.request_id] = reply
            answers.append(answer)
            routed.append(self._route(answer, reply))
        for rid, reply in inbox.cancels:
            cancelled = self.dispatcher.cancel(rid, now, view)
            routed += self._changed(rid, "cancel", cancelled, reply, now, answers)
        for rid, amend, reply in inbox.amends:
            amended = self.dispatcher.amend(
                rid, now, view, power_kw=amend.power_kw, duration_s=amend.duration_s
            )
            routed += self._changed(rid, "amend", amended, reply, now, answers)
        return answers, routed

    def _changed(
        self,
        rid: str,
        kind: Literal["cancel", "amend"],
        answer: DispatchResult | None,
        reply: ReplyTo | None,
        now: float,
        answers: list[DispatchResult],
    ) -> list[Routed]:
        """Route the dispatcher's answer to a cancel or amendment (into ``answers`` too),
        or the refusal of one that named no running request (``answer`` None)."""
        if answer is None:
            return self._not_running(rid, kind, reply, now)
        answer = answer.model_copy(update={"answer_to": kind})
        answers.append(answer)
        return [self._route(answer, reply)]

    def _route(self, answer: DispatchResult, reply: ReplyTo | None = None) -> Routed:
        """An answer about a request: on its result topic, to the response topic of the
        message it answers and to its request's (not a refused amendment or cancel: that
        changes nothing of it); a final one forgets the latter."""
        rid = answer.request_id
        refused = answer.status == "rejected" and answer.answer_to != "request"
        ours = None if refused else self._replies.get(rid)
        routed = Routed(answer, public=True, replies=replies(reply, ours))
        if not self.dispatcher.holds(rid):
            self._replies.pop(rid, None)
        return routed

    def _private(
        self, answer: DispatchResult, reply: ReplyTo | None, payload: bytes, now: float
    ) -> Routed:
        """An answer for the sender alone: on its response topic, or on
        ``dispatch/rejected`` when it gave none."""
        if reply is not None:
            return Routed(answer, public=False, replies=(reply,))
        notice = DispatchRejection(
            ts=from_epoch(now),
            reason=answer.reason or "rejected",
            request_id=answer.request_id,
            topic=self.topics.dispatch_requests,
            payload_head=payload_head(payload),
        )
        return Routed(notice, public=True)

    def _refusal_answer(self, refusal: Refusal, now: float) -> Routed:
        """The answer to a message refused on arrival: a ``rejected`` result on its
        request's result topic (its sender's alone if it reuses a taken request's id),
        or, without a readable id, a notice on ``dispatch/rejected``."""
        rid = refusal.request_id
        if rid is None:
            notice = DispatchRejection(
                ts=from_epoch(now),
                reason=refusal.reason,
                topic=refusal.topic,
                payload_head=refusal.payload_head,
            )
            return Routed(notice, public=True, replies=replies(refusal.reply))
        answer_to: AnswerTo = "request" if refusal.kind == "requests" else refusal.kind
        answer = self.dispatcher.refuse(rid, refusal.reason, now, answer_to)
        if refusal.kind == "requests" and self.dispatcher.knows(rid):
            return self._private(answer, refusal.reply, refusal.payload_head.encode(), now)
        return Routed(answer, public=True, replies=replies(refusal.reply))

    def _not_running(
        self, rid: str, kind: Literal["cancel", "amend"], reply: ReplyTo | None, now: float
    ) -> list[Routed]:
        """The refusal of a cancel or amendment that names no running request."""
        if not self._may_refuse():
            return []
        answer = self.dispatcher.refuse(rid, self.dispatcher.not_running(rid), now, kind)
        self.log.info("dispatch_refused", request_id=rid, to=kind, reason=answer.reason)
        return [Routed(answer, public=True, replies=replies(reply))]

    async def _forecast(self, now: float, view: FleetView, windows: list[CapabilityWindow]) -> None:
        """Learn from this step's one-hour capability; every FORECAST_EVERY_S publish the
        availability forecast (retained) for the next 24 hourly periods."""
        hour = next((w for w in windows if w.duration_s == FORECAST_PERIOD_S), None)
        if hour is not None and len(view):
            self.forecaster.observe(now, hour.min_power_kw, hour.max_power_kw)
        if now - self._forecast_at < FORECAST_EVERY_S or not self.link.connected or not len(view):
            return
        lo, hi = vehicle_ranges(view, now, FORECAST_PERIOD_S)
        periods = self.forecaster.forecast(now, lo, hi, view.departure)
        msg = FleetForecast(
            ts=from_epoch(now),
            periods=[
                ForecastPeriod(
                    start=from_epoch(p.start),
                    duration_s=FORECAST_PERIOD_S,
                    min_power_kw=p.min_power_kw,
                    max_power_kw=p.max_power_kw,
                    confidence=p.confidence,
                    samples=p.samples,
                )
                for p in periods
            ],
        )
        out = Outgoing(self.topics.fleet_forecast, msg.to_json(), qos=1, retain=True)
        with contextlib.suppress(TransportError):
            if await self.link.publish_many([out]):
                self._forecast_at = now

    def _warnings(self, now: float | None = None) -> list[str]:
        """The fleet status's warnings; each new one is logged too (at most every 30 s)."""
        warnings = self.clock_watch.warnings()
        if self.grid is not None and now is not None:
            warnings += self.grid.stale_warnings(self.grid.in_force(now))
        wall = time.monotonic()
        if warnings and wall - self._warned_at >= WARN_LOG_EVERY_S:
            self._warned_at = wall
            for w in warnings:
                self.log.warning("telemetry_clock_mismatch", warning=w)
        return warnings

    def _fold(self, inbox: Inbox, now: float | None = None) -> tuple[int, int]:
        """Fold every report of the step at once, vehicles' own and bridges' batches, and
        note which bridge (if any) carries each vehicle now. Reports already older than
        the stale limit are counted as stale too: they cannot make a vehicle count, and a
        fleet of them is a clock mismatch (aggregator/clockwatch.py). They are still
        folded, in order: a report that is only late still belongs in its meter."""
        now = self.clock.now() if now is None else now
        ahead = self.rejected["future"] + self.rejected_rows["future"]
        ahead, self._ahead_seen = ahead - self._ahead_seen, ahead
        reports = self._gather(inbox)
        if reports is None:
            self.clock_watch.observe(now, reports=ahead, ahead=ahead)
            return 0, 0
        old = behind(reports.ts, now, self.settings.stale_s)
        n_old = int(old.sum())
        seen = len(reports)
        if n_old:
            self.clock_watch.observe(
                now,
                reports=seen + ahead,
                ahead=ahead,
                behind=n_old,
                behind_vehicles=len(set(np.asarray(reports.vehicle_id)[old].tolist())),
                max_lag_s=float((now - reports.ts[old]).max()),
            )
        else:
            self.clock_watch.observe(now, reports=seen + ahead, ahead=ahead)
        applied, stale = self.state.apply_arrays(reports)
        return applied, stale + n_old

    def _gather(self, inbox: Inbox) -> TelemetryArrays | None:
        """The step's reports as one set of columns (None if there are none), noting which
        bridge carries each vehicle."""
        parts = [a for _, a in inbox.batches]
        if inbox.telemetry:
            own = TelemetryArrays.from_telemetry(inbox.telemetry)
            self._carried_by(own.vehicle_id, -1)
            parts.append(own)
        for bridge_id, reports in inbox.batches:
            b = self._bridge_index.get(bridge_id)
            if b is None:
                b = self._bridge_index[bridge_id] = len(self.bridges)
                self.bridges.append(bridge_id)
            self._carried_by(reports.vehicle_id, b)
        return TelemetryArrays.concat(parts) if parts else None

    def _carried_by(self, vehicle_ids: list[str], bridge: int) -> None:
        rows = self.state.rows_of(vehicle_ids)
        self._fit_bridges()
        self._bridge_of[rows] = bridge

    def _fit_bridges(self) -> None:
        have = self._bridge_of.shape[0]
        if have < len(self.state):
            grown = np.full(max(len(self.state), 2 * have), -1, np.int32)
            grown[:have] = self._bridge_of
            self._bridge_of = grown

    def _setpoint_messages(
        self, rows: np.ndarray, power: np.ndarray, until: np.ndarray, request_id: str, now: float
    ) -> list[Outgoing]:
        """Setpoints for fleet ``rows``: one ``Setpoint`` per vehicle that talks for itself,
        one ``SetpointBatch`` per bridge (split at MAX_BATCH_VEHICLES) for the others."""
        t = self.topics
        ids = self.state.ids
        issued = from_epoch(now)
        self._fit_bridges()
        bridge = self._bridge_of[rows]
        own = np.flatnonzero(bridge < 0)
        # Formatted directly by broker/codec.py (tests/unit/test_codec.py holds them to the
        # Setpoint and SetpointBatch models): a model per vehicle costs more than allocating.
        own_ids = list(map(ids.__getitem__, rows[own].tolist()))
        msgs = [
            Outgoing(t.setpoint(vid), body, qos=1)
            for vid, body in zip(
                own_ids,
                setpoint_payloads(own_ids, request_id, power[own], until[own], issued),
                strict=True,
            )
        ]
        carried = np.flatnonzero(bridge >= 0)
        if carried.size:
            order = carried[np.argsort(bridge[carried], kind="stable")]
            b_sorted = bridge[order]
            cuts = np.flatnonzero(np.diff(b_sorted)) + 1
            for group in np.split(order, cuts):
                bridge_id = self.bridges[int(bridge[group[0]])]
                for k in range(0, group.shape[0], MAX_BATCH_VEHICLES):
                    part = group[k : k + MAX_BATCH_VEHICLES]
                    msgs.append(
                        Outgoing(
                            t.bridge_setpoints(bridge_id),
                            setpoint_batch_payload(
                                bridge_id,
                                request_id,
                                issued,
                                list(map(ids.__getitem__, rows[part].tolist())),
                                power[part],
                                until[part],
                            ),
                            qos=1,
                        )
                    )
        return msgs

    async def _publish(
        self,
        now: float,
        out: StepOutput,
        answers: list[DispatchResult],
        routed: list[Routed],
        capability: Capability,
        status: FleetStatus,
    ) -> int:
        t = self.topics
        msgs = self._setpoint_messages(out.rows, out.power_kw, out.valid_until, out.request_id, now)
        # Released vehicles get a setpoint that is already over: they go back to plain charging.
        released = out.release_rows
        msgs += self._setpoint_messages(
            released,
            np.zeros(released.shape[0]),
            np.full(released.shape[0], now + 1e-3),
            "release",
            now,
        )
        n_setpoints = len(msgs)
        msgs += [
            Outgoing(t.dispatch_progress(p.request_id), p.to_json(), qos=0) for p in out.progress
        ]
        msgs.append(Outgoing(t.fleet_capability, capability.to_json(), qos=1, retain=True))
        msgs.append(Outgoing(t.fleet_status, status.to_json(), qos=1, retain=True))
        for a in answers:
            self.log.info(
                "dispatch_result",
                request_id=a.request_id,
                status=a.status,
                requested_kw=a.requested_kw,
                allocated_kw=a.allocated_kw,
                shortfall_kw=a.shortfall_kw,
                delivered_kwh=a.delivered_kwh,
                reason=a.reason,
            )
        results = messages(routed, t)
        if not self.link.connected:
            # The broker is away: keep steering from memory rather than wait for it. Results
            # are owed and go out first once it is back; setpoints are decided afresh then.
            self._owed.extend(results)
            self.dispatcher.unsend(out.rows)
            if not self._owed_logged:
                link = self.link.stats
                if time.monotonic() - link.taken_over_at < TAKEOVER_WINDOW_S:
                    # The broker is there: another client keeps taking our connection.
                    self.log.error(
                        "mqtt_session_taken_over",
                        client_id=self.client_id,
                        hint=TAKEN_OVER_HINT,
                        owed_results=len(self._owed),
                    )
                else:
                    self.log.warning(
                        "broker_unreachable",
                        client_id=self.client_id,
                        last_error=link.last_disconnect or None,
                        owed_results=len(self._owed),
                    )
                self._owed_logged = True
            return 0
        owed, self._owed = list(self._owed), deque(maxlen=self._owed.maxlen)
        self._owed_logged = False
        # With fast setpoints, they go on their own connection while the rest goes here.
        fast = self.setpoints is not None
        on_link = [*owed, *results, *(msgs[n_setpoints:] if fast else msgs)]

        async def via_link() -> int:
            try:
                return await self.link.publish_many(on_link) - len(owed)
            except TransportError as err:
                self._owed.extend(owed + results)
                if not fast:
                    self.dispatcher.unsend(out.rows)
                self.log.warning("publish_failed", error=str(err), owed_results=len(self._owed))
                return 0

        if not fast:
            return await via_link()
        sent = await asyncio.gather(via_link(), self._send_setpoints(msgs[:n_setpoints], out.rows))
        return sum(sent)

    async def _send_setpoints(self, msgs: list[Outgoing], rows: np.ndarray) -> int:
        """Setpoints on the fast connection; returns how many the broker acknowledged. Those
        of ``rows`` whose setpoint it did not are decided and sent again next step."""
        fast = self.setpoints
        assert fast is not None
        if not msgs:
            return 0
        try:
            delivery = await fast.publish_many(msgs)
        except TransportError as err:
            self.dispatcher.unsend(rows)
            self.log.warning("setpoints_not_sent", error=str(err), setpoints=len(msgs))
            return 0
        if not delivery.complete:
            self.dispatcher.unsend(self._unacked_rows(msgs, delivery, rows))
        return delivery.count

    def _unacked_rows(
        self, msgs: list[Outgoing], delivery: Delivery, rows: np.ndarray
    ) -> np.ndarray:
        """The ``rows`` whose setpoint the broker did not acknowledge: a vehicle's own
        message, or a batch of the bridge that carries it."""
        vids: list[str] = []
        bridges: list[int] = []
        for k in np.flatnonzero(~delivery.acked).tolist():
            kind, ident = self.topics.parse(msgs[k].topic)
            if kind == "setpoint":
                vids.append(ident)
            elif kind == "bridge_setpoints" and ident in self._bridge_index:
                bridges.append(self._bridge_index[ident])
        index = self.state.index
        lost = np.array([index[v] for v in vids if v in index], dtype=np.intp)
        hit = np.isin(rows, lost)
        if bridges:
            self._fit_bridges()
            hit |= np.isin(self._bridge_of[rows], bridges)
        return rows[hit]

    def _settle_vehicles(
        self, now: float, view: FleetView, out: StepOutput
    ) -> list[tuple[str, Entry]]:
        """Per-vehicle settlement entries for the requests running this step (and those
        that ran until it): intervals that closed and drivers who unplugged."""
        dispatches = self.dispatcher.dispatches
        # Requests on a grid node are not settled per vehicle (yet): only the fleet's.
        running = {
            p.request_id: dispatches[p.request_id].end
            for p in out.progress
            if p.request_id in dispatches
        }
        owners = list(dict.fromkeys([*self._settling, *running]))
        before, self._settling = self._settling, running
        if self.ledger is None or not owners:
            return []
        meter, ids = self.state.meters(now, self.settings.stale_s), self.state.ids
        entries: list[Entry] = []
        if running:
            closed, departures = self.settlement.observe(
                now, view, meter, self.state.col("plugged"), ids, self.settings.control_step_s
            )
            entries += [vehicles_entry(iv) for iv in closed]
            entries += [departure_entry(d) for d in departures]
            for d in departures:
                if d.short:
                    self.log.warning(
                        "driver_left_short",
                        vehicle_id=d.vehicle_id,
                        short_kwh=round(d.short_kwh, 3),
                        requests=list(running),
                    )
        else:
            # The last interval stops where the requests did, not at this step: past their
            # end the vehicles are back to plain charging. Read the meters back to then, as
            # the dispatcher books the fleet's (each vehicle's power held since).
            end = min(now, max(before.values(), default=now))
            meter = self.settlement.meters_at(end, now, meter, view)
            last = self.settlement.flush(end, meter, ids)
            if last is not None:
                entries.append(vehicles_entry(last))
        return [(rid, e) for rid in owners for e in entries]

    def _record(
        self, answers: list[DispatchResult], out: StepOutput, status: FleetStatus | None = None
    ) -> None:
        """Queue this step's ledger entries and start writing them; never waits on Redis.
        While it is away they are kept (bounded) and written, in order, on its return."""
        if self.ledger is None:
            return
        # The books of the interval a request ended in come before its final answer.
        for rid, entry in self._vehicle_books:
            self.ledger.add(rid, entry)
        for a in answers:
            self.ledger.add(a.request_id, answer_entry(a))
        for p in out.progress:
            self.ledger.add(p.request_id, step_entry(p, int(out.rows.shape[0])))
        if status is not None and (grid := grid_entry(status.ts.timestamp(), status.nodes)):
            self.ledger.add(GRID_STREAM, grid)
        if self.ledger.owed and (self._ledger_task is None or self._ledger_task.done()):
            self._ledger_task = asyncio.create_task(self.ledger.drain(), name="aggregator-ledger")

    async def _finish_ledger(self) -> None:
        """Write what the ledger is owed before the service goes (bounded)."""
        if self.ledger is None:
            return
        task = self._ledger_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=SAVE_GRACE_S)
        if self.ledger.owed and (task is None or task.done()):
            last = asyncio.create_task(self.ledger.drain())
            await asyncio.wait({last}, timeout=SAVE_GRACE_S)
            if not last.done():
                last.cancel()
        if self.ledger.owed:
            self.log.error("ledger_unwritten", entries=len(self.ledger.owed))

    def _persist(self, now: float) -> None:
        """Start writing a snapshot, unless the last one is still being written (then the
        next step's, newer, goes instead): a slow or frozen Redis never holds up a step."""
        if self._saving is not None and not self._saving.done():
            self.saves_skipped += 1
            return
        ids, columns = self.state.snapshot()
        columns.update(self.dispatcher.learned(len(ids)))
        records = self.dispatcher.to_records()
        for record in records:  # the dispatcher skips keys it does not know
            reply = self._replies.get(record["request"]["request_id"])
            if reply is not None:
                record["reply_to"] = reply_record(reply)
        cursor = self.scale.saved_cursor if self.scale is not None else None
        snap = Snapshot(ids, columns, records, saved_at=now, ingest_cursor=cursor)
        self._saving = asyncio.create_task(self._save(snap), name="aggregator-save")

    async def _save(self, snap: Snapshot) -> None:
        try:
            await self.store.save(snap)
        except TransportError as err:
            if not self.degraded:
                self.log.error("state_save_failed", error=str(err), note="running from memory")
            self.degraded = True
            return
        if self.degraded:
            self.log.info("state_save_recovered", saved_at=round(snap.saved_at, 3))
        self.degraded = False

    async def _finish_save(self) -> None:
        """Let a snapshot write in flight end (bounded) before the service goes: one torn
        by cancellation can leave a half-used Redis connection behind."""
        save = self._saving
        if save is None or save.done():
            return
        await asyncio.wait({save}, timeout=SAVE_GRACE_S)
        if not save.done():
            save.cancel()
            await asyncio.wait({save}, timeout=1.0)

    def _log_step(self, report: StepReport, applied: int) -> None:
        wall = time.monotonic()
        if wall - self._last_log_wall < self.settings.status_every_wall_s and not report.results:
            return
        self._last_log_wall = wall
        self.log.info(
            "fleet_status",
            **log_fields(report.status),
            setpoints=report.setpoints_sent,
            telemetry=applied,
            step_ms=round(report.step_ms, 1),
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


def _decode(model: type[M], payload: bytes) -> M:
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


def _same_vehicle(topic_id: str, payload_id: str) -> None:
    if topic_id != payload_id:
        raise InvalidMessage(
            "identity", f"topic names vehicle {topic_id!r} but payload says {payload_id!r}"
        )
