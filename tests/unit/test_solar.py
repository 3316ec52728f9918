"""The solar profile from pvlib's typical-year file: bounded, dark at night, peaking near
local noon, and as much energy as a plant in North Carolina makes."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from v2g.solar import hour_of_year, pv_ac_kw, typical_year_ac

pytestmark = pytest.mark.timeout(60)


def day_times(y: int, m: int, d: int, step_s: float = 300.0) -> np.ndarray:
    t0 = datetime(y, m, d, tzinfo=UTC).timestamp()
    return t0 + np.arange(0.0, 86400.0, step_s)


def test_output_stays_within_the_ac_rating_all_year() -> None:
    year = typical_year_ac()
    assert year.shape == (8760,)
    assert year.min() >= 0.0 and year.max() <= 1.0
    # The inverter clips at its rating on the best hours (DC/AC 1.2).
    assert year.max() > 0.95
    t = datetime(2026, 1, 1, tzinfo=UTC).timestamp() + np.arange(0.0, 365 * 86400.0, 1800.0)
    kw = pv_ac_kw(t, 250.0)
    assert kw.min() >= 0.0 and kw.max() <= 250.0 + 1e-9


def test_dark_at_night_and_peaks_near_local_noon() -> None:
    t = day_times(2026, 6, 10)
    kw = pv_ac_kw(t, 1.0)
    hour = (t % 86400.0) / 3600.0
    assert np.all(kw[(hour < 4.0) | (hour >= 21.0)] == 0.0)
    # Solar noon at 79.95 W is ~12:20 local standard time (the file's clock).
    assert 11.0 <= hour[int(np.argmax(kw))] <= 14.0
    assert kw[(hour > 11.0) & (hour < 14.0)].mean() > 0.6


def test_energy_is_plausible_for_the_site() -> None:
    # Greensboro, NC: a fixed south-facing plant yields ~1,300-1,500 kWh per kWp (DC)
    # a year, here per kW AC with DC/AC 1.2; a clear June day gives 5-8 kWh per kW AC.
    assert 1400.0 < typical_year_ac().sum() < 1900.0
    clear = pv_ac_kw(day_times(2026, 6, 10), 1.0).sum() * 300.0 / 3600.0
    assert 5.0 < clear < 8.0
    winter = pv_ac_kw(day_times(2026, 12, 20), 1.0).sum() * 300.0 / 3600.0
    assert winter < clear


def test_the_clock_reads_any_year_as_the_typical_one() -> None:
    feb28 = datetime(2028, 2, 28, 12, tzinfo=UTC).timestamp()
    feb29 = datetime(2028, 2, 29, 12, tzinfo=UTC).timestamp()
    mar1 = datetime(2028, 3, 1, 12, tzinfo=UTC).timestamp()
    h = hour_of_year(np.array([feb28, feb29, mar1]))
    assert h.tolist() == [(31 + 27) * 24 + 12.0, (31 + 27) * 24 + 12.0, (31 + 28) * 24 + 12.0]
    a = pv_ac_kw(day_times(2026, 6, 10), 1.0)
    b = pv_ac_kw(day_times(2031, 6, 10), 1.0)
    np.testing.assert_allclose(a, b)
