"""Requests that name a grid node (issue 11): served by the vehicles under that node only,
their net power being the request's ``power_kw``.

Each running one is a band on its node's vehicles' total that the nested allocation
holds after the limits and the drivers' floors (aggregator/grid_alloc.py), so requests
on different nodes run at the same time, beside the fleet's own stack. Admission weighs
the subtree's range for the window inside the headroom of the node and of every
ancestor, given what the rest of the fleet under them draws now; a partial answer names
the node (or the vehicles) that binds.

Service ``firming`` is served the same way: its band on the node's net power each step
is :func:`aggregator.grid_alloc.firming_band` ([min_kw, max_kw] within the ramp from the
last step's measured net power); admission accepts it if the cars under the node can
bring the net power into [min_kw, max_kw] now (within the limits), partial with the
shortfall otherwise; its progress and result carry ``outside_band_kwh``.

Owns the node requests (scheduled and running) and their books: requested energy,
delivered energy from the subtree's measured power held between steps, and for firming
the energy outside the band; per settlement interval, the energy outside the band and
the ramp violations with the fleet and with the node's cars on plain charging
(:mod:`aggregator.firming`), taken by the control step for the ledger.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch import answers as wire
from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch
from aggregator.firming import FirmingBooks, FirmingInterval
from aggregator.fleet_state import FleetView
from aggregator.grid_alloc import firming_band, subtree_sums
from aggregator.grid_state import GridNow, GridState
from aggregator.settlement import INTERVAL_S
from broker.models import DispatchProgress, DispatchRequest, DispatchResult, Service, to_epoch
from core.physics import baseline_power

Floats = NDArray[np.float64]


def _kw(v: float) -> str:
    return f"{v:.1f} kW"


class NodeRequests:
    """The requests that name a node, admitted and run as bands on their nodes."""

    def __init__(
        self,
        grid: GridState,
        ranges: FleetRanges,
        said: wire.AnswerBook,
        limits: wire.Limits,
        *,
        control_step_s: float,
    ) -> None:
        self.grid = grid
        self.ranges = ranges
        self.said = said
        self.limits = limits
        self.control_step_s = control_step_s
        self.dispatches: dict[str, Dispatch] = {}
        self._seq = 0
        # Firming: each request's energy outside its band so far, and its node's net
        # power (meter + measured vehicles) at the last step, for the ramp.
        self.outside_kwh: dict[str, float] = {}
        self.last_net_kw: dict[str, float] = {}
        # Firming, per settlement interval: each request's books, and the intervals closed
        # since the control step last took them (for the ledger).
        self.firming: dict[str, FirmingBooks] = {}
        self.closed_intervals: list[tuple[str, FirmingInterval]] = []

    def _under(self, j: int, vnode: NDArray[np.intp]) -> NDArray[np.bool_]:
        under: NDArray[np.bool_] = (vnode >= j) & (vnode < self.grid.grid.end[j])
        return under

    def problem(self, req: DispatchRequest) -> str | None:
        """Why a node-targeted request cannot be served (before the general checks)."""
        if req.power_kw is None and req.service != Service.FIRMING:
            return (
                f"service {req.service.value} on a node is not served yet: a node takes"
                " power requests (power_kw) and firming; send it without node to serve it"
                " with the whole fleet"
            )
        if req.node not in self.grid.grid.index:
            return f"node {req.node!r} is not in the grid file: see 'v2g grid show FILE'"
        return None

    def submit(self, req: DispatchRequest, now: float, view: FleetView) -> DispatchResult:
        """Answer a request with ``node``: accepted, partial (naming what binds) or
        rejected; one for later is checked at its start."""
        again = self.said.seen(req, now)
        if again is not None:
            return again
        why = self.problem(req) or wire.problem(
            req.model_copy(update={"node": None}), now, self.limits
        )
        if why is not None:
            return self.said.result(
                req.request_id, "rejected", now, reason=why, requested_kw=req.power_kw
            )
        start = now if req.start is None else max(now, to_epoch(req.start))
        self._seq += 1
        d = Dispatch(request=req, start=start, end=start + req.duration_s, seq=self._seq)
        self.dispatches[req.request_id] = d
        if start > now + self.control_step_s:
            return self.said.result(
                d.request_id,
                "accepted",
                now,
                reason=wire.checked_at_start(start),
                requested_kw=req.power_kw,
                allocated_kw=req.power_kw or 0.0,
            )
        return self.admit(d, now, view)

    def admit(self, d: Dispatch, now: float, view: FleetView) -> DispatchResult:
        """``d`` starts now: what the subtree can hold for its window, inside the
        headroom of its node and every ancestor."""
        grid = self.grid.grid
        node = d.request.node
        assert node is not None
        j = grid.index[node]
        vnode = self.grid.vehicle_nodes(view)
        under = self._under(j, vnode)
        n = int(under.sum())
        asked = float(d.request.power_kw or 0.0)
        if n == 0:
            self.dispatches.pop(d.request_id, None)
            return self.said.rejected(
                d, now, f"no vehicle is plugged in under node {node}", requested_kw=asked
            )
        lo, hi = self.ranges.ranges(view, now, self.ranges.rest_s(d.end, now))
        # Its own vehicles' range, then each ancestor's headroom given the rest under it.
        bound_lo, bound_hi = float(lo[under].sum()), float(hi[under].sum())
        why_lo = why_hi = f"the {n} vehicles under {node}"
        g = self.grid.in_force(now)
        meter0 = np.nan_to_num(g.meter_kw, nan=0.0)
        p = subtree_sums(grid, np.where(vnode < 0, 0, vnode), np.asarray(view.power, dtype=float))
        for a in grid.ancestors(j):
            others = float(p[a] - p[j])
            up = float(g.import_kw[a] - meter0[a]) - others
            down = float(-g.export_kw[a] - meter0[a]) - others
            if up < bound_hi:
                bound_hi, why_hi = up, f"node {grid.ids[a]}'s import limit"
            if down > bound_lo:
                bound_lo, why_lo = down, f"node {grid.ids[a]}'s export limit"
        if d.request.service == Service.FIRMING:
            return self._firming_answer(d, now, n, meter0[j], bound_lo, bound_hi, why_lo, why_hi)
        held = min(max(asked, bound_lo), bound_hi) if bound_lo <= bound_hi else bound_hi
        d.state = "active"
        d.last_t = d.acc_t = now
        d.allocated_kw = held
        d.shortfall_kw = abs(asked - held)
        d.vehicles = n
        d.committed = True
        d.measured_kw = float(view.power[under].sum())
        if d.shortfall_kw <= 1e-6:
            return self.said.result(
                d.request_id,
                "accepted",
                now,
                requested_kw=asked,
                allocated_kw=held,
                vehicles=n,
            )
        binding = why_hi if asked > held else why_lo
        return self.said.result(
            d.request_id,
            "partial",
            now,
            reason=f"{binding} allows {_kw(held)} of the {_kw(asked)} asked under node {node}"
            f" (range {_kw(bound_lo)}..{_kw(bound_hi)})",
            requested_kw=asked,
            allocated_kw=held,
            shortfall_kw=d.shortfall_kw,
            vehicles=n,
        )

    def _firming_answer(
        self,
        d: Dispatch,
        now: float,
        n: int,
        meter_kw: float,
        bound_lo: float,
        bound_hi: float,
        why_lo: str,
        why_hi: str,
    ) -> DispatchResult:
        """Firming holds the node's net power in [min_kw, max_kw]: accepted if its cars
        can (within the limits) now, partial with the shortfall otherwise."""
        req = d.request
        node = str(req.node)
        lo = -np.inf if req.min_kw is None else req.min_kw
        hi = np.inf if req.max_kw is None else req.max_kw
        reach_lo, reach_hi = meter_kw + bound_lo, meter_kw + bound_hi  # its net power range
        short = max(0.0, lo - reach_hi, reach_lo - hi)
        if d.state != "active":  # an amendment keeps the time its books were last brought to
            d.last_t = d.acc_t = now
        d.state = "active"
        d.vehicles = n
        d.committed = True
        d.shortfall_kw = short
        self.outside_kwh.setdefault(d.request_id, 0.0)  # an amendment keeps its books
        self.last_net_kw.setdefault(d.request_id, np.nan)
        self.firming.setdefault(
            d.request_id,
            FirmingBooks(node, req.min_kw, req.max_kw, req.ramp_kw_per_min, INTERVAL_S),
        )
        if short <= 1e-6:
            return self.said.result(d.request_id, "accepted", now, vehicles=n)
        binding = why_hi if lo > reach_hi else why_lo
        return self.said.result(
            d.request_id,
            "partial",
            now,
            reason=f"bound by {binding}, node {node}'s net power can reach"
            f" {_kw(reach_lo)}..{_kw(reach_hi)} now (its meter {_kw(meter_kw)}): the band"
            f" is missed by {_kw(short)}",
            shortfall_kw=short,
            vehicles=n,
        )

    def amend(
        self,
        d: Dispatch,
        now: float,
        view: FleetView,
        power_kw: float | None,
        duration_s: float | None,
    ) -> DispatchResult:
        """Change a node request in flight, as a fleet-wide one is: a running one keeps
        its books and is admitted afresh on its node (partial names what binds); one for
        later is checked at its start. If the new terms are refused the old ones stand."""
        req = d.request
        update: dict[str, float] = {}
        if power_kw is not None:
            update["power_kw"] = power_kw
        if duration_s is not None:
            update["duration_s"] = duration_s
        new_req = req.model_copy(update=update)
        problem = None
        if req.service == Service.FIRMING and power_kw is not None:
            # DispatchAmend carries power and duration only: a firming band is amended
            # by sending it anew.
            problem = (
                "firming takes no power_kw (its band is min_kw/max_kw): amend duration_s,"
                " or cancel it and send a new one"
            )
        problem = problem or wire.problem(
            new_req.model_copy(update={"node": None, "start": None}), now, self.limits
        )
        if problem is None and d.start + new_req.duration_s <= now + self.control_step_s:
            problem = wire.ends_in_past(new_req.duration_s, now - d.start - new_req.duration_s)
        vnode = self.grid.vehicle_nodes(view)
        if problem is None and d.state == "active":
            under = self._under(self.grid.grid.index[str(req.node)], vnode)
            if not under.any():
                problem = f"no vehicle is plugged in under node {req.node}"
        if problem is not None:
            return self.said.result(
                d.request_id, "rejected", now, reason=wire.amendment_refused(problem),
                remember=False, requested_kw=new_req.power_kw,
            )  # fmt: skip
        if d.state == "active" and req.service != Service.FIRMING:
            # The energy asked and delivered until now, on the terms in force until now
            # (firming's books are brought on by the step, outside-band energy with them).
            self._book(d, now, view, vnode)
        d.request, d.end = new_req, d.start + new_req.duration_s
        self.said.terms[d.request_id] = new_req
        if d.state == "active":
            answer = self.admit(d, now, view)
            if req.service != Service.FIRMING:
                d.changed = wire.amended_at(now, d.allocated_kw)
        else:
            answer = self.said.result(
                d.request_id,
                "accepted",
                now,
                reason=wire.checked_at_start(d.start),
                requested_kw=new_req.power_kw,
                allocated_kw=new_req.power_kw or 0.0,
            )
        return answer.model_copy(update={"reason": wire.amended(answer.reason)})

    def running(self) -> list[Dispatch]:
        return [d for d in self.dispatches.values() if d.state == "active"]

    def cancel(self, request_id: str, now: float, view: FleetView) -> DispatchResult | None:
        d = self.dispatches.pop(request_id, None)
        if d is None:
            return None
        if d.state == "active":
            self._book(d, now, view, self.grid.vehicle_nodes(view))
        self.outside_kwh.pop(request_id, None)
        self.last_net_kw.pop(request_id, None)
        self._close_books(request_id, now)
        return self.said.closed(d, now, "cancelled", None, None, reason=wire.CANCELLED)

    def _book(self, d: Dispatch, now: float, view: FleetView, vnode: NDArray[np.intp]) -> None:
        """Bring the books to ``now`` (or the end): the subtree held its last measured
        power since the last step; what it draws now is the next interval's."""
        assert d.last_t is not None and d.request.node is not None
        t = min(now, d.end)
        dt_h = max(0.0, t - d.last_t) / 3600.0
        d.requested_kwh += d.requested_kw * dt_h
        d.delivered_kwh += d.measured_kw * dt_h
        under = self._under(self.grid.grid.index[d.request.node], vnode)
        d.measured_kw = d.delivered_kw = float(view.power[under].sum())
        d.vehicles = int(under.sum())
        d.last_t = max(d.last_t, t)

    def step(
        self, now: float, view: FleetView, g: GridNow
    ) -> tuple[list[DispatchResult], list[DispatchProgress], tuple[Floats, Floats] | None]:
        """Start, book and close node requests at ``now``; the bands on the nodes'
        vehicle totals (with the meters: on their net power) for this step, or None."""
        results: list[DispatchResult] = []
        vnode = self.grid.vehicle_nodes(view)
        meter0 = np.nan_to_num(g.meter_kw, nan=0.0)
        plain: Floats | None = None  # every car's plain-charging power, once a step
        for d in list(self.dispatches.values()):
            if d.state == "active":
                was_t = d.last_t
                self._book(d, now, view, vnode)
                if d.request.service == Service.FIRMING:
                    if plain is None:
                        plain = baseline_power(view.batteries, view.energy, self.control_step_s)
                    self._firming_books(d, now, was_t, meter0, plain, vnode)
                if d.over(now):
                    del self.dispatches[d.request_id]
                    results.append(self._final(d, now))
            elif now >= d.start:
                answer = self.admit(d, now, view)
                if answer.status != "rejected":
                    results.append(self.said.started(d, answer, now, remember=True))
                if answer.status != "accepted":
                    results.append(answer)
        run = self.running()
        if not run:
            return results, [], None
        n = len(self.grid.grid)
        want = np.zeros(n)
        has = np.zeros(n, dtype=np.bool_)
        lo = np.full(n, -np.inf)
        hi = np.full(n, np.inf)
        for d in run:
            j = self.grid.grid.index[str(d.request.node)]
            if d.request.service == Service.FIRMING:
                req = d.request
                b_lo, b_hi = firming_band(
                    req.min_kw,
                    req.max_kw,
                    req.ramp_kw_per_min,
                    self.last_net_kw.get(d.request_id, np.nan),
                    self.control_step_s,
                )
                lo[j], hi[j] = max(lo[j], b_lo), min(hi[j], b_hi)
            else:
                want[j] += d.allocated_kw
                has[j] = True
        # A power request on a node is a point on its vehicles' total; a firming band on
        # the same node yields to it.
        lo = np.where(has, meter0 + want, lo)
        hi = np.where(has, meter0 + want, hi)
        progress = [self._progress(d, now) for d in run]
        return results, progress, (lo, hi)

    def _firming_books(
        self,
        d: Dispatch,
        now: float,
        was_t: float | None,
        meter0: Floats,
        plain: Floats,
        vnode: NDArray[np.intp],
    ) -> None:
        """The energy outside the band since the last step (the net power then held),
        and the net power now, for the next step's ramp and books; the interval books
        beside it, with the baseline's net power (meter + the cars' plain charging)."""
        req = d.request
        j = self.grid.grid.index[str(req.node)]
        books = self.firming.get(d.request_id)
        if books is not None:
            base = float(meter0[j]) + float(plain[self._under(j, vnode)].sum())
            closed = books.step(min(now, d.end), float(meter0[j]) + d.measured_kw, base)
            self.closed_intervals += [(d.request_id, iv) for iv in closed]
        net_then = self.last_net_kw.get(d.request_id, np.nan)
        if was_t is not None and np.isfinite(net_then):
            lo = -np.inf if req.min_kw is None else req.min_kw
            hi = np.inf if req.max_kw is None else req.max_kw
            miss = max(0.0, net_then - hi, lo - net_then)
            dt_h = max(0.0, min(now, d.end) - was_t) / 3600.0
            self.outside_kwh[d.request_id] = self.outside_kwh.get(d.request_id, 0.0) + miss * dt_h
        self.last_net_kw[d.request_id] = float(meter0[j]) + d.measured_kw

    def _progress(self, d: Dispatch, now: float) -> DispatchProgress:
        p = wire.progress(d, now, None, None)
        if d.request.service != Service.FIRMING:
            return p
        out = round(self.outside_kwh.get(d.request_id, 0.0), 4)
        return p.model_copy(update={"outside_band_kwh": out})

    def _final(self, d: Dispatch, now: float) -> DispatchResult:
        """The completed result; a firming one carries its energy outside the band."""
        result = self.said.closed(d, now, "completed", None, None)
        if d.request.service != Service.FIRMING:
            return result
        out = round(self.outside_kwh.pop(d.request_id, 0.0), 4)
        self.last_net_kw.pop(d.request_id, None)
        self._close_books(d.request_id, d.end)
        result = result.model_copy(update={"outside_band_kwh": out})
        self.said.answers[d.request_id] = result
        return result

    def _close_books(self, request_id: str, end: float) -> None:
        """A firming request ended at ``end``: its last interval closes."""
        books = self.firming.pop(request_id, None)
        last = None if books is None else books.close(end)
        if last is not None:
            self.closed_intervals.append((request_id, last))

    def take_intervals(self) -> list[tuple[str, FirmingInterval]]:
        """The firming intervals closed since the last call, in order (for the ledger)."""
        out, self.closed_intervals = self.closed_intervals, []
        return out
