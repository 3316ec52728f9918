"""The web view folds the broker's messages into what the page draws: an hour of fleet
power against the active requests, and each request's last answer and progress."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.models import (
    ActiveDispatch,
    CapabilityWindow,
    DispatchProgress,
    DispatchResult,
    FleetStatus,
)
from broker.settings import Settings
from v2g.operator import Event
from v2g.web.app import Live
from v2g.web.serve import apply
from v2g.web.view import HISTORY_S, MAX_DISPATCHES, MAX_POINTS, FleetView

T0 = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)


def status(at_s: float, power: float, *requests: tuple[str, float]) -> FleetStatus:
    return FleetStatus(
        ts=T0 + timedelta(seconds=at_s),
        vehicles_online=10,
        vehicles_plugged_in=8,
        energy_kwh=300.0,
        power_kw=power,
        capability=CapabilityWindow(duration_s=900.0, min_power_kw=-100.0, max_power_kw=90.0),
        dispatches=[
            ActiveDispatch(
                request_id=rid,
                service="manual",
                requested_kw=kw,
                allocated_kw=kw,
                delivered_kw=kw * 0.9,
                delivered_kwh=1.0,
            )
            for rid, kw in requests
        ],
        rejected={"schema": 2},
    )


def test_the_chart_pairs_fleet_power_with_the_sum_of_the_active_requests() -> None:
    view = FleetView()
    view.on_status(status(0, 40.0))
    view.on_status(status(10, -55.0, ("a", -30.0), ("b", -20.0)))
    snap = view.snapshot()
    assert [p[1:3] for p in snap["history"]] == [[40.0, None], [-55.0, -50.0]]
    assert snap["history"][-1][3:] == [-100.0, 90.0]  # the 15-minute band
    assert snap["rejected"] == {"schema": 2}
    assert {d["request_id"] for d in snap["dispatches"]} == {"a", "b"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.1, max_value=120.0), min_size=1, max_size=400))
def test_the_chart_keeps_at_most_an_hour_and_a_bounded_number_of_points(
    gaps: list[float],
) -> None:
    view = FleetView()
    t = 0.0
    for gap in gaps:
        t += gap
        view.on_status(status(t, 1.0))
    times = [p[0] for p in view.history]
    assert len(times) <= MAX_POINTS
    assert times == sorted(times)
    assert times[-1] - times[0] <= HISTORY_S
    assert times[-1] == (T0 + timedelta(seconds=t)).timestamp()  # the newest is always in


def test_a_clock_that_goes_back_starts_the_chart_again() -> None:
    view = FleetView()
    view.on_status(status(100, 1.0))
    view.on_status(status(50, 2.0))
    assert [p[1] for p in view.history] == [2.0]


def test_a_request_is_tracked_from_its_answer_through_progress_to_its_end() -> None:
    view = FleetView()
    view.on_result(
        DispatchResult(
            request_id="r1", status="accepted", requested_kw=-50.0, allocated_kw=-50.0, ts=T0
        )
    )
    view.on_status(status(5, -50.0, ("r1", -50.0)))
    view.on_progress(
        DispatchProgress(
            request_id="r1",
            ts=T0 + timedelta(seconds=5),
            requested_kw=-50.0,
            allocated_kw=-50.0,
            delivered_kw=-49.0,
            baseline_kw=0.0,
            requested_kwh=-1.0,
            delivered_kwh=-0.9,
            vehicles=4,
            elapsed_s=60.0,
            remaining_s=840.0,
        )
    )
    (row,) = view.snapshot()["dispatches"]
    assert (row["status"], row["active"], row["remaining_s"]) == ("started", True, 840.0)
    # A refused amendment says why and leaves the request as it was.
    view.on_result(
        DispatchResult(
            request_id="r1", status="rejected", reason="too much", answer_to="amend", ts=T0
        )
    )
    (row,) = view.snapshot()["dispatches"]
    assert (row["status"], row["active"], row["reason"]) == ("started", True, "too much")
    view.on_result(
        DispatchResult(
            request_id="r1",
            status="completed",
            delivered_kwh=-12.4,
            requested_kwh=-12.5,
            score=0.97,
            ts=T0 + timedelta(minutes=15),
        )
    )
    view.on_status(status(920, 0.0))
    (row,) = view.snapshot()["dispatches"]
    assert (row["status"], row["active"], row["score"]) == ("completed", False, 0.97)
    assert row["delivered_kwh"] == -12.4


def test_the_dispatch_table_keeps_the_most_recent_requests_newest_first() -> None:
    view = FleetView()
    for i in range(MAX_DISPATCHES + 5):
        view.on_result(DispatchResult(request_id=f"r{i}", status="accepted", ts=T0))
    ids = [d["request_id"] for d in view.snapshot()["dispatches"]]
    assert len(ids) == MAX_DISPATCHES
    assert ids[0] == f"r{MAX_DISPATCHES + 4}"
    assert "r0" not in ids


def test_every_change_moves_the_version_the_streams_wait_on() -> None:
    view = FleetView()
    before = view.version
    view.on_status(status(0, 1.0))
    view.on_result(DispatchResult(request_id="x", status="accepted", ts=T0))
    assert view.version == before + 2


def test_the_page_hears_when_the_broker_link_drops_and_comes_back() -> None:
    view = FleetView()
    assert view.on_broker(True) and view.snapshot()["broker_connected"]
    assert not view.on_broker(True)  # no change, no new version to send
    assert view.on_broker(False) and not view.snapshot()["broker_connected"]


def test_a_request_accepted_for_later_stays_open_to_amend_until_it_ends() -> None:
    view = FleetView()
    view.on_result(DispatchResult(request_id="later", status="accepted", ts=T0))
    view.on_status(status(5, 0.0))  # not running yet, so not in the status
    (row,) = view.snapshot()["dispatches"]
    assert row["active"] and row["status"] == "accepted"
    view.on_result(DispatchResult(request_id="later", status="cancelled", ts=T0))
    (row,) = view.snapshot()["dispatches"]
    assert not row["active"]


def test_a_running_request_that_leaves_the_status_has_ended() -> None:
    view = FleetView()  # started after the request did: no answer heard, only the status
    view.on_status(status(0, -20.0, ("r", -20.0)))
    view.on_status(status(5, 0.0))
    (row,) = view.snapshot()["dispatches"]
    assert (row["active"], row["status"]) == (False, "ended")


def test_a_message_the_view_cannot_read_is_counted_and_dropped() -> None:
    settings = Settings(topic_prefix="p")
    live = Live()
    t = settings.topics
    good = status(0, 5.0).to_json()
    assert apply(live, settings, Event(t.fleet_status, good))
    for topic, payload in [
        (t.fleet_status, b"{not json"),
        (t.fleet_capability, b'{"ts": "yesterday"}'),
        (t.dispatch_progress("r1"), b"[]"),
        ("p/dispatch/a+b/result", b"{}"),
    ]:
        before = live.view.version
        assert not apply(live, settings, Event(topic, payload))
        assert live.view.version == before + 1  # the page hears of the count
    assert live.view.unreadable == 4
    assert live.view.status is not None and live.view.status.power_kw == 5.0  # kept
    assert apply(live, settings, Event(t.fleet_status, b""))  # a cleared topic is no error
