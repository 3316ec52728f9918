"""What the dispatcher says: its answers, remembered by request id, with their reasons
worded and their figures rounded for the wire.

The other parts of dispatch decide in plain floats; every sentence an operator reads and
every rounding of a published figure is here, so wording changes in one place. Who gets
each answer (topics, response topics, the refusal budget) is ``aggregator/answers.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aggregator.dispatch.records import Dispatch
from broker.models import (
    SIGNAL_SERVICES,
    ActiveDispatch,
    AnswerTo,
    DispatchProgress,
    DispatchRequest,
    DispatchResult,
    ResultStatus,
    ScheduledInterval,
    from_epoch,
    to_epoch,
)

# How many finished requests are remembered, so that a repeated request_id gets the
# same answer instead of a second dispatch.
REMEMBERED_ANSWERS = 10_000
KW_DIGITS = 3
KWH_DIGITS = 4
SCORE_DIGITS = 4


def _when(t: float | None) -> datetime | None:
    return None if t is None else from_epoch(t)


def _hms(t: float) -> str:
    return f"{from_epoch(t):%H:%M:%S}Z"


class AnswerBook:
    """The latest answer to every request id it remembers (the oldest forgotten past
    REMEMBERED_ANSWERS), the terms each was answered on, and the answers owed to
    requests a later one pre-empted (sent with the next step)."""

    def __init__(self) -> None:
        self.answers: OrderedDict[str, DispatchResult] = OrderedDict()
        self.terms: dict[str, DispatchRequest] = {}
        self.notices: list[DispatchResult] = []

    def knows(self, request_id: str) -> bool:
        return request_id in self.terms

    def reuses_id(self, req: DispatchRequest) -> bool:
        seen = self.terms.get(req.request_id)
        return seen is not None and seen != req

    def seen(self, req: DispatchRequest, now: float) -> DispatchResult | None:
        """The answer to a request_id seen before (its latest answer again, or a refusal
        if the terms differ), or None after noting ``req``'s terms as first seen."""
        terms = self.terms.get(req.request_id)
        if terms is None:
            self.terms[req.request_id] = req
            return None
        if terms != req:
            return self.result(
                req.request_id,
                "rejected",
                now,
                reason=REUSED_ID,
                requested_kw=req.power_kw,
                remember=False,
            )
        return self.answers[req.request_id]

    def not_running(self, request_id: str) -> str:
        """Why an amendment or cancel of ``request_id`` finds nothing to act on."""
        last = self.answers.get(request_id)
        if last is None:
            return "unknown request"
        return f"request is not running (its last answer: {last.status})"

    def result(
        self,
        request_id: str,
        status: ResultStatus,
        now: float,
        *,
        remember: bool = True,
        **fields: Any,
    ) -> DispatchResult:
        """A result for the wire (figures rounded), remembered as the id's latest answer
        unless ``remember`` is False."""
        for key in ("allocated_kw", "shortfall_kw"):
            if key in fields:
                fields[key] = round(fields[key], KW_DIGITS)
        result = DispatchResult(request_id=request_id, status=status, ts=from_epoch(now), **fields)
        if remember:
            self.answers[request_id] = result
            self.answers.move_to_end(request_id)
            while len(self.answers) > REMEMBERED_ANSWERS:
                old, _ = self.answers.popitem(last=False)
                self.terms.pop(old, None)
        return result

    def refuse(
        self, request_id: str, reason: str, now: float, answer_to: AnswerTo = "request"
    ) -> DispatchResult:
        return self.result(
            request_id, "rejected", now, reason=reason, answer_to=answer_to, remember=False
        )

    def rejected(self, d: Dispatch, now: float, reason: str, **fields: Any) -> DispatchResult:
        return self.result(d.request_id, "rejected", now, reason=reason, **fields)

    def started(
        self, d: Dispatch, answer: DispatchResult, now: float, *, remember: bool
    ) -> DispatchResult:
        """The ``started`` result of a request planned for later that begins now, with
        what it holds at its start (its admission answer's figures)."""
        return self.result(
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

    def closed(
        self,
        d: Dispatch,
        now: float,
        status: ResultStatus,
        score: float | None,
        fcr_share: float | None,
        reason: str | None = None,
    ) -> DispatchResult:
        """The last result of a request: its books, and how its commitment moved."""
        if d.changed is not None:
            reason = d.changed if reason is None else f"{reason}; {d.changed}"
        return self.result(
            d.request_id,
            status,
            now,
            reason=reason,
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            shortfall_kw=d.shortfall_kw,
            vehicles=d.vehicles,
            delivered_kwh=round(d.delivered_kwh, KWH_DIGITS),
            requested_kwh=round(d.requested_kwh, KWH_DIGITS),
            baseline_kwh=round(d.baseline_kwh, KWH_DIGITS),
            score=wire_score(score),
            fcr_share=wire_score(fcr_share),
            delivery_start=_when(d.delivery_start),
        )

    def restored(self, d: Dispatch) -> None:
        """Remember a request restored from a snapshot as accepted."""
        self.terms[d.request_id] = d.request
        self.result(
            d.request_id,
            "accepted",
            d.start,
            reason="restored after a restart",
            requested_kw=d.requested_kw,
            allocated_kw=d.allocated_kw,
            vehicles=d.vehicles,
        )


def wire_score(score: float | None) -> float | None:
    """A score or a share of activation as published."""
    return None if score is None else round(score, SCORE_DIGITS)


def progress(
    d: Dispatch, now: float, score: float | None, fcr_share: float | None
) -> DispatchProgress:
    """A running request's progress, for its progress topic."""
    return DispatchProgress(
        request_id=d.request_id,
        ts=from_epoch(now),
        requested_kw=d.requested_kw,
        allocated_kw=round(d.allocated_kw, KW_DIGITS),
        delivered_kw=round(d.delivered_kw, KW_DIGITS),
        baseline_kw=round(d.baseline_kw, KW_DIGITS),
        requested_kwh=round(d.requested_kwh, KWH_DIGITS),
        delivered_kwh=round(d.delivered_kwh, KWH_DIGITS),
        baseline_kwh=round(d.baseline_kwh, KWH_DIGITS),
        vehicles=d.vehicles,
        elapsed_s=round(max(0.0, now - d.start), 3),
        remaining_s=round(max(0.0, d.end - now), 3),
        score=wire_score(score),
        fcr_share=wire_score(fcr_share),
        delivery_start=_when(d.delivery_start),
        reason=d.changed,
    )


def active(d: Dispatch) -> ActiveDispatch:
    """A running request, for fleet status."""
    return ActiveDispatch(
        request_id=d.request_id,
        service=d.request.service.value,
        requested_kw=d.requested_kw,
        allocated_kw=round(d.allocated_kw, KW_DIGITS),
        delivered_kw=round(d.delivered_kw, KW_DIGITS),
        delivered_kwh=round(d.delivered_kwh, KWH_DIGITS),
    )


def schedule(
    spans: Sequence[tuple[float, float]], power_kw: Iterable[float]
) -> list[ScheduledInterval]:
    """What a request planned ahead gets interval by interval, for its answer."""
    return [
        ScheduledInterval(
            start=from_epoch(t0),
            duration_s=round(t1 - t0, 6),
            power_kw=round(float(kw), KW_DIGITS),
            energy_kwh=round(float(kw) * (t1 - t0) / 3600.0, KWH_DIGITS),
        )
        for (t0, t1), kw in zip(spans, power_kw, strict=True)
    ]


# -- reasons ---------------------------------------------------------------------------
REUSED_ID = "request_id already used with different terms; use a new id"
CANCELLED = "cancelled by the operator"
NONE_AHEAD = (
    "the fleet plugged in now cannot deliver any of it in that window,"
    " with the requests already taken"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the platform admits: the largest power, the longest duration, and how far
    in the past a start may be (a control step)."""

    max_request_kw: float
    max_duration_s: float
    control_step_s: float


def problem(req: DispatchRequest, now: float, limits: Limits) -> str | None:
    """Why a request is malformed or absurd, or None if it is fine."""
    if req.node is not None:  # every firming request names one (the model checks)
        # Served only with a grid (dispatch/noderequests.py); never fleet-wide (power_kw
        # would mean another thing).
        return (
            "node-targeted requests need a grid: start the aggregator with --grid FILE,"
            " or omit node"
        )
    if req.service in SIGNAL_SERVICES and req.power_kw is not None:
        return (
            f"service {req.service.value} follows a signal around the baseline: give"
            " capacity_kw, not power_kw"
        )
    power = req.power_kw or req.capacity_kw or 0.0
    if abs(power) > limits.max_request_kw:
        return (
            f"power_kw {power:.0f} is beyond the platform limit of ±{limits.max_request_kw:.0f} kW"
        )
    if req.duration_s > limits.max_duration_s:
        return f"duration_s {req.duration_s:.0f} is longer than the limit of {limits.max_duration_s:.0f} s"
    if req.start is not None:
        start = to_epoch(req.start)
        if start < now - limits.control_step_s:
            return (
                f"start {req.start.isoformat()} is {now - start:.0f} s in the past;"
                " omit start for now, or give a future time"
            )
        if start > now + limits.max_duration_s:
            return f"start {req.start.isoformat()} is too far ahead (limit {limits.max_duration_s:.0f} s)"
    return None


def clash(other: Dispatch) -> str:
    return (
        f"overlaps power request {other.request_id}"
        f" ({from_epoch(other.start):%H:%M:%S}-{from_epoch(other.end):%H:%M:%S}Z);"
        " the fleet holds one net power at a time (frequency services stack on"
        " it): cancel or amend that one, or choose another window"
    )


def checked_at_start(start: float) -> str:
    return f"scheduled for {from_epoch(start).isoformat()}; the capacity is checked at start"


def above(swing_kw: float) -> str:
    """The capacity requests of higher priority hold, as a reason's tail."""
    return f", less ±{swing_kw:.1f} kW held for requests of higher priority" if swing_kw else ""


def no_swing(base_kw: float, swing_above_kw: float) -> str:
    return (
        f"the fleet cannot move both ways around its operating point"
        f" ({base_kw:.1f} kW) for that long{above(swing_above_kw)}"
    )


def swing_partial(capacity_kw: float, rest_s: float, swing_above_kw: float) -> str:
    return (
        f"the fleet can hold ±{capacity_kw:.1f} kW around its operating point for"
        f" {rest_s:.0f} s{above(swing_above_kw)}"
    )


def power_partial(
    d: Dispatch, lo_kw: float, hi_kw: float, rest_s: float, swing_above_kw: float, feasible: bool
) -> str:
    side = "import" if d.requested_kw > d.allocated_kw else "export"
    limit = f"{side} limited to {d.allocated_kw:.1f} kW"
    if not feasible:
        limit = (
            "no constant power holds for that long (cars that must charge flat out"
            f" leave inside it): {d.allocated_kw:.1f} kW comes closest"
        )
    return f"the fleet can hold {lo_kw:.1f}..{hi_kw:.1f} kW for {rest_s:.0f} s{above(swing_above_kw)}; {limit}"


def before_first_step(end: float) -> str:
    return (
        f"the request ends at {_hms(end)}, before its first"
        " control step: give a longer duration_s, or a later start"
    )


def preempted(by: Dispatch, held_kw: float, *, swing: bool) -> str:
    return (
        f"pre-empted by request {by.request_id} of priority {by.priority}:"
        f" holds {'±' if swing else ''}{held_kw:.1f} kW now"
    )


def too_far_ahead(ahead_s: float, limit_s: float) -> str:
    return (
        f"ends {ahead_s / 3600:.1f} h ahead; requests are planned up to"
        f" {limit_s / 3600:.0f} h ahead"
    )


def scheduled(start: float, hold_kw: float | None) -> str:
    """A request planned ahead: in full (``hold_kw`` None), or holding ``hold_kw`` kW
    through all of its window."""
    when = from_epoch(start).isoformat()
    if hold_kw is None:
        return f"scheduled for {when}; admission is checked again at start"
    return (
        f"scheduled for {when}; with the requests already taken, the fleet"
        f" plugged in now can hold {hold_kw:.1f} kW through all of it and more in some"
        " intervals (see schedule)"
    )


def ends_in_past(duration_s: float, ago_s: float) -> str:
    return f"duration_s {duration_s:.0f} would end the request {ago_s:.0f} s ago; cancel it instead"


def amendment_refused(why: str) -> str:
    return f"amendment refused: {why}"


def amended(reason: str | None) -> str:
    return "amended" + (f"; {reason}" if reason else "")


def amended_at(now: float, held_kw: float) -> str:
    return f"amended at {_hms(now)}: {held_kw:.1f} kW held from then"


def fleet_changed(
    now: float, lost: int, lo_kw: float, hi_kw: float, rest_s: float, held_kw: float, was_kw: float
) -> str:
    return (
        f"the fleet changed at {_hms(now)}: {lost} vehicle(s) left"
        f" before their announced departure or went offline; it can hold"
        f" {lo_kw:.1f}..{hi_kw:.1f} kW for the remaining"
        f" {rest_s:.0f} s, so {held_kw:.1f} kW is held from now (was {was_kw:.1f})"
    )
