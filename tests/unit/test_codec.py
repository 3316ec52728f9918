"""Each hand-written decoder and encoder of broker/codec.py is its model, only faster, and
the MQTT 5 codec's remaining length is the spec's.

- ``telemetry_row``: on random valid reports it yields the model's row, bit for bit; on
  random invalid ones it refuses (None: the model decides) or agrees with the model; at
  every bound of every field, read off the model itself, it accepts exactly what the
  model accepts, so a bound changed in broker/models.py and not in the codec fails here.
- ``telemetry_payloads`` and ``telemetry_batch_payloads`` (what simulated vehicles and
  bridges send): what they write parses back through ``Telemetry`` / ``TelemetryBatch``
  to the values given, at the precision they promise, and the ingest's fast path reads
  every per-vehicle payload.
- ``setpoint_payloads`` and ``setpoint_batch_payload``: what they write parses back
  through ``Setpoint`` / ``SetpointBatch`` to the values they were given (power rounded
  to 3 decimals); they raise exactly when the model would refuse the same values.
- the remaining length the ``mqtt5`` codec frames: the spec's examples at each byte-count
  boundary, and broker/mqtt5link.py parses such packets back whole.

(tests/unit/test_telemetry_decode.py fuzzes telemetry_row further: odd times, escapes,
repeated keys, garbled bytes, and the aggregator's handler with and without it.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import mqtt5
import numpy as np
import pytest
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.codec import (
    setpoint_batch_payload,
    setpoint_payloads,
    telemetry_batch_payloads,
    telemetry_payloads,
    telemetry_row,
    utc_stamp,
)
from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import (
    EPOCH_MAX_S,
    EPOCH_MIN_S,
    MAX_VEHICLE_KW,
    SEQ_LIMIT,
    TELEMETRY_FLOAT_COLUMNS,
    Setpoint,
    SetpointBatch,
    Telemetry,
    TelemetryBatch,
    from_epoch,
)
from broker.mqtt5link import _Protocol
from broker.topics import ID_PATTERN
from broker.transport import Received

ids = st.from_regex(ID_PATTERN, fullmatch=True)
FLOAT_FIELDS = [k for k in TELEMETRY_FLOAT_COLUMNS if k != "departure"]


def bounds(field: str) -> tuple[float, bool, float, bool]:
    """(low, low inclusive, high, high inclusive) of a Telemetry field, from the model."""
    lo, lo_in, hi, hi_in = -math.inf, True, math.inf, True
    for m in Telemetry.model_fields[field].metadata:
        if isinstance(m, Ge):
            lo, lo_in = float(m.ge), True  # type: ignore[arg-type]
        elif isinstance(m, Gt):
            lo, lo_in = float(m.gt), False  # type: ignore[arg-type]
        elif isinstance(m, Le):
            hi, hi_in = float(m.le), True  # type: ignore[arg-type]
        elif isinstance(m, Lt):
            hi, hi_in = float(m.lt), False  # type: ignore[arg-type]
    assert math.isfinite(lo) and math.isfinite(hi), f"{field} has no bounds in the model"
    return lo, lo_in, hi, hi_in


def within(field: str) -> st.SearchStrategy[float]:
    lo, lo_in, hi, hi_in = bounds(field)
    return st.floats(lo, hi, exclude_min=not lo_in, exclude_max=not hi_in) | st.sampled_from(
        [v for v, ok in ((lo, lo_in), (hi, hi_in)) if ok]
    )


def edges(field: str) -> list[float]:
    """Each bound, and the floats just inside and just outside it."""
    lo, _, hi, _ = bounds(field)
    return [
        lo,
        hi,
        math.nextafter(lo, -math.inf),
        math.nextafter(lo, math.inf),
        math.nextafter(hi, -math.inf),
        math.nextafter(hi, math.inf),
    ]


def moments() -> st.SearchStrategy[datetime]:
    return st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: d.replace(tzinfo=UTC)
    )


@st.composite
def reports(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Telemetry document in the form the platform writes (UTC times, 'Z')."""
    doc: dict[str, Any] = {
        "vehicle_id": draw(ids),
        "seq": draw(st.integers(0, SEQ_LIMIT - 1)),
        "ts": utc_stamp(draw(moments())),
        "plugged_in": draw(st.booleans()),
    }
    for k in FLOAT_FIELDS:
        doc[k] = draw(within(k))
    departure = draw(st.sampled_from(["absent", "null", "time"]))
    if departure == "null":
        doc["departure"] = None
    elif departure == "time":
        doc["departure"] = utc_stamp(draw(moments()))
    return doc


def model_row(payload: bytes) -> TelemetryRow | None:
    try:
        return TelemetryRow.of(Telemetry.model_validate_json(payload))
    except ValidationError:
        return None


def bits(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row with floats by their bits (-0.0 is not 0.0, NaN equals NaN)."""
    return tuple(
        ("nan" if math.isnan(v) else v.hex()) if type(v) is float else (type(v), v) for v in row
    )


# -- telemetry_row ---------------------------------------------------------------------------
@given(reports())
def test_the_fast_decoder_yields_the_models_row_for_every_valid_report(doc: dict[str, Any]) -> None:
    payload = json.dumps(doc).encode()
    fast = telemetry_row(payload, doc["vehicle_id"])
    model = model_row(payload)
    assert model is not None
    assert fast is not None, f"the common form went to the model: {payload!r}"
    assert bits(fast) == bits(model)


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
)


@given(
    reports(),
    st.sampled_from(["seq", *FLOAT_FIELDS, "plugged_in", "vehicle_id", "ts", "departure"]),
    st.data(),
)
def test_the_fast_decoder_never_accepts_what_the_model_refuses(
    doc: dict[str, Any], field: str, data: st.DataObject
) -> None:
    if field in FLOAT_FIELDS:
        bad: Any = data.draw(st.sampled_from(edges(field)) | junk)
    elif field == "seq":
        bad = data.draw(st.sampled_from([-1, SEQ_LIMIT - 1, SEQ_LIMIT, 1.0, True]) | junk)
    elif field == "vehicle_id":
        bad = data.draw(st.text(max_size=70) | junk)
    else:
        bad = data.draw(junk)
    doc[field] = bad
    payload = json.dumps(doc).encode()
    topic_id = doc["vehicle_id"] if isinstance(doc["vehicle_id"], str) else "ev-1"
    fast = telemetry_row(payload, topic_id)
    if fast is not None:
        model = model_row(payload)
        assert model is not None, f"the fast path took what the model refuses: {payload!r}"
        assert bits(fast) == bits(model)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_the_fast_decoder_has_the_models_bounds_exactly(field: str) -> None:
    doc = {
        "vehicle_id": "ev-1",
        "seq": 1,
        "ts": "2026-11-26T18:00:00Z",
        "plugged_in": True,
        **dict.fromkeys(FLOAT_FIELDS, 0.5),
        "departure": None,
    }
    for value in edges(field):
        payload = json.dumps(doc | {field: value}).encode()
        fast, model = telemetry_row(payload, "ev-1"), model_row(payload)
        assert (fast is None) == (model is None), f"{field}={value!r}: fast {fast}, model {model}"
    for seq in (0, SEQ_LIMIT - 1, SEQ_LIMIT, -1):
        payload = json.dumps(doc | {"seq": seq}).encode()
        assert (telemetry_row(payload, "ev-1") is None) == (model_row(payload) is None), seq


# -- telemetry_payloads, telemetry_batch_payloads ---------------------------------------------
@st.composite
def fleets(draw: st.DrawFn) -> TelemetryArrays:
    """Valid reports of a few vehicles as columns; some share a clock, as a fleet does."""
    n = draw(st.integers(1, 12))
    clock = draw(st.floats(EPOCH_MIN_S + 100.0, EPOCH_MAX_S - 1e6))  # +-60 s stays valid
    ts = [clock if draw(st.booleans()) else clock + draw(st.floats(-60.0, 60.0)) for _ in range(n)]
    values = {k: np.array([draw(within(k)) for _ in range(n)]) for k in FLOAT_FIELDS}
    values["departure"] = np.array(
        [draw(st.just(math.nan) | st.floats(clock, clock + 86_400.0)) for _ in range(n)]
    )
    return TelemetryArrays(
        vehicle_id=draw(st.lists(ids, min_size=n, max_size=n)),
        seq=np.array(draw(st.lists(st.integers(0, SEQ_LIMIT - 1), min_size=n, max_size=n))),
        ts=np.array(ts),
        plugged_in=np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        values=values,
    )


DIGITS = {"soc": 6, "power_kw": 4}  # the decimals the encoders keep; others as they are


def sent(reports: TelemetryArrays) -> list[tuple[Any, ...]]:
    """What the encoders promise: soc to 6 decimals, power_kw to 4, times to microseconds."""
    v = reports.values
    return [
        (
            reports.vehicle_id[i],
            int(reports.seq[i]),
            bool(reports.plugged_in[i]),
            round(float(reports.ts[i]), 6),
            *(
                round(float(v[k][i]), DIGITS[k]) if k in DIGITS else float(v[k][i])
                for k in FLOAT_FIELDS
            ),
            None if math.isnan(v["departure"][i]) else round(float(v["departure"][i]), 6),
        )
        for i in range(len(reports))
    ]


# Positions in a row of what the encoders round: ts, soc, power_kw, departure.
ROUNDED = {3, 4, 6, 13}


def close(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3]
        for j, (a, b) in enumerate(zip(g[3:], w[3:], strict=True), start=3):
            assert (a is None) == (b is None), (g, w)
            if j in ROUNDED and a is not None:  # give or take the last bit of a time
                assert a == pytest.approx(b, rel=0, abs=2e-6), (g, w)
            else:
                assert a == b, (g, w)


@given(fleets())
def test_telemetry_payloads_parse_back_through_the_model_to_their_values(
    reports: TelemetryArrays,
) -> None:
    models = [Telemetry.model_validate_json(p) for p in telemetry_payloads(reports)]
    got = [
        (
            *TelemetryRow.of(t)[:13],
            None if t.departure is None else t.departure.timestamp(),
        )
        for t in models
    ]
    close(got, sent(reports))
    # and the ingest's fast path reads every one of them, to the model's values
    for t, body in zip(models, telemetry_payloads(reports), strict=True):
        row = telemetry_row(body, t.vehicle_id)
        assert row is not None and bits(row) == bits(TelemetryRow.of(t))


@given(fleets(), st.integers(1, 5))
def test_telemetry_batches_parse_back_through_the_model_to_their_values(
    reports: TelemetryArrays, per_batch: int
) -> None:
    bodies = telemetry_batch_payloads("gw", float(reports.ts[0]), reports, per_batch)
    assert len(bodies) == -(-len(reports) // per_batch)
    got: list[tuple[Any, ...]] = []
    for body in bodies:
        b = TelemetryBatch.model_validate_json(body)
        assert b.bridge_id == "gw" and len(b) <= per_batch
        for i in range(len(b)):
            got.append(
                (
                    b.vehicle_id[i],
                    b.seq[i],
                    b.plugged_in[i],
                    b.ts[i],
                    *(getattr(b, k)[i] for k in FLOAT_FIELDS),
                    b.departure[i],
                )
            )
    close(got, sent(reports))


# -- setpoints ----------------------------------------------------------------------------
powers = st.floats(-MAX_VEHICLE_KW, MAX_VEHICLE_KW) | st.sampled_from(
    [0.0, -0.0, 0.0005, -0.0015, 2.675, MAX_VEHICLE_KW, -MAX_VEHICLE_KW, 1e-9]
)
epochs = st.floats(EPOCH_MIN_S + 1.0, EPOCH_MAX_S - 90_000.0) | st.sampled_from(
    [1_795_651_200.0, 1_795_651_200.5, 1_795_651_200.0000005, 1_795_651_200.9999996]
)
ttls = st.floats(1e-5, 86_400.0)


@given(st.lists(st.tuples(ids, powers, ttls), min_size=1, max_size=30), ids, epochs)
def test_setpoint_payloads_parse_back_through_the_model_to_their_values(
    rows: list[tuple[str, float, float]], rid: str, now: float
) -> None:
    issued = from_epoch(now)
    vids = [v for v, _, _ in rows]
    power = np.array([p for _, p, _ in rows])
    until = np.array([now + ttl for _, _, ttl in rows])
    bodies = setpoint_payloads(vids, rid, power, until, issued)
    for body, vid, p, u in zip(bodies, vids, power.tolist(), until.tolist(), strict=True):
        sp = Setpoint.model_validate_json(body)
        assert (sp.vehicle_id, sp.request_id, sp.issued_at) == (vid, rid, issued)
        assert sp.power_kw == round(p, 3)
        assert sp.valid_until == from_epoch(u)
        # and byte for byte what the model writes
        assert body == Setpoint.model_validate_json(body).to_json()


@given(
    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(edges("power_kw")),
    st.floats(-5.0, 5.0) | st.just(1e-7),
    ids | st.text(max_size=70),
)
def test_setpoint_payloads_refuse_exactly_what_the_model_refuses(
    p: float, ttl: float, rid: str
) -> None:
    now = 1_795_651_200.0
    issued = from_epoch(now)
    try:
        Setpoint(
            vehicle_id="ev-1",
            request_id=rid,
            power_kw=round(p, 3),
            issued_at=issued,
            valid_until=from_epoch(now + ttl),
        )
        refused = False
    except ValidationError:
        refused = True
    try:
        setpoint_payloads(["ev-1"], rid, np.array([p]), np.array([now + ttl]), issued)
        raised = False
    except ValueError:
        raised = True
    assert raised == refused


@given(
    ids,
    ids,
    epochs,
    st.lists(st.tuples(ids, powers, ttls), min_size=1, max_size=30),
)
def test_setpoint_batches_parse_back_through_the_model_to_their_values(
    bridge: str, rid: str, now: float, rows: list[tuple[str, float, float]]
) -> None:
    issued = from_epoch(now)
    vids = [v for v, _, _ in rows]
    power = np.array([p for _, p, _ in rows])
    until = np.array([now + ttl for _, _, ttl in rows])
    sb = SetpointBatch.model_validate_json(
        setpoint_batch_payload(bridge, rid, issued, vids, power, until)
    )
    assert (sb.bridge_id, sb.request_id, sb.issued_at) == (bridge, rid, issued)
    assert sb.vehicle_id == vids
    assert sb.power_kw == np.round(power, 3).tolist()
    assert sb.valid_until == until.tolist()


NOW = 1_795_651_200.0
untils = st.floats(NOW - 5.0, NOW + 5.0) | st.sampled_from(
    [NOW + 1e-7, EPOCH_MAX_S - 1.0, EPOCH_MAX_S, EPOCH_MAX_S + 1.0]
)


@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(edges("power_kw")),
            untils,
        ),
        max_size=3,
    ),
    ids | st.text(max_size=70),
    ids | st.text(max_size=70),
)
@example(rows=[(1.797693134862316e305, NOW - 3.4)], bridge="M", rid="5")  # rounds to inf
def test_setpoint_batches_refuse_exactly_what_the_model_refuses(
    rows: list[tuple[float, float]], bridge: str, rid: str
) -> None:
    issued = from_epoch(NOW)
    vids = [f"ev-{i}" for i in range(len(rows))]
    power = [p for p, _ in rows]
    until = [u for _, u in rows]
    with np.errstate(over="ignore"):  # as the encoder rounds: past 1e305 to inf
        rounded = np.round(np.array(power, dtype=np.float64), 3).tolist()
    try:
        SetpointBatch(
            bridge_id=bridge,
            request_id=rid,
            issued_at=issued,
            vehicle_id=vids,
            power_kw=rounded,
            valid_until=until,
        )
        refused = False
    except ValidationError:
        refused = True
    try:
        setpoint_batch_payload(
            bridge, rid, issued, vids, np.array(power, dtype=np.float64), np.array(until)
        )
        raised = False
    except ValueError:
        raised = True
    assert raised == refused


# -- setpoints, byte for byte (moved from test_fastpub.py and test_batch.py) -------------
T0 = 1_795_716_000.0  # 2026-11-26T18:00:00Z

exact_powers = st.floats(-1000.0, 1000.0, allow_nan=False) | st.sampled_from(
    [0.0, -0.0, 0.0005, -0.0015, 999.9995, -1000.0, 7.4, 1e-9, 2.675, 0.1 + 0.2]
)
# Epoch seconds with sub-microsecond digits, so that the rounding to microseconds counts.
exact_epochs = st.floats(1.0e9, 4.0e9, allow_nan=False) | st.sampled_from(
    [1_795_651_200.0, 1_795_651_200.5, 1_795_651_200.0000005, 1_795_651_200.9999996]
)


def model_json(vid: str, rid: str, p: float, issued: datetime, until: float) -> bytes:
    """What ``_setpoint_messages`` sent before: a pydantic Setpoint per vehicle."""
    return Setpoint(
        vehicle_id=vid,
        request_id=rid,
        power_kw=round(p, 3),
        issued_at=issued,
        valid_until=from_epoch(until),
    ).to_json()


@given(
    st.lists(st.tuples(ids, exact_powers), min_size=1, max_size=40),
    ids,
    exact_epochs,
    st.lists(st.floats(1e-6, 86_400.0), min_size=1, max_size=3),
)
def test_fast_payloads_are_the_setpoint_models_json_byte_for_byte(
    rows: list[tuple[str, float]], rid: str, now: float, ttls: list[float]
) -> None:
    issued = from_epoch(now)
    # One validity for all (the dispatcher's case), or several.
    until = np.array([now + ttls[k % len(ttls)] for k in range(len(rows))])
    until = np.where(until > now + 1e-6, until, now + 1.0)  # after issued_at, as the model asks
    vids = [v for v, _ in rows]
    power = np.array([p for _, p in rows])
    fast = setpoint_payloads(vids, rid, power, until, issued)
    assert len(fast) == len(rows)
    for body, vid, p, u in zip(fast, vids, power.tolist(), until.tolist(), strict=True):
        want = model_json(vid, rid, p, issued, u)
        assert body == want
        assert Setpoint.model_validate_json(body) == Setpoint.model_validate_json(want)


def test_fast_payloads_refuse_what_the_model_refuses() -> None:
    issued = datetime(2026, 11, 26, 21, tzinfo=UTC)
    now = issued.timestamp()
    ok = np.array([now + 30.0])
    with pytest.raises(ValueError, match="request_id"):
        setpoint_payloads(["ev-1"], "bad/id", np.array([1.0]), ok, issued)
    for bad in (1000.5, -1001.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="within"):
            setpoint_payloads(["ev-1"], "r", np.array([bad]), ok, issued)
    for until in (now, now - 1.0, now + 1e-7):  # not after issued_at, to the microsecond
        with pytest.raises(ValueError, match="after issued_at"):
            setpoint_payloads(["ev-1"], "r", np.array([1.0]), np.array([until]), issued)
    with pytest.raises(ValueError, match="as long as"):
        setpoint_payloads(["ev-1", "ev-2"], "r", np.array([1.0]), ok, issued)
    assert setpoint_payloads([], "", np.zeros(0), np.zeros(0), issued) == []


def test_the_aggregators_setpoint_batch_holds_to_the_model() -> None:
    body = setpoint_batch_payload(
        "gw",
        "r1",
        datetime(2026, 11, 26, 18, tzinfo=UTC),
        ["ev-1", "ev-2"],
        np.array([-7.12345, 3.0]),
        np.array([T0 + 30] * 2),
    )
    sb = SetpointBatch.model_validate_json(body)
    assert sb.power_kw == [-7.123, 3.0]
    bad = json.loads(body) | {"valid_until": [T0, T0 + 30]}  # one not after issued_at
    with pytest.raises(ValueError, match="after issued_at"):
        SetpointBatch.model_validate_json(json.dumps(bad))


# -- the MQTT remaining length --------------------------------------------------------------
# The mqtt5 codec frames every packet (broker/mqtt5link.py); held to the spec here. MQTT 5,
# section 1.5.5 (as 3.1.1's table 2.4): the first and last value of each byte count.
SPEC = [
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
]
TOPIC = "t/x"
OVERHEAD = 2 + len(TOPIC) + 1  # topic length, topic, properties length (none) of a QoS 0 PUBLISH


@pytest.mark.parametrize(("n", "wire"), SPEC)
async def test_the_codecs_remaining_length_is_the_specs_and_parses_back_at_each_boundary(
    n: int, wire: bytes
) -> None:
    payload = bytes(range(256)) * ((n - OVERHEAD) // 256) + bytes((n - OVERHEAD) % 256)
    packet = mqtt5.PublishPacket(topic=TOPIC, payload=payload).write()
    assert packet[1 : 1 + len(wire)] == wire and len(packet) == 1 + len(wire) + n
    got: list[Received] = []
    proto = _Protocol(got.extend, lambda p: None)
    proto.data_received(packet + packet)
    assert [(m.topic, m.payload) for m in got] == [(TOPIC, payload), (TOPIC, payload)]


# -- the split ----------------------------------------------------------------------------
def test_the_wire_models_stand_alone_without_the_codec_columns_or_numpy() -> None:
    """broker/models.py is the contract only: the codec and the columns import it, never
    the other way round (a fresh interpreter, so other tests' imports do not count)."""
    code = (
        "import sys, broker.models\n"
        "bad = [m for m in ('broker.codec', 'broker.columns', 'mqtt5', 'numpy',"
        " 'orjson') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
