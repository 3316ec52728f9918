"""The zero-setup demo runs end to end: embedded broker, memory store, no servers."""

from __future__ import annotations

import io
import logging

import pytest

from broker.settings import Settings
from v2g.demo import run_demo


@pytest.mark.timeout(90)
async def test_demo_runs_both_requests_to_completion_on_embedded_defaults(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    settings = Settings(
        topic_prefix="demo-test",
        speed=60.0,
        telemetry_interval_s=15.0,
        control_step_s=15.0,
        log_level="warning",
        status_every_wall_s=3600.0,
    )
    out = io.StringIO()
    outcomes = await run_demo(
        settings,
        count=40,
        seed=2,
        request_minutes=3.0,
        use_broker=False,
        use_redis=False,
        mode="multiplexed",
        out=out,
    )
    text = out.getvalue()
    assert [o.label for o in outcomes] == ["discharge", "charge"]
    for o in outcomes:
        r = o.result
        assert r.status == "completed", text
        assert (o.requested_kw < 0) == (o.label == "discharge")
        assert r.requested_kwh is not None and r.delivered_kwh is not None
        # Delivered energy comes off the fleet meter; cars switch within ~50 ms of their
        # setpoints and report the change at once, so even three minutes book closely.
        assert r.delivered_kwh == pytest.approx(r.requested_kwh, rel=0.1), text
        assert r.shortfall_kw == 0.0
    assert "left short: 0" in text
    assert "(embedded)" in text
    assert "for 15 min" in text and "cap15" not in text  # the capability, spelled out
    # A successful run warns about nothing: no library's warnings (amqtt refused every
    # MQTT 5 connect before the clients fell back to 3.1.1), no structured ones.
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if "warning" in line.lower()], err
