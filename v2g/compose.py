"""The composition root: the aggregator's parts built from Settings in one place.

``v2g aggregator``, ``v2g demo``, ``v2g report`` and the benches build the state store,
the settlement ledger and the service here, so a setting (``redis_prefix``,
``rejected_ledger_ttl_s``, ...) reaches every one of them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.ledger import Ledger, MemoryLedger, RedisLedger
from aggregator.service import AggregatorService
from aggregator.store import MemoryStore, RedisStore, StateStore
from broker.settings import Settings
from core.clock import Clock


@dataclass(frozen=True, slots=True)
class Persistence:
    """Where the aggregator keeps fleet state (``store``) and settlement records
    (``ledger``): both in memory, or both in Redis under ``settings.redis_prefix``."""

    store: StateStore
    ledger: Ledger
    memory: bool

    async def close(self) -> None:
        await self.store.close()
        await self.ledger.close()


def redis_ledger(settings: Settings) -> RedisLedger:
    """The settlement ledger in Redis, as the aggregator writes it and ``v2g report`` reads it."""
    return RedisLedger(
        settings.redis_url,
        prefix=settings.redis_prefix,
        rejected_ttl_s=settings.rejected_ledger_ttl_s,
    )


def persistence(settings: Settings, *, memory: bool) -> Persistence:
    """The store and ledger in memory (``memory``), else in Redis at ``settings.redis_url``."""
    if memory:
        return Persistence(MemoryStore(), MemoryLedger(), memory=True)
    return Persistence(
        RedisStore(settings.redis_url, prefix=settings.redis_prefix),
        redis_ledger(settings),
        memory=False,
    )


def aggregator_service(
    settings: Settings,
    clock: Clock,
    persisted: Persistence,
    *,
    fast_ingest: bool = False,
    fast_setpoints: bool = False,
    client_id: str | None = None,
) -> AggregatorService:
    """The aggregator on ``persisted``; its client id comes from the settings
    (broker/clientid.py) unless ``client_id`` is given."""
    return AggregatorService(
        settings=settings,
        clock=clock,
        store=persisted.store,
        ledger=persisted.ledger,
        client_id=client_id,
        fast_ingest=fast_ingest,
        fast_setpoints=fast_setpoints,
    )
