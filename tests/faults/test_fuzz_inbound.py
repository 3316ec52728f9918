"""Hostile input: every inbound decoder fuzzed; nothing crashes, every message is counted.

The aggregator's message handler is fed generated MQTT messages directly (no broker:
what is under test is the decoding and the arithmetic downstream of it). After each
batch the accepted messages are folded and dispatched, so values that pass validation
but are extreme must not break the physics either.
"""

from __future__ import annotations

import json
import math
from typing import Any

import aiomqtt
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.capability import envelope
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.settings import Settings
from core.clock import ManualClock
from tests.support.figures import Recorder
from tests.support.samples import GOOD

T0 = 1_795_716_000.0  # GOOD's ts
BATCH = 50
EXAMPLES = 100  # 100 batches x 50 messages through hypothesis; 100k more below

ids = st.one_of(
    st.sampled_from(["ev-0001", "ev-0002", "ev-7", "depot.3:a"]),
    st.text(st.characters(codec="utf-8", exclude_characters="+#/\x00"), min_size=1, max_size=70),
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def telemetry_payload(draw: st.DrawFn, vid: str) -> bytes:
    doc: dict[str, Any] = dict(GOOD, vehicle_id=vid, seq=draw(st.integers(0, 10**6)))
    for key in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=3)):
        if draw(st.booleans()):
            doc[key] = draw(junk)
        else:
            doc.pop(key, None)
    if draw(st.booleans()):  # in-range but extreme values must survive the physics too
        doc["soc"] = draw(st.sampled_from([0.0, 1.0, 1e-300]))
        doc["capacity_kwh"] = draw(st.sampled_from([1e-9, 1000.0]))
        doc["max_charge_kw"] = draw(st.sampled_from([0.0, 1000.0]))
        doc["charge_efficiency"] = draw(st.sampled_from([1e-12, 1.0]))
    text = json.dumps(doc, allow_nan=True)
    if draw(st.integers(0, 9)) == 0:  # truncated or garbled
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@st.composite
def message(draw: st.DrawFn) -> tuple[str, bytes]:
    vid = draw(ids)
    kind = draw(
        st.sampled_from(["telemetry", "telemetry", "status", "requests", "cancel", "other"])
    )
    if kind == "telemetry":
        return f"fz/vehicles/{vid}/telemetry", draw(telemetry_payload(vid))
    if kind == "status":
        body = {
            "vehicle_id": vid,
            "online": draw(junk),
            "ts": draw(st.sampled_from([GOOD["ts"], "x", 5])),
        }
        return f"fz/vehicles/{vid}/status", json.dumps(body, allow_nan=True).encode()
    if kind == "requests":
        body = {
            "request_id": vid,
            "power_kw": draw(junk),
            "duration_s": draw(st.one_of(junk, st.floats(-1e9, 1e9))),
            "service": draw(
                st.sampled_from(["manual", "peak_shaving", "frequency_regulation", "x"])
            ),
        }
        return "fz/dispatch/requests", json.dumps(body, allow_nan=True).encode()
    if kind == "cancel":
        return f"fz/dispatch/{vid}/cancel", b"{}"
    return draw(st.sampled_from(["fz/other", "fz/vehicles/a/b/c", "fz/dispatch/x/result"])), draw(
        st.binary(max_size=64)
    )


def make_service() -> AggregatorService:
    settings_ = Settings(topic_prefix="fz", log_level="warning", speed=1e6)  # no rate limit here
    return AggregatorService(settings=settings_, clock=ManualClock(T0), store=MemoryStore())


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(batch=st.lists(message(), min_size=BATCH, max_size=BATCH))
def test_fuzzed_messages_never_crash_and_every_one_is_counted(
    batch: list[tuple[str, bytes]],
) -> None:
    svc = make_service()
    for topic, payload in batch:
        svc.on_message(aiomqtt.Message(topic, payload, 0, False, 0, None))
    rejected = sum(n for reason, n in svc.rejected.items() if reason != "stale")
    assert svc.received == len(batch)
    assert svc.accepted + svc.ignored + rejected == svc.received
    assert set(svc.rejected) <= {
        "size",
        "topic",
        "json",
        "schema",
        "unknown_field",
        "identity",
        "rate",
    }

    # Downstream of validation: fold, envelope and dispatch stay finite.
    svc.state.apply_telemetry(svc.inbox.telemetry)
    view = svc.state.view(T0 + 1, 60.0)
    for w in envelope(view, T0 + 1):
        assert math.isfinite(w.min_power_kw) and math.isfinite(w.max_power_kw)
        assert w.min_power_kw <= w.max_power_kw + 1e-6
    for req, _ in svc.inbox.requests:
        answer = svc.dispatcher.submit(req, T0 + 1, view)
        assert answer.status in ("accepted", "partial", "rejected")
    out = svc.dispatcher.step(T0 + 2, view, len(svc.state))
    assert np.all(np.isfinite(out.power_kw))


def test_a_hundred_thousand_mutated_messages_never_crash_and_are_all_counted(
    figure: Recorder,
) -> None:
    """Volume: 100k seeded mutations of valid messages and raw garbage, fast enough for CI."""
    rng = np.random.default_rng(20261126)
    svc = make_service()
    good = json.dumps(GOOD).encode()
    keys = sorted(GOOD)
    values: list[Any] = [None, True, "x", -1, 0, 1e308, -1e308, float("nan"), float("inf"), [], {}]
    n = 100_000
    for i in range(n):
        pick = rng.integers(0, 4)
        if pick == 0:  # random bytes
            payload = rng.bytes(int(rng.integers(0, 200)))
        elif pick == 1:  # a valid message with bytes flipped
            buf = bytearray(good)
            for j in rng.integers(0, len(buf), size=int(rng.integers(1, 6))):
                buf[j] = int(rng.integers(0, 256))
            payload = bytes(buf)
        elif pick == 2:  # a field replaced by a wrong type or value
            doc = dict(GOOD)
            doc[keys[int(rng.integers(0, len(keys)))]] = values[int(rng.integers(0, len(values)))]
            payload = json.dumps(doc, allow_nan=True).encode()
        else:  # valid, but for another vehicle than the topic says, or replayed
            doc = dict(GOOD, seq=int(rng.integers(0, 3)))
            if rng.integers(0, 2):
                doc["vehicle_id"] = "ev-9999"
            payload = json.dumps(doc).encode()
        svc.on_message(aiomqtt.Message("fz/vehicles/ev-0001/telemetry", payload, 0, False, i, None))
    rejected = sum(n for reason, n in svc.rejected.items() if reason != "stale")
    assert svc.received == n
    assert svc.accepted + svc.ignored + rejected == n
    assert svc.rejected["json"] > 0 and svc.rejected["schema"] > 0 and svc.rejected["identity"] > 0
    applied, stale = svc.state.apply_telemetry(svc.inbox.telemetry)
    assert applied + stale == len(svc.inbox.telemetry)
    assert svc.state.ids == ["ev-0001"]  # nothing got in under another vehicle's name
    assert np.all(np.isfinite(svc.state.col("soc")))
    figure(
        "fuzz: mutated messages handled without an exception",
        svc.received,
        "msgs",
        limit=f"= {n:,}",
    )
    figure(
        "fuzz: of which rejected, counted by reason",
        rejected,
        "msgs",
        limit="= received - accepted - ignored",
    )


def test_a_flooding_vehicle_is_rate_limited_and_the_others_are_not() -> None:
    svc = AggregatorService(
        settings=Settings(topic_prefix="fz", log_level="warning", telemetry_interval_s=5.0),
        clock=ManualClock(T0),
        store=MemoryStore(),
    )
    flood = json.dumps(dict(GOOD, vehicle_id="ev-0001")).encode()
    for i in range(1000):  # 1000 messages inside one second of wall time
        svc.on_message(aiomqtt.Message("fz/vehicles/ev-0001/telemetry", flood, 0, False, i, None))
    calm = json.dumps(dict(GOOD, vehicle_id="ev-0002")).encode()
    svc.on_message(aiomqtt.Message("fz/vehicles/ev-0002/telemetry", calm, 0, False, 0, None))
    assert svc.rejected["rate"] >= 980
    assert svc.accepted <= 11
    assert any(t.vehicle_id == "ev-0002" for t in svc.inbox.telemetry)
