"""Sample inputs that tests of several packages share: a valid telemetry message and a
regulation-like signal."""

from __future__ import annotations

from typing import Any

import numpy as np

GOOD: dict[str, Any] = {
    "vehicle_id": "ev-0001",
    "seq": 3,
    "ts": "2026-11-26T18:00:00Z",
    "plugged_in": True,
    "soc": 0.5,
    "capacity_kwh": 60,
    "power_kw": -7.4,
    "max_charge_kw": 11,
    "max_discharge_kw": 11,
    "charge_efficiency": 0.95,
    "discharge_efficiency": 0.93,
    "min_soc": 0.2,
    "target_soc": 0.8,
    "departure": "2026-11-27T07:30:00+00:00",
}


def regd_like(n: int, seed: int = 1) -> np.ndarray:
    """A fast, roughly energy-neutral signal in -1..1 (smoothed noise)."""
    rng = np.random.default_rng(seed)
    x = np.convolve(rng.standard_normal(n + 8), np.ones(8) / 8, mode="valid")[:n]
    return np.clip(x / (np.abs(x).max() or 1.0), -1.0, 1.0)
