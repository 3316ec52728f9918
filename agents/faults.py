"""Fault injection for simulated vehicles: cars that do not do quite what they are told.

Real fleets have chargers that follow setpoints only partly (a 22 kW wallbox on a car
that takes 11 kW), ramp slowly, drivers who leave before the departure they announced,
and telematics units with wrong clocks. :class:`Misbehaviour` holds one value per
vehicle for each of these; :class:`~agents.fleet.SimFleet` applies it to every vehicle
at once. The default (:meth:`Misbehaviour.none`) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from core.physics import Array

# Ranges the misbehaving vehicles draw from (simulated seconds, fractions). Of the
# skewed clocks about a third run ahead, a third behind, and a third have stopped.
FOLLOW_RATIO = (0.3, 0.8)
LAG_S = (1.0, 5.0)
EARLY_LEAVE_S = (600.0, 7200.0)
CLOCK_SKEW_S = (30.0, 300.0)

KINDS = ("partial", "lag", "early", "skew")


@dataclass(frozen=True, slots=True)
class Misbehaviour:
    """Per-vehicle faults, one element per vehicle in fleet order.

    follow_ratio: the share of a setpoint the vehicle actually draws (1 = obeys).
    lag_s: the time it takes to ramp through its whole power range (0 = at once).
    early_leave_s: how long before its announced departure it really unplugs.
    clock_skew_s: added to the timestamps it reports (+ ahead, - behind).
    clock_frozen: its clock stopped when the faults were given; it repeats that time.
    """

    follow_ratio: Array
    lag_s: Array
    early_leave_s: Array
    clock_skew_s: Array
    clock_frozen: NDArray[np.bool_]

    def __post_init__(self) -> None:
        n = self.follow_ratio.shape[0]
        for name in ("lag_s", "early_leave_s", "clock_skew_s", "clock_frozen"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one element per vehicle ({n})")
        if np.any((self.follow_ratio < 0.0) | (self.follow_ratio > 1.0)):
            raise ValueError("follow_ratio must be within 0..1")
        if np.any(self.lag_s < 0.0) or np.any(self.early_leave_s < 0.0):
            raise ValueError("lag_s and early_leave_s must be >= 0")

    def __len__(self) -> int:
        return int(self.follow_ratio.shape[0])

    @classmethod
    def none(cls, n: int) -> Misbehaviour:
        """Every vehicle behaves."""
        return cls(np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool))

    @classmethod
    def random(
        cls,
        n: int,
        seed: int,
        *,
        partial: float = 0.0,
        lag: float = 0.0,
        early: float = 0.0,
        skew: float = 0.0,
    ) -> Misbehaviour:
        """Each kind of fault on its own random share of the fleet (a vehicle may have
        several); the same seed gives the same faults."""
        for name, share in zip(KINDS, (partial, lag, early, skew), strict=True):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be a fraction 0..1, got {share}")
        # A stream of its own: the fleet profile draws from the same seed.
        rng = np.random.default_rng([seed, 0xFA])

        def pick(share: float) -> NDArray[np.bool_]:
            chosen = np.zeros(n, dtype=bool)
            chosen[rng.permutation(n)[: round(share * n)]] = True
            return chosen

        follow = np.where(pick(partial), rng.uniform(*FOLLOW_RATIO, size=n), 1.0)
        lag_s = np.where(pick(lag), rng.uniform(*LAG_S, size=n), 0.0)
        early_s = np.where(pick(early), rng.uniform(*EARLY_LEAVE_S, size=n), 0.0)
        how = rng.integers(0, 3, size=n)  # 0 ahead, 1 behind, 2 stopped
        skewed = pick(skew)
        sign = np.where(how == 0, 1.0, -1.0)
        skew_s = np.where(skewed & (how < 2), sign * rng.uniform(*CLOCK_SKEW_S, size=n), 0.0)
        return cls(follow, lag_s, early_s, skew_s, skewed & (how == 2))

    def misbehaving(self) -> NDArray[np.bool_]:
        """Which vehicles have any fault."""
        out: NDArray[np.bool_] = (
            (self.follow_ratio < 1.0)
            | (self.lag_s > 0.0)
            | (self.early_leave_s > 0.0)
            | (self.clock_skew_s != 0.0)
            | self.clock_frozen
        )
        return out


def parse_fractions(spec: str) -> dict[str, float]:
    """``"partial=0.2,lag=0.2,early=0.1,skew=0.05"`` as keyword arguments of
    :meth:`Misbehaviour.random`; kinds left out are 0."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise ValueError(
                f"expected KIND=FRACTION with KIND one of {', '.join(KINDS)}: {part!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"{name}: {value.strip()!r} is not a number") from None
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name}: {share} is not a fraction 0..1")
        out[name] = share
    return out
