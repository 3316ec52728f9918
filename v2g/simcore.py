"""The headless simulation loop: the simulated fleet and the dispatcher on a discrete clock.

Pure and synchronous, no MQTT, no store: the same vehicle physics and driver profiles
(``agents.fleet.SimFleet``) and the same dispatcher (``aggregator.dispatch.Dispatcher``)
that the live platform runs, coupled directly through numpy arrays. Every step costs a
handful of array passes over the fleet; nothing loops over vehicles.

One step at time t, of length step_s:

1. the fleet advances to t (``SimFleet.tick``): energy for the power held since the last
   step, departures and arrivals;
2. the plugged-in vehicles form a ``FleetView`` (their power is what the meter saw over
   the last step, the meter the energy through every charger up to t);
3. requests due at t go into the step's inbox (a regulation signal becomes one request
   per step, power = baseline + value * capacity);
4. the aggregator's own control step (``ControlStep.decide``, aggregator/control_step.py:
   the same code that answers operator messages and steps the dispatcher in the live
   service) admits the requests and decides setpoints, which the vehicles take at once
   (their choice of power at t waits for them: :class:`SteeredFleet`) and hold, within
   their own limits, until t + step_s.

The dispatcher runs with control_step_s = step_s and setpoints that live three steps,
so a setpoint never lapses between two steps of a long request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from agents.fleet import Ranges, SimFleet
from agents.profiles import FleetProfile
from aggregator.control_step import ControlStep
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetView
from aggregator.inbox import Inbox
from broker.models import DispatchRequest, DispatchResult, Service, from_epoch
from broker.settings import Settings
from core.physics import Array, Batteries


@dataclass(frozen=True, slots=True)
class Regulation:
    """A signal to follow: at step i inside [start, end) the fleet is asked for
    baseline_kw + values[i] * capacity_kw, as a request of one step."""

    start: float
    end: float
    capacity_kw: float
    values: Array  # one value per simulation step (NaN outside the window)
    id_prefix: str = "reg"
    service: Service = Service.MANUAL


@dataclass(slots=True)
class RequestRecord:
    """What became of one request: its admission answer and its closing result."""

    request: DispatchRequest
    start: float
    submitted_at: float | None = None
    admission: DispatchResult | None = None
    final: DispatchResult | None = None
    note: str = ""


@dataclass(slots=True)
class SimResult:
    """Per-step series, per-request records and per-vehicle totals of one run."""

    t: Array  # start of each step, epoch s
    step_s: float
    plugged: NDArray[np.int64]
    fleet_kw: Array  # net power held over the step (+ charging)
    baseline_kw: Array  # plain charging of the plugged-in fleet at the step's start
    requested_kw: Array  # the active request's power (NaN when none)
    allocated_kw: Array
    request_id: list[str]
    signal: Array  # regulation value (NaN outside)
    energy_kwh: Array  # energy stored in the plugged-in vehicles at the step's start
    meter_kwh: Array  # energy through every charger since the start, at the step's end
    departures: NDArray[np.int64]
    short: NDArray[np.int64]
    requests: list[RequestRecord]
    throughput_kwh: Array  # per vehicle: sum |P| h through its charger
    discharged_kwh: Array  # per vehicle: energy it sent to the grid
    ever_plugged: NDArray[np.bool_]
    capacity_kwh: Array  # per vehicle
    departed: int = 0
    short_total: int = 0
    short_ids: list[str] = field(default_factory=list)

    @property
    def vehicles(self) -> int:
        return int(self.throughput_kwh.shape[0])

    @property
    def steps(self) -> int:
        return int(self.t.shape[0])


class SteeredFleet(SimFleet):
    """A ``SimFleet`` whose vehicles choose their power only when told to (:meth:`decide`).

    ``tick`` still applies the power held since the last tick and the departures and
    arrivals; the choice of the power to hold next waits until the dispatcher has spoken,
    so setpoints decided at a tick are taken at that tick, and each tick costs one
    decision instead of two (decide with the old setpoints, then again with the new).
    """

    _pending: tuple[float, float] | None = None

    def _decide(self, now: float, dt: float, ranges: Ranges | None = None) -> None:
        self._pending = (now, dt)

    def decide(self, ranges: Ranges | None = None) -> None:
        """Choose every vehicle's power for the coming step, with the setpoints as they are
        (``ranges``: the plugged-in vehicles' feasible ranges for it, if already known)."""
        if self._pending is not None:
            (now, dt), self._pending = self._pending, None
            super()._decide(now, dt, ranges)


def fleet_view(fleet: SimFleet, now: float, held: Array, meter_kwh: float) -> FleetView:
    """The plugged-in vehicles as the dispatcher sees them, straight from the fleet's columns
    (rows are fleet indices; ``held`` is what each drew over the last step)."""
    rows = np.flatnonzero(fleet.plugged)
    return FleetView(
        rows=rows,
        batteries=fleet.bat.take(rows),
        energy=fleet.energy[rows],
        departure=fleet.departure[rows],
        power=held[rows],
        ts=np.full(rows.shape[0], now),
        meter_kwh=meter_kwh,
    )


def make_dispatcher(step_s: float, bat: Batteries | None = None) -> Dispatcher:
    """The dispatcher as the simulation runs it: one control step per simulated step, and a
    sanity limit on request power no lower than what every charger of the fleet could do."""
    limit = 1_000_000.0
    if bat is not None:
        limit = max(limit, float(np.maximum(bat.max_charge_kw, bat.max_discharge_kw).sum()))
    return Dispatcher(control_step_s=step_s, setpoint_ttl_s=3.0 * step_s, max_request_kw=limit)


class Simulation:
    """Runs a fleet profile against requests (and a signal) from ``start`` for ``steps``."""

    def __init__(
        self,
        profile: FleetProfile,
        *,
        start: float,
        step_s: float,
        steps: int,
        requests: list[DispatchRequest] | None = None,
        regulation: Regulation | None = None,
    ) -> None:
        if steps < 1 or step_s <= 0:
            raise ValueError(f"need steps >= 1 and step_s > 0, got {steps} and {step_s}")
        self.profile = profile
        self.start = start
        self.step_s = step_s
        self.steps = steps
        self.regulation = regulation
        self.records = [
            RequestRecord(r, start if r.start is None else r.start.timestamp())
            for r in sorted(
                requests or [], key=lambda r: 0.0 if r.start is None else r.start.timestamp()
            )
        ]
        if regulation is not None and regulation.values.shape[0] != steps:
            raise ValueError("regulation.values needs one value per step")

    def run(self, on_step: Callable[[int], None] | None = None) -> SimResult:
        """Simulate every step; ``on_step(i)`` is called after each (for a progress bar)."""
        n, steps, step_s, h = len(self.profile.ids), self.steps, self.step_s, self.step_s / 3600.0
        fleet = SteeredFleet(self.profile, self.start, step_s=step_s)
        disp = make_dispatcher(step_s, self.profile.batteries)
        control = ControlStep(
            settings=Settings(control_step_s=step_s, telemetry_interval_s=step_s),
            dispatcher=disp,
        )
        reg = self.regulation
        # Fresh records every run: a Simulation can be run again and gives the same result.
        records = [RequestRecord(r.request, r.start) for r in self.records]
        pending = list(records)
        held = np.zeros(n)
        meter = 0.0
        abs_kw_sum = np.zeros(n)  # per vehicle, sum over steps of |P| (times h at the end)
        net_kw_sum = np.zeros(n)  # per vehicle, sum over steps of P
        ever = fleet.plugged.copy()
        by_id = {r.request.request_id: r for r in records}

        t_arr = self.start + step_s * np.arange(steps, dtype=np.float64)
        plugged = np.zeros(steps, np.int64)
        fleet_kw = np.zeros(steps)
        base_kw = np.zeros(steps)
        req_kw = np.full(steps, np.nan)
        alloc_kw = np.full(steps, np.nan)
        req_id = [""] * steps
        signal = np.full(steps, np.nan)
        energy = np.zeros(steps)
        meter_arr = np.zeros(steps)
        departures = np.zeros(steps, np.int64)
        short = np.zeros(steps, np.int64)

        for i in range(steps):
            now = float(t_arr[i])
            if i:
                dep = fleet.tick(now)
                departures[i], short[i] = dep.count, dep.short
                ever |= fleet.plugged
            view = fleet_view(fleet, now, held, meter)
            base = disp.baseline(view)
            inbox = Inbox()
            submitted: list[RequestRecord] = []
            # Requests due by now, in start order (a request is submitted at the first step
            # at or after its start, so the dispatcher takes it as starting now).
            while pending and pending[0].start <= now + 1e-9:
                rec = pending.pop(0)
                self._queue(disp, rec, now, view, inbox, submitted)
            if reg is not None and reg.start <= now + 1e-9 and now < reg.end - 1e-9:
                value = float(reg.values[i])
                signal[i] = value
                rid = f"{reg.id_prefix}-{i:06d}"
                rec = RequestRecord(
                    DispatchRequest(
                        request_id=rid,
                        service=reg.service,
                        power_kw=base + value * reg.capacity_kw,
                        duration_s=min(step_s, reg.end - now),
                    ),
                    now,
                )
                records.append(rec)
                by_id[rid] = rec
                self._queue(disp, rec, now, view, inbox, submitted)
            decision = control.decide(inbox, now, view, n)
            admissions = {a.request_id: a for a in decision.answers}
            for rec in submitted:
                rec.admission = admissions.get(rec.request.request_id)
                if rec.admission is not None and rec.admission.status == "rejected":
                    rec.final = rec.admission
            out = decision.output
            for res in out.results:
                rec_ = by_id.get(res.request_id)
                if rec_ is not None:
                    if res.status in ("completed", "cancelled"):
                        rec_.final = res
                    elif res.status != "started":  # re-admission at a scheduled start
                        rec_.admission = res
            fleet.setpoint_kw[out.rows] = out.power_kw
            fleet.setpoint_until[out.rows] = out.valid_until
            fleet.setpoint_until[out.release_rows] = now
            # The vehicles take their setpoints at once, within their limits: the ranges the
            # dispatcher computed from the same columns (one pass of the physics, not two).
            fleet.decide((view.rows, *disp.ranges(view, now, step_s)))
            active = next((d for d in disp.dispatches.values() if d.state == "active"), None)
            if active is not None:
                req_kw[i], alloc_kw[i], req_id[i] = (
                    active.requested_kw,
                    active.allocated_kw,
                    active.request_id,
                )
            held = fleet.power
            total = float(held.sum())
            meter += total * h
            np.add(abs_kw_sum, np.abs(held), out=abs_kw_sum)
            np.add(net_kw_sum, held, out=net_kw_sum)
            plugged[i] = len(view)
            fleet_kw[i] = total
            base_kw[i] = base
            energy[i] = float(view.energy.sum())
            meter_arr[i] = meter
            if on_step is not None:
                on_step(i)

        # Close the books at the end: requests that end by then complete, others are cut.
        end = self.start + steps * step_s
        dep = fleet.tick(end)
        if steps:
            departures[-1] += dep.count
            short[-1] += dep.short
        view = fleet_view(fleet, end, held, meter)
        for res in control.decide(Inbox(), end, view, n).output.results:
            if res.request_id in by_id and res.status in ("completed", "cancelled"):
                by_id[res.request_id].final = res
        for rid in list(disp.dispatches):
            cut = disp.cancel(rid, end, view)
            if cut is not None and rid in by_id:
                by_id[rid].final = cut
                by_id[rid].note = "still running when the simulation ended"
        for rec in pending:
            rec.note = "starts after the simulation ends"
        return SimResult(
            t=t_arr,
            step_s=step_s,
            plugged=plugged,
            fleet_kw=fleet_kw,
            baseline_kw=base_kw,
            requested_kw=req_kw,
            allocated_kw=alloc_kw,
            request_id=req_id,
            signal=signal,
            energy_kwh=energy,
            meter_kwh=meter_arr,
            departures=departures,
            short=short,
            requests=records,
            throughput_kwh=abs_kw_sum * h,
            # |P| - P = 2 max(-P, 0): what went to the grid, from the two running sums.
            discharged_kwh=np.maximum(0.5 * (abs_kw_sum - net_kw_sum) * h, 0.0),
            ever_plugged=ever,
            capacity_kwh=self.profile.batteries.capacity_kwh,
            departed=fleet.departed,
            short_total=fleet.short,
            short_ids=list(fleet.short_ids),
        )

    @staticmethod
    def _queue(
        disp: Dispatcher,
        rec: RequestRecord,
        now: float,
        view: FleetView,
        inbox: Inbox,
        submitted: list[RequestRecord],
    ) -> None:
        """Put a due request in the step's inbox (answered by the control step)."""
        req = rec.request
        if req.start is not None and req.start.timestamp() < now:
            # Due between two steps: it starts at this step (the dispatcher refuses a start
            # more than one step in the past, and this one is not late, only on the grid).
            req = req.model_copy(update={"start": from_epoch(now)})
            rec.request = req
        rec.submitted_at = now
        if disp.reuses_id(req):
            # The control step answers this one to its sender alone (a request id already
            # taken); the simulation records the refusal as the dispatcher gives it.
            rec.admission = rec.final = disp.submit(req, now, view)
            return
        inbox.requests.append((req, None))
        submitted.append(rec)
