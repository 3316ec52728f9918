"""The dispatcher: admits grid requests, splits them over the fleet each control step,
and keeps the books (requested, delivered and baseline energy).

Pure and synchronous: it is handed the fleet view and the time, and returns the
setpoints and messages to send. The service around it does the I/O. This is a facade:
each part below owns one piece of state (see docs/ARCHITECTURE.md, "Inside dispatch").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from aggregator import envelope as ev
from aggregator.dispatch import answers as wire
from aggregator.dispatch import tracking
from aggregator.dispatch.admission import Admission
from aggregator.dispatch.ahead import SCHEDULE_STEP_S
from aggregator.dispatch.books import Books, accrue
from aggregator.dispatch.gridcap import GridCap
from aggregator.dispatch.learning import Learned
from aggregator.dispatch.noderequests import NodeRequests
from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch, StepOutput
from aggregator.dispatch.setpoints import REPLAN_EVERY_STEP_BELOW, Setpoints
from aggregator.dispatch.stack import Stack
from aggregator.dispatch.tracking import Tracking
from aggregator.fleet_state import FleetView
from aggregator.grid_state import GridState
from aggregator.scoring import FCR_NOMINAL_HZ
from broker.models import (
    ActiveDispatch,
    AnswerTo,
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    DispatchSignal,
    NodeStatus,
    ResultStatus,
    Service,
)
from core.physics import Array

__all__ = ["GRID_SETPOINTS", "SCHEDULE_STEP_S", "Dispatcher", "StepOutput"]

GRID_SETPOINTS = "grid-limits"
"""The request_id of setpoints sent with no request running, only to hold a grid limit."""


class Dispatcher:
    """Admits requests and turns the running ones into per-vehicle setpoints."""

    def __init__(
        self,
        *,
        control_step_s: float = 5.0,
        setpoint_ttl_s: float = 30.0,
        max_request_kw: float = 1_000_000.0,
        max_duration_s: float = 7 * 86_400.0,
        settle_s: float | None = None,
        allocation: Literal["proportional", "cost"] = "proportional",
        replan_every_step_below: int = REPLAN_EVERY_STEP_BELOW,
        grid: GridState | None = None,
    ) -> None:
        self.control_step_s = control_step_s
        # proportional: the fast split in proportion to headroom, sticky from step to step.
        # cost: the least-cost split, each battery weighted by its throughput cost and by
        # the energy it has cycled so far, so wear spreads over the fleet.
        self.allocation = allocation
        self.replan_every_step_below = replan_every_step_below
        self.setpoint_ttl_s = setpoint_ttl_s
        self.max_request_kw = max_request_kw
        self.max_duration_s = max_duration_s
        # A vehicle acts on a setpoint at its next tick, and a burst of setpoints takes a
        # while to go out: judge drift only after two steps, or cars that simply have not
        # heard yet look like cars that will not follow.
        self.settle_s = 2.0 * control_step_s if settle_s is None else settle_s
        self.limits = wire.Limits(max_request_kw, max_duration_s, control_step_s)
        self.said = wire.AnswerBook()
        self.learning = Learned()
        self.fleet = FleetRanges(self.learning, control_step_s=control_step_s)
        self.stack = Stack(self.fleet, control_step_s=control_step_s)
        self.setpoints = Setpoints(
            self.learning,
            self.fleet,
            control_step_s=control_step_s,
            setpoint_ttl_s=setpoint_ttl_s,
            settle_s=self.settle_s,
            allocation=allocation,
            replan_every_step_below=replan_every_step_below,
        )
        self.books = Books(self.fleet)
        self.tracking = Tracking(control_step_s=control_step_s)
        self.admission = Admission(self.stack, self.fleet, self.setpoints, self.said, self.limits)
        # The grid under the fleet (issue 11): with a topology, every step's setpoints
        # (plain charging included) are clipped under the limits in force.
        self.grid: GridCap | None = None
        self.nodes: NodeRequests | None = None
        if grid is not None:
            self.nodes = NodeRequests(
                grid, self.fleet, self.said, self.limits, control_step_s=control_step_s
            )
            self.grid = GridCap(
                grid,
                self.setpoints,
                self.fleet,
                control_step_s=control_step_s,
                setpoint_ttl_s=setpoint_ttl_s,
            )

    # -- what it holds and knows -------------------------------------------------------
    @property
    def dispatches(self) -> dict[str, Dispatch]:
        """The admitted requests (scheduled and running), by request id."""
        return self.stack.dispatches

    def holds(self, request_id: str) -> bool:
        """Is this request admitted (scheduled or running), on the fleet or on a node?"""
        return request_id in self.dispatches or (
            self.nodes is not None and request_id in self.nodes.dispatches
        )

    @property
    def answers(self) -> OrderedDict[str, DispatchResult]:
        """The latest answer to each request id remembered."""
        return self.said.answers

    def _fit(self, n_rows: int) -> None:
        self.setpoints.fit(n_rows)
        self.learning.fit(n_rows)
        self.books.fit(n_rows)

    def _fit_rows(self, rows: NDArray[np.intp]) -> None:
        self._fit(int(rows.max()) + 1 if rows.size else 0)

    def follow_ratio(self, rows: NDArray[np.intp]) -> Array:
        """The measured share of their setpoints these fleet rows deliver (1 = obey)."""
        self._fit_rows(rows)
        return self.learning.ratio[rows].copy()

    def cycled_kwh(self, rows: NDArray[np.intp]) -> Array:
        """Energy each of these fleet rows has cycled under this dispatcher (kWh)."""
        self._fit_rows(rows)
        return self.learning.cycled[rows].copy()

    def ranges(self, view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
        """``vehicle_ranges``, computed once per view, time and window (read-only arrays);
        a caller that holds the same view (the simulation) may share them."""
        return self.fleet.ranges(view, now, window_s)

    def envelope(self, view: FleetView, now: float, window_s: float) -> ev.Envelope:
        """The capability envelope for the window, each car counted for the share of its
        setpoints it delivers."""
        return self.fleet.envelope(view, now, window_s)

    def baseline(self, view: FleetView) -> float:
        """What the active fleet would draw now with plain charging (once per view)."""
        return self.fleet.baseline(view)

    def next_end(self, now: float) -> float | None:
        """When the next running request ends (after ``now``), or None: a step then closes
        its books at its end rather than up to a control step later."""
        return self.stack.next_end(now)

    def ends_at_step(self, d: Dispatch, now: float) -> bool:
        """Does a running request end at the control step of ``now``?"""
        return self.stack.ends_at_step(d, now)

    def unsend(self, rows: NDArray[np.intp]) -> None:
        """These setpoints never reached the broker: decide and send them again next step."""
        self.setpoints.unsend(rows)

    @staticmethod
    def score(d: Dispatch) -> float | None:
        """The PJM-style composite score of a signal service so far, as published (None
        before one whole 5-minute window of samples)."""
        return wire.wire_score(tracking.score(d))

    @staticmethod
    def fcr_share(d: Dispatch) -> float | None:
        """The least share of full activation delivered 30 s after a step, so far."""
        return wire.wire_score(tracking.fcr_share(d))

    def active(self) -> list[ActiveDispatch]:
        """The running requests, for fleet status (those on a node too)."""
        node_run = [] if self.nodes is None else self.nodes.running()
        return [
            wire.active(d) for d in [*self.dispatches.values(), *node_run] if d.state == "active"
        ]

    def _progress(self, d: Dispatch, now: float) -> DispatchProgress:
        return wire.progress(d, now, tracking.score(d), tracking.fcr_share(d))

    # -- answers -----------------------------------------------------------------------
    def reuses_id(self, req: DispatchRequest) -> bool:
        """Does ``req`` take the id of a request already answered, on other terms? (It is
        refused, and the answer is its sender's alone: that id's topics are the first's.)"""
        return self.said.reuses_id(req)

    def knows(self, request_id: str) -> bool:
        """Has a request of this id been answered (and is it remembered)?"""
        return self.said.knows(request_id)

    def refuse(
        self, request_id: str, reason: str, now: float, answer_to: AnswerTo = "request"
    ) -> DispatchResult:
        """A ``rejected`` answer for a message that never reached admission (malformed, or
        naming no running request); nothing is remembered of it."""
        return self.said.refuse(request_id, reason, now, answer_to)

    def not_running(self, request_id: str) -> str:
        """Why an amendment or cancel of ``request_id`` finds nothing to act on."""
        return self.said.not_running(request_id)

    # -- admission ---------------------------------------------------------------------
    def submit(self, req: DispatchRequest, now: float, view: FleetView) -> DispatchResult:
        """Answer a request: accepted, partial (with the shortfall) or rejected (with why).

        A request_id seen before gets its latest answer again, with no second dispatch.
        A request that names a node is served by the vehicles under it (with a grid).
        """
        if req.node is not None and self.nodes is not None:
            return self.nodes.submit(req, now, view)
        return self.admission.submit(req, now, view)

    def amend(
        self,
        request_id: str,
        now: float,
        view: FleetView,
        *,
        power_kw: float | None = None,
        duration_s: float | None = None,
    ) -> DispatchResult | None:
        """Change a request in flight: its power, its duration (from its start), or both.

        A running request keeps its books and is admitted afresh for the rest of its
        window; one planned for later is planned again. If the new terms are refused the
        old ones stand, and the answer says why. One on a node is admitted afresh on its
        node. None if the request is not running.
        """
        d = self.dispatches.get(request_id)
        if d is None:
            if self.nodes is not None and request_id in self.nodes.dispatches:
                nd = self.nodes.dispatches[request_id]
                return self.nodes.amend(nd, now, view, power_kw, duration_s)
            return None
        return self.admission.amend(d, now, view, power_kw, duration_s)

    def cancel(self, request_id: str, now: float, view: FleetView) -> DispatchResult | None:
        """Stop a request, books closed at ``now``; returns its ``cancelled`` result, or
        None if it is not running (unknown, or already over)."""
        d = self.dispatches.pop(request_id, None)
        if d is None:
            return None if self.nodes is None else self.nodes.cancel(request_id, now, view)
        if d.state == "active":
            self.books.book(d, view, now)
        return self._close(d, now, "cancelled", reason=wire.CANCELLED)

    # -- signals -------------------------------------------------------------------------
    def signal(
        self, request_id: str, sample: DispatchSignal, now: float, view: FleetView
    ) -> StepOutput | None:
        """Follow one signal sample at once: the new target and the setpoints for it, out
        of turn (a regulation signal comes every 2-4 s, faster than the control step).
        None if the request is not a running signal service."""
        return self.follow({request_id: sample}, now, view)

    def follow(
        self, samples: Mapping[str, DispatchSignal], now: float, view: FleetView
    ) -> StepOutput | None:
        """Follow the latest sample of each of these signal services, in one plan for the
        whole stack (so one setpoint a vehicle). None if none is a running signal service."""
        stack = self.stack.running(now)
        moved = [
            (d, samples[d.request_id])
            for d in stack
            if d.follows_signal and d.request_id in samples
        ]
        if not moved:
            return None
        for o in stack:  # the terms in force until now go into the books first
            accrue(o, now)
        for d, sample in moved:
            self.tracking.take_signal(d, sample, now, view)
        self._fit_rows(view.rows)
        out = StepOutput()
        self._drive(stack, now, view, out)
        for d, _ in moved:
            self.tracking.moved(d.request_id, out.rows)
        return out

    # -- control step --------------------------------------------------------------------
    def step(self, now: float, view: FleetView, n_rows: int) -> StepOutput:
        """Advance every request to ``now`` and decide the setpoints for the next step."""
        self._fit(n_rows)
        self.setpoints.learn(now, view)
        self.learning.cycle(now, view)
        out = StepOutput()
        self.stack.count_lost(now, view)
        measured = float(view.power.sum())
        for d in list(self.dispatches.values()):
            if d.state == "active":
                if d.follows_signal:
                    self.tracking.step(d, now, view, measured)
                self.books.book(d, view, now)
                if d.over(now):
                    del self.dispatches[d.request_id]
                    out.results.append(self._close(d, now, "completed"))
            elif now >= d.start:
                answer = self.admission.admit(d, now, view)
                if answer.status != "rejected":
                    started = answer.status == "accepted"
                    out.results.append(self.said.started(d, answer, now, remember=started))
                if answer.status != "accepted":  # cut at its start: say so too
                    out.results.append(answer)
        self.books.see(view)
        if self.nodes is not None and self.grid is not None:
            node_results, node_progress, self.grid.bands = self.nodes.step(
                now, view, self.grid.grid.in_force(now)
            )
            out.results += node_results
            out.progress += node_progress
        out.results += self.said.notices
        self.said.notices = []
        stack = self.stack.running()
        if not stack:
            if self.grid is None:
                out.release_rows = self.setpoints.release(now)
            else:
                live = np.flatnonzero(self.setpoints.sent_until > now).astype(np.intp)
                rows, out.release_rows = self.grid.clip_baseline(now, view, live)
                self._out_rows(out, rows)
                # Setpoints name what they serve: a request on a node, or the limits alone.
                node_run = [] if self.nodes is None else self.nodes.running()
                out.request_id = node_run[0].request_id if node_run else GRID_SETPOINTS
            return out
        self._drive(stack, now, view, out)
        # Before its delivery window opens a request's progress shows nothing delivered
        # (delivery_start null), not the power the fleet drew before its setpoints.
        out.progress += [self._progress(d, now) for d in stack]
        return out

    def _drive(self, stack: list[Dispatch], now: float, view: FleetView, out: StepOutput) -> None:
        """Settle the stack, plan the fleet for the power it asks together, and give any
        miss to the request of lowest priority (the others hold their reserves)."""
        target = self.stack.settle(now, view, stack)
        head = stack[0]
        steering = None
        if len(stack) == 1 and not head.follows_signal and head.committed:
            # A power request alone: follow a plan that holds its commitment to its end.
            steering, moved = self.setpoints.steer(head, now, view)
            if moved is not None:
                head.changed = wire.fleet_changed(now, *moved)
            target = head.allocated_kw
        end = max(d.end for d in stack)
        sent = self.setpoints.plan(target, end, now, view, steering)
        out.rows, out.power_kw, out.valid_until = sent.rows, sent.power_kw, sent.valid_until
        out.request_id = head.request_id
        miss = 0.0 if steering is not None else sent.total_kw - target
        if self.grid is not None:
            rows, cut = self.grid.clip_planned(now, view, sent.rows)
            self._out_rows(out, rows)
            miss -= cut
        self.stack.account(stack, len(view), miss)
        self._fcr_shares(stack, now, view, end, out)

    def _fcr_shares(
        self, stack: list[Dispatch], now: float, view: FleetView, end: float, out: StepOutput
    ) -> None:
        """With containment running, each sent row's share of the capacity held (issue 13),
        so a bridge can hand the droop to its chargers: the capacity split over the view in
        proportion to each car's half range for the plan's window (what it can move both
        ways from the middle). The shares over the view add up to the capacity held, and
        none exceeds its car's half range (the stack holds no more than the fleet's)."""
        fcr = [d for d in stack if d.request.service is Service.FREQUENCY_CONTAINMENT]
        held = sum(d.held_kw for d in fcr)
        if not fcr or held <= 0.0 or not out.rows.size or not view.rows.size:
            return
        lo, hi = self.fleet.ranges(view, now, self.fleet.rest_s(end, now))
        half = np.maximum(0.5 * (hi - lo), 0.0)
        total = float(half.sum())
        if total <= 0.0:
            return
        by_row = np.zeros(int(max(int(view.rows.max()), int(out.rows.max()))) + 1)
        by_row[view.rows] = held * half / total
        out.fcr_kw = by_row[out.rows]
        # One grid, one frequency: the highest-priority containment's latest sample (before
        # the first, the setpoints were computed at no activation: nominal).
        hz = fcr[0].frequency_hz
        out.fcr_hz = FCR_NOMINAL_HZ if hz is None else hz

    def _out_rows(self, out: StepOutput, rows: NDArray[np.intp]) -> None:
        """The setpoints of these rows, as they stand now, go out."""
        out.rows = rows
        out.power_kw = self.setpoints.sent_kw[rows].copy()
        out.valid_until = self.setpoints.sent_until[rows].copy()

    def node_statuses(self, ids: list[str]) -> tuple[list[NodeStatus], int]:
        """Each grid node's entry of the fleet status at the last step, and how many
        vehicles named no node of the grid; ([], 0) without a grid."""
        return ([], 0) if self.grid is None else self.grid.statuses(ids)

    def grid_conflicts(self, ids: list[str]) -> list[str]:
        """The vehicles a grid limit held below their floor at the last step."""
        return [] if self.grid is None else self.grid.conflicts(ids)

    def _close(
        self, d: Dispatch, now: float, status: ResultStatus, reason: str | None = None
    ) -> DispatchResult:
        self.tracking.forget(d.request_id)
        return self.said.closed(
            d, now, status, tracking.score(d), tracking.fcr_share(d), reason=reason
        )

    # -- persistence ---------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """The admitted requests as records (those on a grid node too: their request
        names the node)."""
        node_ones = [] if self.nodes is None else list(self.nodes.dispatches.values())
        return [d.to_record() for d in [*self.dispatches.values(), *node_ones]]

    def restore(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            d = Dispatch.from_record(record)
            if d.request.node is not None:
                # Served on its node, never fleet-wide; without a grid now, dropped.
                if self.nodes is None:
                    continue
                self.nodes.dispatches[d.request_id] = d
            else:
                self.dispatches[d.request_id] = d
            self.said.restored(d)

    def learned(self, n_rows: int) -> dict[str, Array]:
        """What it has learned per fleet row (follow ratios, energy cycled), as columns
        to persist beside the fleet's."""
        self._fit(n_rows)
        return self.learning.columns(n_rows)

    def restore_learned(self, columns: dict[str, Array], n_rows: int) -> None:
        """Take back ``learned`` columns (those missing or of another length are skipped)."""
        self._fit(n_rows)
        self.learning.restore(columns, n_rows)
