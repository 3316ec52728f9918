"""How much telemetry one aggregator takes in through Mosquitto, against the broker's own limit.

In one run, side by side (the machine is shared and noisy: read the ratios):

a. the broker's limit with its C clients: ``mosquitto_pub -l`` → ``mosquitto_sub``, QoS 0,
   ~300-byte payloads, one topic, bounded in count and time;
b. the aggregator (``AggregatorService`` with its MQTT link, in this process) receiving
   telemetry published flat out by a separate process, prebuilt frames written to the
   socket as (a)'s C client does (``bench.rawpub``; ``--publisher paho``: the Python
   publisher of ``bench.loadgen``, which takes a core and offers ~60-80k msg/s at most):
   per-vehicle JSON on ``v2g/vehicles/{vid}/telemetry``, and bridges' batches of 1000
   vehicles on ``v2g/bridges/{id}/telemetry``; msg/s and vehicle-updates/s, as a fraction
   of (a) (target: at least half);
c. 100,000 vehicles reporting every 10 s through 100 bridges (10,000 vehicle-updates/s)
   into one aggregator with a request active: its control step time (target < 1 s) and
   its fleet-state memory per vehicle (target < 1 KB: the numpy columns' bytes per
   vehicle, and the process's RSS growth per vehicle).

Needs Mosquitto on 127.0.0.1:1883 and its C clients. Prints a table and writes JSON to
bench/results/ingest.json; ``rows()`` returns the same rows to a caller.

    .venv/bin/python -m bench.ingest [--seconds 8] [--scale-seconds 45]
        [--cases aiomqtt,fast,batch] [--repeat N] [--no-scale]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np

from aggregator.service import AggregatorService, StepReport
from aggregator.store import MemoryStore
from bench.common import (
    HOST,
    PORT,
    RESULTS,
    ROOT,
    Row,
    module_argv,
    print_table,
    provenance,
    row,
    start,
    wait_connected,
    write_results,
)
from broker.models import DispatchRequest
from broker.settings import Settings
from core.clock import SimClock
from v2g import logs

LOADGEN = module_argv("loadgen")
# Flat-out load for (b): prebuilt frames written to the socket, next to no CPU, as the
# C clients of (a); "paho" is the Python publisher of bench.loadgen, which takes a
# core of this 2-core machine and offers ~60-80k msg/s at most.
PUBLISHERS = {"raw": module_argv("rawpub"), "paho": LOADGEN}


def rss_bytes(trim: bool = False) -> int:
    """This process's resident memory; ``trim``: after a collection and glibc's
    ``malloc_trim``, so memory freed but kept by the allocator does not count."""
    if trim:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- (a) the broker's limit ---------------------------------------------------------------
def broker_limit(n: int = 400_000, seconds: float = 30.0) -> tuple[float, Row]:
    """mosquitto_pub -l → mosquitto_sub, QoS 0, ~300-byte lines: delivered msg/s."""
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        raise SystemExit(
            "needs mosquitto_pub and mosquitto_sub (apt-get install mosquitto-clients)"
        )
    topic = f"bench-{uuid.uuid4().hex[:8]}/ref"
    line = (json.dumps({"vehicle_id": "ev-000001", "pad": "x" * 260}) + "\n").encode()
    with tempfile.TemporaryFile() as lines:
        lines.write(line * n)
        lines.seek(0)
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                HOST,
                "-p",
                str(PORT),
                "-t",
                topic,
                "-q",
                "0",
                "-C",
                str(n),
                "-W",
                str(int(seconds)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # "Timed out" when the broker dropped some
        )
        time.sleep(0.5)  # subscribed
        t0 = time.perf_counter()
        pub = subprocess.Popen(
            ["mosquitto_pub", "-h", HOST, "-p", str(PORT), "-t", topic, "-q", "0", "-l"],
            stdin=lines,
        )
        got, last = 0, t0
        assert isinstance(sub.stdout, io.BufferedReader)
        while chunk := sub.stdout.read1(1 << 16):
            got += chunk.count(b"\n")
            last = time.perf_counter()
        sub.wait(timeout=seconds + 5)
        pub.wait(timeout=seconds + 5)
    rate = got / max(last - t0, 1e-9)
    return rate, row(
        f"broker limit: mosquitto_pub → mosquitto_sub, QoS 0, {len(line)} B ({got:,} delivered of {n:,})",
        0,
        rate,
        None,
        "msg/s",
        "",
        None,
    )


# -- the aggregator under load --------------------------------------------------------------
def start_publisher(prefix: str, *extra: str, tool: list[str] = LOADGEN) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*tool, "publish", "--prefix", prefix, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


async def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        return await asyncio.to_thread(proc.stdout.readline)


def make_service(prefix: str, interval_s: float, fast: bool = True) -> AggregatorService:
    settings = Settings(
        topic_prefix=prefix,
        log_level="warning",
        telemetry_interval_s=interval_s,
        control_step_s=5.0,
    )
    return AggregatorService(
        settings=settings,
        clock=SimClock(speed=1.0),
        store=MemoryStore(),
        client_id=f"bench-agg-{prefix.replace('/', '-')}",
        fast_ingest=fast,
    )


async def aggregator_ingest(
    kind: str,
    seconds: float,
    vehicles: int = 100_000,
    fast: bool = True,
    msg_rate: float = 0.0,
    publisher: str = "raw",
) -> dict[str, Any]:
    """Flat-out publishing for ``seconds``; the aggregator's accepted msg/s and updates/s,
    from the go until its counters stop moving."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    svc = make_service(prefix, 5.0, fast)
    task = asyncio.create_task(svc.run(), name="bench-aggregator")
    pub = start_publisher(
        prefix,
        "--kind",
        kind,
        "--vehicles",
        str(vehicles),
        "--seconds",
        str(seconds),
        "--msg-rate",
        str(msg_rate),
        tool=PUBLISHERS[publisher],
    )
    try:
        await wait_connected(svc.link, svc.ingest)
        assert (await readline(pub, 120)).strip() == "ready"

        def counts() -> tuple[int, int]:
            msgs = svc.accepted
            return msgs, (svc.batched_updates if kind == "batch" else msgs)

        m0, u0 = counts()
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        t0 = time.perf_counter()
        sent = asyncio.create_task(readline(pub, seconds + 60))
        last, t_last = counts(), t0
        while True:  # until the publisher is done and the counters have stood still 0.5 s
            await asyncio.sleep(0.1)
            now_counts = counts()
            if now_counts != last:
                last, t_last = now_counts, time.perf_counter()
            elif sent.done() and time.perf_counter() - t_last > 0.5:
                break
            if time.perf_counter() - t0 > seconds + 30:
                break
        report = json.loads(await sent)
    finally:
        if pub.poll() is None:
            pub.kill()
        pub.wait(timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    span = max(t_last - t0, 1e-9)
    return {
        "msgs": last[0] - m0,
        "updates": last[1] - u0,
        "msg_rate": (last[0] - m0) / span,
        "update_rate": (last[1] - u0) / span,
        "sent": report["sent"],
        "sent_rate": report["sent"] / report["seconds"],
        "rejected": dict(svc.rejected),
    }


async def at_scale(seconds: float, vehicles: int = 100_000, every_s: float = 10.0) -> list[Row]:
    """``vehicles`` reporting every ``every_s`` through bridges of 1000, a request active."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    rss0 = rss_bytes(trim=True)
    svc = make_service(prefix, every_s)
    svc.reports = asyncio.Queue()
    task = asyncio.create_task(svc.run(), name="bench-aggregator")
    rate = vehicles / every_s
    pub = start_publisher(
        prefix,
        "--kind",
        "batch",
        "--vehicles",
        str(vehicles),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
    )
    steps: list[StepReport] = []
    try:
        await wait_connected(svc.link)
        assert (await readline(pub, 120)).strip() == "ready"
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        t0 = time.perf_counter()
        requested = False
        while time.perf_counter() - t0 < seconds:
            async with asyncio.timeout(30):
                rep = await svc.reports.get()
            known = rep.status.vehicles_online
            if not requested and known >= 0.99 * vehicles:
                rss_known = rss_bytes()
                rss_trimmed = rss_bytes(trim=True)
                win = rep.capability.windows[0]
                svc.inbox.requests.append(
                    (
                        DispatchRequest(
                            request_id=f"bench-{uuid.uuid4().hex[:6]}",
                            power_kw=round(0.5 * win.min_power_kw, 1),
                            duration_s=3600.0,
                        ),
                        None,
                    )
                )
                requested = True
            elif requested:
                steps.append(rep)
        sent = json.loads(await readline(pub, 30))
    finally:
        if pub.poll() is None:
            pub.kill()
        pub.wait(timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if not requested:
        raise SystemExit(f"the fleet never got known within {seconds} s: raise --scale-seconds")
    n = len(svc.state)
    live = sum(svc.state.col(name).nbytes for name in svc.state.cols)
    held = sum(arr.nbytes for arr in svc.state.cols.values())
    ms = [r.step_ms for r in steps]
    first = steps[0] if steps else None
    budget: dict[str, Any] = {
        "unit": "ms",
        "ref": 1000.0,
        "ref_name": "1 s budget",
        "target": 1000.0,
    }
    out = [
        row(
            f"at scale: updates/s sent ({sent['updates']:,} in {sent['seconds']:.0f} s)",
            n,
            sent["updates"] / sent["seconds"],
            rate,
            "upd/s",
            "10k/s asked",
            None,
        ),
    ]
    if first is not None:
        out.append(
            row(
                f"at scale: step that admits the request ({first.setpoints_sent} msgs)",
                n,
                first.step_ms,
                **budget,
                lower_is_better=True,
            )
        )
    if len(ms) > 1:
        out += [
            row(
                "at scale: control step, median",
                n,
                float(np.median(ms[1:])),
                **budget,
                lower_is_better=True,
            ),
            row(
                "at scale: control step, max",
                n,
                float(np.max(ms[1:])),
                **budget,
                lower_is_better=True,
            ),
        ]
    out += [
        row(
            "fleet-state columns per vehicle (live rows)",
            n,
            live / max(n, 1),
            1024.0,
            "B",
            "1 KB",
            1024.0,
            lower_is_better=True,
        ),
        row(
            "fleet-state columns per vehicle (allocated)",
            n,
            held / max(n, 1),
            1024.0,
            "B",
            "1 KB",
            1024.0,
            lower_is_better=True,
        ),
        row(
            "process RSS growth per vehicle (as is)",
            n,
            (rss_known - rss0) / max(n, 1),
            1024.0,
            "B",
            "1 KB",
            1024.0,
            lower_is_better=True,
        ),
        row(
            "process RSS growth per vehicle (after gc + malloc_trim)",
            n,
            (rss_trimmed - rss0) / max(n, 1),
            1024.0,
            "B",
            "1 KB",
            None,
        ),
    ]
    return out


CASES = {
    "aiomqtt": ("single", False, 0.0, "per-vehicle JSON, aiomqtt link (--no-fast-ingest)"),
    "fast": ("single", True, 0.0, "per-vehicle JSON, fast ingest (the default)"),
    "batch": ("batch", True, 1000.0, "batches of 1000, fast ingest"),
}


async def run_all(
    seconds: float,
    scale_seconds: float,
    cases: tuple[str, ...] = tuple(CASES),
    repeat: int = 1,
    scale: bool = True,
    publisher: str = "raw",
) -> list[Row]:
    """The rows of one run; with ``repeat`` > 1, the broker limit and each case are measured
    that many times, interleaved, and each row is the run with the median ratio."""
    logs.configure(level="error")
    # First, while this process has not grown: its memory growth is part of the figures.
    scale_rows: list[Row] = []
    if scale:
        print("... 100k vehicles every 10 s", file=sys.stderr, flush=True)
        scale_rows = await at_scale(scale_seconds)
    runs: list[list[Row]] = []
    for k in range(repeat):
        print(f"... broker limit (run {k + 1}/{repeat})", file=sys.stderr, flush=True)
        ref, broker_row = broker_limit()
        rows_ = [broker_row]
        half = 0.5 * ref
        for kind, fast, msg_rate, what in (CASES[c] for c in cases):
            print(f"... ingest, {what}", file=sys.stderr, flush=True)
            got = await aggregator_ingest(
                kind, seconds, fast=fast, msg_rate=msg_rate, publisher=publisher
            )
            note = f"(offered {got['sent_rate']:,.0f} msg/s by {publisher})"
            rows_.append(
                row(
                    f"ingest, {what}: msg/s {note}",
                    0,
                    got["msg_rate"],
                    ref,
                    "msg/s",
                    "broker limit (a)",
                    # v2g aggregator ingests on the fast connection by default; the
                    # general client's row is its reference, not held to the target.
                    half if kind == "single" and fast else None,
                )
            )
            if kind == "batch":
                rows_.append(
                    row(
                        f"ingest, {what}: vehicle-updates/s",
                        0,
                        got["update_rate"],
                        ref,
                        "upd/s",
                        "broker limit (a), msg/s",
                        half,
                    )
                )
        if repeat > 1:
            print_table(rows_)
        runs.append(rows_)
    return [_median_row(same) for same in zip(*runs, strict=True)] + scale_rows


def _median_row(same: tuple[Row, ...]) -> Row:
    """The run with the median ratio (or value), named with the spread of all runs."""
    if len(same) == 1:
        return same[0]
    key = "ratio" if same[0]["ratio"] is not None else "value"
    ranked = sorted(same, key=lambda r: r[key])
    mid = dict(ranked[(len(ranked) - 1) // 2])
    mid["metric"] += f" [median of {len(same)}, {key} {ranked[0][key]:g}..{ranked[-1][key]:g}]"
    return mid


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: its --quick ones)."""
    return asyncio.run(run_all(4.0 if quick else 8.0, 35.0 if quick else 45.0))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="publishing time of each ingest run")
    ap.add_argument("--scale-seconds", type=float, default=45.0, help="length of the 100k run")
    ap.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"ingest cases to run, comma-separated, of {', '.join(CASES)}",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="measure the broker and each case this many times"
    )
    ap.add_argument("--no-scale", action="store_true", help="skip the 100k-vehicle run")
    ap.add_argument(
        "--publisher",
        choices=sorted(PUBLISHERS),
        default="raw",
        help="load for the ingest cases: prebuilt frames (bench.rawpub) or bench.loadgen (paho)",
    )
    ap.add_argument("--out", default=str(RESULTS / "ingest.json"))
    args = ap.parse_args()
    started = start()
    cases = tuple(c for c in args.cases.split(",") if c)
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    result = asyncio.run(
        run_all(
            args.seconds,
            args.scale_seconds,
            cases,
            max(1, args.repeat),
            not args.no_scale,
            args.publisher,
        )
    )
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
