"""``v2g report`` reads a large ledger in pages (for its progress bar): on real Redis the
pages add up to exactly the entries of one read, in order, and report their progress."""

from __future__ import annotations

import pytest

from aggregator.ledger import RedisLedger
from broker.settings import Settings

pytestmark = pytest.mark.integration


async def test_a_paged_read_returns_the_same_entries_and_reports_each_page(
    settings: Settings, redis_keys: None
) -> None:
    ledger = RedisLedger(settings.redis_url, prefix=settings.redis_prefix)
    try:
        await ledger.append([("big", {"kind": "step", "n": str(k)}) for k in range(25)])
        pages: list[tuple[int, int]] = []
        paged = await ledger.read(
            "big", page=10, on_page=lambda done, total: pages.append((done, total))
        )
        assert paged == await ledger.read("big")
        assert [e["n"] for e in paged] == [str(k) for k in range(25)]
        assert pages == [(10, 25), (20, 25), (25, 25)]
        await ledger.append([("even", {"kind": "step", "n": str(k)}) for k in range(20)])
        assert len(await ledger.read("even", page=10)) == 20
        assert await ledger.read("none", page=10) == []
    finally:
        await ledger.close()
