"""A QoS 0 telemetry publisher that costs next to no CPU, for the ingest benchmark: the
messages of ``bench.loadgen``, framed as MQTT 5 PUBLISH packets once (the ``mqtt5`` codec), then written to
the socket many at a time. Loopback only, bounded in count and time.

Why: bench/ingest.py sets the aggregator's ingest against the broker's limit measured
with Mosquitto's C clients, on a 2-core machine. Published through paho, the load took a
core of its own (~13 µs of Python a message) and offered no more than ~60-80k msg/s, so
the figure measured the publisher as much as the aggregator. This one writes prebuilt
frames, as ``mosquitto_pub -l`` does from its file.

    python -m bench.rawpub publish --prefix P --kind single|batch --vehicles N
        [--per-batch 1000] [--msg-rate MSGS_PER_S] [--seconds S] [--max-msgs M]

Same protocol as ``bench.loadgen publish`` with ``--rate 0`` (flat out, cycling over one
round of reports; ``--msg-rate`` caps it): prints ``ready`` once connected with its
frames made, waits for a line on stdin, publishes, then prints one JSON line of what it
sent.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import mqtt5

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from bench.common import HOST, PORT, publish_parser
from bench.loadgen import round_messages

PER_WRITE = 256 * 1024  # bytes of frames handed to the socket at once


def publish(args: argparse.Namespace) -> None:
    fleet = SimFleet(
        generate_fleet(args.vehicles, args.seed, id_prefix=args.id_prefix), time.time()
    )
    msgs = round_messages(fleet, time.time(), args.kind, args.per_batch, args.prefix)
    # Runs of whole frames, each about PER_WRITE bytes: (bytes, messages, updates).
    runs: list[tuple[bytes, int, int]] = []
    frames: list[bytes] = []
    size = updates = 0
    for topic, body, n in msgs:
        frames.append(mqtt5.PublishPacket(topic=topic, payload=body).write())
        size, updates = size + len(frames[-1]), updates + n
        if size >= PER_WRITE or args.msg_rate > 0:  # paced: one message per write
            runs.append((b"".join(frames), len(frames), updates))
            frames, size, updates = [], 0, 0
    if frames:
        runs.append((b"".join(frames), len(frames), updates))
    sock = socket.create_connection((HOST, PORT), timeout=10)
    client_id = f"bench-rawpub-{args.prefix.replace('/', '-')}-{args.seed}"
    sock.sendall(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=120).write())
    connack, _ = mqtt5.read(memoryview(sock.recv(256)))
    if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != 0:
        raise SystemExit(f"the broker refused the publisher: {connack!r}")
    sock.settimeout(None)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    sent = updated = i = 0
    while sent < args.max_msgs and time.perf_counter() < deadline:
        if args.msg_rate > 0:
            ahead = t0 + sent / args.msg_rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        data, count, n = runs[i]
        sock.sendall(data)
        sent, updated, i = sent + count, updated + n, (i + 1) % len(runs)
    elapsed = time.perf_counter() - t0
    sock.sendall(mqtt5.DisconnectPacket().write())
    sock.close()
    print(json.dumps({"sent": sent, "updates": updated, "seconds": elapsed}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    publish_parser(sub, max_msgs=20_000_000, rate_help="accepted for loadgen's; must be 0")
    args = ap.parse_args()
    if args.rate:
        ap.error("rawpub publishes flat out (optionally capped by --msg-rate); use loadgen")
    publish(args)


if __name__ == "__main__":
    main()
