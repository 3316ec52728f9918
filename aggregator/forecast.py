"""Availability forecast: for each of the next 24 hourly market periods, the range of fleet
net power the fleet can offer, with a stated confidence.

Two sources, both vectorised:

- **history**: the one-hour capability the fleet actually had, sampled at every control
  step and binned by hour of day (UTC). The forecast for a period is a low quantile of what
  was seen in that hour (the 10th percentile of export and of import headroom for 90%
  confidence): plug-in and departure habits are in it, arrivals included.
- **the vehicles here now**: each plugged-in vehicle counts, for every period that ends
  before its announced departure, with the one-hour range it has now. That is what the
  fleet has for sure (if drivers keep to what they announced); it holds no arrivals.

A period's forecast is the wider of the two where the hour has enough history, else the
vehicles-here projection alone, reported with confidence 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from core.physics import Array

HOURS = 24
PERIOD_S = 3600.0
CONFIDENCE = 0.9
MIN_SAMPLES = 12  # of an hour of day before its history is trusted
MAX_SAMPLES = 2048  # per hour of day: two weeks of 5 s steps is more than enough spread


@dataclass(frozen=True, slots=True)
class PeriodForecast:
    start: float  # epoch seconds, on the hour
    min_power_kw: float  # most the fleet can export for the whole period (<= 0 if any)
    max_power_kw: float  # most it can import
    confidence: float  # probability the fleet has at least this range; 0 = no history
    samples: int


def hour_of_day(t: float) -> int:
    return int((t % 86_400.0) // 3600.0)


@dataclass
class ForecastModel:
    """What the fleet could hold for an hour, as seen, binned by hour of day."""

    confidence: float = CONFIDENCE
    min_samples: int = MIN_SAMPLES
    max_samples: int = MAX_SAMPLES
    _lo: NDArray[np.float64] = field(init=False)
    _hi: NDArray[np.float64] = field(init=False)
    _count: NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        self._lo = np.full((HOURS, self.max_samples), np.nan)
        self._hi = np.full((HOURS, self.max_samples), np.nan)
        self._count = np.zeros(HOURS, dtype=np.int64)

    def observe(self, now: float, min_power_kw: float, max_power_kw: float) -> None:
        """Record the one-hour capability the fleet had at ``now`` (a ring per hour)."""
        if not (math.isfinite(min_power_kw) and math.isfinite(max_power_kw)):
            return
        h = hour_of_day(now)
        slot = int(self._count[h] % self.max_samples)
        self._lo[h, slot], self._hi[h, slot] = min_power_kw, max_power_kw
        self._count[h] += 1

    def samples(self) -> NDArray[np.int64]:
        return np.minimum(self._count, self.max_samples)

    def forecast(
        self,
        now: float,
        lo_1h: Array,
        hi_1h: Array,
        departure: Array,
    ) -> list[PeriodForecast]:
        """The next 24 whole hours from ``now``.

        ``lo_1h``/``hi_1h`` are the one-hour ranges of the vehicles plugged in now and
        ``departure`` their announced departures (NaN: unknown, counted for no period).
        """
        first = (math.floor(now / PERIOD_S) + 1) * PERIOD_S
        starts = first + PERIOD_S * np.arange(HOURS)
        ends = starts + PERIOD_S
        # Vehicles here now that stay to the end of each period: (24, n) mask, one matmul.
        stays = (np.nan_to_num(departure, nan=-np.inf)[None, :] >= ends[:, None]).astype(np.float64)
        here_lo = stays @ np.minimum(lo_1h, 0.0)  # export headroom only
        here_hi = stays @ np.maximum(hi_1h, 0.0)
        hours = ((starts % 86_400.0) // PERIOD_S).astype(np.intp)
        q = 1.0 - self.confidence
        n = self.samples()[hours]
        with warnings.catch_warnings():
            # nanquantile warns on hours never seen (all NaN); they are handled below.
            warnings.simplefilter("ignore", RuntimeWarning)
            # Export: the least negative of the low quantile is the cautious offer.
            hist_lo = np.nanquantile(self._lo[hours], 1.0 - q, axis=1)
            hist_hi = np.nanquantile(self._hi[hours], q, axis=1)
        known = n >= self.min_samples
        lo = np.where(known, np.minimum(here_lo, np.nan_to_num(hist_lo, nan=0.0)), here_lo)
        hi = np.where(known, np.maximum(here_hi, np.nan_to_num(hist_hi, nan=0.0)), here_hi)
        return [
            PeriodForecast(
                start=float(starts[i]),
                min_power_kw=round(float(lo[i]), 3),
                max_power_kw=round(float(hi[i]), 3),
                confidence=self.confidence if known[i] else 0.0,
                samples=int(n[i]),
            )
            for i in range(HOURS)
        ]
