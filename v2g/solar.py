"""A solar plant's AC power from measured typical-year irradiance (pvlib), as a node meter.

The data: ``723170TYA.CSV``, the TMY3 file for Greensboro Piedmont Triad International
airport (North Carolina, 36.1 N, 79.95 W, 273 m; NSRDB typical meteorological year, hourly
GHI, DNI, DHI, air temperature and wind speed) that pvlib ships in ``pvlib/data``. The
model: PVWatts (pvlib's ``pvwatts_dc`` with the SAPM cell temperature on an open rack,
14% system losses, a DC/AC ratio of 1.2 and pvlib's PVWatts inverter), Hay-Davies
transposition onto a fixed plane (tilt 25 deg, facing south by default). The result is
per kW of AC rating, hour by hour over the typical year, interpolated between the middles
of the hours (TMY3 values are hour-ending averages).

The clock: the profile follows the site's local standard time, laid on the scenario's
clock (the driver patterns of ``agents.profiles`` are in that same clock): 12:00 in the
scenario is 12:00 local standard time at the plant, on the same month and day of the
typical year. A node meter is + import, - export, so a plant's meter is ``-ac_kw``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from core.physics import Array

TMY3_FILE = "723170TYA.CSV"
"""The typical-year file used (pvlib/data): Greensboro, NC (TMY3)."""
DC_AC_RATIO = 1.2
SYSTEM_LOSSES = 0.14  # PVWatts' default losses (soiling, wiring, mismatch, availability...)
GAMMA_PDC = -0.004  # per deg C: a crystalline silicon module
HOURS = 8760
# Cumulative days before each month of a non-leap year (a typical year has no 29 Feb).
_MONTH_START = np.array([0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334])


def data_path() -> Path:
    """Where pvlib keeps its bundled typical-year file."""
    import pvlib

    return Path(pvlib.__file__).parent / "data" / TMY3_FILE


@lru_cache(maxsize=8)
def typical_year_ac(tilt_deg: float = 25.0, azimuth_deg: float = 180.0) -> Array:
    """AC power per kW of AC rating, one value per hour of the typical year (8760, the
    average over each hour, hour 0 being 00:00-01:00 on 1 January, local standard time)."""
    import pandas as pd
    import pvlib

    df, meta = pvlib.iotools.read_tmy3(str(data_path()), map_variables=True)
    # The middle of each hour-ending interval, where the averages are best represented
    # (the frame re-indexed on it, so that every series below aligns on one index).
    times = df.index - pd.Timedelta(minutes=30)
    df = df.set_axis(times)
    # The file's zone is a fixed UTC offset (TZ -5): POSIX spells UTC-5 as Etc/GMT+5.
    zone = f"Etc/GMT{-int(meta['TZ']):+d}"
    site = pvlib.location.Location(
        meta["latitude"], meta["longitude"], altitude=meta["altitude"], tz=zone
    )
    sun = site.get_solarposition(times)
    poa = pvlib.irradiance.get_total_irradiance(
        tilt_deg,
        azimuth_deg,
        sun["apparent_zenith"],
        sun["azimuth"],
        df["dni"],
        df["ghi"],
        df["dhi"],
        dni_extra=pvlib.irradiance.get_extra_radiation(times),
        model="haydavies",
    )
    params = pvlib.temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"]["open_rack_glass_polymer"]
    cell = pvlib.temperature.sapm_cell(
        poa["poa_global"], df["temp_air"], df["wind_speed"], **params
    )
    dc = pvlib.pvsystem.pvwatts_dc(poa["poa_global"], cell, DC_AC_RATIO, GAMMA_PDC)
    dc = dc * (1.0 - SYSTEM_LOSSES)
    # The inverter's DC rating such that its AC output tops out at 1 kW.
    ac = pvlib.inverter.pvwatts(dc, 1.0 / 0.96, eta_inv_nom=0.96)
    out = np.clip(np.nan_to_num(np.asarray(ac, dtype=np.float64)), 0.0, 1.0)
    if out.shape[0] != HOURS:
        raise ValueError(f"{TMY3_FILE}: expected {HOURS} hourly rows, got {out.shape[0]}")
    out.flags.writeable = False
    return out


def hour_of_year(times: Array) -> Array:
    """Hours since 1 January 00:00 of a non-leap year at each epoch time, reading each time's
    UTC date and clock as the site's local standard time (29 February counts as the 28th)."""
    t = np.asarray(times, dtype=np.float64)
    days = np.floor(t / 86400.0).astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    month = months.astype(np.int64) % 12
    day = (days - months).astype(np.int64)
    day = np.where((month == 1) & (day == 28), 27, day)
    return np.asarray((_MONTH_START[month] + day) * 24.0 + (t % 86400.0) / 3600.0)


def pv_ac_kw(
    times: Array, ac_kw: float, *, tilt_deg: float = 25.0, azimuth_deg: float = 180.0
) -> Array:
    """A plant's AC output (kW, >= 0) at each epoch time (see the module for the clock)."""
    year = typical_year_ac(float(tilt_deg), float(azimuth_deg))
    mid = np.arange(HOURS, dtype=np.float64) + 0.5
    return np.asarray(ac_kw * np.interp(hour_of_year(times), mid, year, period=HOURS))
