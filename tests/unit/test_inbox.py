"""The inbox router on its own: bytes in, typed events and counters out, no broker."""

from __future__ import annotations

import json
from datetime import datetime

import structlog

from aggregator.inbox import MAX_PAYLOAD_BYTES, InboxRouter, Refusals
from broker.columns import TelemetryRow
from broker.settings import Settings
from core.clock import ManualClock
from tests.support.samples import GOOD

T0 = datetime.fromisoformat(GOOD["ts"]).timestamp()


class Wall:
    """A wall clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def router(wall: Wall | None = None, refusals_per_s: float = 20.0) -> InboxRouter:
    settings = Settings(topic_prefix="inbox-test")
    w = wall or Wall()
    return InboxRouter(
        topics=settings.topics,
        clock=ManualClock(T0),
        telemetry_interval_s=settings.telemetry_interval_s,
        speed=settings.speed,
        refusals=Refusals(refusals_per_s, wall=w),
        logger=structlog.get_logger("test"),
        wall=w,
    )


def test_valid_telemetry_becomes_a_row_and_is_counted_accepted() -> None:
    r = router()
    r.route(r.topics.telemetry("ev-0001"), json.dumps(GOOD).encode())
    inbox = r.take()
    assert len(inbox.telemetry) == 1
    row = inbox.telemetry[0]
    assert isinstance(row, TelemetryRow) and row.vehicle_id == "ev-0001"
    assert (r.received, r.accepted, r.ignored, sum(r.rejected.values())) == (1, 1, 0, 0)
    assert not r.take().telemetry  # taken: the next inbox starts empty


def test_bad_messages_are_counted_by_reason_never_raised() -> None:
    r = router()
    t = r.topics
    r.route(t.telemetry("ev-0002"), json.dumps(GOOD).encode())  # payload names ev-0001
    r.route(t.telemetry("ev-0001"), b"x" * (MAX_PAYLOAD_BYTES + 1))
    r.route(t.telemetry("ev-0001"), json.dumps({**GOOD, "ts": "2026-11-26T18:10:00Z"}).encode())
    r.route("inbox-test/not/a/topic", b"{}")
    assert r.rejected["identity"] == 1 and r.rejected["size"] == 1
    assert r.rejected["future"] == 1 and sum(r.rejected.values()) == 4
    assert r.received == 4 and r.accepted == 0
    assert not r.inbox.telemetry


def test_a_vehicle_over_its_rate_is_refused_until_the_next_wall_second() -> None:
    wall = Wall()
    r = router(wall)
    body = json.dumps(GOOD).encode()
    for _ in range(r.rate_limit + 3):
        r.route(r.topics.telemetry("ev-0001"), body)
    assert r.accepted == r.rate_limit and r.rejected["rate"] == 3
    wall.t += 1.0
    r.route(r.topics.telemetry("ev-0001"), body)
    assert r.accepted == r.rate_limit + 1


def test_a_refused_request_is_queued_for_an_answer_within_the_budget() -> None:
    r = router(refusals_per_s=2.0)
    bad = b'{"request_id": "r-1", "power_kw": "lots"}'
    for _ in range(5):
        r.route(r.topics.dispatch_requests, bad)
    refusals = r.take().refusals
    assert [f.request_id for f in refusals] == ["r-1", "r-1"]
    assert all("invalid request (schema)" in f.reason for f in refusals)
    assert r.refusals.unanswered == 3 and r.rejected["schema"] == 5


def test_a_signal_is_kept_latest_per_request_and_wakes_the_follower() -> None:
    r = router()
    woken: list[int] = []
    r.on_signal = lambda: woken.append(1)
    for v in (0.1, 0.5):
        r.route(
            r.topics.dispatch_signal("reg-1"), json.dumps({"ts": GOOD["ts"], "value": v}).encode()
        )
    assert list(r.signals) == ["reg-1"] and r.signals["reg-1"][0].value == 0.5
    assert len(woken) == 2 and r.accepted == 2
