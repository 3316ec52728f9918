"""Requests that name a grid node (issue 11): served by the vehicles under that node only,
their net power being the request's ``power_kw``.

Each running one is a band on its node's vehicles' total that the nested allocation
holds after the limits and the drivers' floors (aggregator/grid_alloc.py), so requests
on different nodes run at the same time, beside the fleet's own stack. Admission weighs
the subtree's range for the window inside the headroom of the node and of every
ancestor, given what the rest of the fleet under them draws now; a partial answer names
the node (or the vehicles) that binds.

Owns the node requests (scheduled and running) and their books: requested energy, and
delivered energy from the subtree's measured power held between steps.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from aggregator.dispatch import answers as wire
from aggregator.dispatch.ranges import FleetRanges
from aggregator.dispatch.records import Dispatch
from aggregator.fleet_state import FleetView
from aggregator.grid_alloc import subtree_sums
from aggregator.grid_state import GridNow, GridState
from broker.models import DispatchProgress, DispatchRequest, DispatchResult, Service, to_epoch

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

    def _under(self, j: int, vnode: NDArray[np.intp]) -> NDArray[np.bool_]:
        under: NDArray[np.bool_] = (vnode >= j) & (vnode < self.grid.grid.end[j])
        return under

    def problem(self, req: DispatchRequest) -> str | None:
        """Why a node-targeted request cannot be served (before the general checks)."""
        if req.service == Service.FIRMING:
            return "service firming is not served yet: ask for power_kw on the node"
        if req.power_kw is None:
            return (
                f"service {req.service.value} on a node is not served yet: node-targeted"
                " requests take power_kw"
            )
        if req.node not in self.grid.grid.index:
            return f"node {req.node!r} is not in the grid file: see 'v2g grid show FILE'"
        return None

    def submit(self, req: DispatchRequest, now: float, view: FleetView) -> DispatchResult:
        """Answer a request with ``node``: accepted, partial (naming what binds) or
        rejected; one for later is checked at its start."""
        seen = self.said.terms.get(req.request_id)
        if seen is not None:
            if seen != req:
                return self.said.result(
                    req.request_id,
                    "rejected",
                    now,
                    reason=wire.REUSED_ID,
                    requested_kw=req.power_kw,
                    remember=False,
                )
            return self.said.answers[req.request_id]
        self.said.terms[req.request_id] = req
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

    def running(self) -> list[Dispatch]:
        return [d for d in self.dispatches.values() if d.state == "active"]

    def cancel(self, request_id: str, now: float, view: FleetView) -> DispatchResult | None:
        d = self.dispatches.pop(request_id, None)
        if d is None:
            return None
        if d.state == "active":
            self._book(d, now, view, self.grid.vehicle_nodes(view))
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
        for d in list(self.dispatches.values()):
            if d.state == "active":
                self._book(d, now, view, vnode)
                if d.over(now):
                    del self.dispatches[d.request_id]
                    results.append(self.said.closed(d, now, "completed", None, None))
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
        for d in run:
            j = self.grid.grid.index[str(d.request.node)]
            want[j] += d.allocated_kw
            has[j] = True
        meter0 = np.nan_to_num(g.meter_kw, nan=0.0)
        band = meter0 + want
        lo = np.where(has, band, -np.inf)
        hi = np.where(has, band, np.inf)
        progress = [wire.progress(d, now, None, None) for d in run]
        return results, progress, (lo, hi)
