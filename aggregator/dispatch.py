"""The dispatcher: admits grid requests, splits them over the fleet each control step,
and keeps the books (requested, delivered and baseline energy).

Pure and synchronous: it is handed the fleet view and the time, and returns the
setpoints and messages to send. The service around it does the I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from aggregator import envelope as ev
from aggregator.allocation import Allocation, allocate, allocate_cost
from aggregator.capability import vehicle_ranges
from aggregator.fleet_state import FleetView
from aggregator.schedule import Block, cohorts, grid, index_of, plan
from aggregator.scoring import FCR_FULL_WITHIN_S, fcr_activation, regulation_score
from aggregator.scoring import SAMPLE_S as SCORE_SAMPLE_S
from aggregator.scoring import WINDOW_S as SCORE_WINDOW_S
from broker.models import (
    SIGNAL_SERVICES,
    ActiveDispatch,
    AnswerTo,
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    DispatchSignal,
    ResultStatus,
    ScheduledInterval,
    from_epoch,
    to_epoch,
)
from core.physics import Array, baseline_power

# A vehicle whose reported power is off its setpoint by more than this (after it had
# time to act on it) is drifting: the others are asked to cover for it.
DRIFT_TOL_KW = 0.5
# Setpoints that moved less than this are not sent again (until they near expiry).
RESEND_DEADBAND_KW = 0.05
# Each vehicle's follow ratio (what it draws / what it was told) is learned as an
# exponentially weighted mean: a new sample moves it by this share.
FOLLOW_ALPHA = 0.5
# Below this many kW asked, a ratio sample is mostly rounding: none is taken.
FOLLOW_MIN_ASK_KW = 1.0
# A vehicle that follows less than this is not steered through its ratio (a setpoint
# divided by almost nothing): it is held at what it draws, like a drifting one.
FOLLOW_MIN_RATIO = 0.1
# The least-cost split weighs a battery by REFERENCE / capacity (a kWh is a deeper cycle
# of a small one) and by its energy cycled over the fleet's mean (at least the floor).
REFERENCE_CAPACITY_KWH = 60.0
CYCLED_FLOOR_KWH = 0.1
# A signal service keeps score samples every SCORE_SAMPLE_S (a day of them at most);
# one whole window is needed for a score. Below SIGNAL_MIN_KW of capacity: refused.
SCORE_WINDOW_SAMPLES = round(SCORE_WINDOW_S / SCORE_SAMPLE_S)
MAX_SCORE_SAMPLES = 8640
SIGNAL_MIN_KW = 0.1
SIGNAL_ANSWERED_SHARE = 0.9  # of the vehicles a signal moved, reported since: answered
# Containment is checked on steps in its activation of at least FCR_CHECK_STEP (of the
# capacity) that then hold within FCR_CHECK_HOLD for the 30 s; the last checks are kept.
FCR_CHECK_STEP = 0.2
FCR_CHECK_HOLD = 0.05
MAX_FCR_CHECKS = 1000
# Requests for later are planned on this grid, this far ahead, and accepted in full
# when the plan misses them by less than this.
SCHEDULE_STEP_S = 900.0
SCHEDULE_MAX_INTERVALS = 192
SCHEDULE_TOL_KW = 0.01
# How many finished requests are remembered, so that a repeated request_id gets the
# same answer instead of a second dispatch.
REMEMBERED_ANSWERS = 10_000
# A committed request's plan is solved every control step for a fleet under this many
# vehicles, and above only when its first step runs out or a car comes or goes.
REPLAN_EVERY_STEP_BELOW = 20_000
# Windows are half-open, [start, end): one that starts where another ends does not overlap
# it. Times are epoch seconds (a float's step there is ~0.2 µs) that went through the
# wire's microseconds: ends closer than this are the same instant.
SAME_INSTANT_S = 1e-3
ENDING_SLACK_STEPS = 0.2
# A request is over at a step whose clock reads its end, to a float's rounding.
ENDED_EPS_S = 1e-9


def overlaps(a_start: float, a_end: float, b_start: float, b_end: float) -> bool:
    """Do the half-open windows [a_start, a_end) and [b_start, b_end) share a moment?"""
    return a_start < b_end - SAME_INSTANT_S and b_start < a_end - SAME_INSTANT_S


def _entries(schedule: list[list[float]] | None) -> list[tuple[float, float, float]]:
    """A planned request's schedule as (start, kW, end) intervals."""
    return [(e[0], e[1], e[2] if len(e) > 2 else e[0] + SCHEDULE_STEP_S) for e in schedule or []]


def _on_grid(bounds: Array, start: float, end: float, power_kw: float) -> Block | None:
    """``power_kw`` from ``start`` to ``end`` on the planning grid ``bounds`` (clipped to
    it; None if none of it is on it)."""
    s = index_of(bounds, max(start, float(bounds[0])))
    e = index_of(bounds, min(end, float(bounds[-1])))
    return Block(s, e, power_kw) if s < e else None


@dataclass(slots=True)
class Dispatch:
    """One admitted request and its running books."""

    request: DispatchRequest
    start: float
    end: float
    state: Literal["scheduled", "active"] = "scheduled"
    allocated_kw: float = 0.0
    shortfall_kw: float = 0.0
    vehicles: int = 0
    requested_kwh: float = 0.0
    delivered_kwh: float = 0.0
    baseline_kwh: float = 0.0
    delivered_kw: float = 0.0
    baseline_kw: float = 0.0
    last_t: float | None = None
    meter_start: float | None = None
    # The delivery window runs from when the first setpoints are in force (None until the
    # step after they went out shows when) to ``end``. The fleet's measured power at the
    # last booking (until the window opens: when the first setpoints went out).
    delivery_start: float | None = None
    measured_kw: float = 0.0
    # [interval start, kW, interval end] reserved, if planned (records from before the
    # end was kept have two entries: a 15-min interval)
    schedule: list[list[float]] | None = None
    # A service that follows a signal: the capacity held, the latest signal (-1..1), the
    # baseline it moves around, and (t, signal, response) samples for its score.
    capacity_kw: float = 0.0
    signal: float = 0.0
    signal_prev: float = 0.0
    signal_at: float = -math.inf
    base_kw: float = 0.0
    samples: list[list[float]] | None = None
    # Stacking: admission order (ties of priority go to the earlier), the capacity a
    # signal service holds now (its grant, at most capacity_kw), and what the rest of
    # the stack asks on top of this request's own term, in kW now and in kWh so far
    # (kept off its delivered energy: every request is metered at the same fleet meter).
    seq: int = 0
    held_kw: float = 0.0
    offset_kw: float = 0.0
    stacked_kwh: float = 0.0
    acc_t: float | None = None
    # Containment: the open 30-s activation check [step at, kW needed, kW before, last
    # sample t, last sample kW, activation] and the shares of full activation found.
    fcr_check: list[float] | None = None
    fcr_shares: list[float] | None = None
    # A power request's commitment: once answered, allocated_kw is what the fleet holds
    # until the request is amended or the fleet changes; ``changed`` says how it changed.
    committed: bool = False
    changed: str | None = None
    lost: int = 0  # vehicles gone unannounced (or offline) since the commitment

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def priority(self) -> int:
        return self.request.priority or 0

    def over(self, now: float, slack_s: float = ENDED_EPS_S) -> bool:
        """Has it ended by ``now`` (give or take ``slack_s``)? The one rule for when a
        request is over: a step closes it, the stack drops it, admission looks past it."""
        return self.end <= now + slack_s

    @property
    def follows_signal(self) -> bool:
        return self.request.service in SIGNAL_SERVICES

    @property
    def requested_kw(self) -> float:
        """The fleet net power asked now: the request's, or baseline + signal x capacity."""
        if self.request.power_kw is not None:
            return self.request.power_kw
        return self.base_kw + self.signal * self.capacity_kw

    def to_record(self) -> dict[str, Any]:
        record = {k: getattr(self, k) for k in _BOOK_FIELDS}
        record["request"] = self.request.model_dump(mode="json")
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Dispatch:
        request = DispatchRequest.model_validate(record["request"])
        d = cls(request=request, **{k: record[k] for k in _BOOK_FIELDS if k in record})
        if "delivery_start" not in record and d.state == "active":
            d.delivery_start = d.start  # books kept before the window had its own start
        return d


_BOOK_FIELDS = (
    "start",
    "end",
    "state",
    "allocated_kw",
    "shortfall_kw",
    "vehicles",
    "requested_kwh",
    "delivered_kwh",
    "baseline_kwh",
    "delivered_kw",
    "baseline_kw",
    "last_t",
    "meter_start",
    "delivery_start",
    "measured_kw",
    "schedule",
    "capacity_kw",
    "signal",
    "signal_prev",
    "signal_at",
    "base_kw",
    "samples",
    "seq",
    "held_kw",
    "offset_kw",
    "stacked_kwh",
    "acc_t",
    "fcr_check",
    "fcr_shares",
    "committed",
    "changed",
    "lost",
)


def _when(t: float | None) -> datetime | None:
    return None if t is None else from_epoch(t)


# Per-row learned arrays and the snapshot columns they persist as.
_LEARNED = {
    "learned:follow_ratio": "_ratio",
    "learned:follow_ts": "_ratio_ts",
    "learned:cycled_kwh": "_cycled",
}


@dataclass(slots=True)
class StepOutput:
    """What one control step decided: setpoints (by fleet row) and messages."""

    rows: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    power_kw: Array = field(default_factory=lambda: np.zeros(0))
    valid_until: Array = field(default_factory=lambda: np.zeros(0))
    request_id: str = ""
    release_rows: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    results: list[DispatchResult] = field(default_factory=list)
    progress: list[DispatchProgress] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _KeptPlan:
    """A committed request's plan, followed between solves: for which request and
    commitment, until when, and the delivered kW of each vehicle (``rows``: the view's
    rows it was made for, in order; another set of vehicles solves again)."""

    request_id: str
    until: float
    allocated_kw: float
    rows: NDArray[np.intp]
    power_kw: Array


class Dispatcher:
    """Admits requests and turns the active one into per-vehicle setpoints."""

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
        self.dispatches: dict[str, Dispatch] = {}
        self.answers: OrderedDict[str, DispatchResult] = OrderedDict()
        self._terms: dict[str, DispatchRequest] = {}
        self._sent_kw: Array = np.zeros(0)
        self._sent_until: Array = np.zeros(0)
        self._sent_at: Array = np.zeros(0)
        # Per fleet row: the learned follow ratio and the report it was last learned from.
        self._ratio: Array = np.zeros(0)
        self._ratio_ts: Array = np.zeros(0)
        # Per fleet row: energy cycled under this dispatcher (kWh, charge plus discharge).
        self._cycled: Array = np.zeros(0)
        self._cycled_t: float | None = None
        # Per fleet row, at the last step: in the view, its power and its meter (NaN when
        # unknown). A delivery window opening then is placed from them at the next.
        self._seen_in: NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self._seen_kw: Array = np.zeros(0)
        self._seen_meter: Array = np.zeros(0)
        # What was computed from the current view (feasible ranges by (now, window), usable
        # sums, the baseline): admission, settling and planning of a step ask the same.
        self._memo_view: FleetView | None = None
        self._memo_of_view: dict[Any, Any] = {}
        # Per signal service: the fleet rows its latest signal sample moved.
        self._signal_rows: dict[str, NDArray[np.intp]] = {}
        self._seq = 0  # admission order, for ties of priority
        self._ratio_version = 0  # bumped whenever a follow ratio changes
        # From the latest settling: the capacity held above each request (for answers).
        self._swing_above: dict[str, float] = {}
        # Answers owed to requests a higher-priority one pre-empted; sent with the next step.
        self._notices: list[DispatchResult] = []
        # Recent fleet ranges by (end of window, ratio version): see _usable_sums.
        self._sums: dict[tuple[float, int], tuple[float, int, float, float]] = {}
        # The plan a committed request follows between solves: see _keep_plan.
        self._kept: _KeptPlan | None = None
        # The vehicles of the last step and their announced departures: who left early.
        self._fleet_before: tuple[NDArray[np.intp], Array] = (np.zeros(0, np.intp), np.zeros(0))

    def follow_ratio(self, rows: NDArray[np.intp]) -> Array:
        """The measured share of their setpoints these fleet rows deliver (1 = obey)."""
        self._fit_rows(rows)
        return self._ratio[rows].copy()

    def _memo(self, view: FleetView) -> dict[Any, Any]:
        """What was computed from this view so far (a new view starts afresh)."""
        if view is not self._memo_view:
            self._memo_view, self._memo_of_view = view, {}
        return self._memo_of_view

    def ranges(self, view: FleetView, now: float, window_s: float) -> tuple[Array, Array]:
        """``vehicle_ranges``, computed once per view, time and window (read-only arrays).

        Admission, settling and planning of one control step all ask for the same ones; a
        caller that holds the same view (the simulation) may share them too."""
        memo = self._memo(view)
        key = (now, window_s)
        got = memo.get(key)
        if got is None:
            lo, hi = vehicle_ranges(view, now, window_s)
            lo.flags.writeable = hi.flags.writeable = False
            got = memo[key] = (lo, hi)
        return got

    def _usable_sums(self, view: FleetView, now: float, window_s: float) -> tuple[float, float]:
        """The fleet's range for the window as it will be delivered (the envelope, each car
        counted for the share of its setpoints it delivers). The stack is settled several
        times a step and at every signal sample in between: a range worked out less than
        a control step ago for the same end of window and the same learned ratios is
        used again (the fleet moves little in that time; the LP costs ~0.2 s at 100k)."""
        end = round(now + window_s, 6)
        key = (end, self._ratio_version)
        got = self._sums.get(key)
        if got is not None and now - got[0] < self.control_step_s and got[1] == len(view):
            return got[2], got[3]
        env = self.envelope(view, now, window_s)
        self._sums = {k: v for k, v in self._sums.items() if now - v[0] < self.control_step_s}
        self._sums[key] = (now, len(view), env.min_power_kw, env.max_power_kw)
        return env.min_power_kw, env.max_power_kw

    def envelope(self, view: FleetView, now: float, window_s: float) -> ev.Envelope:
        """The capability envelope for the window (aggregator/envelope.py), each car counted
        for the share of its setpoints it delivers; computed once per view, time, window
        and state of the learned ratios."""
        memo = self._memo(view)
        key = ("envelope", now, window_s, self._ratio_version)
        got = memo.get(key)
        if got is None:
            self._fit_rows(view.rows)
            ratio = self._ratio[view.rows]
            got = memo[key] = ev.window(
                view.batteries,
                view.energy,
                view.departure,
                now,
                window_s,
                ratio=ratio,
                min_step_s=self.control_step_s,
                prepared=self._prepared(view, now, window_s, ratio),
            )
        assert isinstance(got, ev.Envelope)
        return got

    def _prepared(self, view: FleetView, now: float, window_s: float, scale: Array) -> ev.Prepared:
        """The fleet made ready for a window's programmes, once per view, time, window
        and scale: admitting a request and planning it in the same step share it (most
        of the cost at 100k vehicles is here, not in the LP)."""
        memo = self._memo(view)
        key = ("prepared", now, window_s)
        got = memo.get(key)
        if got is not None and np.array_equal(got[0], scale):
            prepared: ev.Prepared = got[1]
            return prepared
        prepared = ev.prepare(
            view.batteries,
            view.energy,
            view.departure,
            now,
            window_s,
            ratio=scale,
            min_step_s=self.control_step_s,
        )
        memo[key] = (scale.copy(), prepared)
        return prepared

    # -- admission -------------------------------------------------------------------
    def reuses_id(self, req: DispatchRequest) -> bool:
        """Does ``req`` take the id of a request already answered, on other terms? (It is
        refused, and the answer is its sender's alone: that id's topics are the first's.)"""
        seen = self._terms.get(req.request_id)
        return seen is not None and seen != req

    def ends_at_step(self, d: Dispatch, now: float) -> bool:
        """Does a running request end at the control step of ``now``? A step reads the
        clock a little late or early (its wake-up), so one that started at a step does not
        end exactly at a later one: within ENDING_SLACK_STEPS of a step, it ends there."""
        return d.over(now, max(SAME_INSTANT_S, ENDING_SLACK_STEPS * self.control_step_s))

    def knows(self, request_id: str) -> bool:
        """Has a request of this id been answered (and is it remembered)?"""
        return request_id in self._terms

    def refuse(
        self, request_id: str, reason: str, now: float, answer_to: AnswerTo = "request"
    ) -> DispatchResult:
        """A ``rejected`` answer for a message that never reached admission (malformed, or
        naming no running request); nothing is remembered of it."""
        return self._result(
            request_id, "rejected", now, reason=reason, answer_to=answer_to, remember=False
        )

    def not_running(self, request_id: str) -> str:
        """Why an amendment or cancel of ``request_id`` finds nothing to act on."""
        last = self.answers.get(request_id)
        if last is None:
            return "unknown request"
        return f"request is not running (its last answer: {last.status})"

    def submit(self, req: DispatchRequest, now: float, view: FleetView) -> DispatchResult:
        """Answer a request: accepted, partial (with the shortfall) or rejected (with why).

        A request_id seen before gets its latest answer again, with no second dispatch.
        """
        seen = self._terms.get(req.request_id)
        if seen is not None:
            if seen != req:
                return self._result(
                    req.request_id,
                    "rejected",
                    now,
                    reason="request_id already used with different terms; use a new id",
                    requested_kw=req.power_kw,
                    remember=False,
                )
            return self.answers[req.request_id]
        self._terms[req.request_id] = req
        problem = self._check(req, now)
        if problem is not None:
            return self._result(
                req.request_id, "rejected", now, reason=problem, requested_kw=req.power_kw
            )
        start = now if req.start is None else max(now, to_epoch(req.start))
        d = Dispatch(request=req, start=start, end=start + req.duration_s, seq=self._seq)
        self._seq += 1
        # Requests stack, but the fleet has one net power: two power requests cannot
        # overlap; services that follow a signal stack on either.
        # One that ends at this step does not clash with one that starts at it: for the
        # moment both run, the stack's books keep each one's energy apart.
        clash = next(
            (
                o
                for o in self.dispatches.values()
                if not (o.state == "active" and self.ends_at_step(o, now))
                and overlaps(o.start, o.end, d.start, d.end)
                and not o.follows_signal
                and not d.follows_signal
            ),
            None,
        )
        if clash is not None:
            return self._result(
                req.request_id,
                "rejected",
                now,
                reason=(
                    f"overlaps power request {clash.request_id}"
                    f" ({from_epoch(clash.start):%H:%M:%S}-{from_epoch(clash.end):%H:%M:%S}Z);"
                    " the fleet holds one net power at a time (frequency services stack on"
                    " it): cancel or amend that one, or choose another window"
                ),
                requested_kw=req.power_kw,
            )
        if start <= now + self.control_step_s or d.follows_signal:
            self.dispatches[req.request_id] = d
            if start > now + self.control_step_s:
                return self._result(
                    d.request_id,
                    "accepted",
                    now,
                    reason=f"scheduled for {from_epoch(start).isoformat()}; the capacity is"
                    " checked at start",
                    allocated_kw=req.capacity_kw or 0.0,
                )
            return self._admit(d, now, view)
        return self._admit_ahead(d, now, view)

    def _signal_answer(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """The answer for a signal service just settled into the stack: it holds a
        symmetric capacity around the operating point for its whole window, up to what
        was asked, after the reserves of the requests above it."""
        asked = float(d.request.capacity_kw or 0.0)
        d.capacity_kw = d.allocated_kw = d.held_kw
        d.shortfall_kw = asked - d.capacity_kw
        if d.capacity_kw < SIGNAL_MIN_KW:
            self.dispatches.pop(d.request_id, None)
            self._settle(now, view, self._stack(now))  # the others take back what it held
            return self._result(
                d.request_id,
                "rejected",
                now,
                reason=f"the fleet cannot move both ways around its operating point"
                f" ({d.base_kw:.1f} kW) for that long{self._above_text(d)}",
                allocated_kw=0.0,
            )
        status: ResultStatus = "accepted" if d.shortfall_kw <= 1e-6 else "partial"
        return self._result(
            d.request_id,
            status,
            now,
            reason=None
            if status == "accepted"
            else f"the fleet can hold ±{d.capacity_kw:.1f} kW around its operating point for"
            f" {d.end - now:.0f} s{self._above_text(d)}",
            allocated_kw=d.capacity_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
        )

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
        stack = self._stack(now)
        moved = [
            (d, samples[d.request_id])
            for d in stack
            if d.follows_signal and d.request_id in samples
        ]
        if not moved:
            return None
        for o in stack:  # the terms in force until now go into the books first
            self._accrue(o, now)
        for d, sample in moved:
            d.signal_prev, d.signal_at = d.signal, now
            if sample.value is not None:
                d.signal = sample.value
            else:
                assert sample.frequency_hz is not None
                d.signal = float(fcr_activation(np.array([sample.frequency_hz]))[0])
                self._watch_fcr(d, now, view)
        self._fit_rows(view.rows)
        out = StepOutput()
        self._drive(stack, now, view, out)
        for d, _ in moved:
            self._signal_rows[d.request_id] = out.rows
        return out

    # -- the stack -------------------------------------------------------------------
    def _stack(self, now: float = -math.inf) -> list[Dispatch]:
        """The running requests, highest priority first (ties: the earlier admitted); with
        ``now``, not those that have ended by then (closed at the step, but over)."""
        return sorted(
            (d for d in self.dispatches.values() if d.state == "active" and not d.over(now)),
            key=lambda d: (-d.priority, d.seq),
        )

    def next_end(self, now: float) -> float | None:
        """When the next running request ends (after ``now``), or None: a step then closes
        its books at its end rather than up to a control step later."""
        return min((d.end for d in self._stack(now)), default=None)

    def _rest_s(self, end: float, now: float) -> float:
        """The window from ``now`` to ``end`` that ranges and plans are made for: at least
        a control step (setpoints hold that long, even at a request's last step)."""
        return max(end - now, self.control_step_s)

    def _settle(self, now: float, view: FleetView, stack: list[Dispatch]) -> float:
        """Share the fleet's range among the running requests, in priority order, and
        return the fleet net power they ask together now.

        Each takes its reserve from what the ones above it left: a signal service a
        capacity both ways around the operating point, a power request its power, kept
        inside the range by the capacities above it. A request of lower priority never
        eats the reserve of a higher one; when the fleet shrinks it is cut first. Each
        is checked on the fleet's ranges for its own window, to its end."""
        swing = 0.0  # capacity held both ways by the signal services so far
        point: float | None = None  # the power request's fleet net power
        lo_all, hi_all = -math.inf, math.inf  # what every signal window allows
        self._swing_above = {}
        for d in stack:
            self._swing_above[d.request_id] = swing
            if not d.follows_signal and d.committed and swing == 0.0:
                # A commitment stands: what the fleet holds was said in the answer.
                point = d.allocated_kw
                continue
            lo_sum, hi_sum = self._usable_sums(view, now, self._rest_s(d.end, now))
            if d.follows_signal:
                room = (
                    0.5 * (hi_sum - lo_sum)
                    if point is None
                    else min(point - lo_sum, hi_sum - point)
                )
                d.held_kw = max(0.0, min(d.capacity_kw, room - swing))
                swing += d.held_kw
                lo_all, hi_all = max(lo_all, lo_sum), min(hi_all, hi_sum)
            else:
                a, b = max(lo_sum, lo_all) + swing, min(hi_sum, hi_all) - swing
                want = float(d.request.power_kw or 0.0)
                point = min(max(want, a), b) if a <= b else 0.5 * (a + b)
                d.allocated_kw = point
        if point is None:  # signals only: around the baseline, moved into the range
            a, b = lo_all + swing, hi_all - swing
            point = min(max(self.baseline(view), a), b) if a <= b else 0.5 * (a + b)
        target = point + sum(d.signal * d.held_kw for d in stack if d.follows_signal)
        # What the rest of the stack asks on top of each one's own term (kept off its
        # delivered energy): for the power request the signal services' moves; a signal
        # service's base already holds the others, so nothing. A request's own shortfall
        # (a power clipped to the range, a capacity cut) is not an offset: it is its miss.
        for d in stack:
            if d.follows_signal:
                d.base_kw = target - d.signal * d.held_kw
                d.offset_kw = 0.0
            else:
                d.offset_kw = target - d.allocated_kw
        return target

    def _above_text(self, d: Dispatch) -> str:
        swing = self._swing_above.get(d.request_id, 0.0)
        return f", less ±{swing:.1f} kW held for requests of higher priority" if swing else ""

    @staticmethod
    def _holding(d: Dispatch) -> float:
        """How much of its terms a request holds (higher is better), to see cuts."""
        if d.follows_signal:
            return d.held_kw
        return -abs(float(d.request.power_kw or 0.0) - d.allocated_kw)

    def _take(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """Settle ``d`` (running, on its current terms) into the stack and answer it.
        Requests of lower priority it cuts are owed a ``partial`` answer saying so."""
        if d.follows_signal:
            d.capacity_kw = float(d.request.capacity_kw or 0.0)
        else:
            d.committed, d.lost = False, 0  # new terms: answered afresh, planned afresh
            if self._kept is not None and self._kept.request_id == d.request_id:
                self._kept = None
        # New terms change what the rest of the stack asks on top of each request: book
        # the terms in force until now first (those that ended, to their end).
        for o in self._stack():
            if o is not d and o.last_t is not None:
                self._accrue(o, min(now, o.end))
        stack = self._stack(now)
        if d not in stack:  # over before its first step: a sliver of a duration
            self.dispatches.pop(d.request_id, None)
            self._settle(now, view, stack)
            return self._result(
                d.request_id,
                "rejected",
                now,
                reason=f"the request ends at {from_epoch(d.end):%H:%M:%S}Z, before its first"
                " control step: give a longer duration_s, or a later start",
            )
        others = [o for o in stack if o is not d]
        below = stack[stack.index(d) + 1 :]
        before: dict[str, float] = {}
        if below:  # what those it may cut held without it
            self._settle(now, view, others)
            before = {o.request_id: self._holding(o) for o in below}
        self._settle(now, view, stack)
        d.vehicles = len(view)
        self._sent_until[:] = -np.inf  # new terms: every vehicle gets a fresh setpoint
        answer = (
            self._signal_answer(d, now, view)
            if d.follows_signal
            else self._power_answer(d, now, view)
        )
        if answer.status == "rejected":
            return answer
        d.committed = not d.follows_signal
        for o in below:
            if before[o.request_id] - self._holding(o) > 1e-6:
                held = o.held_kw if o.follows_signal else o.allocated_kw
                self._notices.append(
                    self._result(
                        o.request_id,
                        "partial",
                        now,
                        reason=f"pre-empted by request {d.request_id} of priority"
                        f" {d.priority}: holds {'±' if o.follows_signal else ''}{held:.1f} kW"
                        " now",
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

    def _sample(self, d: Dispatch, now: float, view: FleetView) -> None:
        """Keep a (t, signal, response) sample every SCORE_SAMPLE_S for the score."""
        if d.samples is None or d.capacity_kw <= 0 or d.signal_at == -math.inf:
            return  # nothing to score before the first signal sample
        # Steps come every control step, a little late at times: half a step of slack.
        if d.samples and now - d.samples[-1][0] < SCORE_SAMPLE_S - 0.5 * self.control_step_s:
            return
        # The fleet's measured power answers the latest signal only once the vehicles it
        # moved have reported since; until then it answers the one before.
        s = d.signal if self._answered(d, view) else d.signal_prev
        measured = float(view.power.sum())
        d.samples.append([now, s, (measured - d.base_kw) / d.capacity_kw])
        del d.samples[:-MAX_SCORE_SAMPLES]

    def _answered(self, d: Dispatch, view: FleetView) -> bool:
        """Have most vehicles the latest signal moved reported since it went out?"""
        rows = self._signal_rows.get(d.request_id)
        if rows is None or rows.size == 0:
            return True
        where = np.full(int(max(rows.max(), view.rows.max(initial=-1))) + 1, -1, np.intp)
        where[view.rows] = np.arange(len(view))
        pos = where[rows]
        pos = pos[pos >= 0]
        if pos.size == 0:
            return True
        return float(np.mean(view.ts[pos] >= d.signal_at)) >= SIGNAL_ANSWERED_SHARE

    def _watch_fcr(self, d: Dispatch, now: float, view: FleetView) -> None:
        """A step in the activation containment asks for opens a check of what the fleet
        delivers of it 30 s later; a further move before then voids the check."""
        check = d.fcr_check
        if check is not None and abs(d.signal - check[5]) <= FCR_CHECK_HOLD:
            return
        d.fcr_check = None
        need = (d.signal - d.signal_prev) * d.capacity_kw
        if abs(d.signal - d.signal_prev) >= FCR_CHECK_STEP and abs(need) >= SIGNAL_MIN_KW:
            d.fcr_check = [now, need, float(view.power.sum()), now, 0.0, d.signal]

    @staticmethod
    def _check_fcr(d: Dispatch, now: float, measured: float) -> None:
        """Close an open FCR check once 30 s have passed: the delivered change at 30 s
        (interpolated between steps) over the change required."""
        check = d.fcr_check
        if check is None:
            return
        at, need, before, last_t, last_got, _ = check
        got = measured - before
        due = at + FCR_FULL_WITHIN_S
        if now < due:
            check[3], check[4] = now, got
            return
        w = 0.0 if now <= last_t else (due - last_t) / (now - last_t)
        share = (last_got + w * (got - last_got)) / need
        d.fcr_shares = [*(d.fcr_shares or [])[-(MAX_FCR_CHECKS - 1) :], round(share, 4)]
        d.fcr_check = None

    @staticmethod
    def fcr_share(d: Dispatch) -> float | None:
        """The least share of full activation delivered 30 s after a step, so far."""
        return min(d.fcr_shares) if d.fcr_shares else None

    @staticmethod
    def score(d: Dispatch) -> float | None:
        """The PJM-style composite score of a signal service so far (None before one
        whole 5-minute window of samples)."""
        if not d.samples or len(d.samples) < SCORE_WINDOW_SAMPLES:
            return None
        arr = np.asarray(d.samples)
        composite = regulation_score(arr[:, 1], np.clip(arr[:, 2], -2.0, 2.0)).composite
        return None if math.isnan(composite) else round(composite, 4)

    def _admit_ahead(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """Admit a request for later: plan the fleet over the horizon with every request
        already taken as reserved (so this one cannot take their energy), and answer with
        what it can deliver per interval. Admission is checked again at its start."""
        horizon = math.ceil((d.end - now) / SCHEDULE_STEP_S - 1e-9)
        if horizon > SCHEDULE_MAX_INTERVALS:
            return self._result(
                d.request_id,
                "rejected",
                now,
                reason=(
                    f"ends {(d.end - now) / 3600:.1f} h ahead; requests are planned up to"
                    f" {SCHEDULE_MAX_INTERVALS * SCHEDULE_STEP_S / 3600:.0f} h ahead"
                ),
                requested_kw=d.requested_kw,
            )
        # Intervals on the quarter hours and on every request's own start and end, so
        # each request is planned over exactly its window.
        cuts = [d.start, d.end]
        for o in self.dispatches.values():
            cuts += [o.start, o.end]
            cuts += [b for t, _, end in _entries(o.schedule) for b in (t, end)]
        bounds = grid(now, d.end, step_s=SCHEDULE_STEP_S, cuts=cuts)
        new = self._block(d, bounds, d.requested_kw)
        assert new is not None  # it starts after now and ends within the horizon
        taken: list[Block] = []
        for o in sorted(self.dispatches.values(), key=lambda o: o.start):
            for b in self._reserved(o, bounds):
                # Overlaps should not happen on exact bounds: the earlier keeps the interval.
                if not any(b.start < x.end and x.start < b.end for x in [*taken, new]):
                    taken.append(b)
        cohort = cohorts(view.batteries, view.energy, view.departure, now, bounds=bounds)
        p = plan(cohort, taken, new, swing_kw=self._headroom(bounds))
        got = p.deliverable_kw(new)
        spans = [
            (float(bounds[new.start + i]), float(bounds[new.start + i + 1]))
            for i in range(new.end - new.start)
        ]
        intervals = [
            ScheduledInterval(
                start=from_epoch(t0),
                duration_s=round(t1 - t0, 6),
                power_kw=round(float(kw), 3),
                energy_kwh=round(float(kw) * (t1 - t0) / 3600.0, 4),
            )
            for (t0, t1), kw in zip(spans, got, strict=True)
        ]
        # What the fleet can hold through every interval of the request.
        sign = -1.0 if d.requested_kw < 0 else 1.0
        part = np.clip(sign * got, 0.0, abs(d.requested_kw))  # toward the request only
        hold = sign * float(part.min())
        if float(part.max()) < SCHEDULE_TOL_KW and abs(d.requested_kw) > SCHEDULE_TOL_KW:
            return self._result(
                d.request_id,
                "rejected",
                now,
                reason="the fleet plugged in now cannot deliver any of it in that window,"
                " with the requests already taken",
                requested_kw=d.requested_kw,
                schedule=intervals,
            )
        d.allocated_kw = hold
        d.shortfall_kw = abs(d.requested_kw - hold)
        # The energy reserved is what the plan gives it, interval by interval.
        d.schedule = [[t0, sign * float(kw), t1] for (t0, t1), kw in zip(spans, part, strict=True)]
        self.dispatches[d.request_id] = d
        status: ResultStatus = "accepted" if d.shortfall_kw <= SCHEDULE_TOL_KW else "partial"
        if status == "accepted":
            d.shortfall_kw = 0.0
            d.allocated_kw = d.requested_kw
        when = from_epoch(d.start).isoformat()
        return self._result(
            d.request_id,
            status,
            now,
            reason=(
                f"scheduled for {when}; admission is checked again at start"
                if status == "accepted"
                else f"scheduled for {when}; with the requests already taken, the fleet"
                f" plugged in now can hold {hold:.1f} kW through all of it and more in some"
                " intervals (see schedule)"
            ),
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=len(view),
            schedule=intervals,
        )

    def _reserved(self, d: Dispatch, bounds: Array) -> list[Block]:
        """What a request already taken holds on the planning grid: its per-interval
        schedule if it was planned ahead, else its power over its window."""
        if d.follows_signal:
            return []  # it holds headroom both ways, not a power: see _headroom
        spans = _entries(d.schedule) or [(d.start, d.allocated_kw, d.end)]
        blocks = (_on_grid(bounds, t, end, kw) for t, kw, end in spans)
        return [b for b in blocks if b is not None]

    def _headroom(self, bounds: Array) -> Array:
        """The capacity signal services hold both ways, per interval of the grid."""
        swing = np.zeros(bounds.shape[0] - 1)
        for d in self.dispatches.values():
            if d.follows_signal:
                kw = d.capacity_kw if d.state == "active" else float(d.request.capacity_kw or 0)
                b = self._block(d, bounds, kw)
                if b is not None:
                    swing[b.start : b.end] += kw
        return swing

    @staticmethod
    def _block(d: Dispatch, bounds: Array, power_kw: float) -> Block | None:
        """The request on the planning grid (None if it is not on it)."""
        return _on_grid(bounds, d.start, d.end, power_kw)

    def _check(self, req: DispatchRequest, now: float) -> str | None:
        """Why a request is malformed or absurd, or None if it is fine."""
        if req.node is not None:  # every firming request names one (the model checks)
            # The wire takes them (issue 11); until the dispatcher serves the grid they are
            # refused, never served fleet-wide (power_kw would mean another thing).
            return "node-targeted requests and service firming are not served yet: omit node"
        if req.service in SIGNAL_SERVICES and req.power_kw is not None:
            return (
                f"service {req.service.value} follows a signal around the baseline: give"
                " capacity_kw, not power_kw"
            )
        power = req.power_kw or req.capacity_kw or 0.0
        if abs(power) > self.max_request_kw:
            return f"power_kw {power:.0f} is beyond the platform limit of ±{self.max_request_kw:.0f} kW"
        if req.duration_s > self.max_duration_s:
            return f"duration_s {req.duration_s:.0f} is longer than the limit of {self.max_duration_s:.0f} s"
        if req.start is not None:
            start = to_epoch(req.start)
            if start < now - self.control_step_s:
                return (
                    f"start {req.start.isoformat()} is {now - start:.0f} s in the past;"
                    " omit start for now, or give a future time"
                )
            if start > now + self.max_duration_s:
                return f"start {req.start.isoformat()} is too far ahead (limit {self.max_duration_s:.0f} s)"
        return None

    def _admit(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        d.state = "active"
        d.last_t = d.acc_t = now
        d.meter_start = view.meter_kwh
        # The delivery window opens when these setpoints are in force: the next booking
        # places it, from the fleet's power now and what it draws once they are.
        d.delivery_start = None
        d.measured_kw = float(view.power.sum())
        d.baseline_kw = self.baseline(view)
        if d.follows_signal and d.samples is None:
            d.signal, d.samples = 0.0, []
        return self._take(d, now, view)

    def _started(
        self, d: Dispatch, answer: DispatchResult, now: float, *, remember: bool
    ) -> DispatchResult:
        """The ``started`` result of a request planned for later that begins now, with
        what it holds at its start (its admission answer's figures)."""
        return self._result(
            d.request_id,
            "started",
            now,
            remember=remember,
            reason=f"began at {from_epoch(now).isoformat(timespec='seconds')}, planned for"
            f" {from_epoch(d.start).isoformat(timespec='seconds')}",
            requested_kw=answer.requested_kw,
            allocated_kw=answer.allocated_kw,
            shortfall_kw=answer.shortfall_kw,
            vehicles=answer.vehicles,
        )

    def _power_answer(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """The answer for a power request just settled into the stack (at its start, or
        on new terms while it runs: the books carry on either way)."""
        lo_sum, hi_sum = self._usable_sums(view, now, self._rest_s(d.end, now))
        d.shortfall_kw = abs(d.requested_kw - d.allocated_kw)
        if d.shortfall_kw <= 1e-6:
            return self._result(
                d.request_id,
                "accepted",
                now,
                requested_kw=d.requested_kw,
                allocated_kw=d.allocated_kw,
                vehicles=d.vehicles,
            )
        side = "import" if d.requested_kw > d.allocated_kw else "export"
        limit = f"{side} limited to {d.allocated_kw:.1f} kW"
        if not self.envelope(view, now, self._rest_s(d.end, now)).feasible:
            limit = (
                "no constant power holds for that long (cars that must charge flat out"
                f" leave inside it): {d.allocated_kw:.1f} kW comes closest"
            )
        return self._result(
            d.request_id,
            "partial",
            now,
            reason=(
                f"the fleet can hold {lo_sum:.1f}..{hi_sum:.1f} kW for {d.end - now:.0f} s"
                f"{self._above_text(d)}; {limit}"
            ),
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
        )

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
        old ones stand, and the answer says why. None if the request is not running.
        """
        d = self.dispatches.get(request_id)
        if d is None:
            return None
        update: dict[str, float] = {}
        if power_kw is not None:
            update["power_kw"] = power_kw
        if duration_s is not None:
            update["duration_s"] = duration_s
        new_req = d.request.model_copy(update=update)
        problem = self._check(new_req.model_copy(update={"start": None}), now)
        if problem is None and d.start + new_req.duration_s <= now + self.control_step_s:
            problem = (
                f"duration_s {new_req.duration_s:.0f} would end the request"
                f" {now - d.start - new_req.duration_s:.0f} s ago; cancel it instead"
            )
        if problem is not None:
            return self._result(
                request_id, "rejected", now, reason=f"amendment refused: {problem}", remember=False,
                requested_kw=new_req.power_kw,
            )  # fmt: skip
        old = (d.request, d.end, d.schedule)
        if d.state == "active":  # the energy asked until now, on the terms in force until now
            self._accrue(d, now)
        d.request, d.end = new_req, d.start + new_req.duration_s
        self._terms[request_id] = new_req
        if d.state == "active":
            answer = self._take(d, now, view)
        else:
            del self.dispatches[request_id]
            d.schedule = None
            answer = self._admit_ahead(d, now, view)
            if answer.status == "rejected":  # nothing left for the new terms: keep the old
                d.request, d.end, d.schedule = old
                self.dispatches[request_id] = d
                self._terms[request_id] = old[0]
        if d.state == "active" and answer.status != "rejected" and not d.follows_signal:
            d.changed = (
                f"amended at {from_epoch(now):%H:%M:%S}Z: {d.allocated_kw:.1f} kW held from then"
            )
        reason = "amended" + (f"; {answer.reason}" if answer.reason else "")
        return answer.model_copy(update={"reason": reason})

    def cancel(self, request_id: str, now: float, view: FleetView) -> DispatchResult | None:
        """Stop a request, books closed at ``now``; returns its ``cancelled`` result, or
        None if it is not running (unknown, or already over)."""
        d = self.dispatches.pop(request_id, None)
        if d is None:
            return None
        if d.state == "active":
            self._book(d, view, now)
        return self._close(d, now, "cancelled", reason="cancelled by the operator")

    # -- control step ----------------------------------------------------------------
    def step(self, now: float, view: FleetView, n_rows: int) -> StepOutput:
        """Advance every request to ``now`` and decide the setpoints for the next step."""
        self._fit(n_rows)
        self._learn(now, view)
        if self._cycled_t is not None and now > self._cycled_t:
            self._cycled[view.rows] += np.abs(view.power) * (now - self._cycled_t) / 3600.0
        self._cycled_t = now
        out = StepOutput()
        self._count_lost(now, view)
        measured = float(view.power.sum())
        for d in list(self.dispatches.values()):
            if d.state == "active":
                if d.follows_signal:
                    self._sample(d, now, view)
                    self._check_fcr(d, now, measured)
                self._book(d, view, now)
                if d.over(now):
                    del self.dispatches[d.request_id]
                    out.results.append(self._close(d, now, "completed"))
            elif now >= d.start:
                answer = self._admit(d, now, view)
                if answer.status != "rejected":
                    out.results.append(
                        self._started(d, answer, now, remember=answer.status == "accepted")
                    )
                if answer.status != "accepted":  # cut at its start: say so too
                    out.results.append(answer)
        self._seen_in[:] = False
        self._seen_in[view.rows] = True
        self._seen_kw[view.rows] = view.power
        self._seen_meter[view.rows] = np.nan if view.meters is None else view.meters
        out.results += self._notices
        self._notices = []
        stack = self._stack()
        if not stack:
            live = np.flatnonzero(self._sent_until > now)
            if live.size:
                out.release_rows = live
                self._sent_until[live] = -np.inf
            return out
        self._drive(stack, now, view, out)
        # Before its delivery window opens a request's progress shows nothing delivered
        # (delivery_start null), not the power the fleet drew before its setpoints.
        out.progress += [self._progress(d, now) for d in stack]
        return out

    def _count_lost(self, now: float, view: FleetView) -> None:
        """Count, against every running commitment, the vehicles gone since the last step
        that were not due to leave (no announced departure, or one still ahead): they
        left early, unplugged, went offline or fell silent. A car that leaves when it
        said it would is no change: the commitment was made knowing it."""
        prev_rows, prev_dep = self._fleet_before
        self._fleet_before = (view.rows.copy(), view.departure.copy())
        if prev_rows.size == 0:
            return
        gone = ~np.isin(prev_rows, view.rows)
        if not gone.any():
            return
        dep = prev_dep[gone]
        early = int(np.count_nonzero(np.isnan(dep) | (dep > now + self.control_step_s)))
        if early:
            for d in self.dispatches.values():
                if d.committed and d.state == "active":
                    d.lost += early

    def _drive(self, stack: list[Dispatch], now: float, view: FleetView, out: StepOutput) -> None:
        """Settle the stack, plan the fleet for the power it asks together, and give any
        miss to the request of lowest priority (the others hold their reserves)."""
        target = self._settle(now, view, stack)
        end = max(d.end for d in stack)
        head = stack[0]
        steering = None
        if len(stack) == 1 and not head.follows_signal and head.committed:
            # A power request alone: follow a plan that holds its commitment to its end.
            steering = self._steer(head, now, view)
            target = head.allocated_kw
        total = self._plan(target, end, head.request_id, now, view, out, steering)
        for d in stack:
            d.vehicles = len(view)
            if d.follows_signal:
                d.allocated_kw = d.held_kw
                d.shortfall_kw = max(0.0, d.capacity_kw - d.held_kw)
            else:
                d.shortfall_kw = abs(d.requested_kw - d.allocated_kw)
        miss = total - target
        if abs(miss) > 1e-6 and steering is None:
            last = stack[-1]
            if last.follows_signal:
                last.allocated_kw = max(0.0, last.held_kw - abs(miss))
                last.shortfall_kw = max(0.0, last.capacity_kw - last.allocated_kw)
            else:
                last.allocated_kw += miss
                last.shortfall_kw = abs(last.requested_kw - last.allocated_kw)

    def _steer(self, d: Dispatch, now: float, view: FleetView) -> ev.Steering:
        """The plan that holds ``d``'s commitment for the rest of its window. If none holds
        any more because the fleet changed (a car left before its announced departure or
        went offline), the commitment moves to what the fleet can now hold, and the
        progress and the result say why."""
        window_s = self._rest_s(d.end, now)
        gain = self._gain(view)
        kept = self._kept
        if (
            len(view) >= self.replan_every_step_below
            and kept is not None
            and kept.request_id == d.request_id
            and now < kept.until
            and kept.allocated_kw == d.allocated_kw
            and np.array_equal(view.rows, kept.rows)
        ):
            return self._follow_plan(view, now, gain, kept.power_kw)
        plan = self._plan_for(view, now, window_s, d.allocated_kw, gain)
        if plan.holds:
            d.lost = 0  # whoever left, the rest still hold it
            self._keep_plan(d, view, now, window_s, plan)
            return plan
        if d.lost == 0:
            # The fleet is as it was when it was answered: the commitment stands, and the
            # plan closest to it is followed.
            return plan
        env = self.envelope(view, now, window_s)
        want = float(d.request.power_kw or 0.0)
        held = min(max(want, env.min_power_kw), env.max_power_kw)
        d.changed = (
            f"the fleet changed at {from_epoch(now):%H:%M:%S}Z: {d.lost} vehicle(s) left"
            f" before their announced departure or went offline; it can hold"
            f" {env.min_power_kw:.1f}..{env.max_power_kw:.1f} kW for the remaining"
            f" {window_s:.0f} s, so {held:.1f} kW is held from now (was {d.allocated_kw:.1f})"
        )
        d.lost = 0
        d.allocated_kw = held
        d.shortfall_kw = abs(want - held)
        return self._plan_for(view, now, window_s, held, gain)

    def _keep_plan(
        self, d: Dispatch, view: FleetView, now: float, window_s: float, plan: ev.Steering
    ) -> None:
        """Keep a plan that holds for its first step. A large fleet (the LP costs ~0.15 s at
        100k vehicles) solves it again only when that step has run out or a car comes or
        goes, and follows it in between: each car's power in it is an average it can hold
        that long. A smaller one solves it every control step, which holds the edges of
        the envelope more tightly (cars reaching their floor mid-step)."""
        step = window_s / ev.grid(window_s, min_step_s=self.control_step_s)
        self._kept = _KeptPlan(
            request_id=d.request_id,
            until=now + step - 0.5 * self.control_step_s,
            allocated_kw=d.allocated_kw,
            rows=view.rows.copy(),
            power_kw=plan.power_kw.copy(),
        )

    def _follow_plan(
        self, view: FleetView, now: float, gain: Array, power_kw: Array
    ) -> ev.Steering:
        """The kept plan's powers (``power_kw``, for the same rows as the view), within
        what each car can do this control step; the allocation covers any gap in
        proportion."""
        lo, hi = self.ranges(view, now, self.control_step_s)
        lo, hi = gain * lo, gain * hi
        ref = np.clip(np.nan_to_num(power_kw, nan=0.0), lo, hi)
        return ev.Steering(ref, lo, hi, True)

    def _gain(self, view: FleetView) -> Array:
        """Each vehicle's follow ratio as the allocation uses it (1 for a car not steered
        through its ratio)."""
        ratio = self._ratio[view.rows]
        out: Array = np.where(ratio >= FOLLOW_MIN_RATIO, ratio, 1.0)
        return out

    def _plan_for(
        self, view: FleetView, now: float, window_s: float, power_kw: float, gain: Array
    ) -> ev.Steering:
        return ev.steer(
            view.batteries,
            view.energy,
            view.departure,
            now,
            window_s,
            power_kw,
            ratio=gain,
            weight=self._weights(view) if self.allocation == "cost" else None,
            ref=np.where(self._sent_until[view.rows] > now, self._sent_kw[view.rows], 0.0) * gain,
            min_step_s=self.control_step_s,
            prepared=self._prepared(view, now, window_s, gain),
        )

    def _weights(self, view: FleetView) -> Array:
        """Each vehicle's throughput cost per kWh: a kWh is a deeper cycle of a small
        battery, and a battery that has cycled more than the fleet's mean costs more."""
        cycled = self._cycled[view.rows]
        out: Array = (REFERENCE_CAPACITY_KWH / view.batteries.capacity_kwh) * (
            1.0 + cycled / max(float(cycled.mean()), CYCLED_FLOOR_KWH)
        )
        return out

    def _split(
        self,
        target: float,
        lo: Array,
        hi: Array,
        ref: Array,
        view: FleetView,
        subset: NDArray[np.bool_] | None,
        *,
        cost: bool,
    ) -> Allocation:
        """The split over ``subset`` of the view (None: all of it): least-cost if ``cost``,
        else in proportion to headroom from ``ref``."""
        if not cost:
            return allocate(target, lo, hi, ref)
        weight = self._weights(view)
        return allocate_cost(target, lo, hi, weight if subset is None else weight[subset])

    def cycled_kwh(self, rows: NDArray[np.intp]) -> Array:
        """Energy each of these fleet rows has cycled under this dispatcher (kWh)."""
        self._fit_rows(rows)
        return self._cycled[rows].copy()

    def baseline(self, view: FleetView) -> float:
        """What the active fleet would draw now with plain charging (once per view)."""
        memo = self._memo(view)
        got = memo.get("baseline")
        if got is None:
            got = memo["baseline"] = float(
                baseline_power(view.batteries, view.energy, self.control_step_s).sum()
            )
        return float(got)

    def _book(self, d: Dispatch, view: FleetView, now: float) -> None:
        """Bring the books to ``t``: ``now``, or the request's end if it ended since.

        Delivered energy is the fleet meter's over the delivery window only: from when the
        first setpoints were in force (placed at the first booking after they went out) to
        ``t``; what the fleet drew after its end is not the request's. The baseline (a
        model, not a measurement) by trapezoid between steps."""
        assert d.last_t is not None
        if now <= d.last_t:
            return  # nothing has run since the books were last brought up to date
        t = min(now, d.end)
        base = self.baseline(view)
        measured = float(view.power.sum())
        if d.meter_start is None:  # books from before the meter: continue from them
            meter = view.meter_kwh - measured * max(0.0, now - t) / 3600.0
            d.meter_start = meter - d.delivered_kwh - d.stacked_kwh
        if d.delivery_start is None:
            self._accrue(d, t)
            lag, before = self._reaction(d, view, now)
            meter = self._start_delivery(d, t, view.meter_kwh, lag, before, now)
            since = d.delivery_start
            assert since is not None
        else:
            meter = self._meter_at(d, t, view, now)  # from the books as they stand
            self._accrue(d, t)
            since = d.last_t
        d.baseline_kwh += 0.5 * (d.baseline_kw + base) * max(0.0, t - since) / 3600.0
        d.delivered_kwh = meter - d.meter_start - d.stacked_kwh
        d.delivered_kw = measured - d.offset_kw
        d.measured_kw, d.baseline_kw, d.last_t = measured, base, t

    def _reaction(self, d: Dispatch, view: FleetView, now: float) -> tuple[float, float]:
        """How long after they went out (at ``d.last_t``, the last step) the first
        setpoints took hold, at the first booking after it.

        Until then the fleet drew what it measured then (P0), from then on what it measures
        now (P1, reports sent after they were applied); the meter's energy E over the Δ
        between places the moment: lag = (P1·Δ − E) / (P1 − P0), the energy-weighted mean
        of the vehicles' reaction times. Taken over the vehicles in the view at both steps
        (those that came or went meanwhile would count in one term and not the other), as
        the fleet's meter if they are all of them. Returns (lag, the power drawn until then
        by the vehicles it was taken over); (0, 0) if the fleet barely moved."""
        assert d.last_t is not None and d.meter_start is not None
        span = now - d.last_t
        self._fit_rows(view.rows)
        rows = view.rows
        was = self._seen_in[rows]
        if len(view) == int(self._seen_in.sum()) and bool(was.all()):
            got_kws = (view.meter_kwh - d.meter_start) * 3600.0
            before, after = d.measured_kw, float(view.power.sum())
        elif view.meters is not None and was.any():
            got_kws = float((view.meters[was] - self._seen_meter[rows[was]]).sum()) * 3600.0
            before, after = float(self._seen_kw[rows[was]].sum()), float(view.power[was].sum())
        else:
            return 0.0, 0.0
        move = after - before
        if not math.isfinite(got_kws) or abs(move) <= DRIFT_TOL_KW:
            return 0.0, 0.0
        return min(max((after * span - got_kws) / move, 0.0), span), before

    @staticmethod
    def _start_delivery(
        d: Dispatch, t: float, meter_now: float, lag: float, before: float, now: float
    ) -> float:
        """Open the delivery window ``lag`` after the first setpoints went out (at
        ``d.last_t``); returns the meter reading at ``t``. Until then the fleet drew what
        it drew before (``before`` kW): that energy, and the requested energy and the
        baseline before it, are not the request's."""
        assert d.last_t is not None and d.meter_start is not None
        t0 = d.last_t
        start = min(t0 + lag, t)
        d.delivery_start = start
        d.meter_start += before * (start - t0) / 3600.0
        # In force from ``start`` to ``now``: a request that ended before ``now`` takes
        # its share of that energy, pro rata (setpoints held to its end, not after).
        inside_kwh = meter_now - d.meter_start
        meter = d.meter_start + (inside_kwh * (t - start) / (now - start) if now > start else 0.0)
        if t > t0:
            keep = (t - start) / (t - t0)
            d.requested_kwh *= keep
            d.stacked_kwh *= keep
        return meter

    @staticmethod
    def _meter_at(d: Dispatch, t: float, view: FleetView, now: float) -> float:
        """The fleet meter at ``t``, the request's end, for a step at ``now`` after it.

        If no vehicle has reported since ``t``, each has held its power from before ``t``
        to now: take that off. If some have (an expired setpoint noticed, the fleet back
        to plain charging), the meter cannot say vehicle by vehicle when: book the power
        measured at the last step, while the setpoints were in force, up to ``t``. Never
        what the fleet drew after the request's end."""
        assert d.last_t is not None and d.meter_start is not None
        if now <= t:
            return view.meter_kwh
        if not len(view) or float(view.ts.max()) <= t:
            return view.meter_kwh - float(view.power.sum()) * (now - t) / 3600.0
        meter_last = d.meter_start + d.delivered_kwh + d.stacked_kwh
        return meter_last + d.measured_kw * (t - d.last_t) / 3600.0

    @staticmethod
    def _accrue(d: Dispatch, t: float) -> None:
        """Book the energy asked up to ``t`` on the terms in force since the last time:
        this request's own, and what the rest of the stack asked on top of it."""
        since = d.last_t if d.acc_t is None else d.acc_t
        assert since is not None
        dt_h = max(0.0, t - since) / 3600.0
        d.requested_kwh += d.requested_kw * dt_h
        d.stacked_kwh += d.offset_kw * dt_h
        d.acc_t = max(since, t)

    def _learn(self, now: float, view: FleetView) -> None:
        """Fold each fresh report of a vehicle that had time to act on its setpoint into
        its follow ratio. Only reports count: a vehicle that went quiet (stale, so not in
        the view) is unknown, not a vehicle that delivered nothing."""
        rows = view.rows
        sent = self._sent_kw[rows]
        ok = (
            (self._sent_until[rows] > now)
            & (view.ts >= self._sent_at[rows] + self.settle_s)
            & (view.ts > self._ratio_ts[rows])
            & (np.abs(sent) >= FOLLOW_MIN_ASK_KW)
        )
        if not ok.any():
            return
        # A car that holds back because its own limits say so (its floor, a full
        # battery) is not misbehaving: judge it only on setpoints it could follow.
        lo, hi = self.ranges(view, now, self.control_step_s)
        ok &= (sent >= lo - DRIFT_TOL_KW) & (sent <= hi + DRIFT_TOL_KW)
        r = rows[ok]
        self._ratio_version += 1
        sample = np.clip(view.power[ok] / sent[ok], 0.0, 1.0)
        # The first sample is the estimate; later ones are averaged in.
        first = ~np.isfinite(self._ratio_ts[r])
        self._ratio[r] = np.where(
            first, sample, self._ratio[r] + FOLLOW_ALPHA * (sample - self._ratio[r])
        )
        self._ratio_ts[r] = view.ts[ok]

    def _plan(
        self,
        target: float,
        end: float,
        request_id: str,
        now: float,
        view: FleetView,
        out: StepOutput,
        steering: ev.Steering | None = None,
    ) -> float:
        """Setpoints for fleet net power ``target`` until ``end``; returns the total the
        vehicles are told (what the fleet can give of it). With ``steering`` (a plan that
        holds the target to the end, made with the follow ratios) each vehicle starts
        from the plan's power, within its range for the plan's first step."""
        rows = view.rows
        sent = self._sent_kw[rows]
        live = self._sent_until[rows] > now
        ratio = self._ratio[rows]
        # The allocation is made in delivered kW (what each car will draw, its setpoint
        # times its ratio), then turned back into setpoints: a partial follower is told
        # more, up to its limits, and what it still cannot give falls to the others.
        steered = ratio >= FOLLOW_MIN_RATIO
        gain = np.where(steered, ratio, 1.0)
        if steering is None:
            lo, hi = self.ranges(view, now, self._rest_s(end, now))
            # Allocate as moves from what each vehicle was last told, so a steady request
            # does not churn every setpoint every step.
            ref = np.where(live, sent, 0.0)
        else:
            # The plan's ranges and powers are in delivered kW; proportional from them, so
            # that a plan the fleet follows is exactly what each car is told.
            lo, hi, ref = steering.lo_kw / gain, steering.hi_kw / gain, steering.power_kw / gain
        cost = steering is None and self.allocation == "cost"  # a plan weighed it already
        # Vehicles that were told a power, had time to act, and hold another than their
        # ratio says: assume they stay where they are and let the rest cover the gap.
        settled = view.ts >= self._sent_at[rows] + self.settle_s
        drifting = live & settled & (np.abs(view.power - gain * sent) > DRIFT_TOL_KW)
        drifting |= live & ~steered
        if drifting.any() and not drifting.all():
            # What they actually draw now is the best guess for the next step, even out of
            # their range for the window (a car under its floor charges flat out).
            held = view.power[drifting]
            rest = ~drifting
            g = gain[rest]
            cover = self._split(
                target - float(held.sum()),
                g * lo[rest],
                g * hi[rest],
                g * ref[rest],
                view,
                rest,
                cost=cost,
            )
            power = np.clip(ref, lo, hi)
            power[rest] = cover.power / g
            total = float(held.sum()) + cover.total_kw
        else:
            alloc = self._split(target, gain * lo, gain * hi, gain * ref, view, None, cost=cost)
            power, total = alloc.power / gain, alloc.total_kw
        power = np.clip(power, lo, hi)  # dividing by the ratio may round past a bound

        step = power - sent
        until_now = self._sent_until[rows]
        # Refreshes go round-robin, one slice of the fleet a step, so that a long request
        # costs about N / slices messages a step rather than bursts of the whole fleet.
        slices = max(
            1, int((self.setpoint_ttl_s - 2.0 * self.control_step_s) // self.control_step_s)
        )
        turn = (rows + round(now / self.control_step_s)) % slices == 0
        expiring = (turn | (until_now - now < 1.5 * self.control_step_s)) & (until_now < end - 1e-9)
        due = ~live | (np.abs(step) > RESEND_DEADBAND_KW) | expiring
        # Moves under the deadband are held back, but never so many that the fleet would
        # be told a total off the allocation: then the largest of them go out too.
        miss = float(power.sum()) - float(np.where(due, power, sent).sum())
        tol = max(RESEND_DEADBAND_KW, 1e-3 * abs(total))
        if abs(miss) > tol:
            toward = ~due & (np.sign(step) == np.sign(miss))
            idx = np.flatnonzero(toward)
            order = idx[np.argsort(-np.abs(step[idx]))]
            covered = np.cumsum(np.abs(step[order]))
            k = int(np.searchsorted(covered, abs(miss) - tol) + 1)
            due[order[:k]] = True
        send = rows[due]
        until = np.full(send.shape[0], min(now + self.setpoint_ttl_s, end))
        # Settling restarts only for a new or materially different setpoint: a refresh or a
        # nudge below the drift tolerance must not hide a vehicle that holds another power.
        fresh = ~live[due] | (np.abs(step[due]) > DRIFT_TOL_KW)
        self._sent_kw[send] = power[due]
        self._sent_until[send] = until
        self._sent_at[send[fresh]] = now
        out.rows, out.power_kw, out.valid_until = send, power[due], until
        out.request_id = request_id
        return total

    def unsend(self, rows: NDArray[np.intp]) -> None:
        """These setpoints never reached the broker: decide and send them again next step."""
        self._sent_until[rows] = -np.inf

    def _progress(self, d: Dispatch, now: float) -> DispatchProgress:
        return DispatchProgress(
            request_id=d.request_id,
            ts=from_epoch(now),
            requested_kw=d.requested_kw,
            allocated_kw=round(d.allocated_kw, 3),
            delivered_kw=round(d.delivered_kw, 3),
            baseline_kw=round(d.baseline_kw, 3),
            requested_kwh=round(d.requested_kwh, 4),
            delivered_kwh=round(d.delivered_kwh, 4),
            baseline_kwh=round(d.baseline_kwh, 4),
            vehicles=d.vehicles,
            elapsed_s=round(max(0.0, now - d.start), 3),
            remaining_s=round(max(0.0, d.end - now), 3),
            score=self.score(d) if d.follows_signal else None,
            fcr_share=self.fcr_share(d),
            delivery_start=_when(d.delivery_start),
            reason=d.changed,
        )

    def active(self) -> list[ActiveDispatch]:
        """The running requests, for fleet status."""
        return [
            ActiveDispatch(
                request_id=d.request_id,
                service=d.request.service.value,
                requested_kw=d.requested_kw,
                allocated_kw=round(d.allocated_kw, 3),
                delivered_kw=round(d.delivered_kw, 3),
                delivered_kwh=round(d.delivered_kwh, 4),
            )
            for d in self.dispatches.values()
            if d.state == "active"
        ]

    # -- books -----------------------------------------------------------------------
    def _close(
        self, d: Dispatch, now: float, status: ResultStatus, reason: str | None = None
    ) -> DispatchResult:
        self._signal_rows.pop(d.request_id, None)
        if d.changed is not None:  # the commitment moved on the way: say so at the end
            reason = d.changed if reason is None else f"{reason}; {d.changed}"
        return self._result(
            d.request_id,
            status,
            now,
            reason=reason,
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
            delivered_kwh=round(d.delivered_kwh, 4),
            requested_kwh=round(d.requested_kwh, 4),
            baseline_kwh=round(d.baseline_kwh, 4),
            score=self.score(d) if d.follows_signal else None,
            fcr_share=self.fcr_share(d),
            delivery_start=_when(d.delivery_start),
        )

    def _result(
        self,
        request_id: str,
        status: ResultStatus,
        now: float,
        *,
        remember: bool = True,
        **fields: Any,
    ) -> DispatchResult:
        for key in ("allocated_kw", "shortfall_kw"):
            if key in fields:
                fields[key] = round(fields[key], 3)
        result = DispatchResult(request_id=request_id, status=status, ts=from_epoch(now), **fields)
        if remember:
            self.answers[request_id] = result
            self.answers.move_to_end(request_id)
            while len(self.answers) > REMEMBERED_ANSWERS:
                old, _ = self.answers.popitem(last=False)
                self._terms.pop(old, None)
        return result

    def _fit_rows(self, rows: NDArray[np.intp]) -> None:
        """:meth:`_fit` the per-row arrays to hold every one of ``rows``."""
        self._fit(int(rows.max()) + 1 if rows.size else 0)

    def _fit(self, n_rows: int) -> None:
        have = self._sent_kw.shape[0]
        if n_rows > have:
            grow = max(n_rows, 2 * have) - have
            self._sent_kw = np.concatenate([self._sent_kw, np.zeros(grow)])
            self._sent_until = np.concatenate([self._sent_until, np.full(grow, -np.inf)])
            self._sent_at = np.concatenate([self._sent_at, np.full(grow, -np.inf)])
            self._ratio = np.concatenate([self._ratio, np.ones(grow)])
            self._ratio_ts = np.concatenate([self._ratio_ts, np.full(grow, -np.inf)])
            self._cycled = np.concatenate([self._cycled, np.zeros(grow)])
            self._seen_in = np.concatenate([self._seen_in, np.zeros(grow, dtype=bool)])
            self._seen_kw = np.concatenate([self._seen_kw, np.zeros(grow)])
            self._seen_meter = np.concatenate([self._seen_meter, np.full(grow, np.nan)])

    # -- persistence -----------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        return [d.to_record() for d in self.dispatches.values()]

    def learned(self, n_rows: int) -> dict[str, Array]:
        """What it has learned per fleet row (follow ratios, energy cycled), as columns
        to persist beside the fleet's: a restart should not trust a car it had found
        following half its setpoints, nor forget whose battery it has cycled."""
        self._fit(n_rows)
        return {name: getattr(self, attr)[:n_rows].copy() for name, attr in _LEARNED.items()}

    def restore_learned(self, columns: dict[str, Array], n_rows: int) -> None:
        """Take back ``learned`` columns (those missing or of another length are skipped)."""
        self._fit(n_rows)
        for name, attr in _LEARNED.items():
            col = columns.get(name)
            if col is not None and col.shape == (n_rows,):
                getattr(self, attr)[:n_rows] = col
        self._ratio_version += 1

    def restore(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            d = Dispatch.from_record(record)
            self.dispatches[d.request_id] = d
            self._terms[d.request_id] = d.request
            self._result(
                d.request_id,
                "accepted",
                d.start,
                reason="restored after a restart",
                requested_kw=d.requested_kw,
                allocated_kw=d.allocated_kw,
                vehicles=d.vehicles,
            )
