"""The scores a grid operator settles frequency services on: a PJM-style performance score
for regulation and the droop and activation check of frequency containment (FCR).

Pure numpy, samples in and scores out; nothing here knows where the samples came from.
Regulation works on fractions of the offered capacity (signal and response in -1..1),
sampled every ``sample_s`` seconds and aligned in time; the response is the fleet's power
minus its baseline, divided by the capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray

SAMPLE_S = 10.0  # PJM scores 10 s samples
WINDOW_S = 300.0  # ... in 5-minute windows
MAX_DELAY_S = 300.0  # ... searching delays of 0 to 5 minutes

FLAT = 1e-9  # of the capacity: a signal or response that moves less has no shape to score

FCR_NOMINAL_HZ = 50.0
FCR_DEADBAND_HZ = 0.010
FCR_FULL_HZ = 0.200
FCR_FULL_WITHIN_S = 30.0


@dataclass(frozen=True, slots=True)
class RegulationScore:
    """Sub-scores in 0..1 averaged over the windows; ``composite`` is their mean."""

    correlation: float
    delay: float
    precision: float
    windows: int

    @property
    def composite(self) -> float:
        parts = [p for p in (self.correlation, self.delay, self.precision) if not math.isnan(p)]
        return float(np.mean(parts)) if parts else math.nan


def _as_1d(x: ArrayLike, name: str) -> NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite samples; drop or fill them first")
    return a


def regulation_score(
    signal: ArrayLike,
    response: ArrayLike,
    *,
    sample_s: float = SAMPLE_S,
    window_s: float = WINDOW_S,
    max_delay_s: float = MAX_DELAY_S,
) -> RegulationScore:
    """PJM-style performance score of a response to a regulation signal.

    For each whole window: the correlation score is the highest Pearson correlation
    between the window's signal and the response shifted by 0 to ``max_delay_s`` (in
    sample steps, as far as the response reaches); the delay score is
    ``|(d - max_delay) / max_delay|`` for the shift ``d`` where it peaks (1 for no delay);
    the precision score is ``1 - mean|response - signal| / mean|signal|`` without shift.
    Windows whose signal or response is flat have no correlation or delay score; they
    still count for precision. Sub-scores are clipped to 0..1 and averaged over windows.
    """
    sig = _as_1d(signal, "signal")
    resp = _as_1d(response, "response")
    if sig.shape != resp.shape:
        raise ValueError(f"signal and response differ in length: {sig.size} vs {resp.size}")
    if not (sample_s > 0 and window_s >= sample_s and max_delay_s >= 0):
        raise ValueError("need sample_s > 0, window_s >= sample_s and max_delay_s >= 0")
    w = round(window_s / sample_s)
    k_max = round(max_delay_s / sample_s)
    n_win = sig.size // w
    if n_win == 0:
        raise ValueError(f"need at least one {window_s:g} s window of samples, got {sig.size}")
    corr, delay, prec = [], [], []
    for i in range(n_win):
        a = sig[i * w : (i + 1) * w]
        mean_abs = float(np.abs(a).mean())
        if mean_abs > FLAT:
            err = np.abs(resp[i * w : (i + 1) * w] - a).mean() / mean_abs
            prec.append(min(1.0, max(0.0, 1.0 - float(err))))
        reach = min(k_max, resp.size - (i + 1) * w)
        shifted = sliding_window_view(resp[i * w : (i + 1) * w + reach], w)  # (reach+1, w)
        a_c = a - a.mean()
        s_c = shifted - shifted.mean(axis=1, keepdims=True)
        denom = np.sqrt((a_c @ a_c) * np.einsum("ij,ij->i", s_c, s_c))
        if float(np.abs(a_c).max()) <= FLAT:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(np.abs(s_c).max(axis=1) > FLAT, (s_c @ a_c) / denom, np.nan)
        if np.all(np.isnan(r)):
            continue
        best = int(np.nanargmax(r))
        corr.append(min(1.0, max(0.0, float(r[best]))))
        delay.append(abs((best - k_max) / k_max) if k_max else 1.0)
    return RegulationScore(_mean(corr), _mean(delay), _mean(prec), n_win)


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def fcr_activation(
    frequency_hz: ArrayLike,
    *,
    nominal_hz: float = FCR_NOMINAL_HZ,
    deadband_hz: float = FCR_DEADBAND_HZ,
    full_hz: float = FCR_FULL_HZ,
) -> NDArray[np.float64]:
    """Required activation in -1..1 for each frequency: 0 inside the deadband, linear to
    full at ``full_hz`` off nominal. Positive above nominal (the fleet must absorb, i.e.
    charge more), negative below (it must export); multiply by the capacity for kW."""
    if not 0 <= deadband_hz < full_hz:
        raise ValueError(f"need 0 <= deadband ({deadband_hz}) < full activation ({full_hz}) Hz")
    dev = np.asarray(frequency_hz, dtype=np.float64) - nominal_hz
    beyond = np.maximum(np.abs(dev) - deadband_hz, 0.0)
    out: NDArray[np.float64] = np.clip(np.sign(dev) * beyond / (full_hz - deadband_hz), -1.0, 1.0)
    return out


def fcr_delivered_share(
    t: ArrayLike,
    required_kw: ArrayLike,
    delivered_kw: ArrayLike,
    *,
    step_at: float,
    within_s: float = FCR_FULL_WITHIN_S,
) -> float:
    """Share of a step in required activation that was delivered ``within_s`` after it.

    ``required_kw`` and ``delivered_kw`` are changes from the fleet's power before the
    step, sampled at times ``t``; the delivered change at ``step_at + within_s`` is read by
    linear interpolation and divided by the required change there. 1.0 means full.
    """
    tt = _as_1d(t, "t")
    req = _as_1d(required_kw, "required_kw")
    got = _as_1d(delivered_kw, "delivered_kw")
    if not (tt.size == req.size == got.size) or tt.size < 2:
        raise ValueError("t, required_kw and delivered_kw need the same length, at least 2")
    at = step_at + within_s
    if not tt[0] <= at <= tt[-1]:
        raise ValueError(f"no samples around {within_s:g} s after the step")
    need = float(np.interp(at, tt, req))
    if need == 0.0:
        raise ValueError("the required activation is zero there: nothing to check")
    return float(np.interp(at, tt, got)) / need
