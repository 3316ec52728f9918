"""How long the HiGHS schedule takes: 1k and 10k vehicles x 96 intervals of 15 min.

For each fleet size: pool the plugged-in vehicles into cohorts, then solve the LP for an
evening export block at 60% of what the fleet can give, with a reserved block before it
(the admission of a second request). Side by side in the same run: the proportional fast
path on the same job (no look-ahead), whose objective the LP must never exceed. Prints a
table and writes JSON to bench/results/schedule_solve.json, both with the run's
provenance (bench.common); ``rows()`` returns the same rows to a caller.

    .venv/bin/python -m bench.schedule_solve [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator.schedule import THROUGHPUT_COST, Block, cohorts, plan, proportional
from bench.common import RESULTS, Row, print_table, provenance, row, start, write_results
from core.physics import Batteries

T0 = datetime(2024, 6, 3, 16, 0, tzinfo=UTC).timestamp()
STEP = 900.0
HORIZON = 96
SOLVE_BUDGET_S = 5.0  # an admission answer within a few seconds


def bench(n: int) -> list[Row]:
    t = time.perf_counter()
    fleet = SimFleet(generate_fleet(n, 1), T0, step_s=STEP)
    on = fleet.plugged
    bat = Batteries(*(getattr(fleet.bat, f.name)[on] for f in dataclasses.fields(Batteries)))
    c = cohorts(bat, fleet.energy[on], fleet.departure[on], T0, step_s=STEP, horizon=HORIZON)
    pool_s = time.perf_counter() - t
    edge = float(plan(c, new=Block(8, 12, -1e9)).power_kw[8:12].max())
    first = Block(4, 8, round(0.3 * edge, 1))
    second = Block(8, 12, round(0.6 * edge, 1))
    best = float("inf")
    for _ in range(3):
        p = plan(c, reserved=[first], new=second)
        best = min(best, p.solve_s)
    fast = proportional(c, [first, second])
    lp_obj = p.shortfall_kwh + THROUGHPUT_COST * p.cycled_kwh
    fast_obj = fast.shortfall_kwh + THROUGHPUT_COST * fast.cycled_kwh
    print(
        f"N={n}: {int(on.sum())} plugged in {c.size} cohorts; pooling {pool_s * 1e3:.0f} ms;"
        f" LP shortfall {p.shortfall_kwh:.2f} kWh, cycled {p.cycled_kwh:.0f} kWh;"
        f" proportional shortfall {fast.shortfall_kwh:.2f} kWh",
        file=sys.stderr,
    )
    return [
        row(
            "schedule solve (HiGHS, 96 x 15 min)",
            n,
            best * 1e3,
            fast.solve_s * 1e3,
            "ms",
            "proportional pass",
            SOLVE_BUDGET_S * 1e3,
            lower_is_better=True,
        ),
        row(
            "schedule objective, LP vs proportional",
            n,
            float(lp_obj),
            float(fast_obj),
            "kWh",
            "proportional objective",
            float(fast_obj) + 1e-6,
            lower_is_better=True,
        ),
    ]


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: its --quick ones)."""
    out: list[Row] = []
    for n in (1000,) if quick else (1000, 10_000):
        out.extend(bench(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--out", default=str(RESULTS / "schedule_solve.json"))
    args = ap.parse_args()
    started = start()
    result: list[Row] = []
    for n in (int(s) for s in args.sizes.split(",")):
        result.extend(bench(n))
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
