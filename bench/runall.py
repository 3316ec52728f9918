"""Runs every benchmark under bench/ (each in its own process, ``python -m bench.NAME``,
each bounded in time), then prints ONE table (metric, value, reference, ratio, target,
pass) and writes it as JSON to bench/results/all.json, stamped with the run's provenance
(bench.common.provenance). Started by ``bench/run``; see it for the options.

    .venv/bin/python -m bench.runall [--quick] [--only schedule_solve,ingest]

Each benchmark writes its rows as JSON (``{"rows": [...]}``, the row shape of
bench.common.row, and its own provenance, kept here under ``benches``);
bench/ev2gym_compare.py, which has its own shape, is converted here, and is skipped if
it is not there. A benchmark that fails or overruns its limit gets one row saying so,
and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    RESULTS,
    ROOT,
    Row,
    module_argv,
    print_table,
    provenance,
    start,
    write_results,
)
from v2g.progress import bar

BENCH = ROOT / "bench"


def plan(quick: bool) -> list[tuple[str, list[str], float]]:
    """(name, arguments, time limit in s) of each benchmark."""
    return [
        (
            "control_step",
            ["--sizes", "1000,10000" if quick else "1000,10000,100000"],
            240.0 if quick else 420.0,
        ),
        ("ingest", ["--seconds", "4", "--scale-seconds", "35"] if quick else [], 240.0),
        (
            "dispatch_latency",
            ["--trials", "3" if quick else "6"],
            300.0 if quick else 420.0,
        ),
        ("signal_latency", ["--signals", "5" if quick else "10"], 180.0 if quick else 300.0),
        (
            "ev2gym_compare",
            [
                "--sizes",
                "100,1000" if quick else "100,1000,5000",
                "--budget-s",
                "60" if quick else "240",
                "--million",
                "0" if quick else "1000000",
            ],
            240.0 if quick else 600.0,
        ),
        ("schedule_solve", ["--sizes", "1000" if quick else "1000,10000"], 120.0),
        (
            "envelope",
            ["--sizes", "10000" if quick else "10000,100000", "--random", "10" if quick else "30"],
            120.0 if quick else 300.0,
        ),
        ("scale_out", ["--repeat", "2" if quick else "3"], 240.0 if quick else 360.0),
        (
            "grid",
            ["--sizes", "10000:100" if quick else "10000:100,100000:1000", "--lp", "10000:100"],
            120.0,
        ),
        (
            "ocpp_stations",
            [
                "--sizes",
                "250,1000" if quick else "250,1000,2000",
                "--steps",
                "5" if quick else "10",
            ],
            300.0 if quick else 600.0,
        ),
        (
            "ocpp_gateway",
            ["--sizes", "250,1000", "--steps", "5" if quick else "10"],
            300.0 if quick else 480.0,
        ),
        (
            "metrics_scrape",
            ["--sizes", "1000,10000" if quick else "1000,10000,100000"],
            120.0 if quick else 240.0,
        ),
        ("powerflow", ["--flows", "10" if quick else "30"], 120.0),
    ]


def run_one(
    name: str, args: list[str], limit: float, stamps: dict[str, Any] | None = None
) -> list[Row]:
    """Run bench module ``name`` in its own process; its rows, each marked with its name
    (one row saying why, if it did not finish). Its provenance goes into ``stamps``."""
    if not (BENCH / f"{name}.py").exists():
        print(f"--- {name}: not present, skipped", file=sys.stderr, flush=True)
        return []
    out = RESULTS / f"{name}.json"
    out.unlink(missing_ok=True)
    print(f"--- {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    t = time.monotonic()
    try:
        proc = subprocess.run(
            module_argv(name, *args, "--out", str(out)),
            timeout=limit,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        failed = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        failed = f"over its {limit:.0f} s limit"
    took = time.monotonic() - t
    if failed is not None or not out.exists():
        return [
            _row(
                name, f"did not finish: {failed or 'no results'}", None, None, None, "", None, False
            )
        ]
    doc = json.loads(out.read_text())
    if stamps is not None:
        stamps[name] = doc.get("provenance")
    rows = _from_ev2gym(doc) if name == "ev2gym_compare" else doc["rows"]
    for r in rows:
        r["bench"] = name
    print(f"    {len(rows)} rows in {took:.0f} s", file=sys.stderr, flush=True)
    return list(rows)


def _row(
    bench: str,
    metric: str,
    n: int | None,
    value: float | None,
    reference: float | None,
    reference_is: str,
    target: float | None,
    ok: bool | None,
    unit: str = "",
) -> Row:
    ratio = None if not (value is not None and reference) else round(value / reference, 3)
    return {
        "bench": bench,
        "metric": metric,
        "vehicles": n,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_is": reference_is,
        "ratio": ratio,
        "target": target,
        "pass": ok,
    }


def _from_ev2gym(doc: dict[str, Any]) -> list[Row]:
    rows = []
    largest = max((r["n"] for r in doc.get("rows", [])), default=0)
    for r in doc.get("rows", []):
        ours, theirs = r.get("ours_vehicle_steps_per_s"), r.get("ev2gym_vehicle_steps_per_s")
        # Its own target (>= 100x EV2Gym) is judged at its largest size only.
        target = None if not theirs or r["n"] != largest else 100.0 * theirs
        rows.append(
            _row(
                "ev2gym_compare",
                "simulation: vehicle-steps/s, ours vs EV2Gym"
                + ("" if theirs else " (EV2Gym skipped)"),
                r["n"],
                None if ours is None else round(ours, 1),
                None if theirs is None else round(theirs, 1),
                f"EV2Gym {doc.get('ev2gym_version', '')}",
                target,
                None if target is None or ours is None else ours >= target,
                "veh-steps/s",
            )
        )
    big = doc.get("ours_big")
    if big:
        rows.append(
            _row(
                "ev2gym_compare",
                f"simulation: {big['n']:,} vehicles x {doc.get('steps')} steps, wall time",
                big["n"],
                round(big["total_s"], 2),
                60.0,
                "60 s",
                60.0,
                bool(big["pass"]),
                "s",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.runall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer trials")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--out", default=str(RESULTS / "all.json"))
    args = ap.parse_args()
    started = start()
    RESULTS.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    if unknown := only - {name for name, _, _ in plan(args.quick)}:
        ap.error(f"--only: no benchmark named {', '.join(sorted(unknown))}")
    t = time.monotonic()
    rows: list[Row] = []
    stamps: dict[str, Any] = {}
    todo = [p for p in plan(args.quick) if not only or p[0] in only]
    # A bar over the benchmarks on a terminal (v2g/progress.py); nothing in a log or pipe.
    with bar("benchmarks", len(todo)) as at:
        for k, (name, bench_args, limit) in enumerate(todo):
            rows += run_one(name, bench_args, limit, stamps)
            at(k + 1)
    stamp = provenance(started)
    print_table(rows, stamp)
    checked = [r for r in rows if r["pass"] is not None]
    failed = [r for r in checked if not r["pass"]]
    print(
        f"{len(checked) - len(failed)} of {len(checked)} targets met in {time.monotonic() - t:.0f} s"
    )
    write_results(rows, args.out, stamp, quick=args.quick, benches=stamps)


if __name__ == "__main__":
    main()
