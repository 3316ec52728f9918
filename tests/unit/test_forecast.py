"""The availability forecast: 24 hourly periods from history and the vehicles here now."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.forecast import HOURS, ForecastModel, hour_of_day

DAY0 = 1_780_012_800.0  # a midnight UTC
NOW = DAY0 + 17.5 * 3600  # 17:30


def test_without_history_only_the_vehicles_here_count_and_confidence_is_zero() -> None:
    m = ForecastModel()
    lo = np.array([-10.0, -7.0, 3.0])  # the third must charge: no export from it
    hi = np.array([11.0, 7.0, 11.0])
    dep = np.array([DAY0 + 20 * 3600, DAY0 + 19 * 3600 + 1, np.nan])
    f = m.forecast(NOW, lo, hi, dep)
    assert len(f) == HOURS
    assert f[0].start == DAY0 + 18 * 3600  # the next whole hour
    assert [p.start - f[0].start for p in f[:3]] == [0.0, 3600.0, 7200.0]
    # 18-19: both stay; 19-20: both (the first leaves at 20:00 exactly, the second just after
    # 19:00 so not to 20:00); after 20:00: nobody announced to stay.
    assert (f[0].min_power_kw, f[0].max_power_kw) == (-17.0, 18.0)
    assert (f[1].min_power_kw, f[1].max_power_kw) == (-10.0, 11.0)
    assert all((p.min_power_kw, p.max_power_kw) == (0.0, 0.0) for p in f[2:])
    assert all(p.confidence == 0.0 and p.samples == 0 for p in f)


def test_with_history_an_hour_offers_its_cautious_quantile_at_90_percent() -> None:
    m = ForecastModel(min_samples=10)
    # Seen at 19:xx on past days: export headroom -100 .. -10 kW, import 10 .. 100 kW.
    for k, v in enumerate(np.linspace(10.0, 100.0, 91)):
        m.observe(DAY0 - 86_400.0 * (k % 7) + 19 * 3600 + k, -v, v)
    f = m.forecast(NOW, np.zeros(0), np.zeros(0), np.zeros(0))
    p19 = f[1]
    assert hour_of_day(p19.start) == 19
    assert p19.confidence == 0.9 and p19.samples == 91
    # 90% of the time at least this much: the 10th percentile of the headroom.
    assert p19.min_power_kw == pytest.approx(-19.0, abs=0.01)
    assert p19.max_power_kw == pytest.approx(19.0, abs=0.01)
    assert f[0].confidence == 0.0  # 18:xx never seen


def test_vehicles_here_widen_a_thin_history_never_narrow_it() -> None:
    m = ForecastModel(min_samples=1)
    for k in range(5):
        m.observe(DAY0 + 18 * 3600 + k, -5.0, 5.0)
    dep = np.array([DAY0 + 23 * 3600])
    f = m.forecast(NOW, np.array([-40.0]), np.array([40.0]), dep)
    assert (f[0].min_power_kw, f[0].max_power_kw) == (-40.0, 40.0)


def test_the_history_is_a_bounded_ring() -> None:
    m = ForecastModel(max_samples=8)
    for k in range(100):
        m.observe(DAY0 + 5 * 3600 + k, -float(k), float(k))
    assert m.samples()[5] == 8
    assert m.samples().sum() == 8
    m.observe(DAY0, float("nan"), 1.0)  # not a sample
    assert m.samples()[0] == 0


@given(
    n=st.integers(0, 50),
    seed=st.integers(0, 2**32 - 1),
    minutes=st.integers(0, 24 * 60 - 1),
)
def test_more_vehicles_staying_never_shrink_the_offer(n: int, seed: int, minutes: int) -> None:
    rng = np.random.default_rng(seed)
    now = DAY0 + minutes * 60.0
    lo = -rng.uniform(0, 22, n)
    hi = rng.uniform(0, 22, n)
    dep = now + rng.uniform(0, 30 * 3600, n)
    m = ForecastModel()
    base = m.forecast(now, lo, hi, dep)
    later = m.forecast(now, lo, hi, dep + 3600.0)  # everyone stays an hour longer
    for a, b in zip(base, later, strict=True):
        assert b.min_power_kw <= a.min_power_kw + 1e-9
        assert b.max_power_kw >= a.max_power_kw - 1e-9
        assert a.min_power_kw <= 0.0 <= a.max_power_kw
    assert np.all(np.diff([p.start for p in base]) == 3600.0)
