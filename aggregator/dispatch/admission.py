"""Admission: a request (or new terms for one) is checked, taken into the stack and
answered: accepted, partial (with the shortfall and why) or rejected (with why).

Holds no state of its own: it settles the stack (stack.py), plans ahead (ahead.py),
opens the books (books.py), and words each answer through answers.py.
"""

from __future__ import annotations

from aggregator.dispatch import ahead, answers
from aggregator.dispatch.answers import AnswerBook, Limits
from aggregator.dispatch.books import accrue, open_books
from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch
from aggregator.dispatch.setpoints import Setpoints
from aggregator.dispatch.stack import Stack, holding
from aggregator.dispatch.tracking import SIGNAL_MIN_KW
from aggregator.fleet_state import FleetView
from broker.models import DispatchRequest, DispatchResult, ResultStatus, to_epoch


class Admission:
    """Takes requests into the stack and answers them."""

    def __init__(
        self,
        stack: Stack,
        fleet: FleetRanges,
        setpoints: Setpoints,
        said: AnswerBook,
        limits: Limits,
    ) -> None:
        self.stack = stack
        self.fleet = fleet
        self.setpoints = setpoints
        self.said = said
        self.limits = limits
        self.control_step_s = limits.control_step_s

    def submit(self, req: DispatchRequest, now: float, view: FleetView) -> DispatchResult:
        """Answer a new request; a request_id seen before gets its latest answer again,
        with no second dispatch."""
        again = self.said.seen(req, now)
        if again is not None:
            return again
        problem = answers.problem(req, now, self.limits)
        if problem is not None:
            return self.said.result(
                req.request_id, "rejected", now, reason=problem, requested_kw=req.power_kw
            )
        start = now if req.start is None else max(now, to_epoch(req.start))
        d = Dispatch(
            request=req, start=start, end=start + req.duration_s, seq=self.stack.next_seq()
        )
        clash = self.stack.clash(d, now)
        if clash is not None:
            return self.said.rejected(d, now, answers.clash(clash), requested_kw=req.power_kw)
        if start <= now + self.control_step_s or d.follows_signal:
            self.stack.dispatches[req.request_id] = d
            if start > now + self.control_step_s:
                return self.said.result(
                    d.request_id,
                    "accepted",
                    now,
                    reason=answers.checked_at_start(start),
                    allocated_kw=req.capacity_kw or 0.0,
                )
            return self.admit(d, now, view)
        return self.ahead(d, now, view)

    def admit(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """``d`` starts running now: open its books and take it into the stack."""
        open_books(d, now, view, self.fleet.baseline(view))
        if d.follows_signal and d.samples is None:
            d.signal, d.samples = 0.0, []
        return self.take(d, now, view)

    def take(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """Settle ``d`` (running, on its current terms) into the stack and answer it.
        Requests of lower priority it cuts are owed a ``partial`` answer saying so."""
        if d.follows_signal:
            d.capacity_kw = float(d.request.capacity_kw or 0.0)
        else:
            d.committed, d.lost = False, 0  # new terms: answered afresh, planned afresh
            self.setpoints.drop_plan(d.request_id)
        # New terms change what the rest of the stack asks on top of each request: book
        # the terms in force until now first (those that ended, to their end).
        for o in self.stack.running():
            if o is not d and o.last_t is not None:
                accrue(o, min(now, o.end))
        stack = self.stack.running(now)
        if d not in stack:  # over before its first step: a sliver of a duration
            self.stack.dispatches.pop(d.request_id, None)
            self.stack.settle(now, view, stack)
            return self.said.rejected(d, now, answers.before_first_step(d.end))
        others = [o for o in stack if o is not d]
        below = stack[stack.index(d) + 1 :]
        before: dict[str, float] = {}
        if below:  # what those it may cut held without it
            self.stack.settle(now, view, others)
            before = {o.request_id: holding(o) for o in below}
        self.stack.settle(now, view, stack)
        d.vehicles = len(view)
        self.setpoints.resend_all()
        answer = (
            self._signal_answer(d, now, view)
            if d.follows_signal
            else self._power_answer(d, now, view)
        )
        if answer.status == "rejected":
            return answer
        d.committed = not d.follows_signal
        for o in below:
            if before[o.request_id] - holding(o) > 1e-6:
                held = o.held_kw if o.follows_signal else o.allocated_kw
                self.said.notices.append(
                    self.said.result(
                        o.request_id,
                        "partial",
                        now,
                        reason=answers.preempted(d, held, swing=o.follows_signal),
                        requested_kw=o.request.power_kw,
                        allocated_kw=held,
                        shortfall_kw=(
                            o.capacity_kw - o.held_kw
                            if o.follows_signal
                            else abs(float(o.request.power_kw or 0.0) - o.allocated_kw)
                        ),
                        vehicles=len(view),
                    )
                )
        return answer

    def _signal_answer(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """The answer for a signal service just settled into the stack: it holds a
        symmetric capacity around the operating point for its whole window, up to what
        was asked, after the reserves of the requests above it."""
        asked = float(d.request.capacity_kw or 0.0)
        d.capacity_kw = d.allocated_kw = d.held_kw
        d.shortfall_kw = asked - d.capacity_kw
        above = self.stack.swing_above(d)
        if d.capacity_kw < SIGNAL_MIN_KW:
            self.stack.dispatches.pop(d.request_id, None)
            self.stack.settle(now, view, self.stack.running(now))  # the others take it back
            return self.said.rejected(d, now, answers.no_swing(d.base_kw, above), allocated_kw=0.0)
        status: ResultStatus = "accepted" if d.shortfall_kw <= 1e-6 else "partial"
        return self.said.result(
            d.request_id,
            status,
            now,
            reason=None
            if status == "accepted"
            else answers.swing_partial(d.capacity_kw, d.end - now, above),
            allocated_kw=d.capacity_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
        )

    def _power_answer(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """The answer for a power request just settled into the stack (at its start, or
        on new terms while it runs: the books carry on either way)."""
        rest_s = self.fleet.rest_s(d.end, now)
        lo_sum, hi_sum = self.fleet.usable_sums(view, now, rest_s)
        d.shortfall_kw = abs(d.requested_kw - d.allocated_kw)
        if d.shortfall_kw <= 1e-6:
            return self.said.result(
                d.request_id,
                "accepted",
                now,
                requested_kw=d.requested_kw,
                allocated_kw=d.allocated_kw,
                vehicles=d.vehicles,
            )
        feasible = self.fleet.envelope(view, now, rest_s).feasible
        return self.said.result(
            d.request_id,
            "partial",
            now,
            reason=answers.power_partial(
                d, lo_sum, hi_sum, d.end - now, self.stack.swing_above(d), feasible
            ),
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
        )

    def ahead(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """Admit a request for later: plan the fleet over the horizon with every request
        already taken as reserved (so this one cannot take their energy), and answer with
        what it can deliver per interval. Admission is checked again at its start."""
        got = ahead.admit(d, list(self.stack.dispatches.values()), now, view)
        if got.status == "too_far":
            reason = answers.too_far_ahead(d.end - now, ahead.HORIZON_S)
            return self.said.rejected(d, now, reason, requested_kw=d.requested_kw)
        intervals = answers.schedule(got.spans, got.deliverable_kw)
        if got.status == "none":
            return self.said.rejected(
                d, now, answers.NONE_AHEAD, requested_kw=d.requested_kw, schedule=intervals
            )
        self.stack.dispatches[d.request_id] = d
        return self.said.result(
            d.request_id,
            got.status,
            now,
            reason=answers.scheduled(d.start, None if got.status == "accepted" else got.hold_kw),
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=len(view),
            schedule=intervals,
        )

    def amend(
        self,
        d: Dispatch,
        now: float,
        view: FleetView,
        power_kw: float | None,
        duration_s: float | None,
    ) -> DispatchResult:
        """Change ``d`` in flight; if the new terms are refused the old ones stand."""
        update: dict[str, float] = {}
        if power_kw is not None:
            update["power_kw"] = power_kw
        if duration_s is not None:
            update["duration_s"] = duration_s
        new_req = d.request.model_copy(update=update)
        problem = answers.problem(new_req.model_copy(update={"start": None}), now, self.limits)
        if problem is None and d.start + new_req.duration_s <= now + self.control_step_s:
            problem = answers.ends_in_past(new_req.duration_s, now - d.start - new_req.duration_s)
        if problem is not None:
            return self.said.result(
                d.request_id, "rejected", now, reason=answers.amendment_refused(problem),
                remember=False, requested_kw=new_req.power_kw,
            )  # fmt: skip
        old = (d.request, d.end, d.schedule)
        if d.state == "active":  # the energy asked until now, on the terms in force until now
            accrue(d, now)
        d.request, d.end = new_req, d.start + new_req.duration_s
        self.said.terms[d.request_id] = new_req
        if d.state == "active":
            answer = self.take(d, now, view)
        else:
            del self.stack.dispatches[d.request_id]
            d.schedule = None
            answer = self.ahead(d, now, view)
            if answer.status == "rejected":  # nothing left for the new terms: keep the old
                d.request, d.end, d.schedule = old
                self.stack.dispatches[d.request_id] = d
                self.said.terms[d.request_id] = old[0]
        if d.state == "active" and answer.status != "rejected" and not d.follows_signal:
            d.changed = answers.amended_at(now, d.allocated_kw)
        return answer.model_copy(update={"reason": answers.amended(answer.reason)})
