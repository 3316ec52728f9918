"""A request's books persist as plain JSON lists and come back as typed records: the
snapshot format is a contract with snapshots already written (DESIGN.md)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from aggregator.dispatch.records import Dispatch, FcrCheck, Interval, ScoreSample
from broker.models import SIGNAL_SERVICES, DispatchRequest, Service

T0 = 1_795_651_200.0
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def request(service: Service = Service.FREQUENCY_REGULATION) -> DispatchRequest:
    if service in SIGNAL_SERVICES:
        return DispatchRequest(request_id="r", service=service, capacity_kw=50.0, duration_s=3600.0)
    return DispatchRequest(request_id="r", service=service, power_kw=-20.0, duration_s=1800.0)


@given(
    schedule=st.lists(st.tuples(finite, finite, finite), max_size=5),
    samples=st.lists(st.tuples(finite, finite, finite), max_size=5),
    check=st.none() | st.tuples(*[finite] * 6),
)
def test_typed_records_persist_as_plain_lists_and_come_back_equal(
    schedule: list[tuple[float, float, float]],
    samples: list[tuple[float, float, float]],
    check: tuple[float, ...] | None,
) -> None:
    d = Dispatch(
        request=request(),
        start=T0,
        end=T0 + 3600.0,
        schedule=[Interval(*i) for i in schedule],
        samples=[ScoreSample(*s) for s in samples],
        fcr_check=None if check is None else FcrCheck(*check),
    )
    record = json.loads(json.dumps(d.to_record()))  # through the snapshot's encoding
    assert record["schedule"] == [list(i) for i in schedule]
    assert record["samples"] == [list(s) for s in samples]
    assert record["fcr_check"] == (None if check is None else list(check))
    back = Dispatch.from_record(record)
    assert back == d
    assert all(isinstance(i, Interval) for i in back.schedule or [])
    assert all(isinstance(s, ScoreSample) for s in back.samples or [])


def test_a_two_entry_schedule_interval_from_an_older_snapshot_is_a_quarter_hour() -> None:
    d = Dispatch(request=request(Service.PEAK_SHAVING), start=T0, end=T0 + 1800.0)
    record = d.to_record()
    record["schedule"] = [[T0, -20.0], [T0 + 900.0, -10.0, T0 + 1800.0]]
    back = Dispatch.from_record(record)
    assert back.schedule == [
        Interval(T0, -20.0, T0 + 900.0),
        Interval(T0 + 900.0, -10.0, T0 + 1800.0),
    ]
