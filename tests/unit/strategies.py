"""Hypothesis strategies for fleets of batteries."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.physics import Batteries

NOW = 1_800_000_000.0


@st.composite
def fleets(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 40
) -> tuple[Batteries, np.ndarray, np.ndarray]:
    """(batteries, energy kWh, departure epoch or NaN) for a random fleet at time NOW."""
    n = draw(st.integers(min_size, max_size))

    def col(lo: float, hi: float) -> np.ndarray:
        return draw(arrays(np.float64, n, elements=st.floats(lo, hi, allow_nan=False)))

    cap = col(10.0, 120.0)
    min_soc = col(0.0, 0.5)
    target = col(0.0, 1.0)
    bat = Batteries(
        capacity_kwh=cap,
        max_charge_kw=col(0.0, 50.0),
        max_discharge_kw=col(0.0, 50.0),
        charge_efficiency=col(0.5, 1.0),
        discharge_efficiency=col(0.5, 1.0),
        min_soc=min_soc,
        target_soc=target,
    )
    energy = col(0.0, 1.0) * cap
    departure = NOW + col(-3600.0, 86_400.0)
    unknown = draw(arrays(np.bool_, n))
    departure = np.where(unknown, np.nan, departure)
    return bat, energy, departure
