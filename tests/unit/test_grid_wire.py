"""The grid's extension of the wire contract (DESIGN.md "Extension: the grid"): a node in
telemetry (the fast path held to the model), a node column in bridge batches, the grid
topics, the meter and limits messages refused as strictly as operator messages, and the
node and firming terms of a dispatch request."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.codec import telemetry_batch_payloads, telemetry_payloads, telemetry_row
from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import (
    MAX_NODE_KW,
    DispatchRequest,
    GridLimits,
    GridMeter,
    NodeCapability,
    Telemetry,
    TelemetryBatch,
)
from broker.topics import ID_PATTERN, Topics
from core.errors import InvalidMessage

REPORT: dict[str, Any] = {
    "vehicle_id": "ev-1",
    "seq": 3,
    "ts": "2026-06-01T12:00:00Z",
    "plugged_in": True,
    "soc": 0.5,
    "capacity_kwh": 60.0,
    "power_kw": 7.0,
    "max_charge_kw": 11.0,
    "max_discharge_kw": 11.0,
    "charge_efficiency": 0.95,
    "discharge_efficiency": 0.95,
    "min_soc": 0.2,
    "target_soc": 0.8,
}


def _model_row(payload: bytes) -> TelemetryRow | None:
    try:
        return TelemetryRow.of(Telemetry.model_validate_json(payload))
    except ValidationError:
        return None


def _same(a: TelemetryRow | None, b: TelemetryRow | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


@settings(max_examples=300, deadline=None)
@given(
    node=st.one_of(
        st.just("__absent__"),
        st.none(),
        st.from_regex(ID_PATTERN, fullmatch=True),
        st.text(max_size=70),
        st.integers(),
        st.lists(st.just("a"), max_size=2),
    ),
    departure=st.sampled_from(["__absent__", None, "2026-06-01T18:00:00Z"]),
)
def test_a_report_with_or_without_a_node_is_read_by_the_fast_path_as_the_model_reads_it(
    node: object, departure: object
) -> None:
    doc = dict(REPORT)
    if departure != "__absent__":
        doc["departure"] = departure
    if node != "__absent__":
        doc["node"] = node
    payload = json.dumps(doc).encode()
    fast = telemetry_row(payload, "ev-1")
    model = _model_row(payload)
    if fast is not None:  # never takes what the model refuses, never changes a value
        assert _same(fast, model)
    if type(node) is str and model is not None and "\\" not in payload.decode():
        assert fast is not None  # a valid node in the platform's form takes the fast path
    if node in ("__absent__", None) and departure != "x":
        assert fast is not None and fast.node is None


def test_a_report_without_a_node_reads_as_before_and_a_bad_node_is_refused() -> None:
    t = Telemetry.model_validate_json(json.dumps(REPORT))
    assert t.node is None and "node" in t.model_dump()
    t = Telemetry.model_validate_json(json.dumps({**REPORT, "node": "carpark-work"}))
    assert t.node == "carpark-work"
    with pytest.raises(ValidationError, match="node"):
        Telemetry.model_validate_json(json.dumps({**REPORT, "node": "a/b"}))


def _arrays(nodes: list[str | None] | None) -> TelemetryArrays:
    n = 3
    now = datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp()
    return TelemetryArrays(
        vehicle_id=[f"ev-{k}" for k in range(n)],
        seq=np.arange(n, dtype=np.int64),
        ts=np.full(n, now),
        plugged_in=np.ones(n, dtype=np.bool_),
        values={
            "soc": np.full(n, 0.5),
            "capacity_kwh": np.full(n, 60.0),
            "power_kw": np.full(n, 3.0),
            "max_charge_kw": np.full(n, 11.0),
            "max_discharge_kw": np.full(n, 11.0),
            "charge_efficiency": np.full(n, 0.95),
            "discharge_efficiency": np.full(n, 0.95),
            "min_soc": np.full(n, 0.2),
            "target_soc": np.full(n, 0.8),
            "departure": np.full(n, np.nan),
        },
        node=nodes,
    )


@pytest.mark.parametrize("nodes", [None, ["a", None, "b"]])
def test_simulated_reports_and_batches_carry_their_nodes_through_the_models(
    nodes: list[str | None] | None,
) -> None:
    reports = _arrays(nodes)
    payloads = telemetry_payloads(reports)
    got = [Telemetry.model_validate_json(p).node for p in payloads]
    assert got == (nodes or [None] * 3)
    rows = [telemetry_row(p, f"ev-{k}") for k, p in enumerate(payloads)]
    assert all(r is not None for r in rows)
    assert TelemetryArrays.from_rows([r for r in rows if r is not None]).node == nodes
    (batch_payload,) = telemetry_batch_payloads("depot-1", reports.ts[0], reports)
    batch = TelemetryBatch.model_validate_json(batch_payload)
    assert batch.node == nodes
    assert TelemetryArrays.from_batch(batch).node == nodes
    assert TelemetryArrays.concat([reports, _arrays(None)]).node == (
        None if nodes is None else nodes + [None] * 3
    )
    models = [Telemetry.model_validate_json(p) for p in payloads]
    again = TelemetryBatch.from_telemetry("depot-1", datetime.now(UTC), models)
    assert again.node == nodes
    assert reports.take(np.array([2, 0])).node == (None if nodes is None else [nodes[2], nodes[0]])


def test_a_batch_node_column_must_line_up_and_hold_valid_ids() -> None:
    (payload,) = telemetry_batch_payloads("depot-1", 1.8e9, _arrays(["a", None, "b"]))
    doc = json.loads(payload)
    with pytest.raises(ValidationError, match="column node has 2 entries"):
        TelemetryBatch.model_validate_json(json.dumps({**doc, "node": ["a", "b"]}))
    with pytest.raises(ValidationError, match="node"):
        TelemetryBatch.model_validate_json(json.dumps({**doc, "node": ["a", "b c", None]}))


def test_grid_topics_build_and_parse() -> None:
    t = Topics("pfx")
    assert t.grid_meter("tx-1") == "pfx/grid/tx-1/meter"
    assert t.parse(t.grid_meter("tx-1")) == ("grid_meter", "tx-1")
    assert t.parse(t.grid_limits("tx-1")) == ("grid_limits", "tx-1")
    assert t.parse(t.grid_capability("tx-1")) == ("grid_capability", "tx-1")
    assert t.all_grid_meters == "pfx/grid/+/meter"
    assert t.all_grid_limits == "pfx/grid/+/limits"
    for bad in ("pfx/grid/tx-1/voltage", "pfx/grid/tx 1/meter", "pfx/grid/meter"):
        with pytest.raises(InvalidMessage):
            t.parse(bad)


LIMITS: dict[str, Any] = {
    "ts": "2026-06-01T11:00:00Z",
    "intervals": [
        {"start": "2026-06-01T12:00:00Z", "duration_s": 900, "import_kw": 30, "export_kw": None}
    ],
    "safe_import_kw": 10.0,
    "safe_export_kw": None,
}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"ts": "2026-06-01T11:00:00Z", "power_kw": 1.0, "kw": 2}, "kw"),
        ({"ts": "2026-06-01T11:00:00", "power_kw": 1.0}, "timezone"),
        ({"ts": "2026-06-01T11:00:00Z", "power_kw": "1.0"}, "power_kw"),
        ({"ts": "2026-06-01T11:00:00Z", "power_kw": 2 * MAX_NODE_KW}, "power_kw"),
        ({"ts": "2026-06-01T11:00:00Z"}, "power_kw"),
    ],
)
def test_a_bad_meter_reading_is_refused(doc: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        GridMeter.model_validate_json(json.dumps(doc))


def test_a_meter_reading_takes_nan_nowhere() -> None:
    with pytest.raises(ValidationError):
        GridMeter.model_validate_json(b'{"ts": "2026-06-01T11:00:00Z", "power_kw": NaN}')
    m = GridMeter.model_validate_json(b'{"ts": "2026-06-01T11:00:00Z", "power_kw": -40}')
    assert m.power_kw == -40.0


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"safe_import_kw": -1.0}, "safe_import_kw"),
        ({"safe_exprt_kw": 1.0}, "safe_exprt_kw"),
        ({"intervals": [{**LIMITS["intervals"][0], "duration_s": 0}]}, "duration_s"),
        ({"intervals": [{**LIMITS["intervals"][0], "import": 3}]}, "import"),
        ({"intervals": [{**LIMITS["intervals"][0], "start": "2026-06-01T12:00:00"}]}, "timezone"),
        (
            {
                "intervals": [
                    LIMITS["intervals"][0],
                    {"start": "2026-06-01T12:10:00Z", "duration_s": 60, "import_kw": 5},
                ]
            },
            "overlap",
        ),
        ({"intervals": None}, "intervals"),
    ],
)
def test_bad_dynamic_limits_are_refused(change: dict[str, Any], says: str) -> None:
    GridLimits.model_validate_json(json.dumps(LIMITS))  # the base is good
    with pytest.raises(ValidationError, match=says):
        GridLimits.model_validate_json(json.dumps({**LIMITS, **change}))


def test_back_to_back_intervals_do_not_overlap() -> None:
    doc = {
        **LIMITS,
        "intervals": [
            LIMITS["intervals"][0],
            {"start": "2026-06-01T12:15:00Z", "duration_s": 60, "import_kw": 5},
        ],
    }
    assert len(GridLimits.model_validate_json(json.dumps(doc)).intervals) == 2


FIRMING: dict[str, Any] = {
    "request_id": "firm-1",
    "service": "firming",
    "node": "solar-plant",
    "min_kw": -300.0,
    "max_kw": 50.0,
    "ramp_kw_per_min": 20.0,
    "duration_s": 3600,
}


def test_a_request_may_name_a_node_and_firming_takes_a_band() -> None:
    r = DispatchRequest.model_validate_json(json.dumps(FIRMING))
    assert r.service == "firming" and r.power_kw is None and r.max_kw == 50.0
    only_ramp = {k: v for k, v in FIRMING.items() if k not in ("min_kw", "max_kw")}
    assert DispatchRequest.model_validate_json(json.dumps(only_ramp)).ramp_kw_per_min == 20.0
    plain = {"request_id": "r", "power_kw": -50.0, "duration_s": 60, "node": "carpark-work"}
    assert DispatchRequest.model_validate_json(json.dumps(plain)).node == "carpark-work"
    # Without node, as before.
    old = DispatchRequest.model_validate_json(b'{"request_id":"r","power_kw":1,"duration_s":6}')
    assert old.node is None and old.min_kw is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"node": None}, "needs node"),
        ({"power_kw": 10.0}, "no power_kw"),
        ({"capacity_kw": 10.0}, "no power_kw"),
        ({"min_kw": None, "max_kw": None, "ramp_kw_per_min": None}, "at least one"),
        ({"min_kw": 60.0}, "above max_kw"),
        ({"ramp_kw_per_min": 0.0}, "ramp_kw_per_min"),
        ({"max_kw": "50"}, "max_kw"),
        ({"node": "a/b"}, "node"),
        ({"band": 3}, "band"),
        ({"service": "manual", "power_kw": 5.0}, "belong to service firming"),
    ],
)
def test_a_bad_firming_request_is_refused_saying_why(change: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        DispatchRequest.model_validate_json(json.dumps({**FIRMING, **change}))


def test_node_capability_carries_the_node() -> None:
    cap = NodeCapability.model_validate_json(
        json.dumps(
            {
                "node": "carpark-work",
                "ts": "2026-06-01T12:00:00Z",
                "windows": [{"duration_s": 900, "min_power_kw": -10, "max_power_kw": 40}],
                "vehicles": 4,
            }
        )
    )
    assert cap.node == "carpark-work" and cap.windows[0].max_power_kw == 40.0
