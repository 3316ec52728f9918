"""From a regulation signal message to every changed setpoint on the wire, at 1k and 10k.

Each size and path: an ``AggregatorService`` in this process with its MQTT link and its
signal loop (the two tasks of ``run()`` that this path needs; the timed control loop is
not started, so no control step competes for the dispatch lock) holds a
``frequency_regulation`` request admitted at ± half the narrower side of the fleet's
15-min range. An operator client then publishes ``DispatchSignal`` values on
``{prefix}/dispatch/{id}/signal`` (QoS 1, one every period, 2 s as RegD; alternating in
sign, 0.3..1 in size, so nearly every setpoint moves); a separate process (the raw
subscriber of bench.dispatch_latency) timestamps every setpoint message it receives. A
vehicle's latency is the arrival of its setpoint (or of the bridge batch carrying it)
minus the publish time of the signal; p50 and p99 are over every vehicle of every
signal, "all on the wire" is the last vehicle of the slowest signal, and the p99's ratio
to the 2 s period is the share of the period it uses. A fourth row gives the aggregator's
own figure (``signal_latency_ms``: signal received to setpoints acked by the broker), which
tells the platform's share from the broker's and the subscriber's (a Python client, which
receives some 8-25k msg/s; past Mosquitto's queue limit it loses messages, and the
percentiles are then over those it saw).

Attributing arrivals to signals: every signal's setpoints carry the request's id, so they
are told apart by time. A signal is published only once all setpoints of the one before
are in (the count the dispatcher moved, read once the signal loop has published them),
or none has come for 2 s (the broker drops QoS 1 messages past its queue limit for a
subscriber that falls behind; the share seen is then in the metric); the arrivals after
a signal's publish time are its own. Waiting costs nothing at a 2 s period while the
latency stays well inside it; if it did not, the next signal goes late, never early.
The admission step's own setpoints (the fleet moved to its operating point) are waited
for in the same way before the first signal.

Setpoints go through the general client (``MqttLink``: "general") or the lean
publish-only connection ``v2g aggregator`` uses by default (``broker/fastpub.py``: "fast"),
one by one (``v2g/vehicles/{vid}/setpoint``) to vehicles that report for
themselves and batched per bridge (``v2g/bridges/{id}/setpoints``, 1000 vehicles a
bridge) to vehicles heard through bridges. The platform clock is held still (no vehicle
goes stale); vehicles do not report between signals. What this does not include: a
signal that arrives during a control step waits for it (the dispatch lock), up to one
step's time (bench/control_step.py). Target: p99 <= 500 ms at 10k, against the 2 s period.

Needs Mosquitto on 127.0.0.1:1883. Prints a table, writes bench/results/signal_latency.json;
``rows()`` returns the same rows to a caller.

    .venv/bin/python -m bench.signal_latency [--sizes 1000,10000] [--signals 10] [--period 2]
        [--paths general,fast]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any

import aiomqtt
import numpy as np

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from bench.common import (
    HOST,
    PORT,
    RESULTS,
    T0,
    Row,
    print_table,
    provenance,
    row,
    start,
    wait_connected,
    write_results,
)
from bench.dispatch_latency import PATHS, Arrivals, load_fleet
from broker.models import DispatchRequest, DispatchSignal, Service, from_epoch
from broker.settings import Settings
from core.clock import ManualClock
from v2g import logs

PERIOD_MS = 2000.0  # RegD: a new value every 2 s
TARGET_P99_MS = 500.0
QUIET_S = 2.0  # no arrival for this long: the rest of a signal's setpoints are not coming
SIGNAL_TIMEOUT_S = 10.0  # the signal loop must have published a signal's setpoints by then


def signal_values(count: int, seed: int = 7) -> list[float]:
    """Alternating in sign, 0.3..1 in size: every signal moves the fleet across its range."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.3, 1.0, count)
    return [round(float(s) * (1 if k % 2 == 0 else -1), 3) for k, s in enumerate(size)]


async def wait_arrivals(
    arrivals: Arrivals, rid: str, since: float, want: int
) -> list[tuple[float, int]]:
    """The setpoints of ``rid`` that arrived after ``since``: once ``want`` vehicles are in,
    or none has come for QUIET_S."""
    seen, quiet_since = 0, time.monotonic()
    while seen < want and time.monotonic() - quiet_since < QUIET_S:
        await asyncio.sleep(0.002)
        now_seen = sum(n for t, n in arrivals.of(rid) if t >= since)
        if now_seen != seen:
            seen, quiet_since = now_seen, time.monotonic()
    return [(t, n) for t, n in arrivals.of(rid) if t >= since]


async def measure(
    n: int, batched: bool, signals: int, period_s: float, qos: int, fast: bool
) -> list[Row]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(topic_prefix=prefix, log_level="warning", control_step_s=5.0)
    svc = AggregatorService(
        settings=settings,
        clock=ManualClock(T0),
        store=MemoryStore(),
        client_id=f"bench-{prefix}",
        fast_setpoints=fast,
    )
    # What run() starts for this path: the MQTT link(s) and the signal loop.
    tasks = [
        asyncio.create_task(svc.link.run(), name="bench-aggregator-mqtt"),
        asyncio.create_task(svc._signal_loop(), name="bench-aggregator-signals"),
    ]
    if svc.setpoints is not None:
        tasks.append(asyncio.create_task(svc.setpoints.run(), name="bench-setpoints"))
    # The raw subscriber (one QoS 1 connection per 500 vehicles): a single paho client
    # cannot take a fast burst, and the broker drops what it cannot queue.
    ids = [] if batched else SimFleet(generate_fleet(n, 1), T0).ids
    arrivals = Arrivals(prefix, 60.0 + signals * (period_s + 2 * QUIET_S), ids)
    lat_ms: list[float] = []
    last_ms: list[float] = []
    counts: list[int] = []
    delivered: list[float] = []
    own_ms: list[float] = []  # the aggregator's own figure: signal in -> setpoints acked
    late = 0
    try:
        await wait_connected(svc.link, svc.setpoints)
        load_fleet(svc, n, batched)
        async with svc._dispatch_lock:
            rep = await svc.step()  # the fleet is known; no request yet
        win = rep.capability.windows[0]  # 15 min
        capacity = round(0.5 * min(-win.min_power_kw, win.max_power_kw), 1)
        rid = f"reg-{uuid.uuid4().hex[:8]}"
        req = DispatchRequest(
            request_id=rid,
            service=Service.FREQUENCY_REGULATION,
            capacity_kw=capacity,
            duration_s=3600.0,
        )
        async with aiomqtt.Client(HOST, PORT, identifier=f"bench-op-{prefix}") as op:
            await op.publish(settings.topics.dispatch_requests, req.to_json(), qos=1)
            async with asyncio.timeout(10):
                while not svc.inbox.requests:  # noqa: ASYNC110 - polling is the probe
                    await asyncio.sleep(0.001)
            t_admit = time.time()
            async with svc._dispatch_lock:
                rep = await svc.step()
            answer = next(a for a in rep.results if a.request_id == rid)
            if answer.status not in ("accepted", "partial"):
                raise SystemExit(f"the regulation request was {answer.status}: {answer.reason}")
            assert svc.last_output is not None
            await wait_arrivals(arrivals, rid, t_admit, int(svc.last_output.rows.size))
            topic = settings.topics.dispatch_signal(rid)
            next_at = time.monotonic()
            for k, value in enumerate(signal_values(signals)):
                wait = next_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif k > 0:  # the one before took longer than the period
                    late += 1
                next_at = time.monotonic() + period_s
                done_before = len(svc.signal_latency_ms)
                sample = DispatchSignal(value=value, ts=from_epoch(svc.clock.now()))
                t0 = time.time()
                await op.publish(topic, sample.to_json(), qos=qos)
                async with asyncio.timeout(SIGNAL_TIMEOUT_S):
                    while len(svc.signal_latency_ms) == done_before:  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
                own_ms.append(svc.signal_latency_ms[-1])
                # The vehicles this signal moved (the dispatcher keeps them for its score).
                want = int(svc.dispatcher.tracking.signal_rows[rid].size)
                got = await wait_arrivals(arrivals, rid, t0, want)
                if not got:
                    raise SystemExit(f"no setpoint of signal {k} reached the subscriber")
                times = np.repeat([t for t, _ in got], [c for _, c in got])
                delivered.append(times.size / want)
                lat_ms.extend(((times - t0) * 1e3).tolist())
                last_ms.append(float((times.max() - t0) * 1e3))
                counts.append(want)
                print(
                    f"    signal {k + 1}/{signals} ({value:+.2f}): {want} setpoints,"
                    f" last at {last_ms[-1]:.0f} ms (acked to the aggregator at {own_ms[-1]:.0f})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        arrivals.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    how = ("batched per bridge" if batched else "one by one") + (", fast" if fast else ", general")
    seen = f", {min(delivered):.0%} seen" if min(delivered) < 1.0 else ""
    late_note = f", {late} sent late" if late else ""
    p50, p99 = float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99))
    kw: dict[str, Any] = {
        "unit": "ms",
        "ref": PERIOD_MS,
        "ref_name": "2 s signal period",
        "lower_is_better": True,
    }
    return [
        row(
            f"signal → setpoints, {how}: p50 (~{int(np.median(counts))} setpoints,"
            f" ±{capacity:g} kW)",
            n,
            p50,
            **kw,
        ),
        row(
            f"signal → setpoints, {how}: p99",
            n,
            p99,
            target=TARGET_P99_MS if n == 10_000 and (fast or batched) else None,
            **kw,
        ),
        row(
            f"signal → all setpoints on the wire, {how}: worst of {signals}{seen}{late_note}",
            n,
            max(last_ms),
            **kw,
        ),
        row(
            f"signal in → setpoints acked by the broker, {how}: p99 (the aggregator's own)",
            n,
            float(np.percentile(own_ms, 99)),
            **kw,
        ),
    ]


async def run_all(
    sizes: list[int],
    signals: int,
    period_s: float = 2.0,
    qos: int = 1,
    paths: tuple[str, ...] = PATHS,
) -> list[Row]:
    logs.configure(level="error")
    rows_: list[Row] = []
    for n in sizes:
        for batched in (False, True):
            for f in [p == "fast" for p in paths]:
                print(
                    f"... N={n} {'batched' if batched else 'one by one'}"
                    f"{' fast' if f else ''}: {signals} signals every {period_s:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                rows_ += await measure(n, batched, signals, period_s, qos, f)
    return rows_


def rows(quick: bool = False) -> list[Row]:
    """The benchmark's rows at the sizes bench/run uses (``quick``: its --quick ones)."""
    return asyncio.run(run_all([1000, 10_000], 5 if quick else 10))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--signals", type=int, default=10, help="signals per size and path")
    ap.add_argument("--period", type=float, default=2.0, help="seconds between signals")
    ap.add_argument("--qos", type=int, choices=[0, 1], default=1, help="the operator's QoS")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="setpoints through: general, fast (both)"
    )
    ap.add_argument("--out", default=str(RESULTS / "signal_latency.json"))
    args = ap.parse_args()
    started = start()
    if not 1 <= args.signals <= 1000 or not 0.05 <= args.period <= 60:
        ap.error("--signals must be 1..1000 and --period 0.05..60 s")
    paths = tuple(args.paths.split(","))
    if not paths or not set(paths) <= set(PATHS):
        ap.error(f"--paths takes {', '.join(PATHS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    result = asyncio.run(run_all(sizes, args.signals, args.period, args.qos, paths))
    stamp = provenance(started)
    print_table(result, stamp)
    write_results(result, args.out, stamp)


if __name__ == "__main__":
    main()
