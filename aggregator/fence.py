"""Fenced writes: what only the leader of a scaled-out group may write.

A :class:`Fence` is the right to write as leader: the current term (the lease's fencing
token, :mod:`aggregator.lease`) and the Redis scripts that check it in the same step as
the write. The fleet snapshot (:class:`FencedStore`) and the dispatch ledger
(:class:`FencedLedger`) both write through one; neither knows about the lease loop or the
service. A write refused means a newer leader exists: the fence says so to whoever gave
it ``on_fenced`` (scale-out, which then stops leading).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence

import redis.asyncio as aioredis
import structlog

from aggregator.lease import FencedOut, LeaseUnavailable, fenced_hset, fenced_xadd
from aggregator.ledger import Entry, Ledger, RedisLedger
from aggregator.store import Field, RedisStore, Snapshot, StateStore, encode_snapshot
from core.errors import TransportError

REDIS_TIMEOUT_S = 4.0


class Fence:
    """The current term (None while not leading) and the fenced Redis writes."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        token_key: str,
        holder: str,
        term: Callable[[], int | None],
        on_fenced: Callable[[FencedOut], None],
        logger: structlog.typing.FilteringBoundLogger | None = None,
        timeout_s: float = REDIS_TIMEOUT_S,
    ) -> None:
        """``term`` gives the fencing token while this process leads; ``on_fenced`` hears
        of a write of the current term refused (a newer leader exists)."""
        self.redis = redis
        self.token_key = token_key
        self.holder = holder
        self._term = term
        self._on_fenced = on_fenced
        self.log = logger or structlog.get_logger("aggregator.fence")
        self.timeout_s = timeout_s

    @property
    def term(self) -> int | None:
        return self._term()

    def fenced(self, err: FencedOut) -> None:
        self._on_fenced(err)

    async def hset(self, key: str, mapping: Mapping[str, Field], *, term: int) -> None:
        """Replace hash ``key`` if ``term`` is still the latest (FencedOut if not)."""
        await fenced_hset(
            self.redis,
            token_key=self.token_key,
            key=key,
            token=term,
            mapping=mapping,
            timeout_s=self.timeout_s,
        )

    async def xadd(self, entries: Sequence[tuple[str, Mapping[str, str]]], *, term: int) -> None:
        """Append to streams, in order, if ``term`` is still the latest (FencedOut if not)."""
        await fenced_xadd(
            self.redis,
            token_key=self.token_key,
            token=term,
            entries=entries,
            timeout_s=self.timeout_s,
        )


def fence_writes(
    fence: Fence, store: StateStore, ledger: Ledger | None
) -> tuple[FencedStore, FencedLedger | None]:
    """The service's store and ledger, written through ``fence``. Both must be in Redis:
    the other processes of the group read them there."""
    if not isinstance(store, RedisStore):
        raise ValueError(_needs_redis("shares fleet state through", "store", store))
    if ledger is not None and not isinstance(ledger, RedisLedger):
        raise ValueError(_needs_redis("keeps the dispatch ledger in", "ledger", ledger))
    return FencedStore(store, fence), None if ledger is None else FencedLedger(ledger, fence)


def _needs_redis(does: str, what: str, given: object) -> str:
    return (
        f"scale-out {does} Redis: V2G_SHARE_GROUP needs a Redis {what},"
        f" not {type(given).__name__} (drop --memory)"
    )


# -- the store only the leader writes --------------------------------------------------
class FencedStore:
    """A :class:`RedisStore` whose every save carries the leader's fencing token, checked
    by Redis in the same script as the write."""

    def __init__(self, inner: RedisStore, fence: Fence) -> None:
        self.inner = inner
        self.fence = fence
        self.key = inner.key
        self.refused = 0

    async def save(self, snapshot: Snapshot) -> None:
        term = self.fence.term
        if term is None:  # no longer leader: the new one writes the state now
            self.refused += 1
            return
        mapping = encode_snapshot(snapshot) | {"token": term, "leader": self.fence.holder}
        try:
            await self.fence.hset(self.key, mapping, term=term)
        except FencedOut as err:
            self.refused += 1
            self.fence.fenced(err)
        except LeaseUnavailable as err:
            raise TransportError(f"saving fleet state to Redis failed: {err}") from err

    async def load(self) -> Snapshot | None:
        return await self.inner.load()

    async def close(self) -> None:
        await self.inner.close()


# -- the ledger only the leader writes -------------------------------------------------
class FencedLedger:
    """A :class:`RedisLedger` appending each entry with the fencing token of the term that
    wrote it (its ``term`` field), checked by Redis in the same script: a leader paused
    past its lease cannot, on waking, add books for steps that the next leader, restored
    from the snapshot, books again. Refused entries are dropped, counted and logged; an
    entry of the current term refused means a newer leader exists."""

    def __init__(self, inner: RedisLedger, fence: Fence) -> None:
        self.inner = inner
        self.fence = fence
        self.refused = 0

    async def append(self, entries: Sequence[tuple[str, Entry]]) -> None:
        # One script per run of entries of the same term, in order.
        for term, run in itertools.groupby(entries, key=lambda e: e[1].get("term", "")):
            await self._append_term(term, list(run))

    async def _append_term(self, term: str, entries: Sequence[tuple[str, Entry]]) -> None:
        if not term.isdigit():
            self._refuse(entries, term, "written by no leader's term")
            return
        token = int(term)
        try:
            await self.fence.xadd([(self.inner.key(rid), e) for rid, e in entries], term=token)
        except FencedOut as err:
            self._refuse(entries, term, str(err))
            if token == self.fence.term:
                self.fence.fenced(err)
            return  # nothing was written: the streams' expiry is not this writer's to set
        except LeaseUnavailable as err:  # kept by the writer and tried again
            raise TransportError(f"writing the ledger to Redis failed: {err}") from err
        # Written: a rejected request's stream expires as in the plain ledger. Best effort:
        # the entries are in, and writing them again would duplicate them.
        with contextlib.suppress(TransportError):
            await self.inner.apply_expiry(entries)

    def _refuse(self, entries: Sequence[tuple[str, Entry]], term: str, why: str) -> None:
        self.refused += len(entries)
        self.fence.log.error(
            "ledger_entries_fenced",
            holder=self.fence.holder,
            term=term,
            entries=len(entries),
            requests=sorted({rid for rid, _ in entries})[:10],
            error=why,
        )

    async def read(self, request_id: str) -> list[Entry]:
        return await self.inner.read(request_id)

    async def close(self) -> None:
        await self.inner.close()
