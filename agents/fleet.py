"""A simulated fleet as numpy columns: plug-in and departure events, setpoints, physics.

One ``tick`` advances every vehicle at once; nothing here loops over vehicles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agents.faults import Misbehaviour
from agents.profiles import DAY_S, FleetProfile, sessions_at
from core.physics import (
    Array,
    Batteries,
    baseline_energy,
    baseline_power,
    energy_floor,
    protect,
    step_energy,
)

# A driver counts as short only when the platform cost them energy: the departure
# energy is under what plain charging from plug-in could have reached, by more than this.
SHORT_TOL_KWH = 0.05


# Feasible ranges of some vehicles: their rows, p_lo and p_hi.
Ranges = tuple[NDArray[np.intp], Array, Array]


@dataclass(slots=True)
class Departures:
    """What happened at the departures of one tick."""

    count: int
    short: int
    short_ids: list[str]
    early: int = 0  # of ``count``, how many left before their announced departure


class SimFleet:
    """The state of every simulated vehicle, advanced in lock-step by :meth:`tick`."""

    def __init__(
        self,
        profile: FleetProfile,
        start: float,
        *,
        step_s: float = 5.0,
        faults: Misbehaviour | None = None,
        warm_start: bool = False,
    ) -> None:
        """``warm_start``: a car plugged in at ``start`` holds what plain charging since its
        arrival would have put in it (a fleet started at night is mostly at its targets),
        not its arrival energy. Off by default, so a fleet made for a test starts as it
        always did: every plugged-in car at its arrival state of charge, still charging."""
        n = len(profile.ids)
        self.profile = profile
        self.ids = profile.ids
        self.index = {vid: i for i, vid in enumerate(profile.ids)}
        self.bat: Batteries = profile.batteries
        self.step_s = step_s
        self.now = start
        self.arrival, self.departure = sessions_at(profile, start)
        self.plugged: NDArray[np.bool_] = self.arrival <= start
        arrived: Array = profile.arrival_soc * self.bat.capacity_kwh
        self.energy: Array = arrived
        if warm_start:
            warm = baseline_energy(self.bat, arrived, start - self.arrival)
            self.energy = np.where(self.plugged, warm, arrived)
        self.power: Array = np.zeros(n)
        self.setpoint_kw: Array = np.zeros(n)
        self.setpoint_until: Array = np.full(n, -np.inf)
        # A charge-only cap (an OCPP ChargingOnly limit): the car charges at most this much,
        # and never more than its baseline; +inf and already over when there is none.
        self.cap_kw: Array = np.full(n, np.inf)
        self.cap_until: Array = np.full(n, -np.inf)
        self.reachable: Array = self._reachable(start)
        # Where each session started, for judging a driver who leaves early: with its
        # arrival energy, at the start (a warm car's: at its arrival).
        self.plug_t: Array = (
            np.where(self.plugged, self.arrival, start) if warm_start else np.full(n, start)
        )
        self.plug_energy: Array = arrived.copy()
        self.seq: NDArray[np.int64] = np.zeros(n, dtype=np.int64)
        self.departed = 0
        self.left_early = 0
        self.short = 0
        self.short_ids: list[str] = []
        self.faults = Misbehaviour.none(n)
        # The grid node each vehicle is under (issue 11), as it reports it; None: the
        # fleet names no nodes. A car that moves reports its new node (move_to).
        self.node: list[str | None] | None = None
        self.clock_stopped_at: Array = np.full(n, np.nan)
        if faults is not None:
            self.misbehave(faults)
        self._decide(start, np.inf)

    def __len__(self) -> int:
        return len(self.ids)

    def _reachable(self, now: float) -> Array:
        """What plain charging could put in the battery by departure, capped at the target."""
        bat = self.bat
        hours = np.maximum(self.departure - now, 0.0) / 3600.0
        gain = bat.max_charge_kw * bat.charge_efficiency * hours
        return np.minimum(bat.target_soc * bat.capacity_kwh, self.energy + gain)

    def misbehave(self, faults: Misbehaviour) -> None:
        """Give the vehicles faults from now on (see :mod:`agents.faults`)."""
        if len(faults) != len(self.ids):
            raise ValueError(f"faults for {len(faults)} vehicles, the fleet has {len(self.ids)}")
        self.faults = faults
        self.clock_stopped_at = np.where(faults.clock_frozen, self.now, np.nan)

    def leave_at(self) -> Array:
        """When each vehicle really unplugs: its announced departure, or earlier if it
        leaves early (never before it arrived)."""
        return np.maximum(self.arrival, self.departure - self.faults.early_leave_s)

    def departure_or_nan(self) -> Array:
        """Announced departure of plugged-in vehicles; NaN for those on the road."""
        return np.where(self.plugged, self.departure, np.nan)

    def place(self, nodes: list[str | None]) -> None:
        """Put each vehicle under a grid node (one entry per vehicle, None: none)."""
        if len(nodes) != len(self.ids):
            raise ValueError(f"nodes for {len(nodes)} vehicles, the fleet has {len(self.ids)}")
        self.node = list(nodes)

    def move_to(self, index: int, node: str | None) -> None:
        """One vehicle is now under ``node``: its next report says so."""
        if self.node is None:
            self.node = [None] * len(self.ids)
        self.node[index] = node

    def set_setpoint(self, index: int, power_kw: float, valid_until: float) -> None:
        """Record a setpoint for one vehicle; it takes effect at the next tick."""
        self.setpoint_kw[index] = power_kw
        self.setpoint_until[index] = valid_until

    def set_cap(self, index: int, cap_kw: float, valid_until: float) -> None:
        """Cap one vehicle's charging (a limit, not a setpoint: it charges at
        min(baseline, cap)); it takes effect at the next tick."""
        self.cap_kw[index] = max(cap_kw, 0.0)
        self.cap_until[index] = valid_until

    def tick(self, now: float) -> Departures:
        """Advance to ``now``: apply the power held since the last tick, then events, then
        choose the power to hold until the next tick."""
        dt = now - self.now
        if dt < 0:
            raise ValueError(f"time went backwards: {now} < {self.now}")
        if dt > 0:
            self.energy = step_energy(self.bat, self.energy, self.power, dt)
        self.now = now
        out = self._events(now)
        self._decide(now, dt)
        return out

    def _events(self, now: float) -> Departures:
        bat = self.bat
        leaving = self.plugged & (self.leave_at() <= now)
        n_leave = int(leaving.sum())
        short_ids: list[str] = []
        n_short = n_early = 0
        if n_leave:
            early = leaving & (now < self.departure)
            n_early = int(early.sum())
            # A driver who leaves before the departure they announced was only promised
            # the floor for that departure, and never less than plain charging so far.
            plain = np.minimum(
                bat.target_soc * bat.capacity_kwh,
                self.plug_energy
                + bat.max_charge_kw * bat.charge_efficiency * (now - self.plug_t) / 3600.0,
            )
            owed = np.where(
                early,
                np.minimum(plain, energy_floor(bat, self.departure, now)),
                self.reachable,
            )
            short = leaving & (self.energy < owed - SHORT_TOL_KWH)
            n_short = int(short.sum())
            short_ids = [self.ids[i] for i in np.flatnonzero(short)]
            self.plugged = self.plugged & ~leaving
            # The next session is tomorrow; the car comes back with what driving left it.
            self.arrival = np.where(leaving, self.arrival + DAY_S, self.arrival)
            self.departure = np.where(leaving, self.departure + DAY_S, self.departure)
            self.setpoint_until = np.where(leaving, -np.inf, self.setpoint_until)
            self.cap_until = np.where(leaving, -np.inf, self.cap_until)
        arriving = ~self.plugged & (self.arrival <= now) & (now < self.departure)
        if arriving.any():
            self.plugged = self.plugged | arriving
            self.energy = np.where(
                arriving, self.profile.arrival_soc * bat.capacity_kwh, self.energy
            )
            self.reachable = np.where(arriving, self._reachable(now), self.reachable)
            self.plug_t = np.where(arriving, now, self.plug_t)
            self.plug_energy = np.where(arriving, self.energy, self.plug_energy)
        self.departed += n_leave
        self.left_early += n_early
        self.short += n_short
        self.short_ids.extend(short_ids)
        return Departures(n_leave, n_short, short_ids, n_early)

    def _decide(self, now: float, dt: float, ranges: Ranges | None = None) -> None:
        """Choose the power to hold until the next tick; ``dt`` is the time since the last.

        ``ranges`` are the plugged-in vehicles' feasible ranges for the step from this very
        state, (rows, p_lo, p_hi) as ``feasible_range`` gives them, when the caller has
        computed them already (the simulation's dispatcher has, on the same columns)."""
        bat = self.bat
        step_s = self.step_s
        f = self.faults
        following = now < self.setpoint_until
        base = baseline_power(bat, self.energy, step_s)
        capped = now < self.cap_until
        if capped.any():
            base = np.where(capped, np.minimum(base, self.cap_kw), base)
        wanted = np.where(following, self.setpoint_kw * f.follow_ratio, base)
        slow = f.lag_s > 0.0
        if slow.any() and np.isfinite(dt):  # a fleet just made starts where it wants
            # A slow charger crosses its whole range (full charge to full discharge) in
            # lag_s; it starts from what it held, or from 0 if it just plugged in.
            span = bat.max_charge_kw + bat.max_discharge_kw
            reach = span * dt / np.where(slow, f.lag_s, 1.0)
            moved = self.power + np.clip(wanted - self.power, -reach, reach)
            wanted = np.where(slow, moved, wanted)
        # Protection comes after the faults: a misbehaving car still guards its driver.
        if ranges is None:
            held = protect(bat, self.energy, self.departure, now, step_s, wanted)
            self.power = np.where(self.plugged, held, 0.0)
        else:
            # protect() is this clip: under its floor a car's p_lo is its p_hi already.
            rows, p_lo, p_hi = ranges
            power = np.zeros(len(self.ids))
            power[rows] = np.minimum(np.maximum(wanted[rows], p_lo), p_hi)
            self.power = power

    def soc(self) -> Array:
        return self.energy / self.bat.capacity_kwh
