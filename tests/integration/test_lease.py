"""The leader lease and its fencing tokens, against the real Redis on 127.0.0.1:6379.

Each test works under its own Redis prefix (removed at teardown), so runs never cross.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from aggregator.fence import FencedLedger, FencedStore
from aggregator.lease import (
    FencedOut,
    LeaseUnavailable,
    RedisLease,
    fenced_hset,
    fenced_xadd,
    lease_keys,
)
from aggregator.ledger import LedgerWriter, RedisLedger
from aggregator.scaleout import ScaleOut
from aggregator.store import RedisStore, Snapshot
from broker.settings import Settings
from tests.support.harness import HOST

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis(settings: Settings, redis_keys: None) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
    )
    try:
        yield client
    finally:
        await client.aclose()


def lease(redis: aioredis.Redis, settings: Settings, holder: str, ttl_s: float = 5.0) -> RedisLease:
    return RedisLease(redis, prefix=settings.redis_prefix, holder=holder, ttl_s=ttl_s)


async def test_only_one_holder_acquires_and_each_acquisition_gets_a_higher_token(
    redis: aioredis.Redis, settings: Settings
) -> None:
    a, b = lease(redis, settings, "a"), lease(redis, settings, "b")
    first = await a.acquire()
    assert first is not None and a.held
    assert await b.acquire() is None and not b.held
    assert 4.0 < b.free_in <= 5.0, "a failed acquire tells when the lease runs out"
    value, token = await a.current()
    assert (value, token) == (f"a|{first}", first)
    assert await a.release()
    assert not a.held
    second = await b.acquire()
    assert second is not None and second > first
    # A released lease is not ours to release again, nor to renew.
    assert not await a.release()
    assert not await a.renew()


async def test_renewal_extends_the_lease_and_only_the_holder_can_renew(
    redis: aioredis.Redis, settings: Settings
) -> None:
    a, b = lease(redis, settings, "a", ttl_s=0.6), lease(redis, settings, "b", ttl_s=0.6)
    assert await a.acquire() is not None
    for _ in range(4):  # 1.2 s in all, twice the TTL: alive only through renewals
        await asyncio.sleep(0.3)
        assert await a.renew()
        assert await b.acquire() is None
    assert a.held
    pttl = await redis.pttl(a.key)
    assert 0 < pttl <= 600
    # b cannot renew a lease it never had, nor renew a's by guessing the holder name.
    assert not await b.renew()
    b.value = "a|0"
    assert not await b.renew()


async def test_an_expired_lease_passes_to_another_holder_and_the_old_one_learns_it_lost(
    redis: aioredis.Redis, settings: Settings
) -> None:
    a, b = lease(redis, settings, "a", ttl_s=0.3), lease(redis, settings, "b", ttl_s=0.3)
    old = await a.acquire()
    assert old is not None
    await asyncio.sleep(0.28)
    assert not a.held, "the holder must stop counting itself leader before the key expires"
    await asyncio.sleep(0.1)
    new = await b.acquire()
    assert new is not None and new == old + 1
    assert not await a.renew()
    assert a.token is None and not a.held
    assert (await b.current())[0] == f"b|{new}"


async def test_a_write_with_an_old_fencing_token_is_refused_and_changes_nothing(
    redis: aioredis.Redis, settings: Settings
) -> None:
    a, b = lease(redis, settings, "a", ttl_s=0.2), lease(redis, settings, "b", ttl_s=5.0)
    old = await a.acquire()
    assert old is not None
    key = f"{settings.redis_prefix}:books"
    _, token_key = lease_keys(settings.redis_prefix)
    await fenced_hset(redis, token_key=token_key, key=key, token=old, mapping={"by": "a"})
    await asyncio.sleep(0.3)  # a is "paused" past its TTL; b takes over
    new = await b.acquire()
    assert new is not None and new > old
    await fenced_hset(redis, token_key=token_key, key=key, token=new, mapping={"by": "b"})
    with pytest.raises(FencedOut) as refused:
        await fenced_hset(redis, token_key=token_key, key=key, token=old, mapping={"by": "a"})
    assert refused.value.token == old
    assert await redis.hgetall(key) == {b"by": b"b"}  # type: ignore[misc]


async def test_an_append_with_an_old_fencing_token_is_refused(
    redis: aioredis.Redis, settings: Settings
) -> None:
    a, b = lease(redis, settings, "a", ttl_s=0.2), lease(redis, settings, "b", ttl_s=5.0)
    old = await a.acquire()
    assert old is not None
    key = f"{settings.redis_prefix}:ledger:r1"
    _, token_key = lease_keys(settings.redis_prefix)
    other = f"{settings.redis_prefix}:ledger:r2"
    rows = [
        (key, {"kind": "step", "kw": "-5"}),
        (other, {"kind": "answer", "status": "accepted", "json": "{}"}),
        (key, {"kind": "step", "kw": "-6"}),
    ]
    ids = await fenced_xadd(redis, token_key=token_key, token=old, entries=rows)
    assert len(ids) == 3
    got = await redis.xrange(key)
    assert [f for _, f in got] == [
        {b"kind": b"step", b"kw": b"-5"},
        {b"kind": b"step", b"kw": b"-6"},
    ]
    assert await redis.xlen(other) == 1
    await asyncio.sleep(0.3)
    assert await b.acquire() is not None
    with pytest.raises(FencedOut):
        await fenced_xadd(redis, token_key=token_key, token=old, entries=rows)
    assert await redis.xlen(key) == 2 and await redis.xlen(other) == 1


def deposed_and_successor(settings: Settings) -> tuple[Settings, ScaleOut, ScaleOut]:
    """A scaled-out group's settings and two processes: "old", whose lease (0.2 s) will
    lapse while it is "paused", and "new", which takes over and keeps it (5 s)."""
    cfg = settings.model_copy(update={"share_group": "g", "lease_ttl_s": 0.2})
    old_scale = ScaleOut(settings=cfg, holder="old")
    new_scale = ScaleOut(settings=cfg.model_copy(update={"lease_ttl_s": 5.0}), holder="new")
    return cfg, old_scale, new_scale


async def test_the_fenced_store_saves_with_the_token_and_a_deposed_leader_cannot_overwrite(
    redis: aioredis.Redis, settings: Settings
) -> None:
    cfg, old_scale, new_scale = deposed_and_successor(settings)
    inner_old = RedisStore(cfg.redis_url, prefix=cfg.redis_prefix)
    inner_new = RedisStore(cfg.redis_url, prefix=cfg.redis_prefix)
    old_store = FencedStore(inner_old, old_scale.fence)
    new_store = FencedStore(inner_new, new_scale.fence)
    try:
        assert await old_scale.lease.acquire() is not None
        snap = Snapshot(["ev-1"], {"soc": np.array([0.5])}, [], saved_at=1.0, ingest_cursor="5-0")
        await old_store.save(snap)
        got = await new_store.load()
        assert got is not None and got.ids == ["ev-1"] and got.ingest_cursor == "5-0"
        await asyncio.sleep(0.3)
        assert await new_scale.lease.acquire() is not None
        await new_store.save(Snapshot(["ev-2"], {"soc": np.array([0.9])}, [], saved_at=2.0))
        # The old leader wakes up and writes as if nothing happened: refused, it steps down.
        await old_store.save(Snapshot(["ev-1"], {"soc": np.array([0.1])}, [], saved_at=3.0))
        assert old_store.refused == 1 and old_scale.stats.fenced == 1
        assert old_scale.lease.token is None
        got = await new_store.load()
        assert got is not None and got.ids == ["ev-2"] and got.saved_at == 2.0
    finally:
        await old_scale.close(release=False)
        await new_scale.close()
        await inner_old.close()
        await inner_new.close()


async def test_a_deposed_leaders_ledger_entries_are_refused_and_dropped_not_retried(
    redis: aioredis.Redis, settings: Settings
) -> None:
    cfg, old_scale, new_scale = deposed_and_successor(settings)
    old_ledger = FencedLedger(RedisLedger(cfg.redis_url, prefix=cfg.redis_prefix), old_scale.fence)
    new_ledger = FencedLedger(RedisLedger(cfg.redis_url, prefix=cfg.redis_prefix), new_scale.fence)
    old, new = LedgerWriter(old_ledger), LedgerWriter(new_ledger)
    key = f"{cfg.redis_prefix}:ledger:r1"
    try:
        old_token = await old_scale.lease.acquire()
        assert old_token is not None
        old.stamp = {"term": str(old_token)}
        old.add("r1", {"kind": "step", "ts": "1"})
        assert await old.drain() and await redis.xlen(key) == 1
        old.add("r1", {"kind": "step", "ts": "2"})  # queued; then the leader "pauses"
        await asyncio.sleep(0.3)
        new_token = await new_scale.lease.acquire()
        assert new_token is not None and new_token > old_token
        new.stamp = {"term": str(new_token)}
        new.add("r1", {"kind": "step", "ts": "2"})
        assert await new.drain()
        # The old leader wakes and drains: refused by Redis, dropped (not kept to retry),
        # and it knows it is no longer leader.
        assert await old.drain()
        assert not old.owed and old_ledger.refused == 1
        assert old_scale.lease.token is None and old_scale.stats.fenced == 1
        got = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await redis.xrange(key)]
        assert got == [
            {"kind": "step", "ts": "1", "term": str(old_token)},
            {"kind": "step", "ts": "2", "term": str(new_token)},
        ]
        # Entries of an older term refused do not depose the leader of the current one.
        await new.ledger.append([("r1", {"kind": "step", "ts": "3", "term": str(old_token)})])
        assert new_ledger.refused == 1
        assert new_scale.lease.token == new_token and new_scale.stats.fenced == 0
        assert await redis.xlen(key) == 2
        # A refused rejection of an older term sets no expiry on a stream it did not write:
        # the current leader's one-answer stream of r2 stays.
        accepted = {"kind": "answer", "status": "accepted", "ts": "4", "term": str(new_token)}
        await new.ledger.append([("r2", accepted)])
        refusal = {"kind": "answer", "status": "rejected", "ts": "5", "term": str(old_token)}
        await new.ledger.append([("r2", refusal)])
        assert await redis.ttl(f"{cfg.redis_prefix}:ledger:r2") == -1
    finally:
        await old_scale.close(release=False)
        await new_scale.close()
        await old.ledger.close()
        await new.ledger.close()


async def test_an_unreachable_redis_is_a_clear_bounded_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    client = aioredis.Redis.from_url(
        f"redis://{HOST}:{port}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        a = RedisLease(client, prefix="nowhere", holder="a", ttl_s=1.0)
        t = time.monotonic()
        with pytest.raises(LeaseUnavailable, match="Redis"):
            await a.acquire()
        assert time.monotonic() - t < 2.0
        assert not a.held
    finally:
        await client.aclose()
