"""Simulated OCPP stations under a 1 s control step: how many one process runs, and the
setpoint latency (CSMS sends SetChargingProfile -> the station's answer arrives) at 1k.

Two processes on loopback, as in production: the CSMS (tests/support/ocpp_csms.py, the
``ocpp`` library's CSMS side on ``websockets``) in a child process, the N stations
(agents/ocpp_stations.py, every car a BPT car on one vectorised fleet, MeterValues every
5 s) in this one. Once every station has booted and opened its session, the CSMS sends
every station one profile per 1 s step for ``--steps`` steps (alternating +/-2 kW, a
CentralSetpoint Absolute TxProfile; or with ``dynamic``, one Dynamic profile and then an
UpdateDynamicSchedule per step), all at once, and times each answer and each step (the
step is held when every station answered within it). The reference, measured in the
same run at the same N, is the same with the ``ocpp`` library's JSON-schema validation
off on both sides: what validation costs (``--validation inline`` of the CSMS process runs
the checks on the event loop instead of the library's thread pool: the same CPU). Each size is bounded (connect 180 s, steps
``--steps`` x the step, plus 60 s). Prints a table and writes
bench/results/ocpp_stations.json with the run's provenance (bench.common).

    .venv/bin/python -m bench.ocpp_stations [--sizes 250,1000,2000] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import numpy as np

from bench.common import RESULTS, ROOT, Row, module_argv, print_table, provenance, row, start
from bench.common import write_results as write_json

STEP_S = 1.0
METER_S = 5.0  # the stations' MeterValues interval
CONNECT_TIMEOUT_S = 180.0
SIZES = (250, 1000, 2000)
LATENCY_AT = 1000
P99_TARGET_MS = 1000.0  # every answer inside the step


# -- the CSMS, in its own process ----------------------------------------------------
async def _csms(count: int, steps: int, method: str, validation: str) -> dict[str, Any]:
    from tests.support.ocpp_csms import MiniCsms

    _validation(validation)
    async with MiniCsms(validate=validation != "none", response_timeout_s=30.0) as csms:
        print(f"port {csms.port}", flush=True)
        ids = [f"cs-{i:04d}" for i in range(count)]
        t_connect = time.perf_counter()
        await csms.wait_for(
            lambda: all(csms.seen[s].of("NotifyEVChargingNeeds") for s in ids),
            timeout=CONNECT_TIMEOUT_S,
        )
        connect_s = time.perf_counter() - t_connect
        await asyncio.gather(*(csms.allow(s, ["AC_BPT", "DC_BPT"]) for s in ids))
        dynamic_ids: dict[str, int] = {}
        if method == "dynamic":
            profiles = {
                s: csms.profile(s, setpoint_w=0.0, mode="CentralSetpoint", kind="Dynamic")
                for s in ids
            }
            await asyncio.gather(*(csms.set_profile(s, p) for s, p in profiles.items()))
            dynamic_ids = {s: int(p["id"]) for s, p in profiles.items()}

        async def one(sid: str, watts: float) -> tuple[float, bool]:
            t = time.perf_counter()
            if method == "dynamic":
                res = await csms.update_dynamic(sid, dynamic_ids[sid], setpoint=watts)
            else:
                prof = csms.profile(sid, setpoint_w=watts, mode="CentralSetpoint", duration_s=5)
                res = await csms.set_profile(sid, prof)
            return time.perf_counter() - t, res.status == "Accepted"

        latencies: list[float] = []
        step_s: list[float] = []
        accepted = errors = 0
        print("steps", flush=True)  # the stations' process starts its CPU clock here
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for k in range(steps):
            begin = time.perf_counter()
            watts = 2000.0 if k % 2 else -2000.0
            got = await asyncio.gather(*(one(s, watts) for s in ids), return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException):
                    errors += 1
                else:
                    latencies.append(g[0])
                    accepted += g[1]
            step_s.append(time.perf_counter() - begin)
            await asyncio.sleep(max(0.0, t0 + (k + 1) * STEP_S - time.perf_counter()))
        wall = time.perf_counter() - t0
        return {
            "count": count,
            "method": method,
            "validation": validation,
            "connect_s": connect_s,
            "latency_s": latencies,
            "step_s": step_s,
            "accepted": accepted,
            "sent": count * steps,
            "errors": errors,
            "csms_cpu_share": (time.process_time() - cpu0) / wall,
            "csms_cpu_s": time.process_time() - cpu0,
            "steps_wall_s": wall,
        }


def _serve(args: argparse.Namespace) -> None:
    result = asyncio.run(_csms(args.count, args.steps, args.method, args.validation))
    print("result " + json.dumps(result), flush=True)


# -- the stations, here ---------------------------------------------------------------
def _validation(how: str) -> None:
    """``thread``: the ``ocpp`` library's default, each schema check in the default thread
    pool; ``inline``: on the event loop (``ocpp.messages.ASYNC_VALIDATION = False``);
    ``none``: skipped (``validate=False`` on both sides)."""
    import ocpp.messages

    ocpp.messages.ASYNC_VALIDATION = how == "thread"


async def _measure(count: int, steps: int, method: str, validation: str) -> dict[str, Any]:
    """Start the CSMS process, run ``count`` stations against it, return its result."""
    import structlog

    from agents.ocpp_stations import build_stations
    from core.clock import SimClock

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only: quiet
    )
    argv = module_argv(
        "ocpp_stations", "csms", "--count", str(count), "--steps", str(steps),
        "--method", method, "--validation", validation,
    )  # fmt: skip
    _validation(validation)
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, limit=2**26
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30.0):
            line = (await proc.stdout.readline()).decode()
        port = int(line.split()[1])
        stations = build_stations(
            url=f"ws://127.0.0.1:{port}",
            count=count,
            clock=SimClock(),
            mix="v21bpt=1",
            seed=1,
            telemetry_interval_s=METER_S,
            validate=validation != "none",
            reconnect_min_s=1.0,
        )
        task = asyncio.create_task(stations.run(), name="bench-stations")
        cpu0, t0 = time.process_time(), time.perf_counter()
        exchanges0 = 0
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + steps * STEP_S * 3 + 60.0):
                while True:
                    out = (await proc.stdout.readline()).decode()
                    if not out:
                        raise RuntimeError("the CSMS process ended without a result")
                    if out.startswith("steps"):
                        cpu0, t0 = time.process_time(), time.perf_counter()
                        exchanges0 = _exchanges(stations.counts)
                    if out.startswith("result "):
                        cpu_s = time.process_time() - cpu0
                        wall_s = time.perf_counter() - t0
                        exchanges = _exchanges(stations.counts) - exchanges0
                        result: dict[str, Any] = json.loads(out[len("result ") :])
                        break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The stations' CPU over the steps (their meter values and the physics included),
        # per setpoint: what the machine's load does not change.
        result["stations_cpu_share"] = cpu_s / wall_s
        result["stations_cpu_us_per_setpoint"] = cpu_s / max(result["sent"], 1) * 1e6
        # Per OCPP exchange (a CALL answered or sent: setpoints, meter values, heartbeats):
        # steps that overrun their second let more meter values in per setpoint.
        result["station_exchanges"] = exchanges
        result["stations_cpu_us_per_exchange"] = cpu_s / max(exchanges, 1) * 1e6
        result["csms_cpu_us_per_setpoint"] = result["csms_cpu_s"] / max(result["sent"], 1) * 1e6
        result["violations"] = sum(stations.violations.values())
        result["applied"] = stations.counts["profiles_applied"] + stations.counts["updates_applied"]
        return result
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _exchanges(counts: Any) -> int:
    """OCPP exchanges the stations took part in so far: CALLs sent and answered."""
    sent = sum(v for k, v in counts.items() if k.startswith("sent_"))
    return int(sent + counts["profiles_received"] + counts["updates_received"])


def _ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q)) * 1e3 if values else float("nan")


def _summary(r: dict[str, Any]) -> str:
    return (
        f"N={r['count']} {r['method']} validation={r['validation']}: connected in"
        f" {r['connect_s']:.1f} s; answer p50 {_ms(r['latency_s'], 0.5):.0f} ms"
        f" p99 {_ms(r['latency_s'], 0.99):.0f} ms; step p99 {_ms(r['step_s'], 0.99):.0f} ms;"
        f" {r['accepted']}/{r['sent']} accepted, {r['errors']} errors,"
        f" {r['violations']} violations; CPU stations {r['stations_cpu_share']:.0%}"
        f" ({r['stations_cpu_us_per_exchange']:.0f} us/exchange),"
        f" CSMS {r['csms_cpu_share']:.0%} ({r['csms_cpu_us_per_setpoint']:.0f} us/setpoint)"
    )


def bench(sizes: list[int], steps: int) -> tuple[list[Row], list[dict[str, Any]]]:
    """Per size: the library's default (schema checks in its thread pool) and none (the
    reference); at 1k also UpdateDynamicSchedule instead of a new profile per step."""
    out: list[Row] = []
    raw: list[dict[str, Any]] = []
    held = 0

    def run(n: int, method: str, validation: str) -> dict[str, Any]:
        r = asyncio.run(_measure(n, steps, method, validation))
        print(_summary(r), file=sys.stderr)
        raw.append({k: v for k, v in r.items() if k not in ("latency_s", "step_s")})
        raw[-1] |= {
            f"{what}_{q}_ms": _ms(r[f"{what}_s"], p)
            for what in ("latency", "step")
            for q, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        }
        return r

    for n in sizes:
        ref = run(n, "profile", "none")
        r = run(n, "profile", "thread")
        step_p99 = _ms(r["step_s"], 0.99)
        if step_p99 <= STEP_S * 1e3 and r["errors"] == 0 and r["accepted"] == r["sent"]:
            held = n
        out.append(
            row("OCPP 1 s step, all answered p99", n, step_p99, _ms(ref["step_s"], 0.99),
                "ms", "no schema validation", STEP_S * 1e3, lower_is_better=True)
        )  # fmt: skip
        if n != LATENCY_AT:
            continue
        cpu = r["stations_cpu_us_per_exchange"]
        out.append(
            row("stations' CPU per OCPP exchange", n, cpu, ref["stations_cpu_us_per_exchange"],
                "us", "no schema validation", lower_is_better=True)
        )  # fmt: skip
        # A station's second at a 1 s step: one setpoint and a fifth of a meter value.
        out.append(
            row("stations one idle core holds at 1 s, from CPU", n,
                1e6 / (cpu * (1 + 1 / METER_S)), 1e6 / (ref["stations_cpu_us_per_exchange"]
                * (1 + 1 / METER_S)), "stations", "no schema validation",
                target=float(LATENCY_AT))
        )  # fmt: skip
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            out.append(
                row(f"SetChargingProfile send->answer {name}", n, _ms(r["latency_s"], q),
                    _ms(ref["latency_s"], q), "ms", "no schema validation",
                    P99_TARGET_MS if name == "p99" else None, lower_is_better=True)
            )  # fmt: skip
        dyn = run(n, "dynamic", "thread")
        out.append(
            row("UpdateDynamicSchedule send->answer p99", n, _ms(dyn["latency_s"], 0.99),
                _ms(r["latency_s"], 0.99), "ms", "SetChargingProfile p99",
                P99_TARGET_MS, lower_is_better=True)
        )  # fmt: skip
    out.append(
        row("stations one process holds at a 1 s step, measured", max(sizes), float(held),
            None, "stations", target=float(LATENCY_AT))
    )  # fmt: skip
    return out, raw


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: 250 and 1000)."""
    return bench([250, 1000] if quick else list(SIZES), 5 if quick else 10)[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("csms", help="(internal) the CSMS process")
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--method", choices=["profile", "dynamic"], default="profile")
    c.add_argument("--validation", choices=["thread", "inline", "none"], default="thread")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "ocpp_stations.json"))
    args = ap.parse_args()
    if args.cmd == "csms":
        _serve(args)
        return
    started = start()
    result, raw = bench([int(s) for s in args.sizes.split(",")], min(args.steps, 60))
    stamp = provenance(started)
    print_table(result, stamp)
    write_json(result, args.out, stamp, runs=raw)


if __name__ == "__main__":
    main()
