"""The per-vehicle telemetry fast path (``broker.codec.telemetry_row``) is the model,
only faster: whatever it accepts, ``Telemetry.model_validate_json`` accepts with the same
values, and whatever it cannot vouch for it leaves to the model (None). Fuzzed against the
model on generated reports (valid, out of range, wrongly typed, odd times, extra and
repeated keys, escapes, garbled bytes), and through the aggregator's handler: the same
messages are accepted, rejected by the same reasons and folded to the same fleet state
with the fast path as without it.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import aiomqtt
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import aggregator.inbox
from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore
from broker.codec import telemetry_row
from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import Telemetry
from broker.settings import Settings
from broker.topics import ID_PATTERN
from core.clock import ManualClock
from tests.support.samples import GOOD

T0 = 1_795_716_000.0  # GOOD's ts
# GOOD as the platform's agents write it: every number a float.
FLOATY = dict(GOOD, capacity_kwh=60.0, max_charge_kw=11.0, max_discharge_kw=11.0)
NO_DEPARTURE = {k: v for k, v in FLOATY.items() if k != "departure"}
DEEP = b"[" * 300 + b"]" * 300  # past the model's parser's depth (200), within orjson's
RANGES = {  # field: (low, high, low inclusive)
    "soc": (0.0, 1.0, True),
    "capacity_kwh": (0.0, 1000.0, False),
    "power_kw": (-1000.0, 1000.0, True),
    "max_charge_kw": (0.0, 1000.0, True),
    "max_discharge_kw": (0.0, 1000.0, True),
    "charge_efficiency": (0.0, 1.0, False),
    "discharge_efficiency": (0.0, 1.0, False),
    "min_soc": (0.0, 1.0, True),
    "target_soc": (0.0, 1.0, True),
}
ids = st.from_regex(ID_PATTERN, fullmatch=True)
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def model_row(payload: bytes) -> tuple[Any, ...] | None:
    try:
        return TelemetryRow.of(Telemetry.model_validate_json(payload))
    except ValidationError:
        return None


def exact(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row with floats by their bits (-0.0 is not 0.0 here, NaN equals NaN)."""
    return tuple(
        ("nan" if math.isnan(v) else v.hex()) if type(v) is float else (type(v), v) for v in row
    )


def assert_same_as_model(payload: bytes, topic_id: str) -> tuple[Any, ...] | None:
    fast = telemetry_row(payload, topic_id)
    if fast is not None:
        model = model_row(payload)
        assert model is not None, f"the fast path took what the model refuses: {payload!r}"
        assert model[0] == topic_id
        assert exact(fast) == exact(model), payload
    return fast


# -- times -------------------------------------------------------------------------------
@st.composite
def utc_texts(draw: st.DrawFn) -> str:
    """A valid UTC time as the platform writes it (the form the fast path reads)."""
    moment = draw(
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
    ).replace(tzinfo=UTC)
    m = moment
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    digits = draw(st.integers(0, 6))
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    return text + draw(st.sampled_from(["Z", "+00:00"]))


@st.composite
def odd_times(draw: st.DrawFn) -> Any:
    """Times in other forms, impossible dates and times, or not times at all."""
    y, mo, d = draw(st.integers(0, 9999)), draw(st.integers(0, 13)), draw(st.integers(0, 32))
    h, mi, s = draw(st.integers(0, 25)), draw(st.integers(0, 61)), draw(st.integers(0, 61))
    frac = draw(st.sampled_from(["", ".", ".5", ".1234567", ".123456789", ",5"]))
    sep = draw(st.sampled_from(["T", "t", " ", "_"]))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+01:00", "+0000", "", "UTC"]))
    text = f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}:{s:02d}{frac}{zone}"
    return draw(
        st.one_of(
            st.just(text),
            st.just(text.replace("-", "", 2)),
            st.integers(0, 4_102_444_800).map(str),
            st.floats(0, 4e9, allow_nan=False),
            utc_texts().map(lambda t: t + " "),
            utc_texts().map(lambda t: t.replace("T", "T0", 1)),
            junk,
        )
    )


# -- whole reports -------------------------------------------------------------------------
def in_range(field: str) -> st.SearchStrategy[float | int]:
    low, high, closed = RANGES[field]
    floats = st.floats(low, high, exclude_min=not closed, allow_subnormal=True)
    return st.one_of(
        floats,
        st.sampled_from(
            [v for v in (low, -0.0, 0.0, 5e-324, 1e-300, high) if (low <= v if closed else low < v)]
        ),
        st.integers(math.ceil(low) + (0 if closed else 1), math.floor(high)),
    )


def near_or_out_of_range(field: str) -> st.SearchStrategy[Any]:
    low, high, _ = RANGES[field]
    return st.one_of(
        st.sampled_from(
            [low, math.nextafter(low, -math.inf), math.nextafter(high, math.inf), -0.0, 0]
        ),
        st.floats(low - 10.0, high + 10.0),
        st.integers(int(low) - 3, int(high) + 3),
        junk,
    )


@st.composite
def canonical_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid report: every value in range, times in the platform's form."""
    doc: dict[str, Any] = {
        "vehicle_id": draw(ids),
        "seq": draw(st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1]))),
        "ts": draw(utc_texts()),
        "plugged_in": draw(st.booleans()),
    }
    for field in RANGES:
        doc[field] = draw(in_range(field))
    departure = draw(st.sampled_from(["absent", "null", "time"]))
    if departure != "absent":
        doc["departure"] = None if departure == "null" else draw(utc_texts())
    return doc


@st.composite
def any_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid report with up to three fields broken, dropped or added."""
    doc = draw(canonical_docs())
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*sorted(GOOD), "extra"]))
        how = draw(st.sampled_from(["value", "drop", "time"]))
        if how == "drop":
            doc.pop(field, None)
        elif field in RANGES and how == "value":
            doc[field] = draw(near_or_out_of_range(field))
        elif field in ("ts", "departure") or how == "time":
            doc[field] = draw(odd_times())
        elif field == "seq":
            doc[field] = draw(st.one_of(st.sampled_from([-1, 2**63, 2**64, 1.0, True]), junk))
        elif field == "vehicle_id":
            doc[field] = draw(st.one_of(ids, st.sampled_from(["", "ev/1", "ev+", "a" * 65]), junk))
        else:
            doc[field] = draw(junk)
    return doc


@st.composite
def texts(draw: st.DrawFn, docs: st.SearchStrategy[dict[str, Any]], edits: bool = True) -> bytes:
    """A report as JSON text, spelled in any of the ways JSON allows; with ``edits``, also
    with keys repeated or escaped, values nested, padding, cuts."""
    doc = draw(docs)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(doc, separators=separators, ensure_ascii=draw(st.booleans()), allow_nan=True)
    edit = "none"
    if edits:
        edit = draw(
            st.sampled_from(["none", "none", "repeat", "escape", "nest", "pad", "cut", "array"])
        )
    if edit == "repeat" and doc:  # a key twice: the model takes the last
        key = draw(st.sampled_from(sorted(doc)))
        first = draw(st.one_of(junk, st.just(DEEP.decode()), st.just(json.dumps(doc[key]))))
        first = first if isinstance(first, str) else json.dumps(first, allow_nan=True)
        text = "{" + json.dumps(key) + ":" + first + "," + text[1:]
    elif edit == "escape":  # the same key, spelled with an escape
        text = text.replace('"soc"', '"s\\u006fc"').replace('"ts"', '"t\\u0073"')
    elif edit == "nest":
        nested = draw(st.sampled_from(['{"y": [1, "z", null]}', "[]", DEEP.decode()]))
        text = text[:-1] + (", " if doc else "") + f'"x": {nested}}}'
    elif edit == "pad":
        text = draw(st.sampled_from([" ", "\n", "\t", "\r\n", "\ufeff", "\x00"])) + text + " "
    elif edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "array":
        text = "[" + text + "]"
    return text.encode()


FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(texts(canonical_docs(), edits=False))
def test_every_valid_report_in_the_platforms_form_takes_the_fast_path_with_the_models_values(
    payload: bytes,
) -> None:
    assert assert_same_as_model(payload, json.loads(payload)["vehicle_id"]) is not None, payload


@FUZZ
@given(texts(any_docs()), st.one_of(st.none(), ids))
@example(json.dumps(dict(GOOD, seq=2**63)).encode(), None)
@example(json.dumps(dict(GOOD, soc=True)).encode(), None)
@example(json.dumps(dict(GOOD, capacity_kwh=0)).encode(), None)
@example(json.dumps(dict(GOOD, ts="2026-11-26T18:00:60Z")).encode(), None)
@example(json.dumps(dict(GOOD, ts="2026-02-29T18:00:00Z")).encode(), None)
@example(json.dumps(dict(GOOD, ts="2026-11-26T18:00:00.1234567Z")).encode(), None)
@example(json.dumps(dict(GOOD, departure="1795716000")).encode(), None)
@example(json.dumps(dict(GOOD, vehicle_id="ev-0002")).encode(), None)
@example(json.dumps(dict(FLOATY, soc=True)).encode(), None)
@example(json.dumps(dict(FLOATY, vehicle_id="ev/1")).encode(), None)
@example(json.dumps(dict(FLOATY, vehicle_id="")).encode(), None)
# Nested too deep for the model's parser: in a key given twice, or in an extra field.
@example(b'{"soc": ' + DEEP + b", " + json.dumps(FLOATY).encode()[1:], None)
@example(b'{"soc": ' + DEEP + b", " + json.dumps(dict(FLOATY, departure=None)).encode()[1:], None)
@example(
    b'{"soc": ' + DEEP + b", " + json.dumps(GOOD).encode()[1:].replace(b', "departure"', b', "x"'),
    None,
)
@example(b'{"soc": ' + DEEP + b", " + json.dumps(NO_DEPARTURE).encode()[1:], None)
@example(json.dumps(FLOATY).encode()[:-1] + b', "x": ' + DEEP + b"}", None)
@example(json.dumps(dict(GOOD, soc=True)).encode(), None)
def test_the_fast_path_never_takes_what_the_model_refuses_nor_changes_a_value(
    payload: bytes, topic_id: str | None
) -> None:
    if topic_id is None:  # the topic names the vehicle the report claims to be
        with contextlib.suppress(ValueError, TypeError, KeyError):
            topic_id = json.loads(payload)["vehicle_id"]
        if type(topic_id) is not str:
            topic_id = "ev-0001"
    assert_same_as_model(payload, topic_id)


def edges(field: str) -> list[Any]:
    low, high, _ = RANGES[field]
    up, down = math.inf, -math.inf
    near = [low, high, math.nextafter(low, up), math.nextafter(low, down)]
    near += [math.nextafter(high, up), math.nextafter(high, down), (low + high) / 2, -0.0]
    return [
        *near,
        *(int(v) for v in (low, high, low - 1, high + 1)),
        low - 10.0,
        1.5 * high + 1.0,
        1e308,
        True,
        False,
        None,
        "0.5",
        [0.5],
    ]


PLATFORM_TIMES = [  # the form the fast path reads
    "2026-11-26T18:00:00Z",
    "2026-11-26T18:00:00+00:00",
    "2026-11-26T18:00:00.5Z",
    "2026-11-26T17:59:59.999999+00:00",
    "2024-02-29T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
]
TIMES = [
    *PLATFORM_TIMES,
    "2026-11-26T18:00:00.1234567Z",
    "2026-11-26T18:00:00z",
    "2026-11-26t18:00:00Z",
    "2026-11-26 18:00:00Z",
    "2026-11-26T19:00:00+01:00",
    "2026-11-26T18:00:00-00:00",
    "2026-11-26T18:00:00",
    "2026-11-26T18:00Z",
    "2026-11-26",
    "20261126T180000Z",
    "2026-02-29T18:00:00Z",
    "2026-11-31T18:00:00Z",
    "2026-11-26T24:00:00Z",
    "2026-11-26T18:60:00Z",
    "2026-11-26T18:00:60Z",
    "0000-01-01T00:00:00Z",
    "1795716000",
    "1795716000.5",
    "",
    1795716000,
    1795716000.5,
    True,
    None,
]


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in RANGES for v in edges(f)]
    + [(f, t) for f in ("ts", "departure") for t in TIMES]
    + [("seq", v) for v in (0, 2**63 - 1, 2**63, 2**64, -1, 1.0, True, "1", None)]
    + [("plugged_in", v) for v in (True, False, 1, 0, "true", None)]
    + [("vehicle_id", v) for v in ("ev-0001", "ev/1", "", "a" * 65, 1, None)],
)
def test_one_field_at_or_past_its_bounds_is_judged_as_the_model_judges_it(
    field: str, value: Any
) -> None:
    """Every valid value of the platform's form takes the fast path; every other goes to
    the model, which refuses it or takes it with the same value."""
    for base in (FLOATY, GOOD):
        payload = json.dumps(dict(base, **{field: value})).encode()
        fast = assert_same_as_model(payload, "ev-0001")
        odd_time = field in ("ts", "departure") and value not in (None, *PLATFORM_TIMES)
        if model_row(payload) is not None and not odd_time:
            assert fast is not None, payload


def test_garbled_bytes_of_valid_reports_are_never_taken_against_the_model() -> None:
    """20,000 seeded byte flips, insertions and cuts of the platform's own reports."""
    rng = np.random.default_rng(20261126)
    fleet = SimFleet(generate_fleet(50, 7), T0)
    fleet.plugged[::2] = True
    bodies = [*telemetry_payloads(fleet, T0), json.dumps(GOOD).encode()]
    vids = [*fleet.ids, GOOD["vehicle_id"]]
    taken = 0
    for _ in range(20_000):
        k = int(rng.integers(0, len(bodies)))
        buf = bytearray(bodies[k])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(buf)))
            what = rng.integers(0, 3)
            if what == 0:
                buf[at] = int(rng.integers(0, 256))
            elif what == 1:
                buf[at:at] = bytes([int(rng.choice(list(b'0123456789.-e"{}[],: \\')))])
            else:
                del buf[at]
        taken += assert_same_as_model(bytes(buf), vids[k]) is not None
    assert taken > 100  # flips inside digits still make valid reports, and are taken


def test_a_seq_past_int64_is_refused_by_the_model_and_cannot_break_the_fold() -> None:
    big = json.dumps(dict(GOOD, seq=2**63)).encode()
    assert model_row(big) is None and telemetry_row(big, "ev-0001") is None
    top = json.dumps(dict(GOOD, seq=2**63 - 1)).encode()
    row = telemetry_row(top, "ev-0001")
    assert row is not None
    assert TelemetryArrays.from_telemetry([row]).seq.tolist() == [2**63 - 1]


# -- through the aggregator's handler ---------------------------------------------------------
def service() -> AggregatorService:
    return AggregatorService(
        settings=Settings(topic_prefix="fp", log_level="warning", speed=1e6),
        clock=ManualClock(T0),
        store=MemoryStore(),
    )


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    vid = draw(st.sampled_from(["ev-0001", "ev-0002", "ev-3"]))
    doc = draw(st.one_of(canonical_docs(), any_docs()))
    if draw(st.booleans()):
        doc["vehicle_id"] = vid
    if draw(st.booleans()):  # near the platform clock, some ahead of it (refused: future)
        moment = datetime.fromtimestamp(T0, UTC) + timedelta(seconds=draw(st.integers(-60, 60)))
        doc["ts"] = moment.isoformat()
    if draw(st.booleans()):
        doc["seq"] = draw(st.integers(0, 3))
    return f"fp/vehicles/{vid}/telemetry", draw(texts(st.just(doc)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=40))
def test_the_handler_accepts_rejects_and_folds_the_same_with_and_without_the_fast_path(
    batch: list[tuple[str, bytes]],
) -> None:
    fast, slow = service(), service()
    for topic, payload in batch:
        fast.on_message(aiomqtt.Message(topic, payload, 0, False, 0, None))
    with mock.patch.object(aggregator.inbox, "telemetry_row", return_value=None):
        for topic, payload in batch:
            slow.on_message(aiomqtt.Message(topic, payload, 0, False, 0, None))
    assert (fast.received, fast.accepted, fast.ignored) == (
        slow.received,
        slow.accepted,
        slow.ignored,
    )
    assert fast.rejected == slow.rejected
    assert [exact(r) for r in fast.inbox.telemetry] == [exact(r) for r in slow.inbox.telemetry]
    assert fast._fold(fast.inbox) == slow._fold(slow.inbox)
    assert fast.state.ids == slow.state.ids
    for name, column in fast.state.cols.items():
        np.testing.assert_array_equal(column, slow.state.cols[name], err_msg=name)
