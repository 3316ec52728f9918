"""One admitted request and its running books, as typed records, and how they persist.

The snapshot keeps each request as a JSON object of plain numbers and lists (the format
is a contract with snapshots already written: extend it, never rename a field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from broker.models import SIGNAL_SERVICES, DispatchProgress, DispatchRequest, DispatchResult
from core.physics import Array

# Windows are half-open, [start, end): one that starts where another ends does not overlap
# it. Times are epoch seconds (a float's step there is ~0.2 µs) that went through the
# wire's microseconds: ends closer than this are the same instant.
SAME_INSTANT_S = 1e-3
# A request is over at a step whose clock reads its end, to a float's rounding.
ENDED_EPS_S = 1e-9
# Records from before an interval's end was kept hold [start, kW]: a quarter hour.
_LEGACY_INTERVAL_S = 900.0


def overlaps(a_start: float, a_end: float, b_start: float, b_end: float) -> bool:
    """Do the half-open windows [a_start, a_end) and [b_start, b_end) share a moment?"""
    return a_start < b_end - SAME_INSTANT_S and b_start < a_end - SAME_INSTANT_S


class Interval(NamedTuple):
    """Power reserved for a request planned ahead, from ``start`` to ``end`` (epoch s)."""

    start: float
    power_kw: float
    end: float


class ScoreSample(NamedTuple):
    """One sample for a signal service's score: the signal the fleet was answering and
    its response, both as shares of the capacity held."""

    t: float
    signal: float
    response: float


@dataclass(slots=True)
class FcrCheck:
    """An open 30-s containment check: opened at ``at`` by a step of ``need_kw`` in the
    activation asked for (to ``activation``), from ``before_kw`` of fleet power; the last
    step's reading of the change delivered is ``last_kw`` at ``last_t``."""

    at: float
    need_kw: float
    before_kw: float
    last_t: float
    last_kw: float
    activation: float

    def to_list(self) -> list[float]:
        return [self.at, self.need_kw, self.before_kw, self.last_t, self.last_kw, self.activation]


@dataclass(slots=True)
class StepOutput:
    """What one control step decided: setpoints (by fleet row) and messages."""

    rows: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    power_kw: Array = field(default_factory=lambda: np.zeros(0))
    valid_until: Array = field(default_factory=lambda: np.zeros(0))
    request_id: str = ""
    release_rows: NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    # Frequency containment running (issue 13): the frequency these setpoints were
    # computed at, and each row's share of the capacity held (kW at full activation,
    # like ``rows``), so a bridge can droop at the charger. None without containment.
    fcr_hz: float | None = None
    fcr_kw: Array | None = None
    results: list[DispatchResult] = field(default_factory=list)
    progress: list[DispatchProgress] = field(default_factory=list)


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
    # The power reserved interval by interval, if planned ahead.
    schedule: list[Interval] | None = None
    # A service that follows a signal: the capacity held, the latest signal (-1..1), the
    # baseline it moves around, and the samples for its score.
    capacity_kw: float = 0.0
    signal: float = 0.0
    signal_prev: float = 0.0
    signal_at: float = -math.inf
    base_kw: float = 0.0
    samples: list[ScoreSample] | None = None
    # Stacking: admission order (ties of priority go to the earlier), the capacity a
    # signal service holds now (its grant, at most capacity_kw), and what the rest of
    # the stack asks on top of this request's own term, in kW now and in kWh so far
    # (kept off its delivered energy: every request is metered at the same fleet meter).
    seq: int = 0
    held_kw: float = 0.0
    offset_kw: float = 0.0
    stacked_kwh: float = 0.0
    acc_t: float | None = None
    # Containment: the open 30-s activation check and the shares of full activation found.
    fcr_check: FcrCheck | None = None
    fcr_shares: list[float] | None = None
    # The latest frequency sample (containment; None before the first), which the
    # setpoints carry for a bridge that droops at the charger.
    frequency_hz: float | None = None
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

    def intervals(self) -> list[Interval]:
        """What it reserves: its schedule if planned ahead, else its power over its window."""
        return self.schedule or [Interval(self.start, self.allocated_kw, self.end)]

    def to_record(self) -> dict[str, Any]:
        record = {k: getattr(self, k) for k in _BOOK_FIELDS}
        record["request"] = self.request.model_dump(mode="json")
        if self.schedule is not None:
            record["schedule"] = [list(i) for i in self.schedule]
        if self.samples is not None:
            record["samples"] = [list(s) for s in self.samples]
        if self.fcr_check is not None:
            record["fcr_check"] = self.fcr_check.to_list()
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Dispatch:
        request = DispatchRequest.model_validate(record["request"])
        fields = {k: record[k] for k in _BOOK_FIELDS if k in record}
        if fields.get("schedule") is not None:
            fields["schedule"] = [
                Interval(e[0], e[1], e[2] if len(e) > 2 else e[0] + _LEGACY_INTERVAL_S)
                for e in fields["schedule"]
            ]
        if fields.get("samples") is not None:
            fields["samples"] = [ScoreSample(*s) for s in fields["samples"]]
        if fields.get("fcr_check") is not None:
            fields["fcr_check"] = FcrCheck(*fields["fcr_check"])
        d = cls(request=request, **fields)
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
    "frequency_hz",
    "committed",
    "changed",
    "lost",
)
