"""Setpoint planning: what each vehicle is told, from the fleet net power the stack
asks, and the follow ratios learned from how each vehicle answers what it was told.

Owns, per fleet row, the setpoint last sent, until when it holds and when it last
changed materially, and the plan a committed request follows between solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from aggregator import envelope as ev
from aggregator.allocation import Allocation, allocate, allocate_cost
from aggregator.dispatch.learning import FOLLOW_MIN_RATIO, Learned
from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch
from aggregator.fleet_state import FleetView
from core.physics import Array

# A vehicle whose reported power is off its setpoint by more than this (after it had
# time to act on it) is drifting: the others are asked to cover for it.
DRIFT_TOL_KW = 0.5
# Setpoints that moved less than this are not sent again (until they near expiry).
RESEND_DEADBAND_KW = 0.05
# Below this many kW asked, a ratio sample is mostly rounding: none is taken.
FOLLOW_MIN_ASK_KW = 1.0
# A committed request's plan is solved every control step for a fleet under this many
# vehicles, and above only when its first step runs out or a car comes or goes.
REPLAN_EVERY_STEP_BELOW = 20_000


class Sent(NamedTuple):
    """Setpoints decided at a step: to these fleet rows, these powers, valid until;
    ``total_kw`` is what the fleet is told in all (what it can give of the target)."""

    rows: NDArray[np.intp]
    power_kw: Array
    valid_until: Array
    total_kw: float


class Moved(NamedTuple):
    """A commitment that no longer holds once vehicles left unannounced: the fleet's
    range for the rest of the window, what it holds from now and held before."""

    lost: int
    lo_kw: float
    hi_kw: float
    rest_s: float
    held_kw: float
    was_kw: float


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


class Setpoints:
    """What each vehicle was told, and the split of the next target over the fleet."""

    def __init__(
        self,
        learned: Learned,
        ranges: FleetRanges,
        *,
        control_step_s: float,
        setpoint_ttl_s: float,
        settle_s: float,
        allocation: Literal["proportional", "cost"],
        replan_every_step_below: int,
    ) -> None:
        self.learned = learned
        self.ranges = ranges
        self.control_step_s = control_step_s
        self.setpoint_ttl_s = setpoint_ttl_s
        self.settle_s = settle_s
        self.allocation = allocation
        self.replan_every_step_below = replan_every_step_below
        self.sent_kw: Array = np.zeros(0)
        self.sent_until: Array = np.zeros(0)
        self.sent_at: Array = np.zeros(0)
        self._kept: _KeptPlan | None = None

    def fit(self, n_rows: int) -> None:
        have = self.sent_kw.shape[0]
        if n_rows > have:
            grow = max(n_rows, 2 * have) - have
            self.sent_kw = np.concatenate([self.sent_kw, np.zeros(grow)])
            self.sent_until = np.concatenate([self.sent_until, np.full(grow, -np.inf)])
            self.sent_at = np.concatenate([self.sent_at, np.full(grow, -np.inf)])

    def resend_all(self) -> None:
        """New terms: every vehicle gets a fresh setpoint at the next plan."""
        self.sent_until[:] = -np.inf

    def unsend(self, rows: NDArray[np.intp]) -> None:
        """These setpoints never reached the broker: decide and send them again."""
        self.sent_until[rows] = -np.inf

    def release(self, now: float) -> NDArray[np.intp]:
        """Nothing runs: the rows whose setpoints still hold, now released."""
        live = np.flatnonzero(self.sent_until > now)
        if live.size:
            self.sent_until[live] = -np.inf
        return live

    def drop_plan(self, request_id: str) -> None:
        """``request_id`` has new terms: its kept plan is solved afresh."""
        if self._kept is not None and self._kept.request_id == request_id:
            self._kept = None

    def learn(self, now: float, view: FleetView) -> None:
        """Fold each fresh report of a vehicle that had time to act on its setpoint into
        its follow ratio. Only reports count: a vehicle that went quiet (stale, so not in
        the view) is unknown, not a vehicle that delivered nothing."""
        rows = view.rows
        sent = self.sent_kw[rows]
        ok = (
            (self.sent_until[rows] > now)
            & (view.ts >= self.sent_at[rows] + self.settle_s)
            & (view.ts > self.learned.ratio_ts[rows])
            & (np.abs(sent) >= FOLLOW_MIN_ASK_KW)
        )
        if not ok.any():
            return
        # A car that holds back because its own limits say so (its floor, a full
        # battery) is not misbehaving: judge it only on setpoints it could follow.
        lo, hi = self.ranges.ranges(view, now, self.control_step_s)
        ok &= (sent >= lo - DRIFT_TOL_KW) & (sent <= hi + DRIFT_TOL_KW)
        sample = np.clip(view.power[ok] / sent[ok], 0.0, 1.0)
        self.learned.fold(rows[ok], sample, view.ts[ok])

    # -- a committed request's plan -------------------------------------------------
    def steer(self, d: Dispatch, now: float, view: FleetView) -> tuple[ev.Steering, Moved | None]:
        """The plan that holds ``d``'s commitment for the rest of its window. If none holds
        any more because the fleet changed (a car left before its announced departure or
        went offline), the commitment moves to what the fleet can now hold (``d`` holds
        it), and the returned Moved says from what to what."""
        window_s = self.ranges.rest_s(d.end, now)
        gain = self.learned.gain(view.rows)
        kept = self._kept
        if (
            len(view) >= self.replan_every_step_below
            and kept is not None
            and kept.request_id == d.request_id
            and now < kept.until
            and kept.allocated_kw == d.allocated_kw
            and np.array_equal(view.rows, kept.rows)
        ):
            return self._follow_plan(view, now, gain, kept.power_kw), None
        plan = self._plan_for(view, now, window_s, d.allocated_kw, gain)
        if plan.holds:
            d.lost = 0  # whoever left, the rest still hold it
            self._keep_plan(d, view, now, window_s, plan)
            return plan, None
        if d.lost == 0:
            # The fleet is as it was when it was answered: the commitment stands, and the
            # plan closest to it is followed.
            return plan, None
        env = self.ranges.envelope(view, now, window_s)
        want = float(d.request.power_kw or 0.0)
        held = min(max(want, env.min_power_kw), env.max_power_kw)
        moved = Moved(d.lost, env.min_power_kw, env.max_power_kw, window_s, held, d.allocated_kw)
        d.lost = 0
        d.allocated_kw = held
        d.shortfall_kw = abs(want - held)
        return self._plan_for(view, now, window_s, held, gain), moved

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
        lo, hi = self.ranges.ranges(view, now, self.control_step_s)
        lo, hi = gain * lo, gain * hi
        ref = np.clip(np.nan_to_num(power_kw, nan=0.0), lo, hi)
        return ev.Steering(ref, lo, hi, True)

    def _plan_for(
        self, view: FleetView, now: float, window_s: float, power_kw: float, gain: Array
    ) -> ev.Steering:
        rows = view.rows
        return ev.steer(
            view.batteries,
            view.energy,
            view.departure,
            now,
            window_s,
            power_kw,
            ratio=gain,
            weight=self.learned.weights(view) if self.allocation == "cost" else None,
            ref=np.where(self.sent_until[rows] > now, self.sent_kw[rows], 0.0) * gain,
            min_step_s=self.control_step_s,
            prepared=self.ranges.prepared(view, now, window_s, gain),
        )

    # -- the split ------------------------------------------------------------------
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
        weight = self.learned.weights(view)
        return allocate_cost(target, lo, hi, weight if subset is None else weight[subset])

    def plan(
        self,
        target: float,
        end: float,
        now: float,
        view: FleetView,
        steering: ev.Steering | None = None,
    ) -> Sent:
        """Setpoints for fleet net power ``target`` until ``end``, and the total the
        vehicles are told (what the fleet can give of it). With ``steering`` (a plan that
        holds the target to the end, made with the follow ratios) each vehicle starts
        from the plan's power, within its range for the plan's first step."""
        rows = view.rows
        sent = self.sent_kw[rows]
        live = self.sent_until[rows] > now
        ratio = self.learned.ratio[rows]
        # The allocation is made in delivered kW (what each car will draw, its setpoint
        # times its ratio), then turned back into setpoints: a partial follower is told
        # more, up to its limits, and what it still cannot give falls to the others.
        steered = ratio >= FOLLOW_MIN_RATIO
        gain = np.where(steered, ratio, 1.0)
        if steering is None:
            lo, hi = self.ranges.ranges(view, now, self.ranges.rest_s(end, now))
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
        settled = view.ts >= self.sent_at[rows] + self.settle_s
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
        until_now = self.sent_until[rows]
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
        self.sent_kw[send] = power[due]
        self.sent_until[send] = until
        self.sent_at[send[fresh]] = now
        return Sent(send, power[due], until, total)
