"""Seeded driver and vehicle profiles: battery sizes, chargers, plug-in and departure patterns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.physics import Array, Batteries

DAY_S = 86_400.0

# (kWh, weight): a mix of today's cars and vans.
_BATTERY_KWH = np.array([40.0, 52.0, 58.0, 64.0, 77.0, 82.0, 100.0])
_BATTERY_W = np.array([0.12, 0.15, 0.18, 0.18, 0.17, 0.12, 0.08])
# (charge kW, discharge kW, weight): bidirectional AC wallboxes and some DC units.
_CHARGERS = np.array([[7.4, 7.4], [11.0, 11.0], [22.0, 22.0], [50.0, 50.0]])
_CHARGER_W = np.array([0.40, 0.35, 0.17, 0.08])

# Pattern: (arrival mean h, sd h, departure mean h, sd h, arrival soc lo, hi).
PATTERNS: dict[str, tuple[float, float, float, float, float, float]] = {
    "home": (18.5, 1.0, 7.5, 0.6, 0.25, 0.60),
    "workplace": (8.5, 0.6, 17.25, 0.6, 0.35, 0.70),
    "depot": (19.0, 0.7, 6.0, 0.5, 0.20, 0.50),
}
DEFAULT_MIX: dict[str, float] = {"home": 0.6, "workplace": 0.3, "depot": 0.1}


@dataclass(frozen=True, slots=True)
class FleetProfile:
    """A generated fleet: static batteries plus each vehicle's daily plug-in pattern."""

    ids: list[str]
    batteries: Batteries
    pattern: list[str]
    arrival_tod_s: Array  # time of day of plug-in, seconds after 00:00 UTC
    stay_s: Array  # how long the vehicle stays plugged in each day
    arrival_soc: Array  # state of charge it arrives with


def generate_fleet(
    count: int, seed: int, *, mix: dict[str, float] | None = None, id_prefix: str = "ev"
) -> FleetProfile:
    """A reproducible fleet of ``count`` vehicles: the same seed gives the same fleet."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(PATTERNS)
    if unknown:
        raise ValueError(f"unknown patterns {sorted(unknown)}; choose from {sorted(PATTERNS)}")
    rng = np.random.default_rng(seed)
    names = list(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    kinds = rng.choice(len(names), size=count, p=weights / weights.sum())

    capacity = rng.choice(_BATTERY_KWH, size=count, p=_BATTERY_W)
    charger = _CHARGERS[rng.choice(len(_CHARGERS), size=count, p=_CHARGER_W)]
    eta_ch = rng.uniform(0.90, 0.96, size=count)
    eta_dis = rng.uniform(0.90, 0.96, size=count)
    min_soc = rng.choice([0.15, 0.2, 0.25, 0.3], size=count)
    target_soc = rng.choice([0.7, 0.8, 0.85, 0.9, 1.0], size=count, p=[0.2, 0.35, 0.15, 0.2, 0.1])

    table = np.array([PATTERNS[n] for n in names])[kinds]
    arrival_h = rng.normal(table[:, 0], table[:, 1]) % 24.0
    departure_h = rng.normal(table[:, 2], table[:, 3]) % 24.0
    stay_h = (departure_h - arrival_h) % 24.0
    stay_h = np.clip(stay_h, 1.0, 23.0)  # nobody plugs in for a minute or for ever
    arrival_soc = rng.uniform(table[:, 4], table[:, 5])

    width = max(4, len(str(max(count - 1, 0))))
    return FleetProfile(
        ids=[f"{id_prefix}-{i:0{width}d}" for i in range(count)],
        batteries=Batteries(
            capacity_kwh=capacity,
            max_charge_kw=charger[:, 0].copy(),
            max_discharge_kw=charger[:, 1].copy(),
            charge_efficiency=eta_ch,
            discharge_efficiency=eta_dis,
            min_soc=min_soc.astype(float),
            target_soc=target_soc.astype(float),
        ),
        pattern=[names[k] for k in kinds],
        arrival_tod_s=arrival_h * 3600.0,
        stay_s=stay_h * 3600.0,
        arrival_soc=arrival_soc,
    )


def sessions_at(profile: FleetProfile, now: float) -> tuple[Array, Array]:
    """Each vehicle's current or next plug-in session as (arrival, departure) epoch seconds."""
    day = np.floor(now / DAY_S) * DAY_S
    arrival = day + profile.arrival_tod_s
    # The session that started yesterday may still be running.
    arrival = np.where(arrival > now, arrival - DAY_S, arrival)
    departure = arrival + profile.stay_s
    ended = departure <= now
    arrival = np.where(ended, arrival + DAY_S, arrival)
    departure = np.where(ended, departure + DAY_S, departure)
    return arrival, departure


def parse_shares(spec: str, what: str) -> dict[str, float]:
    """``"a=0.6,b=0.4"`` as {name: share}: shares > 0 that sum to 1 (within 1e-6).
    ``what`` names the flag's subject in the error (a node, a pattern)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected {what.upper()}=SHARE, got {part!r}")
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"{name}: {value.strip()!r} is not a number") from None
        if not 0.0 < share <= 1.0 or name in out:
            raise ValueError(f"{name}: give each {what} once, with a share in (0, 1]")
        out[name] = share
    if not out:
        raise ValueError(f"no {what} given: expected {what.upper()}=SHARE,...")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"the shares sum to {sum(out.values()):g}, not 1")
    return out


def spread_nodes(count: int, shares: dict[str, float]) -> list[str]:
    """``count`` vehicles under grid nodes by share, in contiguous blocks of ids (the
    first ``round(share * count)`` under the first node, and so on; largest remainders
    take the vehicles rounding leaves over)."""
    names = list(shares)
    exact = np.array([shares[n] for n in names]) * count
    whole = np.floor(exact).astype(int)
    short = count - int(whole.sum())
    whole[np.argsort(-(exact - whole), kind="stable")[:short]] += 1
    return [n for n, k in zip(names, whole.tolist(), strict=True) for _ in range(k)]
