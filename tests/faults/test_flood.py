"""One vehicle floods the broker with 1000 telemetry messages a second for 10 s (from a
separate ``mosquitto_pub`` process) while 20 honest vehicles report twice a second. The
aggregator's per-vehicle rate limit drops the flood; the honest vehicles' telemetry still
reaches the aggregator's state promptly, and its memory does not balloon.

Latency is publish → accepted into the aggregator's state (its inbox, folded at the next
control step), read from the report's own ts on a real-time clock (speed 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import time
from datetime import datetime
from typing import cast

import aiomqtt
import numpy as np
import pytest

from aggregator.store import MemoryStore, RedisStore
from broker.models import from_epoch
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import make_aggregator
from tests.support.samples import GOOD
from tests.support.servers import HOST, Mosquitto

pytestmark = pytest.mark.integration

FLOOD_RATE = 1000  # msg/s
FLOOD_S = 10.0
HONEST = 20
HONEST_EVERY_S = 0.5


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def telemetry(vid: str, seq: int) -> bytes:
    doc = dict(GOOD, vehicle_id=vid, seq=seq, ts=from_epoch(time.time()).isoformat())
    return json.dumps(doc).encode()


async def test_a_flooding_vehicle_does_not_delay_the_others_or_eat_memory(
    mosquitto: Mosquitto,
    settings: Settings,
    test_id: str,
    figure: Recorder,
) -> None:
    cfg = settings.model_copy(
        update={"speed": 1.0, "telemetry_interval_s": 5.0, "control_step_s": 1.0}
    )
    agg = make_aggregator(cfg, SimClock(speed=1.0), cast(RedisStore, MemoryStore()), test_id)
    latencies: list[float] = []
    handler = agg.on_message
    honest_prefix = f"{cfg.topic_prefix}/vehicles/honest-"

    def timed(m: aiomqtt.Message) -> None:
        arrived = time.time()
        before = agg.accepted
        handler(m)
        if str(m.topic).startswith(honest_prefix) and agg.accepted > before:
            ts = json.loads(cast(bytes, m.payload))["ts"]
            latencies.append(arrived - datetime.fromisoformat(ts).timestamp())

    agg.link.handler = timed
    flood_topic = cfg.topics.telemetry("flood-0000")
    pub = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    task = asyncio.create_task(agg.run())
    try:
        await agg.link.wait_connected(10.0)
        async with aiomqtt.Client(HOST, mosquitto.port, identifier=f"honest-{test_id}") as honest:

            async def report() -> None:
                seq = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < FLOOD_S + 1.0:
                    seq += 1
                    for i in range(HONEST):
                        vid = f"honest-{i:04d}"
                        await honest.publish(cfg.topics.telemetry(vid), telemetry(vid, seq))
                    await asyncio.sleep(HONEST_EVERY_S)

            rss0 = rss_mb()
            proc = await asyncio.create_subprocess_exec(
                pub, "-h", HOST, "-p", str(mosquitto.port), "-t", flood_topic, "-l",
                "-i", f"flood-{test_id}", stdin=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdin is not None
            honest_task = asyncio.create_task(report())
            try:
                t0, sent = time.monotonic(), 0
                while (elapsed := time.monotonic() - t0) < FLOOD_S:
                    due = int(elapsed * FLOOD_RATE) + FLOOD_RATE // 20
                    lines = b"".join(telemetry("flood-0000", s) + b"\n" for s in range(sent, due))
                    proc.stdin.write(lines)
                    await proc.stdin.drain()
                    sent = due
                    await asyncio.sleep(0.05)
                proc.stdin.close()
                async with asyncio.timeout(10.0):
                    await proc.wait()
                await honest_task
            finally:
                honest_task.cancel()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await asyncio.sleep(1.0)  # the tail of the flood drains
            grown = rss_mb() - rss0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10.0):
                await task

    lat = np.array(latencies)
    p50, p99 = float(np.percentile(lat, 50)) * 1e3, float(np.percentile(lat, 99)) * 1e3
    rate_dropped = agg.rejected["rate"]
    print(
        f"\nflood {sent} msgs in {FLOOD_S:.0f} s: {rate_dropped} rate-limited; honest latency"
        f" p50 {p50:.1f} ms p99 {p99:.1f} ms over {lat.size} reports; RSS grew {grown:.1f} MB"
    )
    figure("flood 1000 msg/s x 10 s: others' telemetry p99 latency", p99, "ms", limit="< 500 ms")
    figure("... memory growth during the flood", grown, "MB", limit="< 50 MB")
    figure("... flood messages dropped by the rate limit", rate_dropped, f"of {sent}")
    assert sent >= 0.95 * FLOOD_RATE * FLOOD_S
    assert lat.size >= 0.9 * HONEST * FLOOD_S / HONEST_EVERY_S, "honest reports went missing"
    assert p99 < 500.0
    assert grown < 50.0
    assert rate_dropped >= 0.8 * sent, "the rate limit let the flood through"
