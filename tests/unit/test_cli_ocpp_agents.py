"""``v2g agents --protocol ocpp`` explains bad input before it connects anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from v2g.cli import app
from v2g.ocpp_agents import check_url, station_prefix

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--protocol", "amqp"], "protocol must be mqtt or ocpp"),
        (["--protocol", "ocpp", "--mix", "v21bpt=1,v16=1"], "KIND one of v21bpt, v21, v201"),
        (["--protocol", "ocpp", "--url", "http://127.0.0.1:9000"], "not a websocket URL"),
        (["--protocol", "ocpp", "--url", "ws://cs:pw@127.0.0.1:9000"], "use --password"),
        # --mix is read by the protocol: station versions for ocpp, driver patterns else.
        (["--mix", "v21bpt=1"], "station versions such as v21bpt are for --protocol ocpp"),
        (["--protocol", "ocpp", "--mix", "workplace=1"], "KIND one of v21bpt, v21, v201"),
        (["--protocol", "ocpp", "--node", "site-a"], "drop them with --protocol ocpp"),
    ],
)
def test_bad_ocpp_options_are_refused_with_the_reason(args: list[str], says: str) -> None:
    result = runner.invoke(app, ["agents", *args])
    assert result.exit_code == 2
    assert says in " ".join(result.output.split())


def test_station_ids_follow_the_vehicle_prefix() -> None:
    assert station_prefix("ev") == "cs"
    assert station_prefix("depot") == "depot-cs"
    assert check_url("ws://127.0.0.1:9000/") == "ws://127.0.0.1:9000"
