"""MQTT client stacks side by side on loopback Mosquitto: which one carries the platform.

Two jobs, each done by every candidate in the same run, alternated trial by trial (the
machine is shared: read the ratios against the reference, the platform's MQTT 5 link):

- **publish**: a burst of N QoS 1 setpoints (~120 B each, one topic per vehicle), timed
  from the first write to the last PUBACK: msg/s; and the round trip of one QoS 1
  publish (median of ``--pings``): ack latency.
- **receive**: N QoS 0 telemetry messages (~300 B) written flat out by a separate process
  (prebuilt frames, as ``mosquitto_pub -l`` does), timed from the first to the last one
  received: msg/s.

Candidates: ``mqtt5link`` (broker/mqtt5link.py: the ``mqtt5`` codec under one asyncio
protocol, MQTT 5; the reference of the ratios), ``aiomqtt`` (broker/link.py's MqttLink,
aiomqtt 2.5 on paho, MQTT 5), ``gmqtt`` (0.8, MQTT 5), ``zmqtt`` (0.2, MQTT 5). A
candidate whose package is missing is skipped (gmqtt and zmqtt are not dependencies:
``pip install gmqtt zmqtt``). The choice was measured against the hand-written MQTT 3.1.1
clients the platform had then (``fastpub``/``fastlink``, deleted since): run this module
at commit c94ea00 for that table (docs/benchmarks.md "MQTT clients").

The broker: the shared one on 127.0.0.1:1883 by default (Mosquitto's default
``max_inflight_messages`` 20: its CONNACK grants an MQTT 5 client a Receive Maximum of
20), or ``--own-broker N``: a Mosquitto of this run's own on a free port with
``max_inflight_messages N`` (broker/mosquitto/mosquitto.conf ships 100).

    .venv/bin/python -m bench.mqtt_clients [--n 10000] [--trials 5] [--pings 200]
        [--own-broker 100] [--cases mqtt5link,aiomqtt,gmqtt,zmqtt]

Prints a table; writes bench/results/mqtt_clients.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import HOST, PORT, RESULTS, ROOT, Row, print_table, provenance, row, start
from bench.common import write_results as write_json
from broker.settings import Settings

SETPOINT = (
    b'{"vehicle_id":"ev-000000","power_kw":-7.4,"valid_until":"2026-11-26T21:00:15Z","seq":1}'
)
TELEMETRY = b"t" * 300
Publish = Callable[[list[tuple[str, bytes]]], Awaitable[int]]  # a burst -> how many acked


# -- the candidates: publish ---------------------------------------------------------------
@contextlib.asynccontextmanager
async def pub_mqtt5link(settings: Settings, cid: str) -> AsyncIterator[Publish]:
    from broker.mqtt5link import Mqtt5Link
    from broker.transport import Outgoing

    link = Mqtt5Link(settings, cid)
    async with link.running(10, name=cid):

        async def burst(msgs: list[tuple[str, bytes]]) -> int:
            return (await link.publish_many([Outgoing(t, p, 1) for t, p in msgs])).count

        yield burst


@contextlib.asynccontextmanager
async def pub_aiomqtt(settings: Settings, cid: str) -> AsyncIterator[Publish]:
    from broker.link import MqttLink, Outgoing

    link = MqttLink(settings=settings.model_copy(update={"mqtt_protocol": "5"}), client_id=cid)
    async with link.running(10, name=cid):

        async def burst(msgs: list[tuple[str, bytes]]) -> int:
            return await link.publish_many([Outgoing(t, p, 1) for t, p in msgs])

        yield burst


@contextlib.asynccontextmanager
async def pub_gmqtt(settings: Settings, cid: str) -> AsyncIterator[Publish]:
    import gmqtt  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from gmqtt.mqtt.constants import MQTTv50  # type: ignore[import-untyped,import-not-found,unused-ignore]

    client = gmqtt.Client(cid)
    target = settings.mqtt_target()
    await client.connect(target.host, target.port, version=MQTTv50)
    storage = client._persistent_storage  # gmqtt tells of no PUBACK: wait until none is due

    async def burst(msgs: list[tuple[str, bytes]]) -> int:
        for t, p in msgs:
            while True:  # gmqtt raises at the broker's Receive Maximum: wait for an id
                try:
                    client.publish(t, p, qos=1)
                    break
                except OverflowError:
                    await asyncio.sleep(0)
        async with asyncio.timeout(settings.publish_timeout_s):
            await storage.wait_empty()
        return len(msgs)  # no reason code: every PUBACK counts as delivered

    try:
        yield burst
    finally:
        await client.disconnect()


@contextlib.asynccontextmanager
async def pub_zmqtt(settings: Settings, cid: str) -> AsyncIterator[Publish]:
    import zmqtt  # type: ignore[import-not-found,unused-ignore]

    target = settings.mqtt_target()
    client = zmqtt.create_client(
        target.host, target.port, client_id=cid, version="5.0", reconnect=None
    )
    async with client:

        async def burst(msgs: list[tuple[str, bytes]]) -> int:
            res = await asyncio.gather(
                *(client.publish(t, p, qos=zmqtt.QoS.AT_LEAST_ONCE) for t, p in msgs),
                return_exceptions=True,
            )
            return sum(1 for r in res if r is None)

        yield burst


PUBLISHERS = {
    "mqtt5link": (pub_mqtt5link, None),
    "aiomqtt": (pub_aiomqtt, "aiomqtt"),
    "gmqtt": (pub_gmqtt, "gmqtt"),
    "zmqtt": (pub_zmqtt, "zmqtt"),
}


# -- the candidates: receive ---------------------------------------------------------------
class Counter:
    """Counts messages; ``done`` when ``n`` have come. Times the first and the last."""

    def __init__(self) -> None:
        self.n = 0
        self.got = 0
        self.first = self.last = 0.0
        self.done = asyncio.Event()

    def reset(self, n: int) -> None:
        self.n, self.got, self.first, self.last = n, 0, 0.0, 0.0
        self.done.clear()

    def add(self, k: int = 1) -> None:
        now = time.perf_counter()
        if not self.got:
            self.first = now
        self.got += k
        self.last = now
        if self.got >= self.n:
            self.done.set()


@contextlib.asynccontextmanager
async def sub_mqtt5link(settings: Settings, cid: str, flt: str, c: Counter) -> AsyncIterator[None]:
    from broker.mqtt5link import Mqtt5Link

    link = Mqtt5Link(settings, cid, subscriptions=[(flt, 0)])

    async def drain() -> None:
        async for batch in link.batches():
            for _m in batch:  # a consumer touches each message
                pass
            c.add(len(batch))

    async with link.running(10, name=cid):
        task = asyncio.create_task(drain())
        try:
            yield
        finally:
            task.cancel()


@contextlib.asynccontextmanager
async def sub_aiomqtt(settings: Settings, cid: str, flt: str, c: Counter) -> AsyncIterator[None]:
    from broker.link import MqttLink

    link = MqttLink(
        settings=settings.model_copy(update={"mqtt_protocol": "5"}),
        client_id=cid,
        handler=lambda m: c.add(),
        subscriptions=[(flt, 0)],
    )
    async with link.running(10, name=cid):
        yield


@contextlib.asynccontextmanager
async def sub_gmqtt(settings: Settings, cid: str, flt: str, c: Counter) -> AsyncIterator[None]:
    import gmqtt  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from gmqtt.mqtt.constants import MQTTv50  # type: ignore[import-untyped,import-not-found,unused-ignore]

    client = gmqtt.Client(cid)

    def on_message(*_: Any) -> int:
        c.add()
        return 0

    client.on_message = on_message
    target = settings.mqtt_target()
    await client.connect(target.host, target.port, version=MQTTv50)
    client.subscribe(flt, qos=0)
    await asyncio.sleep(0.3)  # gmqtt's subscribe does not wait for the SUBACK
    try:
        yield
    finally:
        await client.disconnect()


@contextlib.asynccontextmanager
async def sub_zmqtt(settings: Settings, cid: str, flt: str, c: Counter) -> AsyncIterator[None]:
    import zmqtt  # type: ignore[import-not-found,unused-ignore]

    target = settings.mqtt_target()
    client = zmqtt.create_client(
        target.host, target.port, client_id=cid, version="5.0", reconnect=None
    )
    async with client, client.subscribe(flt, receive_buffer_size=1_000_000) as sub:

        async def drain() -> None:
            async for _m in sub:
                c.add()

        task = asyncio.create_task(drain())
        try:
            yield
        finally:
            task.cancel()


SUBSCRIBERS = {
    "mqtt5link": (sub_mqtt5link, None),
    "aiomqtt": (sub_aiomqtt, "aiomqtt"),
    "gmqtt": (sub_gmqtt, "gmqtt"),
    "zmqtt": (sub_zmqtt, "zmqtt"),
}


# -- the flood publisher (a process of its own) --------------------------------------------
def flood(port: int, topic_prefix: str, n: int) -> None:
    """Connect (MQTT 3.1.1), print ready; per line on stdin, write ``n`` QoS 0 messages on
    ``{topic_prefix}/{i}/telemetry`` flat out and print done; stop at EOF."""

    def utf8(s: str) -> bytes:
        raw = s.encode()
        return len(raw).to_bytes(2, "big") + raw

    def frame(first: int, body: bytes) -> bytes:
        n, out = len(body), bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes((first,)) + bytes(out) + body

    frames = b"".join(
        frame(0x30, utf8(f"{topic_prefix}/ev-{i:06d}/telemetry") + TELEMETRY) for i in range(n)
    )
    sock = socket.create_connection((HOST, port), timeout=10)
    cid = f"bench-flood-{uuid.uuid4().hex[:8]}"
    sock.sendall(frame(0x10, utf8("MQTT") + bytes([4, 2]) + (120).to_bytes(2, "big") + utf8(cid)))
    if sock.recv(4)[3:4] != b"\x00":
        raise SystemExit("the broker refused the flood publisher")
    print("ready", flush=True)
    for _ in sys.stdin:
        sock.sendall(frames)
        print("done", flush=True)
    sock.sendall(b"\xe0\x00")
    sock.close()


# -- the run -------------------------------------------------------------------------------
def available(cases: dict[str, tuple[Any, str | None]], wanted: list[str]) -> list[str]:
    out = []
    for name in wanted:
        if name not in cases:
            continue
        need = cases[name][1]
        if need is None or importlib.util.find_spec(need) is not None:
            out.append(name)
        else:
            print(f"skipped {name}: {need} is not installed", file=sys.stderr)
    return out


async def measure_publish(
    settings: Settings, names: list[str], n: int, trials: int, pings: int, prefix: str
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {k: {"rate": [], "ack_us": []} for k in names}
    msgs = [(f"{prefix}/vehicles/ev-{i:06d}/setpoint", SETPOINT) for i in range(n)]
    async with contextlib.AsyncExitStack() as stack:
        pubs = {
            k: await stack.enter_async_context(PUBLISHERS[k][0](settings, f"{prefix}-{k}"))
            for k in names
        }
        for burst in pubs.values():  # warm up: connections, caches
            await burst(msgs[:200])
        for _ in range(trials):
            for k in names:  # alternated: every candidate once per trial
                t = time.perf_counter()
                done = await pubs[k](msgs)
                dt = time.perf_counter() - t
                out[k]["rate"].append(done / dt)
            for k in names:
                rtts = []
                for i in range(pings // trials or 1):
                    t = time.perf_counter()
                    await pubs[k](msgs[i : i + 1])
                    rtts.append((time.perf_counter() - t) * 1e6)
                out[k]["ack_us"].extend(rtts)
    return out


async def measure_receive(
    settings: Settings, names: list[str], n: int, trials: int, prefix: str, port: int
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {k: {"rate": [], "seen": []} for k in names}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mqtt_clients", "_flood", str(port), f"{prefix}/rx", str(n),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).strip() == b"ready"
        for _ in range(trials):
            for k in names:
                c = Counter()
                c.reset(n)
                cid = f"{prefix}-rx-{k}"
                async with SUBSCRIBERS[k][0](settings, cid, f"{prefix}/rx/+/telemetry", c):
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
                    await proc.stdout.readline()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(30):
                            await c.done.wait()
                    await asyncio.sleep(0.5) if c.got < n else None
                    span = max(c.last - c.first, 1e-6)
                    out[k]["rate"].append(c.got / span)
                    out[k]["seen"].append(c.got / n)
    finally:
        proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
    return out


@contextlib.contextmanager
def own_broker(inflight: int) -> Any:
    """A Mosquitto of this run's own on a free port, ``max_inflight_messages inflight``."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "m.conf"
        conf.write_text(
            f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
            f"max_inflight_messages {inflight}\nmax_queued_messages 1000000\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    break
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def summarize(
    pub: dict[str, dict[str, list[float]]], rx: dict[str, dict[str, list[float]]], n: int
) -> list[Row]:
    rows: list[Row] = []
    ref = "mqtt5link"
    for k, v in pub.items():
        rate = statistics.median(v["rate"])
        rows.append(
            row(f"publish QoS 1 burst: {k}", n, rate, statistics.median(pub[ref]["rate"])
                if ref in pub else None, "msg/s", ref)
        )  # fmt: skip
    for k, v in pub.items():
        ack = statistics.median(v["ack_us"])
        rows.append(
            row(f"publish QoS 1 ack round trip: {k}", 1, ack, statistics.median(pub[ref]["ack_us"])
                if ref in pub else None, "µs (median)", ref)
        )  # fmt: skip
    ref = "mqtt5link"
    for k, v in rx.items():
        rate = statistics.median(v["rate"])
        r = row(f"receive QoS 0: {k}", n, rate, statistics.median(rx[ref]["rate"])
                if ref in rx else None, "msg/s", ref)  # fmt: skip
        r["seen"] = round(min(v["seen"]), 4)
        rows.append(r)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_flood":
        flood(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--own-broker", type=int, default=0, metavar="INFLIGHT")
    ap.add_argument("--cases", default="mqtt5link,aiomqtt,gmqtt,zmqtt")
    ap.add_argument("--out", default=str(RESULTS / "mqtt_clients.json"))
    args = ap.parse_args()
    if not 1 <= args.n <= 200_000 or not 1 <= args.trials <= 50:
        ap.error("--n is 1..200000 and --trials 1..50: every load here is bounded")
    wanted = args.cases.split(",")
    pubs = available(PUBLISHERS, wanted)
    subs = available(SUBSCRIBERS, wanted)
    prefix = f"bench-clients-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    started = start()

    async def run(port: int) -> tuple[Any, Any]:
        settings = Settings(broker_url=f"mqtt://{HOST}:{port}", publish_timeout_s=30.0)
        pub = await measure_publish(settings, pubs, args.n, args.trials, args.pings, prefix)
        rx = await measure_receive(settings, subs, args.n, args.trials, prefix, port)
        return pub, rx

    if args.own_broker:
        with own_broker(args.own_broker) as port:
            pub, rx = asyncio.run(run(port))
    else:
        pub, rx = asyncio.run(run(PORT))
    rows = summarize(pub, rx, args.n)
    stamp = provenance(started)
    for k in ("gmqtt", "zmqtt", "mqtt5"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            stamp["versions"][k] = importlib.metadata.version(k)
    broker = f"own, max_inflight_messages {args.own_broker}" if args.own_broker else "shared :1883"
    print(f"# broker: {broker}")
    print_table(rows, stamp)
    write_json(rows, args.out, stamp, broker=broker, raw={"publish": pub, "receive": rx})


if __name__ == "__main__":
    main()
