"""The real OCPP gateway under a 1 s control step, next to the MQTT bridge path.

Three processes on loopback, as in production: the gateway (``v2g ocpp --open``, this
venv's ``v2g``, on a free port, a unique topic and Redis prefix on the broker at
127.0.0.1:1883), the N simulated stations (agents/ocpp_stations.py, every car OCPP 2.1
with BPT; this module's ``stations`` mode) and, here, the setpoint source: once the
gateway reports every station's EV as a vehicle that may discharge, one ``SetpointBatch``
a second for ``--steps`` steps on ``{prefix}/bridges/{bridge}/setpoints`` (alternating
about +/-2 kW, each step its own value, valid 5 s). A setpoint's latency is from that
publish to the station's answer to the ``SetChargingProfile`` that carries it (both
sides read CLOCK_MONOTONIC, which one machine shares between processes). A step is held
when every station answered within the step.

The reference, in the same run at the same N: the same setpoints to simulated MQTT bridge
agents (``v2g agents --mode multiplexed --batch``, 4 bridges; this module's ``agents``
mode runs the same AgentRuntime), the latency from the publish to the agent applying the
batch. What the OCPP path adds is the gateway's translation and one websocket round trip
per station.

Each size is bounded (connect 240 s, the steps, plus 60 s). Prints a table and writes
bench/results/ocpp_gateway.json with the run's provenance (bench.common).

    .venv/bin/python -m bench.ocpp_gateway [--sizes 250,1000] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

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
)
from bench.common import write_results as write_json

STEP_S = 1.0
VALID_S = 5.0
METER_S = 5.0
CONNECT_TIMEOUT_S = 240.0
SIZES = (250, 1000)
BRIDGE = "gw-bench"
AGENT_LINKS = 4  # `v2g agents --mode multiplexed`'s default --connections
REDIS_URL = os.environ.get("V2G_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _kw(k: int) -> float:
    """Step k's setpoint in kW: alternating sign, a value of its own (to match answers)."""
    return round((1.0 if k % 2 else -1.0) * (2.0 + 0.01 * k), 2)


def _step_of(kw: float, steps: int) -> int | None:
    for k in range(steps):
        if abs(_kw(k) - kw) < 0.004:
            return k
    return None


def _quiet() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


# -- the stations, in a process of their own -------------------------------------------------
async def _stations(url: str, count: int) -> None:
    """Run ``count`` stations; record (monotonic time, setpoint W) of every profile they
    answer; on a line on stdin, print them as one JSON line and stop."""
    from agents.ocpp_stations import OcppStations, build_stations
    from core.clock import SimClock

    _quiet()
    stations = build_stations(
        url=url,
        count=count,
        clock=SimClock(),
        mix="v21bpt=1",
        seed=1,
        telemetry_interval_s=METER_S,
        reconnect_min_s=1.0,
    )
    got: list[tuple[float, float]] = []
    apply = OcppStations.apply_profile

    def timed(st: Any, profile: dict[str, Any]) -> tuple[str, str | None]:
        answer = apply(stations, st, profile)
        with contextlib.suppress(LookupError, TypeError):
            period = profile["charging_schedule"][0]["charging_schedule_period"][0]
            got.append((time.monotonic(), float(period.get("setpoint", float("nan")))))
        return answer

    stations.apply_profile = timed  # type: ignore[method-assign]
    task = asyncio.create_task(stations.run(), name="bench-stations")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    out = {"got": got, "violations": sum(stations.violations.values())}
    print("result " + json.dumps(out | {"summary": stations.summary()}), flush=True)


# -- the MQTT bridge agents, in a process of their own --------------------------------------
async def _agents(prefix: str, count: int) -> None:
    """``v2g agents --mode multiplexed --batch`` with ``count`` vehicles: record (monotonic
    time, first power_kw, vehicles) of every SetpointBatch applied; "ready" when the
    links are up; on a line on stdin, print them as one JSON line and stop."""
    from agents.fleet import SimFleet
    from agents.profiles import generate_fleet
    from agents.runtime import AgentRuntime
    from bench.common import wait_connected
    from broker.settings import Settings
    from core.clock import SimClock

    _quiet()
    settings = Settings(broker_url=f"mqtt://{HOST}:{PORT}", topic_prefix=prefix)
    clock = SimClock()
    fleet = SimFleet(generate_fleet(count, 1), clock.now(), step_s=settings.telemetry_interval_s)
    rt = AgentRuntime(
        settings=settings,
        clock=clock,
        fleet=fleet,
        mode="multiplexed",
        connections=AGENT_LINKS,
        batch=True,
    )
    got: list[tuple[float, float, int]] = []
    on_batch = rt._on_setpoint_batch

    def timed(topic: str, payload: bytes) -> None:
        before = rt.setpoints_applied
        on_batch(topic, payload)
        body = json.loads(payload)
        got.append((time.monotonic(), float(body["power_kw"][0]), rt.setpoints_applied - before))

    rt._on_setpoint_batch = timed  # type: ignore[method-assign]
    task = asyncio.create_task(rt.run(), name="bench-agents")
    await wait_connected(*rt.links, timeout=30.0)
    print("ready " + json.dumps({"bridges": rt.bridge_ids, "ids": fleet.ids}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print("result " + json.dumps({"got": got}), flush=True)


# -- the setpoint source, here ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setpoints(prefix_bridge: str, ids: list[str], kw: float, now: float) -> bytes:
    from broker.models import SetpointBatch, from_epoch

    return SetpointBatch.model_validate(
        {
            "bridge_id": prefix_bridge,
            "request_id": f"bench-{uuid.uuid4().hex[:8]}",
            "issued_at": from_epoch(now),
            "vehicle_id": ids,
            "power_kw": [kw] * len(ids),
            "valid_until": [now + VALID_S] * len(ids),
        }
    ).to_json()


async def _drive(client: Any, topics: list[tuple[str, str, list[str]]], steps: int) -> list[float]:
    """Publish step k's setpoints to every (topic, bridge, ids) at t0 + k s; the
    monotonic time of each step's publish."""
    sent: list[float] = []
    t0 = time.monotonic() + 0.2
    for k in range(steps):
        await asyncio.sleep(max(0.0, t0 + k * STEP_S - time.monotonic()))
        sent.append(time.monotonic())
        now = time.time()
        for topic, bridge, ids in topics:
            await client.publish(topic, _setpoints(bridge, ids, _kw(k), now), qos=1)
    await asyncio.sleep(STEP_S * 2)
    return sent


async def _finish(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"done\n")
    await proc.stdin.drain()
    async with asyncio.timeout(60.0):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError("the child process ended without a result")
            if line.startswith("result "):
                result: dict[str, Any] = json.loads(line[len("result ") :])
                return result


async def _child(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *module_argv("ocpp_gateway", *args),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=2**28,
    )


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is not None and proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(10.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _latencies(
    got: list[tuple[float, float]], sent: list[float], count: int, steps: int, per_w: float
) -> dict[str, Any]:
    """Per step, the latency of every answer matched to it by its value; a step is held
    when all ``count`` answered within STEP_S."""
    per: list[list[float]] = [[] for _ in range(steps)]
    for t, value in got:
        k = _step_of(value / per_w, steps)
        if k is not None:
            per[k].append(t - sent[k])
    flat = [x for p in per for x in p]
    held = [len(p) >= count and max(p) <= STEP_S for p in per]
    return {
        "latency_s": flat,
        "answered": len(flat),
        "expected": count * steps,
        "steps_held": int(sum(held)),
        "step_last_s": [max(p) if p else float("inf") for p in per],
    }


async def _measure(count: int, steps: int) -> dict[str, Any]:
    """One size: the gateway path, then the MQTT bridge path, each with its own prefix."""
    import aiomqtt
    import redis.asyncio as aioredis

    from broker.settings import Settings

    prefix = f"bench-ocppgw-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=f"mqtt://{HOST}:{PORT}", topic_prefix=prefix)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("V2G_")} | {
        "V2G_BROKER_URL": settings.broker_url,
        "V2G_REDIS_URL": REDIS_URL,
        "V2G_TOPIC_PREFIX": prefix,
        "V2G_LOG_FORMAT": "json",
    }
    v2g = str(Path(sys.executable).parent / "v2g")
    log = RESULTS / f"ocpp_gateway-{count}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    gw = stations = agents = None
    out: dict[str, Any] = {"count": count, "steps": steps}
    try:
        with log.open("wb") as sink:
            gw = await asyncio.create_subprocess_exec(
                v2g, "ocpp", "--listen", f"127.0.0.1:{port}", "--open", "--bridge-id", BRIDGE,
                env=env, stdout=sink, stderr=sink, cwd=ROOT,
            )  # fmt: skip
        async with asyncio.timeout(30.0):
            while b"ocpp_gateway_listening" not in log.read_bytes():
                if gw.returncode is not None:
                    raise RuntimeError(f"the gateway stopped; see {log}")
                await asyncio.sleep(0.2)
        async with aiomqtt.Client(HOST, PORT, identifier=f"{prefix}-source") as client:
            await client.subscribe(settings.topics.bridge_telemetry(BRIDGE), qos=0)
            stations = await _child(
                "stations", "--url", f"ws://127.0.0.1:{port}", "--count", str(count)
            )
            ready: dict[str, float] = {}
            t = time.perf_counter()

            async def heard() -> None:
                async for m in client.messages:
                    body = json.loads(bytes(m.payload))
                    for vid, dis in zip(body["vehicle_id"], body["max_discharge_kw"], strict=True):
                        if dis and dis > 0:
                            ready[vid] = dis
                    if len(ready) >= count:
                        return

            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await heard()
            out["connect_s"] = time.perf_counter() - t
            await client.unsubscribe(settings.topics.bridge_telemetry(BRIDGE))
            ids = sorted(ready)
            cpu_before = _cpu_s(gw.pid), _cpu_s(stations.pid)
            t = time.perf_counter()
            sent = await _drive(
                client, [(settings.topics.bridge_setpoints(BRIDGE), BRIDGE, ids)], steps
            )
            wall = time.perf_counter() - t
            out["gateway_cpu_share"] = (_cpu_s(gw.pid) - cpu_before[0]) / wall
            out["stations_cpu_share"] = (_cpu_s(stations.pid) - cpu_before[1]) / wall
            res = await _finish(stations)
            out["ocpp"] = _latencies([tuple(g) for g in res["got"]], sent, count, steps, 1000.0)
            out["violations"] = res["violations"]
            out["stations_summary"] = res["summary"]
            await _stop(stations)
            stations = None
            await _stop(gw)
            gw = None

            agents = await _child("agents", "--prefix", prefix + "-mqtt", "--count", str(count))
            assert agents.stdout is not None
            async with asyncio.timeout(60.0):
                line = (await agents.stdout.readline()).decode()
            if not line.startswith("ready "):
                raise RuntimeError("the agents process did not start")
            info = json.loads(line[len("ready ") :])
            mqtt = Settings(broker_url=settings.broker_url, topic_prefix=prefix + "-mqtt")
            k = len(info["bridges"])
            topics = [
                (mqtt.topics.bridge_setpoints(b), b, info["ids"][j::k])
                for j, b in enumerate(info["bridges"])
            ]
            sent = await _drive(client, topics, steps)
            res = await _finish(agents)
            got = [(t_, kw * 1000.0) for t_, kw, n in res["got"] for _ in range(n)]
            out["mqtt"] = _latencies(got, sent, count, steps, 1000.0)
            # what stays retained: the clock anchor the gateway created for its prefix,
            # and the agents' offline status of every vehicle
            await client.publish(settings.topics.clock, b"", qos=1, retain=True)
            for vid in info["ids"]:
                await client.publish(mqtt.topics.vehicle_status(vid), b"", qos=1, retain=True)
    finally:
        for p in (stations, agents, gw):
            await _stop(p)
        r = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await r.delete(*keys)
        finally:
            await r.aclose()
    return out


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU so far, s (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q)) * 1e3 if values else float("nan")


def bench(sizes: list[int], steps: int) -> tuple[list[Row], list[dict[str, Any]]]:
    out: list[Row] = []
    raw: list[dict[str, Any]] = []
    held = 0
    for n in sizes:
        r = asyncio.run(_measure(n, steps))
        o, m = r["ocpp"], r["mqtt"]
        print(
            f"N={n}: connected in {r['connect_s']:.1f} s; OCPP p50 {_ms(o['latency_s'], 0.5):.0f}"
            f" p99 {_ms(o['latency_s'], 0.99):.0f} ms, {o['answered']}/{o['expected']} answered,"
            f" {o['steps_held']}/{steps} steps held; MQTT p50 {_ms(m['latency_s'], 0.5):.0f}"
            f" p99 {_ms(m['latency_s'], 0.99):.0f} ms; gateway CPU"
            f" {r['gateway_cpu_share']:.0%}, stations' {r['stations_cpu_share']:.0%};"
            f" violations {r['violations']}",
            file=sys.stderr,
        )
        raw.append(
            {k: v for k, v in r.items() if k not in ("ocpp", "mqtt")}
            | {
                f"{path}_{name}": val
                for path in ("ocpp", "mqtt")
                for name, val in (
                    ("p50_ms", _ms(r[path]["latency_s"], 0.5)),
                    ("p99_ms", _ms(r[path]["latency_s"], 0.99)),
                    ("max_ms", _ms(r[path]["latency_s"], 1.0)),
                    ("answered", r[path]["answered"]),
                    ("expected", r[path]["expected"]),
                    ("steps_held", r[path]["steps_held"]),
                )
            }
        )
        if o["steps_held"] == steps and r["violations"] == 0:
            held = n
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            out.append(
                row(f"gateway: SetpointBatch -> SetChargingProfile answered {name}", n,
                    _ms(o["latency_s"], q), _ms(m["latency_s"], q), "ms",
                    "MQTT bridge agents, same setpoints",
                    STEP_S * 1e3 if name == "p99" else None, lower_is_better=True)
            )  # fmt: skip
        out.append(
            row("gateway: steps with every station answered within 1 s", n,
                float(o["steps_held"]), float(m["steps_held"]), "steps",
                "MQTT bridge agents", float(steps))
        )  # fmt: skip
    last = raw[-1]
    # The gateway's CPU per station at one setpoint a second (meter values included): what
    # the machine's load does not change, unlike the wall figures above.
    out.append(
        row("stations one idle core of the gateway holds at 1 s, from its CPU",
            last["count"], last["count"] / max(last["gateway_cpu_share"], 1e-9), None,
            "stations", target=float(max(sizes)))
    )  # fmt: skip
    out.append(
        row("stations one gateway process holds at a 1 s step, measured", max(sizes),
            float(held), None, "stations", target=float(max(sizes)))
    )  # fmt: skip
    return out, raw


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("stations", help="(internal) the stations' process")
    s.add_argument("--url", required=True)
    s.add_argument("--count", type=int, required=True)
    a = sub.add_parser("agents", help="(internal) the MQTT bridge agents' process")
    a.add_argument("--prefix", required=True)
    a.add_argument("--count", type=int, required=True)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "ocpp_gateway.json"))
    args = ap.parse_args()
    if args.cmd == "stations":
        asyncio.run(_stations(args.url, args.count))
        return
    if args.cmd == "agents":
        asyncio.run(_agents(args.prefix, args.count))
        return
    started = start()
    result, raw = bench([int(x) for x in args.sizes.split(",")], max(2, min(args.steps, 60)))
    stamp = provenance(started)
    print_table(result, stamp)
    write_json(result, args.out, stamp, runs=raw)


if __name__ == "__main__":
    main()
