"""Ingest rate through Mosquitto with one aggregator process, and with two on an MQTT 5
shared subscription (``V2G_SHARE_GROUP``), under the same load.

Each run starts its aggregator processes (the real ``AggregatorService``: its
``on_message`` validation and, with a share group, its lease, its forwarding of rows to
Redis and the leader's merge), lets them subscribe, then freezes them (SIGSTOP) while
separate publisher processes (paho, QoS 0) send the load: ``--vehicles`` vehicles x
``--rounds`` reports, each a valid ``Telemetry`` JSON on its own vehicle's topic. The
broker holds it for the frozen subscribers; then the aggregators are thawed and the
rate is the reports they accept per second of wall time until the last one. So the
publishers never compete with the aggregators for the machine's two cores, and both
setups drain the same backlog. The reference is one aggregator without a share group:
the platform as it ran before.

The broker is a Mosquitto of the bench's own on a free loopback port, with no queue
limit (``max_queued_messages 0``: a frozen QoS 0 subscriber would otherwise lose all but
1000); Redis is the one on 127.0.0.1:6379, under a prefix removed afterwards. Every wait
is bounded. Prints a table and writes JSON to bench/results/scale_out.json
(``{"when", "provenance", "runs", "rows"}``: the run's provenance, the raw runs, and
rows as bench.common.row makes them); ``rows()`` returns the same rows to a caller.

    .venv/bin/python -m bench.scale_out [--vehicles 10000 --rounds 4 --repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    RESULTS,
    ROOT,
    Row,
    module_argv,
    print_table,
    provenance,
    row,
    start,
    write_results,
)

TARGET_RATIO = 1.7
REDIS_URL = f"redis://{HOST}:6379/0"
LAST_RUNS: list[dict[str, Any]] = []  # the raw runs behind the latest rows()
LOG = RESULTS / "scale_out.log"


# -- an aggregator process --------------------------------------------------------------
async def worker(name: str, port: int, prefix: str, group: str, stats_path: Path) -> None:
    """Run one aggregator until SIGTERM; write what it accepted to ``stats_path`` (every
    0.2 s while running, and once more at the end)."""
    from aggregator.service import AggregatorService
    from aggregator.store import RedisStore
    from broker.settings import Settings
    from core.clock import SimClock
    from v2g import logs

    settings = Settings(
        topic_prefix=prefix,
        redis_prefix=f"bench-{prefix}",
        redis_url=REDIS_URL,
        broker_url=f"mqtt://{HOST}:{port}",
        control_step_s=1.0,
        telemetry_interval_s=5.0,
        share_group=group or None,
        lease_ttl_s=60.0,  # outlives the freeze: no takeover in the middle of a run
        keepalive_s=60,
        log_level="warning",
        status_every_wall_s=3600.0,
    )
    logs.configure(level="warning")
    store = RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    svc = AggregatorService(
        settings=settings, clock=SimClock(speed=1.0), store=store, client_id=f"bench-{name}"
    )
    # Wall time and this process's CPU time at its first and last accepted report.
    seen = {"accepted": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}
    handle = svc.on_message

    def counted(message: Any) -> None:
        before = svc.accepted
        handle(message)
        if svc.accepted > before:
            seen["accepted"] += 1
            seen["last"] = time.time()
            seen["cpu_last"] = time.process_time()
            if not seen["first"]:
                seen["first"], seen["cpu_first"] = seen["last"], seen["cpu_last"]

    svc.link.handler = counted

    def dump() -> None:
        scale = svc.scale
        stats_path.write_text(
            json.dumps(
                seen
                | {
                    "connected": svc.link.connected,
                    "received": svc.received,
                    "rejected": dict(svc.rejected),
                    "leader": bool(scale and scale.leading),
                    "forwarded": scale.stats.forwarded_rows if scale else 0,
                    "merged": scale.stats.merged_rows if scale else 0,
                }
            )
        )

    async def report() -> None:
        while True:
            dump()
            await asyncio.sleep(0.2)

    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(svc.run(), name="aggregator")
            tg.create_task(report(), name="report")
    except asyncio.CancelledError:
        pass
    finally:
        dump()
        await store.close()


# -- a publisher process ----------------------------------------------------------------
def publisher(port: int, prefix: str, first: int, count: int, rounds: int) -> None:
    """Publish ``rounds`` reports of vehicles ``first..first+count`` (QoS 0), then exit."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agents.fleet import SimFleet
    from agents.profiles import generate_fleet
    from agents.telemetry import telemetry_payloads

    fleet = SimFleet(generate_fleet(count, first, id_prefix=f"ev{first}"), time.time())
    topics = [f"{prefix}/vehicles/{vid}/telemetry" for vid in fleet.ids]
    now = time.time()
    batches = []
    for k in range(rounds):
        fleet.seq[:] = k + 1
        batches.append(telemetry_payloads(fleet, now - 5.0 * (rounds - k)))
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_queued_messages_set(0)
    client.connect(HOST, port)
    client.loop_start()
    try:
        for payloads in batches:
            for topic, payload in zip(topics, payloads, strict=True):
                client.publish(topic, payload, qos=0)
        # QoS 0 has no ack: wait until paho has written its queue to the socket.
        deadline = time.time() + 60.0
        while client.want_write() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        client.disconnect()
        client.loop_stop()


# -- the orchestration ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_mosquitto() -> Iterator[int]:
    """A Mosquitto on a free loopback port with no queue limit; stopped at exit."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start on {HOST}:{port}")
                time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    with LOG.open("ab") as log:
        return subprocess.Popen(
            module_argv("scale_out", *args),
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def run_once(
    port: int, processes: int, vehicles: int, rounds: int, publishers: int, timeout: float
) -> dict[str, Any]:
    """One measurement: ``processes`` aggregators (a share group if more than one) drain
    the backlog of ``vehicles x rounds`` reports; see the module docstring."""
    prefix = f"bench-so-{uuid.uuid4().hex[:8]}"
    group = "bench" if processes > 1 else ""
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    stats = [tmp / f"{k}.json" for k in range(processes)]
    per = vehicles // publishers
    sent = per * publishers * rounds
    workers = [
        _spawn(
            *("--worker", f"{prefix}-{k}", "--port", str(port), "--prefix", prefix),
            *("--group", group, "--stats", str(s)),
        )
        for k, s in enumerate(stats)
    ]
    thawed = 0.0
    load = os.getloadavg()[0]  # others' work on the machine, before this run
    try:
        deadline = time.monotonic() + 20.0
        while not all(_read(s).get("connected") for s in stats) or (
            group and not any(_read(s).get("leader") for s in stats)
        ):
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"aggregators did not come up: see {LOG}")
            time.sleep(0.05)
        time.sleep(0.5)
        for w in workers:
            w.send_signal(signal.SIGSTOP)
        pubs = [
            _spawn(
                *("--publisher", "--port", str(port), "--prefix", prefix),
                *("--first", str(k * per), "--count", str(per), "--rounds", str(rounds)),
            )
            for k in range(publishers)
        ]
        for p in pubs:
            p.wait(timeout=timeout)
        time.sleep(0.3)  # the broker has routed the last of it
        thawed = time.time()
        for w in workers:
            w.send_signal(signal.SIGCONT)
        end = time.monotonic() + timeout
        last_total, last_change = -1, time.monotonic()
        while time.monotonic() < end:
            total = sum(_read(s).get("accepted", 0) for s in stats)
            if total >= sent:
                break
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > 2.0:
                break
            time.sleep(0.1)
    finally:
        for w in workers:
            w.send_signal(signal.SIGCONT)
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(timeout=5.0)
        _cleanup(prefix)
    got = [_read(s) for s in stats]
    shutil.rmtree(tmp, ignore_errors=True)
    accepted = [int(g.get("accepted", 0)) for g in got]
    last = max(float(g.get("last", 0.0)) for g in got)
    seconds = max(last - thawed, 1e-3)
    return {
        "processes": processes,
        "sent": sent,
        "accepted": accepted,
        "rate": sum(accepted) / seconds,
        "seconds": round(seconds, 3),
        "busy_s": [round(float(g.get("last", 0)) - float(g.get("first", 0)), 3) for g in got],
        "cpu_s": [
            round(float(g.get("cpu_last", 0)) - float(g.get("cpu_first", 0)), 3) for g in got
        ],
        "loadavg_1m_before": round(load, 2),
        "leaders": sum(bool(g.get("leader")) for g in got),
        "forwarded": [g.get("forwarded", 0) for g in got],
        "merged": [g.get("merged", 0) for g in got],
        "rejected": [g.get("rejected", {}) for g in got],
    }


def _cleanup(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL, socket_timeout=2.0)
    try:
        keys = list(r.scan_iter(match=f"bench-{prefix}*"))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def rows(
    vehicles: int = 10_000,
    rounds: int = 4,
    repeat: int = 3,
    publishers: int = 2,
    timeout: float = 60.0,
) -> list[Row]:
    """Measure and return the table's rows: medians over ``repeat`` runs of each setup,
    run alternately so drifting background load hits both alike."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with own_mosquitto() as port:
        for k in range(repeat):
            for processes in (1, 2):
                print(f"... run {k + 1}/{repeat}, {processes} aggregator(s)", file=sys.stderr)
                runs[processes].append(
                    run_once(port, processes, vehicles, rounds, publishers, timeout)
                )
    LAST_RUNS[:] = runs[1] + runs[2]
    one = statistics.median(r["rate"] for r in runs[1])
    two = statistics.median(r["rate"] for r in runs[2])
    split = statistics.median(min(r["accepted"]) / max(1, sum(r["accepted"])) for r in runs[2])
    best = max(r["rate"] for r in runs[2]) / max(r["rate"] for r in runs[1])

    def cpu_us(k: int) -> float:
        """Aggregator CPU per accepted report: what the rate would be on idle cores."""
        return 1e6 * float(
            statistics.median(sum(r["cpu_s"]) / max(1, sum(r["accepted"])) for r in runs[k])
        )

    def lost(k: int) -> float:
        return 100.0 * max(1.0 - float(sum(r["accepted"])) / float(r["sent"]) for r in runs[k])

    n = vehicles
    return [
        row("telemetry ingest, 1 aggregator (no share group)", n, one, unit="upd/s"),
        row(
            "telemetry ingest, 2 aggregators ($share)",
            n,
            two,
            one,
            "upd/s",
            "1 aggregator",
            TARGET_RATIO,
            on_ratio=True,
        ),
        row("ratio, best run of each", n, best, unit="x"),
        row("aggregator CPU per report, 1 aggregator", n, cpu_us(1), unit="us"),
        row(
            "aggregator CPU per report, 2 aggregators (sum)",
            n,
            cpu_us(2),
            cpu_us(1),
            "us",
            "1 aggregator",
        ),
        row("share of the smaller of the 2", n, 100 * split, unit="%"),
        row("reports not accepted, 1 aggregator (max)", n, lost(1), unit="%"),
        row("reports not accepted, 2 aggregators (max)", n, lost(2), unit="%"),
        row("leaders per 2-aggregator run (max)", n, max(r["leaders"] for r in runs[2])),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vehicles", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=4, help="reports per vehicle")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--timeout", type=float, default=60.0, help="per wait, wall seconds")
    ap.add_argument("--out", default=str(RESULTS / "scale_out.json"))
    # The child processes.
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=1883, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--group", default="", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(args.worker, args.port, args.prefix, args.group, Path(args.stats)))
        return
    if args.publisher:
        publisher(args.port, args.prefix, args.first, args.count, args.rounds)
        return
    started = start()
    table = rows(args.vehicles, args.rounds, args.repeat, args.publishers, args.timeout)
    stamp = provenance(started)
    print_table(table, stamp)
    write_results(table, args.out, stamp, runs=LAST_RUNS)


if __name__ == "__main__":
    main()
