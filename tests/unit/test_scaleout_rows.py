"""The rows a follower forwards to the leader survive their binary encoding unchanged; the
snapshot's one encoding round-trips; a promoted leader resets itself from its own config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import redis.asyncio as aioredis

from aggregator.fence import Fence, fence_writes
from aggregator.fleet_state import FleetState
from aggregator.ledger import MemoryLedger
from aggregator.scaleout import Rows, decode_rows, encode_rows, shared_subscriptions
from aggregator.service import AggregatorService
from aggregator.store import (
    MemoryStore,
    RedisStore,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)
from broker.columns import TelemetryArrays
from broker.models import TELEMETRY_FLOAT_COLUMNS
from broker.settings import Settings
from core.clock import ManualClock

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


async def test_a_promoted_leader_resets_itself_from_its_own_config_and_restores() -> None:
    settings = Settings(
        topic_prefix="x",
        control_step_s=2.0,
        setpoint_ttl_s=11.0,
        max_request_kw=5.0,
        log_level="warning",
    )
    store = MemoryStore()
    svc = AggregatorService(
        settings=settings, clock=ManualClock(1.7e9), store=store, ledger=MemoryLedger()
    )
    old = svc.dispatcher
    old.dispatches["x"] = object()  # type: ignore[assignment]
    svc.state.apply_arrays(arrays(["stale-1"], 3))  # what it knew as a follower
    last = FleetState()
    last.apply_arrays(arrays(["ev-1", "ev-2"], 4))
    ids, columns = last.snapshot()
    await store.save(Snapshot(ids, columns, [], saved_at=1.7e9))  # the last leader's
    await svc.reset_for_takeover(7)
    new = svc.dispatcher
    assert new is not old and not new.dispatches
    for name in ("control_step_s", "setpoint_ttl_s", "max_request_kw", "settle_s"):
        assert getattr(new, name) == getattr(old, name)
    assert sorted(svc.state.ids) == ["ev-1", "ev-2"]
    assert svc.ledger is not None and svc.ledger.stamp == {"term": "7"}


def test_the_snapshot_round_trips_through_its_one_encoding() -> None:
    columns = {"soc": np.array([0.5, 0.25]), "seq": np.array([3, 4], dtype=np.int64)}
    for cursor in (None, "17-0"):
        snap = Snapshot(["a", "b"], columns, [{"k": 1}], saved_at=2.5, ingest_cursor=cursor)
        raw = {
            k.encode(): v if isinstance(v, bytes) else str(v).encode()
            for k, v in encode_snapshot(snap).items()
        }
        back = decode_snapshot(raw)
        assert back is not None and back.ids == ["a", "b"] and back.ingest_cursor == cursor
        assert back.dispatches == [{"k": 1}] and back.saved_at == 2.5
        for k, v in columns.items():
            np.testing.assert_array_equal(back.columns[k], v)
            assert back.columns[k].dtype == v.dtype
    assert decode_snapshot({}) is None


async def test_fenced_writes_need_the_store_and_the_ledger_in_redis() -> None:
    url = "redis://127.0.0.1:6379/0"  # never contacted: the check comes first
    redis = aioredis.Redis.from_url(url)
    fence = Fence(redis, token_key="k", holder="h", term=lambda: None, on_fenced=print)
    store = RedisStore(url, prefix="unit-fence")
    try:
        with pytest.raises(ValueError, match="needs a Redis store, not MemoryStore"):
            fence_writes(fence, MemoryStore(), None)
        with pytest.raises(ValueError, match="needs a Redis ledger, not MemoryLedger"):
            fence_writes(fence, store, MemoryLedger())
        fenced_store, fenced_ledger = fence_writes(fence, store, None)
        assert fenced_store.inner is store and fenced_ledger is None
    finally:
        await store.close()
        await redis.aclose()


def test_forwarded_rows_keep_each_reports_node() -> None:
    own, bridged = arrays(["ev-1", "ev-2"], 1), arrays(["b-1", "b-2"], 2)
    own = dataclasses.replace(own, node=["site-a", None])
    rows = Rows(parts=[("", own), ("bridge-7", bridged)])  # the bridge's name no node
    back = decode_rows({k.encode(): v for k, v in encode_rows("p", rows).items()})
    assert back.parts[0][1].node == ["site-a", None]
    assert back.parts[1][1].node is None
