"""Signal tracking: how well the fleet follows each signal service's signal (the
PJM-style score) and, for FCR, what share of each step in activation it delivers 30 s
later. Owns which vehicles each service's latest signal sample moved.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch.records import Dispatch, FcrCheck, ScoreSample
from aggregator.fleet_state import FleetView
from aggregator.scoring import FCR_FULL_WITHIN_S, fcr_activation, regulation_score
from aggregator.scoring import SAMPLE_S as SCORE_SAMPLE_S
from aggregator.scoring import WINDOW_S as SCORE_WINDOW_S
from broker.models import DispatchSignal

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


class Tracking:
    """The score samples and FCR checks of the running signal services."""

    def __init__(self, *, control_step_s: float) -> None:
        self.control_step_s = control_step_s
        # Per signal service: the fleet rows its latest signal sample moved.
        self.signal_rows: dict[str, NDArray[np.intp]] = {}

    def take_signal(self, d: Dispatch, sample: DispatchSignal, now: float, view: FleetView) -> None:
        """``d`` follows ``sample`` from ``now`` (a value, or a frequency for FCR)."""
        d.signal_prev, d.signal_at = d.signal, now
        if sample.value is not None:
            d.signal = sample.value
        else:
            assert sample.frequency_hz is not None
            d.frequency_hz = sample.frequency_hz
            d.signal = float(fcr_activation(np.array([sample.frequency_hz]))[0])
            self._watch_fcr(d, now, view)

    def moved(self, request_id: str, rows: NDArray[np.intp]) -> None:
        """The latest signal sample of ``request_id`` moved these fleet rows."""
        self.signal_rows[request_id] = rows

    def forget(self, request_id: str) -> None:
        self.signal_rows.pop(request_id, None)

    def step(self, d: Dispatch, now: float, view: FleetView, measured_kw: float) -> None:
        """At a control step: take a score sample if one is due, close an FCR check."""
        self._sample(d, now, view)
        self._check_fcr(d, now, measured_kw)

    def _sample(self, d: Dispatch, now: float, view: FleetView) -> None:
        """Keep a score sample every SCORE_SAMPLE_S."""
        if d.samples is None or d.capacity_kw <= 0 or d.signal_at == -math.inf:
            return  # nothing to score before the first signal sample
        # Steps come every control step, a little late at times: half a step of slack.
        if d.samples and now - d.samples[-1].t < SCORE_SAMPLE_S - 0.5 * self.control_step_s:
            return
        # The fleet's measured power answers the latest signal only once the vehicles it
        # moved have reported since; until then it answers the one before.
        s = d.signal if self._answered(d, view) else d.signal_prev
        measured = float(view.power.sum())
        d.samples.append(ScoreSample(now, s, (measured - d.base_kw) / d.capacity_kw))
        del d.samples[:-MAX_SCORE_SAMPLES]

    def _answered(self, d: Dispatch, view: FleetView) -> bool:
        """Have most vehicles the latest signal moved reported since it went out?"""
        rows = self.signal_rows.get(d.request_id)
        if rows is None or rows.size == 0:
            return True
        where = np.full(int(max(rows.max(), view.rows.max(initial=-1))) + 1, -1, np.intp)
        where[view.rows] = np.arange(len(view))
        pos = where[rows]
        pos = pos[pos >= 0]
        if pos.size == 0:
            return True
        return float(np.mean(view.ts[pos] >= d.signal_at)) >= SIGNAL_ANSWERED_SHARE

    @staticmethod
    def _watch_fcr(d: Dispatch, now: float, view: FleetView) -> None:
        """A step in the activation containment asks for opens a check of what the fleet
        delivers of it 30 s later; a further move before then voids the check."""
        check = d.fcr_check
        if check is not None and abs(d.signal - check.activation) <= FCR_CHECK_HOLD:
            return
        d.fcr_check = None
        need = (d.signal - d.signal_prev) * d.capacity_kw
        if abs(d.signal - d.signal_prev) >= FCR_CHECK_STEP and abs(need) >= SIGNAL_MIN_KW:
            d.fcr_check = FcrCheck(now, need, float(view.power.sum()), now, 0.0, d.signal)

    @staticmethod
    def _check_fcr(d: Dispatch, now: float, measured: float) -> None:
        """Close an open FCR check once 30 s have passed: the delivered change at 30 s
        (interpolated between steps) over the change required."""
        check = d.fcr_check
        if check is None:
            return
        got = measured - check.before_kw
        due = check.at + FCR_FULL_WITHIN_S
        if now < due:
            check.last_t, check.last_kw = now, got
            return
        w = 0.0 if now <= check.last_t else (due - check.last_t) / (now - check.last_t)
        share = (check.last_kw + w * (got - check.last_kw)) / check.need_kw
        d.fcr_shares = [*(d.fcr_shares or [])[-(MAX_FCR_CHECKS - 1) :], share]
        d.fcr_check = None


def fcr_share(d: Dispatch) -> float | None:
    """The least share of full activation delivered 30 s after a step, so far."""
    return min(d.fcr_shares) if d.fcr_shares else None


def score(d: Dispatch) -> float | None:
    """The PJM-style composite score of a signal service so far (None before one whole
    5-minute window of samples)."""
    if not d.follows_signal or not d.samples or len(d.samples) < SCORE_WINDOW_SAMPLES:
        return None
    arr = np.asarray(d.samples)
    composite = regulation_score(arr[:, 1], np.clip(arr[:, 2], -2.0, 2.0)).composite
    return None if math.isnan(composite) else composite
