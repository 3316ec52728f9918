"""``v2g report`` on a large ledger in real Redis: a progress bar while the books are read
when stderr is a terminal (python's ``pty``), nothing extra on a pipe; the same report."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aggregator.ledger import Entry, RedisLedger, answer_entry, step_entry
from broker.models import DispatchProgress, DispatchResult, from_epoch
from broker.settings import Settings
from tests.support.terminal import run_on_pipe, run_on_pty

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_780_000_000.0
STEPS = 25_000  # three pages of 10,000
BAR = "━"


def _entries() -> list[Entry]:
    def at(k: int) -> DispatchProgress:
        return DispatchProgress(
            request_id="big", ts=from_epoch(T0 + 5 * k), requested_kw=-100.0,
            allocated_kw=-100.0, delivered_kw=-99.0, baseline_kw=20.0,
            requested_kwh=-100.0 * 5 * k / 3600, delivered_kwh=-99.0 * 5 * k / 3600,
            vehicles=10, elapsed_s=5 * k, remaining_s=5 * (STEPS - k),
        )  # fmt: skip

    first = DispatchResult(
        request_id="big", status="accepted", requested_kw=-100.0, allocated_kw=-100.0,
        ts=from_epoch(T0),
    )  # fmt: skip
    return [answer_entry(first), *(step_entry(at(k), setpoints=3) for k in range(1, STEPS + 1))]


@pytest.fixture
async def big_ledger(settings: Settings, redis_keys: None) -> AsyncIterator[Settings]:
    ledger = RedisLedger(settings.redis_url, prefix=settings.redis_prefix)
    try:
        entries = _entries()
        for k in range(0, len(entries), 5000):
            await ledger.append([("big", e) for e in entries[k : k + 5000]])
        yield settings
    finally:
        await ledger.close()


def _argv(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "v2g.cli", "report", "big", "--redis", settings.redis_url,
        "--redis-prefix", settings.redis_prefix, "--interval", "3600",
    ]  # fmt: skip


async def test_report_reads_a_large_ledger_under_a_bar_only_on_a_terminal(
    big_ledger: Settings,
) -> None:
    argv = _argv(big_ledger)
    code, err, piped = await asyncio.to_thread(run_on_pipe, argv, cwd=ROOT)
    assert code == 0, err
    assert BAR not in err and "reading the books" not in err, err
    code, text, out = await asyncio.to_thread(run_on_pty, argv, cwd=ROOT)
    assert code == 0, text
    assert BAR in text and "reading the books of big" in text, text[:2000]
    assert out.decode() == piped, "the report itself is the same with or without a bar"
