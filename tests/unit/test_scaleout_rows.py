"""The rows a follower forwards to the leader survive their binary encoding unchanged."""

from __future__ import annotations

import numpy as np

from aggregator.dispatch import Dispatcher
from aggregator.scaleout import (
    Rows,
    decode_rows,
    encode_rows,
    fresh_dispatcher,
    shared_subscriptions,
)
from broker.columns import TelemetryArrays
from broker.models import TELEMETRY_FLOAT_COLUMNS
from broker.settings import Settings

FLOATS = TELEMETRY_FLOAT_COLUMNS  # the float columns, in the wire order


def arrays(ids: list[str], seed: int) -> TelemetryArrays:
    rng = np.random.default_rng(seed)
    n = len(ids)
    values = {k: rng.random(n) for k in FLOATS}
    values["departure"][0] = np.nan
    return TelemetryArrays(
        vehicle_id=ids,
        seq=rng.integers(0, 1 << 40, n),
        ts=1.7e9 + rng.random(n),
        plugged_in=rng.random(n) < 0.5,
        values=values,
    )


def test_forwarded_rows_round_trip_by_part_and_status() -> None:
    own, bridged = arrays(["ev-1", "ev-2", "ev-3"], 1), arrays(["b-1", "b-2"], 2)
    rows = Rows(
        parts=[("", own), ("bridge-7", bridged)],
        status_ids=["ev-9", "ev-1"],
        status_online=np.array([False, True]),
        status_ts=np.array([1.7e9, 1.7e9 + 0.5]),
    )
    entry = {k.encode(): v for k, v in encode_rows("proc-a", rows).items()}
    back = decode_rows(entry)
    assert [b for b, _ in back.parts] == ["", "bridge-7"]
    for (_, want), (_, got) in zip(rows.parts, back.parts, strict=True):
        assert got.vehicle_id == want.vehicle_id
        np.testing.assert_array_equal(got.seq, want.seq)
        np.testing.assert_array_equal(got.ts, want.ts)
        np.testing.assert_array_equal(got.plugged_in, want.plugged_in)
        for k in FLOATS:
            np.testing.assert_array_equal(got.values[k], want.values[k])
    assert back.status_ids == ["ev-9", "ev-1"]
    np.testing.assert_array_equal(back.status_online, rows.status_online)
    np.testing.assert_array_equal(back.status_ts, rows.status_ts)
    assert len(back) == 7


def test_statuses_alone_and_nothing_at_all_encode_too() -> None:
    only = Rows(status_ids=["ev-1"], status_online=np.array([True]), status_ts=np.array([1.0]))
    back = decode_rows({k.encode(): v for k, v in encode_rows("p", only).items()})
    assert back.parts == [] and back.status_ids == ["ev-1"]
    empty = decode_rows({k.encode(): v for k, v in encode_rows("p", Rows()).items()})
    assert len(empty) == 0


def test_only_the_vehicles_filters_move_onto_the_shared_subscription() -> None:
    base = Settings(topic_prefix="x")
    t = base.topics
    subs = [
        (t.all_telemetry, 0),
        (t.all_bridge_telemetry, 0),
        (t.all_vehicle_status, 1),
        (t.dispatch_requests, 1),
    ]
    assert shared_subscriptions(base, subs) == subs
    shared = shared_subscriptions(base.model_copy(update={"share_group": "aggs"}), subs)
    assert shared == [
        (f"$share/aggs/{t.all_telemetry}", 0),
        (f"$share/aggs/{t.all_bridge_telemetry}", 0),
        (f"$share/aggs/{t.all_vehicle_status}", 1),
        (t.dispatch_requests, 1),
    ]


def test_a_promoted_leader_gets_an_empty_dispatcher_configured_like_its_old_one() -> None:
    old = Dispatcher(control_step_s=2.0, setpoint_ttl_s=11.0, max_request_kw=5.0, settle_s=3.0)
    old.dispatches["x"] = object()  # type: ignore[assignment]
    new = fresh_dispatcher(old)
    assert new is not old and not new.dispatches
    for name in ("control_step_s", "setpoint_ttl_s", "max_request_kw", "settle_s"):
        assert getattr(new, name) == getattr(old, name)
