"""The fleet status log line names its fields in words an operator can read."""

from __future__ import annotations

from datetime import UTC, datetime

from aggregator.status import log_fields
from broker.models import CapabilityWindow, FleetStatus


def test_the_status_line_spells_out_the_15_minute_capability() -> None:
    status = FleetStatus(
        ts=datetime(2026, 12, 7, 18, 0, tzinfo=UTC),
        vehicles_online=3,
        vehicles_plugged_in=2,
        energy_kwh=80.0,
        power_kw=12.5,
        capability=CapabilityWindow(duration_s=900.0, min_power_kw=-21.0, max_power_kw=22.0),
        dispatches=[],
    )
    fields = log_fields(status)
    assert fields["capability_15min_kw"] == "-21..22"
    assert not any("cap15" in key for key in fields)
