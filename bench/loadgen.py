"""Load for the benchmarks, run as separate processes: a paho publisher of vehicle telemetry
and a paho subscriber that timestamps setpoints. Loopback only, bounded in count and time.

    python -m bench.loadgen publish --prefix P --kind single|batch --vehicles N
        [--per-batch 1000] [--rate UPDATES_PER_S] [--seconds S] [--max-msgs M]
    python -m bench.loadgen subscribe --prefix P --seconds S

``publish`` prints ``ready`` once its payloads are made, waits for a line on stdin, then
publishes and prints one JSON line of what it sent. With ``--rate 0`` it sends as fast as
it can (cycling over its payloads; repeats are stale to the aggregator but still cost it
a receive and a validation); with a rate it paces whole rounds of fresh reports (every
vehicle once per round, new seq and ts). ``subscribe`` prints ``ready`` once subscribed,
then one JSON line per setpoint message: arrival time, request id and vehicles in it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_batch_payloads, telemetry_payloads
from bench.common import HOST, PORT, publish_parser


def _client(name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
    c.max_queued_messages_set(0)
    c.connect(HOST, PORT, keepalive=30)
    return c


Msg = tuple[str, bytes, int]  # topic, payload, vehicle-updates in it


def round_messages(
    fleet: SimFleet, now: float, kind: str, per_batch: int, prefix: str
) -> list[Msg]:
    """Every vehicle's report at ``now``: one message each, or one batch per bridge."""
    fleet.tick(now)
    if kind == "single":
        bodies = telemetry_payloads(fleet, now)
        return [
            (f"{prefix}/vehicles/{v}/telemetry", b, 1)
            for v, b in zip(fleet.ids, bodies, strict=True)
        ]
    out = []
    for k, start in enumerate(range(0, len(fleet), per_batch)):
        bridge = f"bench-gw{k}"
        rows = np.arange(start, min(start + per_batch, len(fleet)))
        for body in telemetry_batch_payloads(fleet, now, rows, bridge, max_vehicles=per_batch):
            out.append((f"{prefix}/bridges/{bridge}/telemetry", body, int(rows.size)))
    return out


def publish(args: argparse.Namespace) -> None:
    fleet = SimFleet(
        generate_fleet(args.vehicles, args.seed, id_prefix=args.id_prefix), time.time()
    )
    c = _client(f"bench-pub-{args.prefix.replace('/', '-')}-{args.seed}")
    c.loop_start()
    msgs = round_messages(fleet, time.time(), args.kind, args.per_batch, args.prefix)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    sent = updates = 0
    if args.rate <= 0:  # flat out, cycling over one round
        i = 0
        while sent < args.max_msgs and (sent % 64 or time.perf_counter() < deadline):
            if args.msg_rate > 0 and sent % 64 == 0:  # a cap, for messages the size of batches
                ahead = t0 + sent / args.msg_rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            topic, body, n = msgs[i]
            c.publish(topic, body, qos=0)
            sent += 1
            updates += n
            i = (i + 1) % len(msgs)
    else:  # paced: whole rounds of fresh reports, spread evenly over each round's period
        period = args.vehicles / args.rate
        start = time.perf_counter()
        while time.perf_counter() < deadline and sent < args.max_msgs:
            for k, (topic, body, n) in enumerate(msgs):
                due = start + period * k / len(msgs)
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                if time.perf_counter() >= deadline:
                    break
                c.publish(topic, body, qos=0)
                sent += 1
                updates += n
            start += period
            msgs = round_messages(fleet, time.time(), args.kind, args.per_batch, args.prefix)
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    print(json.dumps({"sent": sent, "updates": updates, "seconds": elapsed}), flush=True)


def subscribe(args: argparse.Namespace) -> None:
    done = threading.Event()
    lock = threading.Lock()

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        at = time.time()
        if m.topic.endswith("/setpoints"):  # a bridge's batch: count its vehicles
            try:
                doc = json.loads(m.payload)
            except ValueError:
                return
            rid, n = doc.get("request_id"), len(doc.get("vehicle_id", []))
        else:  # one vehicle: no full decode, this subscriber must keep up with a burst
            rid = m.payload.partition(b'"request_id":"')[2].partition(b'"')[0].decode()
            n = 1
        with lock:
            sys.stdout.write(json.dumps({"t": at, "request_id": rid, "n": n}) + "\n")

    def flusher() -> None:  # lines go out every 20 ms, not one write per message
        while not done.wait(0.02):
            with lock:
                sys.stdout.flush()

    def on_subscribe(*_: object) -> None:
        print("ready", flush=True)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{time.time_ns()}")
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    c.connect(HOST, PORT, keepalive=30)
    c.subscribe(
        [(f"{args.prefix}/vehicles/+/setpoint", 1), (f"{args.prefix}/bridges/+/setpoints", 1)]
    )
    c.loop_start()
    threading.Thread(target=flusher, daemon=True).start()
    time.sleep(args.seconds)
    done.set()
    c.loop_stop()
    c.disconnect()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    publish_parser(sub, max_msgs=2_000_000, rate_help="vehicle-updates/s; 0: flat out")
    s = sub.add_parser("subscribe")
    s.add_argument("--prefix", required=True)
    s.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    publish(args) if args.cmd == "publish" else subscribe(args)


if __name__ == "__main__":
    main()
