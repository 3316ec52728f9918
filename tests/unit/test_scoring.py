"""The settlement scores: PJM-style regulation performance and the FCR droop check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.scoring import fcr_activation, fcr_delivered_share, regulation_score
from tests.support.samples import regd_like

HOUR = 360  # 10 s samples


def test_a_perfect_follower_scores_one_on_everything() -> None:
    sig = regd_like(HOUR)
    s = regulation_score(sig, sig)
    assert (s.correlation, s.delay, s.precision, s.windows) == pytest.approx((1, 1, 1, 12))
    assert s.composite == pytest.approx(1.0)


def test_a_late_follower_loses_on_delay_and_precision_but_not_correlation() -> None:
    sig = regd_like(HOUR + 3)
    late = np.concatenate([np.zeros(3), sig[:-3]])  # 30 s behind
    s = regulation_score(sig, late)
    assert s.correlation > 0.99
    assert s.delay == pytest.approx(1 - 3 / 30)  # 30 s of a 5-minute allowance
    assert s.precision < 0.9


def test_a_half_hearted_follower_correlates_but_is_imprecise() -> None:
    sig = regd_like(HOUR)
    s = regulation_score(sig, 0.5 * sig)
    assert s.correlation == pytest.approx(1.0)
    assert s.delay == pytest.approx(1.0)
    assert s.precision == pytest.approx(0.5)


def test_noise_does_not_score_well() -> None:
    sig = regd_like(HOUR, seed=1)
    s = regulation_score(sig, regd_like(HOUR, seed=2))
    assert s.composite < 0.6


def test_bad_input_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        regulation_score(np.zeros(60), np.zeros(59))
    with pytest.raises(ValueError, match="NaN"):
        regulation_score(np.full(60, np.nan), np.zeros(60))
    with pytest.raises(ValueError, match="window"):
        regulation_score(np.zeros(10), np.zeros(10))


@given(
    sig=arrays(np.float64, 90, elements=st.floats(-1, 1)),
    resp=arrays(np.float64, 90, elements=st.floats(-2, 2)),
)
def test_every_sub_score_lies_in_zero_to_one(sig: np.ndarray, resp: np.ndarray) -> None:
    s = regulation_score(sig, resp)
    for part in (s.correlation, s.delay, s.precision, s.composite):
        assert math.isnan(part) or 0.0 <= part <= 1.0
    assert s.windows == 3


def test_fcr_droop_has_a_deadband_and_full_activation_at_200_mhz() -> None:
    f = np.array([50.0, 50.009, 49.991, 50.105, 49.895, 50.2, 49.8, 50.5, 49.0])
    a = fcr_activation(f)
    assert a[:3] == pytest.approx([0, 0, 0])
    assert a[3] == pytest.approx(0.5, abs=1e-9) and a[4] == pytest.approx(-0.5, abs=1e-9)
    assert list(a[5:]) == pytest.approx([1, -1, 1, -1])  # full, and no more than full


@given(st.lists(st.floats(49.0, 51.0), min_size=2, max_size=50))
def test_fcr_activation_rises_with_frequency(freqs: list[float]) -> None:
    f = np.sort(np.array(freqs))
    a = fcr_activation(f)
    assert np.all(np.diff(a) >= -1e-12)
    assert np.all(np.abs(a) <= 1.0)


def test_fcr_check_reads_the_share_delivered_30_s_after_a_step() -> None:
    t = np.arange(0.0, 61.0, 1.0)
    required = np.where(t >= 10.0, -400.0, 0.0)  # under-frequency at t = 10 s: export 400 kW
    delivered = np.where(t >= 10.0, -400.0 * (1 - np.exp(-(t - 10.0) / 8.0)), 0.0)
    share = fcr_delivered_share(t, required, delivered, step_at=10.0)
    assert share == pytest.approx(1 - math.exp(-30 / 8), rel=1e-3)
    with pytest.raises(ValueError, match="no samples"):
        fcr_delivered_share(t, required, delivered, step_at=45.0)
