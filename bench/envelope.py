"""The capability envelope (issue 14): its error against the exact LP, before and after,
and what it costs per control step at 10k and 100k vehicles.

- **error**: the envelope's two bounds against the reference LP (aggregator/envelope.py
  ``reference``: one unit per vehicle, every control step of 5 s for the 900-s window,
  60 s for the hour), as |difference| / the larger |bound| of the reference, for
  (a) today's envelope before issue 14, the sum of each car's constant-power range, and
  (b) the production envelope (``window``: cohorts, 16 steps at most). Fleets: 300
  simulated cars in a departure wave (07:15) and an arrival wave (18:00), and random
  fleets with departures and arrivals on a 12-step grid (the property test's). The
  production's error has two parts: its grid (16 steps at most; the LP's are the
  control steps) and its cohorts. The "pooling error" rows hold it to the LP on its own
  grid, which is the cohorts' part alone, and at 2,000 vehicles (``--large``), where
  the cars whose energy bounds bind are pooled by kind. A window no constant power
  holds in is marked "(none holds)": its envelope is the closest single power, which
  moves with the grid.
- **cost**: one control step's envelope at N vehicles (all plugged in, departures from
  the 07:15 sessions): the five windows before (sum of ranges) and after (LP), one LP
  window (what a step costs above 20k vehicles, where the windows are refreshed in
  turn), and steering a running request (one plan a step).

Prints a table and writes JSON to bench/results/envelope.json, both with the run's
provenance (bench.common: git SHA, package versions, CPU, load).

    .venv/bin/python -m bench.envelope [--sizes 10000,100000] [--random 30] [--large 2000]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator import envelope as ev
from aggregator.capability import WINDOWS_S
from bench.common import (
    RESULTS,
    Row,
    best_of,
    print_table,
    provenance,
    row,
    start,
    write_results,
)
from core.physics import Array, Batteries, feasible_range

DAY = datetime(2024, 6, 3, tzinfo=UTC).timestamp()
WAVES = {"departure wave 07:15": DAY + 7.25 * 3600, "arrival wave 18:00": DAY + 18 * 3600}
CONTROL_STEP_S = 5.0
STEP_BUDGET_MS = 1000.0


def plugged(n: int, at: float, seed: int = 7) -> tuple[Batteries, Array, Array]:
    """The cars of a simulated fleet plugged in at ``at``: batteries, energy, departure."""
    fleet = SimFleet(generate_fleet(n, seed), at, step_s=CONTROL_STEP_S)
    on = fleet.plugged
    return fleet.bat.take(on), fleet.energy[on], fleet.departure[on]


def everyone(n: int, at: float) -> tuple[Batteries, Array, Array]:
    """``n`` cars, all counted as plugged in, with the departures of their sessions."""
    fleet = SimFleet(generate_fleet(n, 3), at, step_s=CONTROL_STEP_S)
    return fleet.bat, fleet.energy, fleet.departure


def error(got: tuple[float, float], ref: ev.Envelope) -> float:
    """The larger of the two bounds' differences, over the larger |bound| of the reference."""
    scale = max(abs(ref.min_power_kw), abs(ref.max_power_kw), 1.0)
    return max(abs(got[0] - ref.min_power_kw), abs(got[1] - ref.max_power_kw)) / scale


def wave_errors() -> list[Row]:
    out: list[Row] = []
    for name, at in WAVES.items():
        bat, energy, dep = plugged(300, at)
        for window_s, step_s in ((900.0, CONTROL_STEP_S), (3600.0, 60.0)):
            steps = round(window_s / step_s)
            ref = ev.reference(bat, energy, dep, at, window_s, steps)
            lo, hi = feasible_range(bat, energy, dep, at, window_s)
            env = ev.window(bat, energy, dep, at, window_s, exact_below=0)
            before = error((float(lo.sum()), float(hi.sum())), ref)
            after = error((env.min_power_kw, env.max_power_kw), ref)
            print(
                f"{name}, {window_s:.0f} s, {len(energy)} plugged: LP over {steps} steps"
                f" {ref.min_power_kw:.1f}..{ref.max_power_kw:.1f} kW; sum of ranges"
                f" {lo.sum():.1f}..{hi.sum():.1f}; production"
                f" {env.min_power_kw:.1f}..{env.max_power_kw:.1f} ({env.units} cohorts)",
                file=sys.stderr,
            )
            label = f"{name.split()[0]} {window_s:.0f}s"
            if not ref.feasible:
                label += " (none holds)"
            out.append(
                row(f"envelope error vs LP, {label}", len(energy), 100 * after, 100 * before,
                    "%", "sum of ranges (before)", 1.0, lower_is_better=True)
            )  # fmt: skip
            # The part of it the cohorts make: against the LP on the production's grid.
            same = ev.reference(bat, energy, dep, at, window_s, env.steps)
            out.append(
                row(f"pooling error vs LP on its grid, {label}", len(energy),
                    100 * error((env.min_power_kw, env.max_power_kw), same), None, "%", "",
                    1.0, lower_is_better=True)
            )  # fmt: skip
    return out


def large_errors(n: int) -> list[Row]:
    """The production envelope of ``n`` vehicles (all counted plugged in, 07:15) against
    the LP on the same grid, worst over the five windows: the cohorts' error at a size
    where the cars whose energy bounds bind are pooled by kind, not solved one by one."""
    now = WAVES["departure wave 07:15"]
    bat, energy, dep = everyone(n, now)
    worst = 0.0
    for w in WINDOWS_S:
        env = ev.window(bat, energy, dep, now, w)
        ref = ev.reference(bat, energy, dep, now, w, env.steps)
        worst = max(worst, error((env.min_power_kw, env.max_power_kw), ref))
    return [
        row("pooling error vs LP on its grid, 5 windows (worst)", n, 100 * worst, None, "%", "",
            1.0, lower_is_better=True)
    ]  # fmt: skip


def random_fleet(
    rng: np.random.Generator, n: int, now: float, window_s: float = 900.0, steps: int = 12
) -> tuple[Batteries, Array, Array, Array]:
    """``n`` cars like the simulated ones, departures and arrivals on a grid of ``steps``
    equal steps of the window from ``now``: some leave inside it, some arrive, some stay
    with no departure. Batteries, energy, departure (NaN: unknown), arrival (NaN: here
    now). The property test (tests/unit/test_envelope.py) draws its fleets with it too."""
    cap = rng.uniform(30.0, 90.0, n)
    bat = Batteries(
        capacity_kwh=cap,
        max_charge_kw=rng.choice([3.7, 7.4, 11.0, 22.0], n),
        max_discharge_kw=rng.choice([0.0, 7.4, 11.0], n),
        charge_efficiency=rng.uniform(0.88, 0.96, n),
        discharge_efficiency=rng.uniform(0.88, 0.96, n),
        min_soc=rng.uniform(0.1, 0.3, n),
        target_soc=rng.uniform(0.6, 1.0, n),
    )
    energy = rng.uniform(0.1, 1.0, n) * cap
    step = window_s / steps
    dep = np.asarray(now + rng.integers(1, 3 * steps, n) * step, dtype=np.float64)
    dep = np.where(rng.random(n) < 0.2, np.nan, dep)
    arr: Array = np.where(rng.random(n) < 0.3, now + rng.integers(1, steps, n) * step, np.nan)
    dep = np.where(~np.isnan(arr) & (dep <= arr), arr + 5 * step, dep).astype(np.float64)
    return bat, energy, dep, arr


def random_errors(count: int) -> list[Row]:
    """Random fleets as the property test draws them (:func:`random_fleet`): the worst
    error of each envelope over ``count``."""
    rng = np.random.default_rng(14)
    now, window_s, k = DAY, 900.0, 12
    worst_before = worst_after = 0.0
    for _ in range(count):
        n = int(rng.integers(20, 41))
        bat, energy, dep, arr = random_fleet(rng, n, now, window_s, k)
        ref = ev.reference(bat, energy, dep, now, window_s, k, arr)
        env = ev.window(bat, energy, dep, now, window_s, steps=k, arrival=arr, exact_below=0)
        # Before issue 14 a car not there yet did not count; one that is counted whole.
        here = np.isnan(arr)
        lo, hi = feasible_range(bat.take(here), energy[here], dep[here], now, window_s)
        worst_before = max(worst_before, error((float(lo.sum()), float(hi.sum())), ref))
        worst_after = max(worst_after, error((env.min_power_kw, env.max_power_kw), ref))
    return [
        row("envelope error vs LP, random (worst)", count, 100 * worst_after,
            100 * worst_before, "%", "sum of ranges (before)", 1.0, lower_is_better=True)
    ]  # fmt: skip


def costs(n: int) -> list[Row]:
    now = WAVES["departure wave 07:15"]
    bat, energy, dep = everyone(n, now)
    before = best_of(lambda: [feasible_range(bat, energy, dep, now, w) for w in WINDOWS_S])
    after = best_of(lambda: [ev.window(bat, energy, dep, now, w) for w in WINDOWS_S], 2)
    one = best_of(lambda: ev.window(bat, energy, dep, now, 900.0), 2)
    env = ev.window(bat, energy, dep, now, 900.0)
    target = 0.5 * (env.min_power_kw + env.max_power_kw)
    steer = best_of(lambda: ev.steer(bat, energy, dep, now, 900.0, target), 2)
    print(
        f"N={n}: 900 s window {env.min_power_kw:.0f}..{env.max_power_kw:.0f} kW over"
        f" {env.units} cohorts x {env.steps} steps",
        file=sys.stderr,
    )
    return [
        row("envelope, 5 windows (LP)", n, after * 1e3, before * 1e3, "ms",
            "sum of ranges (before)", STEP_BUDGET_MS, lower_is_better=True),
        row("envelope, 1 window a step (LP)", n, one * 1e3, before * 1e3, "ms",
            "sum of ranges (before)", STEP_BUDGET_MS, lower_is_better=True),
        row("steering a request, per step (LP)", n, steer * 1e3, None, "ms", "",
            STEP_BUDGET_MS, lower_is_better=True),
    ]  # fmt: skip


def measure(sizes: Iterable[int], random: int, large: int = 0) -> list[Row]:
    """The error rows (``random`` random fleets; ``large`` vehicles against the LP, if
    any), then the cost rows at each size."""
    out = wave_errors() + random_errors(random) + (large_errors(large) if large else [])
    for n in sizes:
        out.extend(costs(n))
    return out


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: its --quick ones)."""
    return measure(
        (10_000,) if quick else (10_000, 100_000), 10 if quick else 30, 0 if quick else 2000
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--random", type=int, default=30, help="random fleets for the worst error")
    ap.add_argument(
        "--large", type=int, default=2000, help="vehicles held to the LP (0: skip; ~1 min)"
    )
    ap.add_argument("--out", default=str(RESULTS / "envelope.json"))
    args = ap.parse_args()
    started = start()
    result = measure((int(s) for s in args.sizes.split(",") if s), args.random, args.large)
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
