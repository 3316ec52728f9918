"""The books of each running request: the energy requested, delivered (the fleet meter
over its delivery window) and the baseline, brought up to date at every step.

Owns, per fleet row, what the last step saw (in the view, its power, its meter): a
delivery window opening then is placed from them at the next step.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch
from aggregator.dispatch.setpoints import DRIFT_TOL_KW
from aggregator.fleet_state import FleetView
from core.physics import Array


def accrue(d: Dispatch, t: float) -> None:
    """Book the energy asked up to ``t`` on the terms in force since the last time:
    this request's own, and what the rest of the stack asked on top of it."""
    since = d.last_t if d.acc_t is None else d.acc_t
    assert since is not None
    dt_h = max(0.0, t - since) / 3600.0
    d.requested_kwh += d.requested_kw * dt_h
    d.stacked_kwh += d.offset_kw * dt_h
    d.acc_t = max(since, t)


def open_books(d: Dispatch, now: float, view: FleetView, baseline_kw: float) -> None:
    """``d`` starts running at ``now``: its books open on the fleet meter. The delivery
    window opens when its setpoints are in force: the next booking places it, from the
    fleet's power now and what it draws once they are."""
    d.state = "active"
    d.last_t = d.acc_t = now
    d.meter_start = view.meter_kwh
    d.delivery_start = None
    d.measured_kw = float(view.power.sum())
    d.baseline_kw = baseline_kw


class Books:
    """Brings each request's books up to date at a step."""

    def __init__(self, ranges: FleetRanges) -> None:
        self.ranges = ranges
        self._seen_in: NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self._seen_kw: Array = np.zeros(0)
        self._seen_meter: Array = np.zeros(0)

    def fit(self, n_rows: int) -> None:
        have = self._seen_in.shape[0]
        if n_rows > have:
            grow = max(n_rows, 2 * have) - have
            self._seen_in = np.concatenate([self._seen_in, np.zeros(grow, dtype=bool)])
            self._seen_kw = np.concatenate([self._seen_kw, np.zeros(grow)])
            self._seen_meter = np.concatenate([self._seen_meter, np.full(grow, np.nan)])

    def see(self, view: FleetView) -> None:
        """Remember what this step saw, for the next step's bookings."""
        self._seen_in[:] = False
        self._seen_in[view.rows] = True
        self._seen_kw[view.rows] = view.power
        self._seen_meter[view.rows] = np.nan if view.meters is None else view.meters

    def book(self, d: Dispatch, view: FleetView, now: float) -> None:
        """Bring the books to ``t``: ``now``, or the request's end if it ended since.

        Delivered energy is the fleet meter's over the delivery window only: from when the
        first setpoints were in force (placed at the first booking after they went out) to
        ``t``; what the fleet drew after its end is not the request's. The baseline (a
        model, not a measurement) by trapezoid between steps."""
        assert d.last_t is not None
        if now <= d.last_t:
            return  # nothing has run since the books were last brought up to date
        t = min(now, d.end)
        base = self.ranges.baseline(view)
        measured = float(view.power.sum())
        if d.meter_start is None:  # books from before the meter: continue from them
            meter = view.meter_kwh - measured * max(0.0, now - t) / 3600.0
            d.meter_start = meter - d.delivered_kwh - d.stacked_kwh
        if d.delivery_start is None:
            accrue(d, t)
            lag, before = self._reaction(d, view, now)
            meter = _start_delivery(d, t, view.meter_kwh, lag, before, now)
            since = d.delivery_start
            assert since is not None
        else:
            meter = _meter_at(d, t, view, now)  # from the books as they stand
            accrue(d, t)
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
        rows = view.rows
        self.fit(int(rows.max()) + 1 if rows.size else 0)
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
