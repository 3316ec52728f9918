"""The control step, pure: one inbox and the time in, everything the edges must do out.

:meth:`ControlStep.run` is the one orchestration of the flow, in order:

0. apply the grid's meters and limits that came since the last step (with a grid);
1. fold the step's telemetry (vehicles' own reports and bridges' batches) into the fleet
   state, then the statuses (a will that came after a vehicle's last report wins);
2. take the operator messages to the dispatcher and route every answer;
3. let the dispatcher step (allocation, setpoints, progress, results);
4. settle per vehicle, update the capability envelope and the fleet status;
5. format the setpoints (per vehicle, or batched per bridge), answers, progress,
   capability and status messages; the ledger entries; the availability forecast when
   due; and a snapshot to persist.

It returns a :class:`StepPlan` and does no I/O: no asyncio, no MQTT client, no Redis.
The aggregator service publishes and persists the plan; ``v2g simulate``
(v2g/simcore.py), the benches and the in-memory loop of the tests drive the same steps
(:meth:`ControlStep.decide` when they bring their own view of the fleet).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog
from numpy.typing import NDArray

from aggregator.answers import Refusal, Routed, messages, payload_head, replies
from aggregator.capability import Envelopes, vehicle_ranges
from aggregator.clockwatch import ClockWatch, behind
from aggregator.dispatch import Dispatcher, StepOutput
from aggregator.fleet_state import FleetState, FleetView
from aggregator.forecast import ForecastModel
from aggregator.grid_capability import NodeCapabilities, node_capabilities
from aggregator.grid_state import GridState
from aggregator.inbox import Inbox, Refusals
from aggregator.ledger import (
    GRID_STREAM,
    Entry,
    answer_entry,
    departure_entry,
    firming_entry,
    grid_entry,
    step_entry,
    vehicles_entry,
)
from aggregator.scoring import FCR_DEADBAND_HZ, FCR_FULL_HZ, FCR_NOMINAL_HZ
from aggregator.settlement import Settlement
from aggregator.status import fleet_status
from aggregator.store import Snapshot
from broker.codec import setpoint_batch_payload, setpoint_payloads
from broker.columns import TelemetryArrays
from broker.link import Outgoing
from broker.models import (
    MAX_BATCH_VEHICLES,
    AnswerTo,
    Capability,
    CapabilityWindow,
    DispatchRejection,
    DispatchResult,
    DispatchSignal,
    FcrDroop,
    FleetForecast,
    FleetStatus,
    ForecastPeriod,
    NodeCapability,
    from_epoch,
    to_epoch,
)
from broker.replies import ReplyTo, reply_from_record, reply_record
from broker.settings import Settings

FORECAST_PERIOD_S = 3600.0  # hourly market periods
FORECAST_EVERY_S = 900.0  # simulated seconds between forecasts
CLOCK_WINDOW_STEPS = 12  # telemetry intervals over which the clock warnings count reports
WARN_LOG_EVERY_S = 30.0  # wall seconds between log lines of a standing warning


@dataclass(slots=True)
class Decision:
    """What the dispatcher made of one step's operator messages and the fleet: the
    answers to the messages (those booked to a request), where every answer goes, and
    the dispatcher's step (setpoints by fleet row, progress, its own results)."""

    answers: list[DispatchResult]
    routed: list[Routed]
    output: StepOutput


@dataclass(slots=True)
class StepPlan:
    """Everything the edges must do after one control step."""

    now: float
    output: StepOutput  # the dispatcher's decision, by fleet row
    # Every answer of the step booked to a request (to operator messages, then the
    # dispatcher's own results), in order: logged, and each goes into the ledger.
    answers: list[DispatchResult]
    setpoints: list[Outgoing]  # per vehicle and per bridge, released vehicles' included
    results: list[Outgoing]  # every answer, where it goes (result topics, replies)
    updates: list[Outgoing]  # progress, then capability and status (retained)
    status: FleetStatus
    capability: Capability
    # Each grid node's windows (with a grid, at most once per envelope turn; else empty).
    node_capabilities: list[NodeCapability]
    ledger: list[tuple[str, Entry]]  # (request id, entry), in the order they are written
    # The availability forecast when one is due, built when the edge can send it (the
    # broker may be away: then it is due again next step): ``forecast()``.
    forecast: Callable[[], Outgoing] | None
    applied: int  # telemetry rows folded
    # The snapshot to persist, built when the edge writes it (a write still in flight
    # skips this step's): ``snapshot(ingest_cursor)``.
    snapshot: Callable[[str | None], Snapshot] = field(repr=False)


class ControlStep:
    """The aggregator's state (fleet, dispatcher, books, bridges, envelopes) and the one
    function that moves it on: :meth:`run`."""

    def __init__(
        self,
        *,
        settings: Settings,
        rejected: Counter[str] | None = None,
        rejected_rows: Counter[str] | None = None,
        refusals: Refusals | None = None,
        books: bool = False,
        state: FleetState | None = None,
        dispatcher: Dispatcher | None = None,
        grid: GridState | None = None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rejected``/``rejected_rows``: the counters the inbox router keeps (the step
        adds "stale" and shows them in the status). ``refusals``: the budget of answers
        to refused messages, shared with the router. ``books``: keep per-vehicle books
        and make ledger entries (there is a ledger). ``state``, ``dispatcher``: to step
        (else an empty fleet, and a dispatcher from ``settings``). ``grid``: the grid under
        the fleet (issue 11, ``--grid``), given to every dispatcher made here and kept
        across a takeover's reset (the retained limits come only once). ``wall``:
        monotonic seconds, for the warnings' log throttle."""
        self.settings = settings
        self.topics = settings.topics
        self.log = logger or structlog.get_logger("aggregator")
        self.rejected: Counter[str] = Counter() if rejected is None else rejected
        self.rejected_rows: Counter[str] = Counter() if rejected_rows is None else rejected_rows
        self.refusals = refusals or Refusals(math.inf)
        self.books = books
        self._wall = wall
        self.state = FleetState() if state is None else state
        # The last meter and limits per grid node; before the dispatcher, which steers by it.
        self.grid = grid
        self.dispatcher = dispatcher or self.new_dispatcher()
        self.forecaster = ForecastModel()
        self.envelopes = Envelopes(step_s=settings.control_step_s)
        # The nodes' windows once per turn of the envelope's windows, not every step.
        self.node_caps = NodeCapabilities(len(self.envelopes.windows) * settings.control_step_s)
        self.forecast_at = -math.inf
        # Per-vehicle settlement while requests run: the requests it books for (with when
        # each ends).
        self.settlement = Settlement()
        self._settling: dict[str, float] = {}
        # Where each running request's sender wants its answers (MQTT 5 response topic),
        # kept with the snapshot.
        self.replies: dict[str, ReplyTo] = {}
        # Reports far behind or ahead of the platform clock, for the status's warnings.
        self.clock_watch = ClockWatch(window_s=CLOCK_WINDOW_STEPS * settings.telemetry_interval_s)
        self._ahead_seen = 0
        self._warned_at = -math.inf
        # Which bridge carries each fleet row (-1: the vehicle talks for itself); rows
        # behind a bridge get their setpoints batched on the bridge's setpoints topic.
        self.bridges: list[str] = []
        self.bridge_index: dict[str, int] = {}
        self._bridge_of = np.full(0, -1, dtype=np.int32)
        # Set by the edge: snapshots are not being written (shown in the status).
        self.degraded = False

    def new_dispatcher(self) -> Dispatcher:
        """A dispatcher from the settings (as a new leader starts one)."""
        s = self.settings
        return Dispatcher(
            control_step_s=s.control_step_s,
            setpoint_ttl_s=s.setpoint_ttl_s,
            max_request_kw=s.max_request_kw,
            max_duration_s=s.max_request_duration_s,
            allocation=s.allocation,
            grid=self.grid,
        )

    # -- state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the fleet and the requests (scale-out: a new leader starts again from
        its own config, then restores the last leader's snapshot). The grid's state is
        kept: its retained limits came once, at subscription."""
        self.state = FleetState()
        self.dispatcher = self.new_dispatcher()

    def restore(self, snap: Snapshot) -> None:
        """Take up the fleet, the requests, their senders' reply addresses and what the
        dispatcher learned from a snapshot."""
        self.state = FleetState.restore(snap.ids, snap.columns)
        self.dispatcher.restore(snap.dispatches)
        self.replies = {
            r["request"]["request_id"]: reply
            for r in snap.dispatches
            if (reply := reply_from_record(r.get("reply_to"))) is not None
        }
        self.dispatcher.restore_learned(snap.columns, len(snap.ids))

    def snapshot(self, now: float, ingest_cursor: str | None = None) -> Snapshot:
        """The state to persist: fleet columns with what the dispatcher learned, and the
        requests with where their senders want answers."""
        ids, columns = self.state.snapshot()
        columns.update(self.dispatcher.learned(len(ids)))
        records = self.dispatcher.to_records()
        for record in records:  # the dispatcher skips keys it does not know
            reply = self.replies.get(record["request"]["request_id"])
            if reply is not None:
                record["reply_to"] = reply_record(reply)
        return Snapshot(ids, columns, records, saved_at=now, ingest_cursor=ingest_cursor)

    # -- the step --------------------------------------------------------------------
    def run(self, inbox: Inbox, now: float) -> StepPlan:
        """One control step over ``inbox`` at ``now``; see the module docstring."""
        self.apply_grid(inbox)
        # Telemetry first: a will that arrived after a vehicle's last report must win.
        applied, stale = self.fold(inbox, now)
        for s in inbox.status:
            self.state.apply_status(s.vehicle_id, s.online, to_epoch(s.ts))
        for vehicle_id, on, at in inbox.holds:
            self.state.set_no_v2g(vehicle_id, on, at)
        if stale:
            self.rejected["stale"] += stale
        step_s, stale_s = self.settings.control_step_s, self.settings.stale_s
        view = self.state.view(now, stale_s)
        decision = self.decide(inbox, now, view)
        out = decision.output
        vehicle_books = self._settle_vehicles(now, view, out)
        answers = decision.answers + out.results
        # What the fleet offers is what it will deliver: partial followers count for
        # their measured share, as admission counts them.
        ratio = self.dispatcher.follow_ratio(view.rows)
        windows = self.envelopes.update(view, now, ratio)
        node_caps = self._node_capabilities(view, now, ratio)
        # The dispatcher's, for the same view: the step's learning or plan may have them.
        lo, hi = self.dispatcher.ranges(view, now, step_s)
        online, plugged = self.state.counts(now, stale_s)
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
        t = self.topics
        setpoints = self.setpoint_messages(
            out.rows, out.power_kw, out.valid_until, out.request_id, now, out.fcr_hz, out.fcr_kw
        )
        # Released vehicles get a setpoint that is already over: back to plain charging.
        released = out.release_rows
        setpoints += self.setpoint_messages(
            released,
            np.zeros(released.shape[0]),
            np.full(released.shape[0], now + 1e-3),
            "release",
            now,
        )
        updates = [
            Outgoing(t.dispatch_progress(p.request_id), p.to_json(), qos=0) for p in out.progress
        ]
        updates.append(Outgoing(t.fleet_capability, capability.to_json(), qos=1, retain=True))
        updates += [
            Outgoing(t.grid_capability(c.node), c.to_json(), qos=1, retain=True) for c in node_caps
        ]
        updates.append(Outgoing(t.fleet_status, status.to_json(), qos=1, retain=True))
        return StepPlan(
            now=now,
            output=out,
            answers=answers,
            setpoints=setpoints,
            results=messages(decision.routed + [self._route(a) for a in out.results], t),
            updates=updates,
            status=status,
            capability=capability,
            node_capabilities=node_caps,
            ledger=self._ledger(vehicle_books, answers, out, status),
            forecast=self._forecast(now, view, windows),
            applied=applied,
            snapshot=lambda cursor: self.snapshot(now, cursor),
        )

    def _node_capabilities(
        self, view: FleetView, now: float, ratio: np.ndarray
    ) -> list[NodeCapability]:
        """The grid nodes' windows when due (aggregator/grid_capability.py); [] else."""
        if self.grid is None or not self.node_caps.due(now):
            return []
        return node_capabilities(
            self.grid.grid,
            self.grid.vehicle_nodes(view),
            view,
            now,
            self.envelopes.windows,
            self.grid.in_force(now),
            ratio,
        )

    def apply_grid(self, inbox: Inbox) -> None:
        """Take the grid's meters and limits queued in ``inbox`` (the router checked their
        nodes), in arrival order, and clear them: a follower in a share group applies
        them too, so its grid is current when it takes over."""
        if self.grid is not None:
            for node, meter in inbox.grid_meters:
                self.grid.meter(node, meter)
            for node, limits in inbox.grid_limits:
                self.grid.limits(node, limits)
        inbox.grid_meters.clear()
        inbox.grid_limits.clear()

    def decide(
        self, inbox: Inbox, now: float, view: FleetView, n_rows: int | None = None
    ) -> Decision:
        """Take ``inbox``'s operator messages to the dispatcher, answer each, then let it
        step over ``view``: the part of :meth:`run` after the fold, for a caller that
        brings its own view of the fleet (the headless simulation; ``n_rows``: how many
        rows its fleet has, else the fleet state's)."""
        answers, routed = self._answer(inbox, now, view)
        out = self.dispatcher.step(now, view, len(self.state) if n_rows is None else n_rows)
        return Decision(answers, routed, out)

    def follow(
        self, samples: dict[str, DispatchSignal], now: float
    ) -> tuple[StepOutput, list[Outgoing]] | None:
        """Follow signal samples between steps: the new target's setpoints (None, or no
        rows, if nothing changes)."""
        view = self.state.view(now, self.settings.stale_s)
        out = self.dispatcher.follow(samples, now, view)
        if out is None or not out.rows.size:
            return None
        msgs = self.setpoint_messages(
            out.rows, out.power_kw, out.valid_until, out.request_id, now, out.fcr_hz, out.fcr_kw
        )
        return out, msgs

    def forecast_published(self, now: float) -> None:
        """The edge published this step's forecast: the next is due FORECAST_EVERY_S on."""
        self.forecast_at = now

    # -- telemetry -------------------------------------------------------------------
    def fold(self, inbox: Inbox, now: float) -> tuple[int, int]:
        """Fold every report of the step at once, vehicles' own and bridges' batches, and
        note which bridge (if any) carries each vehicle now. Reports already older than
        the stale limit are counted as stale too: they cannot make a vehicle count, and a
        fleet of them is a clock mismatch (aggregator/clockwatch.py). They are still
        folded, in order: a report that is only late still belongs in its meter.
        Returns (rows applied, rows stale)."""
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

    def fold_forwarded(self, reports: TelemetryArrays) -> None:
        """Scale-out: fold vehicles' own reports other processes received (with the
        leader's own, in one pass, so the newest report of a vehicle wins)."""
        self._carried_by(reports.vehicle_id, -1)
        _, stale = self.state.apply_arrays(reports)
        if stale:
            self.rejected["stale"] += stale

    def _gather(self, inbox: Inbox) -> TelemetryArrays | None:
        """The step's reports as one set of columns (None if there are none), noting which
        bridge carries each vehicle."""
        parts = [a for _, a in inbox.batches]
        if inbox.telemetry:
            own = TelemetryArrays.from_telemetry(inbox.telemetry)
            self._carried_by(own.vehicle_id, -1)
            parts.append(own)
        for bridge_id, reports in inbox.batches:
            b = self.bridge_index.get(bridge_id)
            if b is None:
                b = self.bridge_index[bridge_id] = len(self.bridges)
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

    # -- setpoints -------------------------------------------------------------------
    def setpoint_messages(
        self,
        rows: np.ndarray,
        power: np.ndarray,
        until: np.ndarray,
        request_id: str,
        now: float,
        fcr_hz: float | None = None,
        fcr_kw: np.ndarray | None = None,
    ) -> list[Outgoing]:
        """Setpoints for fleet ``rows``: one ``Setpoint`` per vehicle that talks for itself,
        one ``SetpointBatch`` per bridge (split at MAX_BATCH_VEHICLES) for the others.
        With containment running (``fcr_hz``, ``fcr_kw``: the frequency the setpoints were
        computed at and each row's share of the capacity), the batches carry the FCR
        extension, so a bridge can droop at the charger; a vehicle's own Setpoint has none."""
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
        droop = None
        if fcr_hz is not None and fcr_kw is not None:
            droop = FcrDroop(
                frequency_hz=fcr_hz,
                nominal_hz=FCR_NOMINAL_HZ,
                deadband_hz=FCR_DEADBAND_HZ,
                full_activation_hz=FCR_FULL_HZ,
            )
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
                                droop,
                                None if fcr_kw is None or droop is None else fcr_kw[part],
                            ),
                            qos=1,
                        )
                    )
        return msgs

    def unacked_rows(
        self, msgs: list[Outgoing], acked: NDArray[np.bool_], rows: np.ndarray
    ) -> np.ndarray:
        """The ``rows`` whose setpoint in ``msgs`` was not acknowledged (``acked`` False):
        a vehicle's own message, or a batch of the bridge that carries it."""
        vids: list[str] = []
        bridges: list[int] = []
        for k in np.flatnonzero(~acked).tolist():
            kind, ident = self.topics.parse(msgs[k].topic)
            if kind == "setpoint":
                vids.append(ident)
            elif kind == "bridge_setpoints" and ident in self.bridge_index:
                bridges.append(self.bridge_index[ident])
        index = self.state.index
        lost = np.array([index[v] for v in vids if v in index], dtype=np.intp)
        hit = np.isin(rows, lost)
        if bridges:
            self._fit_bridges()
            hit |= np.isin(self._bridge_of[rows], bridges)
        return rows[hit]

    # -- books -----------------------------------------------------------------------
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
        if not self.books or not owners:
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

    def _ledger(
        self,
        vehicle_books: list[tuple[str, Entry]],
        answers: list[DispatchResult],
        out: StepOutput,
        status: FleetStatus | None = None,
    ) -> list[tuple[str, Entry]]:
        """This step's ledger entries, in order: the books of the interval a request
        ended in (its vehicles', a firming request's) come before its final answer; the
        grid's nodes (``status``'s) last."""
        nodes = self.dispatcher.nodes
        firming = [] if nodes is None else nodes.take_intervals()
        if not self.books:
            return []
        entries = list(vehicle_books)
        entries += [(rid, firming_entry(iv)) for rid, iv in firming]
        entries += [(a.request_id, answer_entry(a)) for a in answers]
        n = int(out.rows.shape[0])
        entries += [(p.request_id, step_entry(p, n)) for p in out.progress]
        if status is not None and (grid := grid_entry(status.ts.timestamp(), status.nodes)):
            entries.append((GRID_STREAM, grid))
        return entries

    # -- answers ---------------------------------------------------------------------
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
                if not self.refusals.may_answer():
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
                self.replies[req.request_id] = reply
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
        ours = None if refused else self.replies.get(rid)
        routed = Routed(answer, public=True, replies=replies(reply, ours))
        if not self.dispatcher.holds(rid):
            self.replies.pop(rid, None)
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
        if not self.refusals.may_answer():
            return []
        answer = self.dispatcher.refuse(rid, self.dispatcher.not_running(rid), now, kind)
        self.log.info("dispatch_refused", request_id=rid, to=kind, reason=answer.reason)
        return [Routed(answer, public=True, replies=replies(reply))]

    # -- status ----------------------------------------------------------------------
    def _forecast(
        self, now: float, view: FleetView, windows: list[CapabilityWindow]
    ) -> Callable[[], Outgoing] | None:
        """Learn from this step's one-hour capability; every FORECAST_EVERY_S the
        availability forecast (retained) for the next 24 hourly periods is due."""
        hour = next((w for w in windows if w.duration_s == FORECAST_PERIOD_S), None)
        if hour is not None and len(view):
            self.forecaster.observe(now, hour.min_power_kw, hour.max_power_kw)
        if now - self.forecast_at < FORECAST_EVERY_S or not len(view):
            return None
        return lambda: self._forecast_message(now, view)

    def _forecast_message(self, now: float, view: FleetView) -> Outgoing:
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
        return Outgoing(self.topics.fleet_forecast, msg.to_json(), qos=1, retain=True)

    def _warnings(self, now: float | None = None) -> list[str]:
        """The fleet status's warnings; each new one is logged too (at most every 30 s)."""
        warnings = self.clock_watch.warnings()
        if self.grid is not None and now is not None:
            warnings += self.grid.stale_warnings(self.grid.in_force(now))
        wall = self._wall()
        if warnings and wall - self._warned_at >= WARN_LOG_EVERY_S:
            self._warned_at = wall
            for w in warnings:
                self.log.warning("telemetry_clock_mismatch", warning=w)
        return warnings
