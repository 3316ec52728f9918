"""The one composition root (v2g/compose.py): every process that builds the aggregator
gets the same store and ledger from the same settings (no connection is opened here)."""

from __future__ import annotations

from aggregator.ledger import MemoryLedger, RedisLedger
from aggregator.store import MemoryStore, RedisStore
from broker.settings import Settings
from core.clock import SimClock
from v2g import compose


async def test_redis_persistence_honours_the_prefix_and_the_rejected_ledger_ttl() -> None:
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0",
        topic_prefix="t-compose",
        redis_prefix="rp-compose",
        rejected_ledger_ttl_s=123.0,
    )
    persisted = compose.persistence(settings, memory=False)
    try:
        assert isinstance(persisted.store, RedisStore)
        assert persisted.store.key == "rp-compose:fleet"
        assert isinstance(persisted.ledger, RedisLedger)
        assert persisted.ledger.prefix == "rp-compose"
        # The demo's Redis ledger used to ignore this setting (the aggregator's did not).
        assert persisted.ledger.rejected_ttl_s == 123.0
        assert not persisted.memory
    finally:
        await persisted.close()


async def test_memory_persistence_and_the_service_built_on_it() -> None:
    settings = Settings(topic_prefix="t-compose-mem")
    persisted = compose.persistence(settings, memory=True)
    assert isinstance(persisted.store, MemoryStore)
    assert isinstance(persisted.ledger, MemoryLedger)
    service = compose.aggregator_service(
        settings, SimClock(speed=1.0), persisted, fast_setpoints=True
    )
    assert service.store is persisted.store
    assert service.ledger is not None  # the ledger is written (through a LedgerWriter)
    await persisted.close()


def test_report_reads_the_ledger_the_aggregator_writes() -> None:
    settings = Settings(topic_prefix="t-compose-rep", redis_prefix="rp-rep")
    ledger = compose.redis_ledger(settings)
    assert (ledger.url, ledger.prefix) == (settings.redis_url, "rp-rep")
