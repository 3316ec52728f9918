"""The aggregator's background work is structured: every task it starts while serving is
named and belongs to its task groups, and a stop lets a snapshot write in flight finish."""

from __future__ import annotations

import asyncio

from aggregator.service import AggregatorService
from aggregator.store import MemoryStore, Snapshot
from broker.settings import Settings
from core.clock import SimClock
from tests.support.harness import SIM_START


class SlowStore(MemoryStore):
    """A store whose writes take a while, and which says which finished."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.started = asyncio.Event()
        self.finished = 0

    async def save(self, snapshot: Snapshot) -> None:
        self.started.set()
        await asyncio.sleep(self.delay_s)
        await super().save(snapshot)
        self.finished += 1


def service_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("aggregator-")}


async def test_a_stop_ends_every_named_task_and_lets_a_write_in_flight_finish(
    settings: Settings,
) -> None:
    store = SlowStore(delay_s=0.5)
    svc = AggregatorService(
        settings=settings,
        clock=SimClock(speed=settings.speed, sim_anchor=SIM_START),
        store=store,
        client_id=f"tasks-{settings.topic_prefix.rsplit('/', 1)[-1]}",
    )
    svc.reports = asyncio.Queue()
    before = asyncio.all_tasks()
    run = asyncio.create_task(svc.run(), name="test-aggregator")
    try:
        async with asyncio.timeout(20.0):
            await svc.reports.get()  # a step ran: its snapshot write has started
            await store.started.wait()
        names = {t.get_name() for t in service_tasks()}
        assert {"aggregator-mqtt", "aggregator-control", "aggregator-signals"} <= names
        assert "aggregator-save" in names  # the write, named, while it runs
        # Nothing the service started runs under a default name ("Task-12").
        unnamed = {
            t for t in asyncio.all_tasks() - before - {run} if t.get_name().startswith("Task-")
        }
        assert not [t for t in unnamed if "service.py" in repr(t.get_coro())]
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert store.finished >= 1  # the write in flight at the stop was let finish
    assert not service_tasks()  # and nothing of the service outlives run()
