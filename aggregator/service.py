"""The aggregator process: the thin async edge around the control step.

Messages are validated as they arrive and queued by the inbox router
(aggregator/inbox.py); once per control step :class:`ControlStep` (aggregator/
control_step.py, pure) turns the inbox into a plan (fold telemetry → admit requests →
allocate → books, envelope, status), and this service publishes it (setpoints, results,
progress, capability, status, forecast) and persists it (ledger, snapshot). It runs its
loops as named tasks of one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import numpy as np
import structlog
from paho.mqtt.properties import Properties

from aggregator.control_step import ControlStep, StepPlan
from aggregator.dispatch import Dispatcher, StepOutput
from aggregator.fence import fence_writes
from aggregator.fleet_state import FleetState
from aggregator.forecast import ForecastModel
from aggregator.grid import load_grid
from aggregator.grid_state import GridState
from aggregator.inbox import (  # the limits, re-exported: they were the service's
    MAX_BATCH_BYTES,
    MAX_PAYLOAD_BYTES,
    REFUSALS_PER_S,
    Inbox,
    InboxRouter,
    Refusals,
)
from aggregator.ledger import Ledger, LedgerWriter
from aggregator.scaleout import Rows, ScaleOut, shared_subscriptions
from aggregator.status import log_fields
from aggregator.store import MemoryStore, Snapshot, StateStore
from broker.clientid import client_id as derive_client_id
from broker.clientid import main_client_id
from broker.columns import TelemetryArrays
from broker.fastlink import FastIngest
from broker.fastpub import Delivery, FastPublisher
from broker.link import TAKEN_OVER_HINT, TAKEOVER_WINDOW_S, MqttLink, Outgoing
from broker.models import (
    Capability,
    DispatchResult,
    DispatchSignal,
    FleetStatus,
    from_epoch,
)
from broker.settings import Settings
from core.clock import Clock, raise_if_cancelled
from core.errors import TransportError

__all__ = ["MAX_BATCH_BYTES", "MAX_PAYLOAD_BYTES", "AggregatorService", "Inbox", "StepReport"]

# A step at a request's end comes this much after it (simulated s): epoch seconds carry
# ~1e-7 s of rounding, and a step a hair early would leave the request for the next.
END_MARGIN_S = 1e-3
SAVE_GRACE_S = 5.0  # how long a cancelled aggregator lets an in-flight snapshot write finish


T = TypeVar("T")


@dataclass(slots=True)
class StepReport:
    """What one control step did, for logs, tests and the demo."""

    now: float
    status: FleetStatus
    capability: Capability
    setpoints_sent: int
    results: list[DispatchResult]
    step_ms: float


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
        self._ledger = None if ledger is None else LedgerWriter(ledger)
        self._ledger_task: asyncio.Task[bool] | None = None
        self._writes: asyncio.TaskGroup | None = None  # while run() serves
        # Set by the router when a signal sample comes in: the signal loop follows it.
        self._signal_ready = asyncio.Event()
        self._dispatch_lock = asyncio.Lock()
        # How long each signal sample took from arrival to setpoints on the wire (ms).
        self.signal_latency_ms: deque[float] = deque(maxlen=10_000)
        self.topics = settings.topics
        self.log = logger or structlog.get_logger("aggregator")
        # The grid (issue 11, --grid): the last meter and limits per node. The router
        # checks its messages against the grid's nodes and queues them; the control step
        # applies them and steers by it, keeping it across a takeover's new dispatcher.
        self.grid: GridState | None = None
        if settings.grid_file:
            self.grid = GridState(
                load_grid(Path(settings.grid_file)),
                telemetry_interval_s=settings.telemetry_interval_s,
            )
        # Refusals answered at most this fast (the router's and the step's alike).
        self.refusals = Refusals(refusals_per_s)
        # (topic, bytes) -> the typed inbox, with limits and counters (aggregator/inbox.py):
        # received == accepted + ignored + every rejection but "stale" (found at the fold).
        self.router = InboxRouter(
            topics=self.topics,
            clock=clock,
            telemetry_interval_s=settings.telemetry_interval_s,
            speed=settings.speed,
            refusals=self.refusals,
            logger=self.log,
            on_signal=self._signal_ready.set,
            grid_nodes=None if self.grid is None else self.grid.grid.ids,
        )
        # The state and the one orchestration of a step (aggregator/control_step.py):
        # this service only runs the loops and publishes and persists each StepPlan.
        self.control = ControlStep(
            settings=settings,
            rejected=self.router.rejected,
            rejected_rows=self.router.rejected_rows,
            refusals=self.refusals,
            books=self._ledger is not None,
            grid=self.grid,
            logger=self.log,
        )
        self._saving: asyncio.Task[None] | None = None
        self.saves_skipped = 0
        self._owed: deque[Outgoing] = deque(maxlen=100_000)
        self._owed_logged = False
        self.reports: asyncio.Queue[StepReport] | None = None
        self.last_report: StepReport | None = None
        self.last_output: StepOutput | None = None
        self._last_log_wall = 0.0
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
                handler=self.router.route,
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
                    (self.topics.all_no_v2g, 1),
                    # Not shared: every process takes the whole grid's word, so a
                    # follower's grid is current when it takes over.
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
        self.router.route(str(message.topic), bytes(payload), message.properties)

    def on_payload(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """:meth:`on_message` for a topic and payload (the fast ingest client's form), and
        the MQTT 5 properties the message came with, if any."""
        self.router.route(topic, payload, properties)

    # The router's inbox and counters, read (and the inbox swapped) as the service's.
    @property
    def inbox(self) -> Inbox:
        return self.router.inbox

    @inbox.setter
    def inbox(self, inbox: Inbox) -> None:
        self.router.inbox = inbox

    @property
    def received(self) -> int:
        return self.router.received

    @property
    def accepted(self) -> int:
        return self.router.accepted

    @property
    def ignored(self) -> int:
        return self.router.ignored

    @property
    def rejected(self) -> Counter[str]:
        return self.router.rejected

    @property
    def rejected_rows(self) -> Counter[str]:
        return self.router.rejected_rows

    @property
    def batched_updates(self) -> int:
        return self.router.batched_updates

    @property
    def refusals_unanswered(self) -> int:
        return self.refusals.unanswered

    @property
    def ledger(self) -> LedgerWriter | None:
        """Where settlement records go (None: no books are kept)."""
        return self._ledger

    @ledger.setter
    def ledger(self, writer: LedgerWriter | None) -> None:
        # The step keeps per-vehicle books only while there is a ledger to write them to.
        self._ledger = writer
        self.control.books = writer is not None

    # The step's state, read as the service's (tests, benches, the demo and scale-out).
    @property
    def state(self) -> FleetState:
        return self.control.state

    @property
    def dispatcher(self) -> Dispatcher:
        return self.control.dispatcher

    @property
    def forecaster(self) -> ForecastModel:
        return self.control.forecaster

    @property
    def bridges(self) -> list[str]:
        return self.control.bridges

    @property
    def degraded(self) -> bool:
        return self.control.degraded

    @degraded.setter
    def degraded(self, value: bool) -> None:
        self.control.degraded = value

    @property
    def _signals(self) -> dict[str, tuple[DispatchSignal, float]]:
        return self.router.signals

    # -- the loop --------------------------------------------------------------------
    async def run(self) -> None:
        """Restore state, then serve until cancelled."""
        self.log.info("deployment", role="aggregator", **self.deployment())
        await self.restore()
        try:
            # The writes the steps start (snapshots, ledger) are tasks of the group around
            # the loops' group: a stop cancels the loops at once, then lets a write in
            # flight finish (bounded) before the outer group closes; one torn by
            # cancellation can leave a half-used Redis connection behind.
            async with asyncio.TaskGroup() as writes:
                self._writes = writes
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
        finally:
            self._writes = None
            if self.scale is not None:  # a graceful stop hands the lease on at once
                await self.scale.close()

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start a write in the service's task group while it runs (:meth:`run`); a step
        driven on its own (tests, benches) keeps the task itself and it ends with it."""
        if self._writes is not None:
            with contextlib.suppress(RuntimeError):  # the group is already shutting down
                return self._writes.create_task(coro, name=name)
        return asyncio.create_task(coro, name=name)

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
        self.control.restore(snap)
        self.log.info(
            "state_restored",
            vehicles=len(snap.ids),
            dispatches=len(snap.dispatches),
            saved_at=from_epoch(snap.saved_at).isoformat() if snap.saved_at else None,
        )

    async def reset_for_takeover(self, term: int) -> None:
        """Scale-out: this process now leads. What it knew before is stale: it starts again
        from its own config and restores the last leader's snapshot (and the stream cursor
        with it); this term's ledger entries carry its fencing token."""
        self.control.reset()
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
            inbox = self.router.take()
            self.control.apply_grid(inbox)  # kept current for when this process leads
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
        self.control.fold_forwarded(TelemetryArrays.concat(own))

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
            pending, self.router.signals = self.router.signals, {}
            if self.scale is not None and not self.scale.leading:
                continue
            async with self._dispatch_lock:
                samples = {rid: sample for rid, (sample, _) in pending.items()}
                followed = self.control.follow(samples, self.clock.now())
                if followed is not None:
                    out, msgs = followed
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
        """One control step: :meth:`ControlStep.run` over the inbox, then publish and
        persist its plan (see aggregator/control_step.py for the order)."""
        wall0 = time.perf_counter()
        now = self.clock.now()
        inbox = self.router.take()
        if self.scale is not None:  # scale-out: fold in what the other processes received
            await self._collect(inbox)
        plan = self.control.run(inbox, now)
        self.last_output = plan.output
        sent = await self._publish(plan)
        self._record(plan)
        await self._forecast(plan)
        self._persist(plan)
        report = StepReport(
            now,
            plan.status,
            plan.capability,
            sent,
            plan.answers,
            (time.perf_counter() - wall0) * 1e3,
        )
        self.last_report = report
        self._log_step(report, plan.applied)
        return report

    async def _forecast(self, plan: StepPlan) -> None:
        """Publish the availability forecast when the plan has one (retained); one not
        sent is made again at the next step."""
        if plan.forecast is None or not self.link.connected:
            return
        with contextlib.suppress(TransportError):
            if await self.link.publish_many([plan.forecast()]):
                self.control.forecast_published(plan.now)

    # Kept for tests and tools that call them on the service.
    def _fold(self, inbox: Inbox, now: float | None = None) -> tuple[int, int]:
        return self.control.fold(inbox, self.clock.now() if now is None else now)

    def _setpoint_messages(
        self, rows: np.ndarray, power: np.ndarray, until: np.ndarray, request_id: str, now: float
    ) -> list[Outgoing]:
        return self.control.setpoint_messages(rows, power, until, request_id, now)

    async def _publish(self, plan: StepPlan) -> int:
        """Send the plan's messages: results owed from before first, then this step's
        results, setpoints, progress, capability and status. Returns the setpoints and
        messages the broker took (0 while it is away: results are owed, setpoints decided
        afresh)."""
        out = plan.output
        msgs = [*plan.setpoints, *plan.updates]
        n_setpoints = len(plan.setpoints)
        for a in plan.answers:
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
        results = plan.results
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
        """The ``rows`` whose setpoint the broker did not acknowledge."""
        return self.control.unacked_rows(msgs, delivery.acked, rows)

    def _record(self, plan: StepPlan) -> None:
        """Queue the plan's ledger entries and start writing them; never waits on Redis.
        While it is away they are kept (bounded) and written, in order, on its return."""
        if self.ledger is None:
            return
        for rid, entry in plan.ledger:
            self.ledger.add(rid, entry)
        if self.ledger.owed and (self._ledger_task is None or self._ledger_task.done()):
            self._ledger_task = self._spawn(self.ledger.drain(), "aggregator-ledger")

    async def _finish_ledger(self) -> None:
        """Write what the ledger is owed before the service goes (bounded)."""
        if self.ledger is None:
            return
        task = self._ledger_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=SAVE_GRACE_S)
        if self.ledger.owed and (task is None or task.done()):
            last = self._spawn(self.ledger.drain(), "aggregator-ledger-last")
            await asyncio.wait({last}, timeout=SAVE_GRACE_S)
            if not last.done():
                last.cancel()
        if self.ledger.owed:
            self.log.error("ledger_unwritten", entries=len(self.ledger.owed))

    def _persist(self, plan: StepPlan) -> None:
        """Start writing the plan's snapshot, unless the last one is still being written
        (then the next step's, newer, goes instead): a slow or frozen Redis never holds up
        a step."""
        if self._saving is not None and not self._saving.done():
            self.saves_skipped += 1
            return
        cursor = self.scale.saved_cursor if self.scale is not None else None
        snap = plan.snapshot(cursor)
        self._saving = self._spawn(self._save(snap), "aggregator-save")

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
