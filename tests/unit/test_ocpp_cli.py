"""``v2g ocpp`` and the ``v2g provision`` group: flags, the old provision form, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from v2g.cli import app
from v2g.ocpp_gateway import default_bridge_id, parse_listen, tls_context

runner = CliRunner()


def test_ocpp_command_documents_its_flags() -> None:
    out = runner.invoke(app, ["ocpp", "--help"]).output
    for flag in (
        "--listen",
        "--broker",
        "--redis",
        "--topic-prefix",
        "--log-format",
        "--open",
        "--certfile",
        "--keyfile",
    ):
        assert flag in out, flag
    assert "127.0.0.1:9000" in out


def test_provision_is_a_group_and_the_old_form_still_means_mqtt(tmp_path: Path) -> None:
    top = runner.invoke(app, ["provision", "--help"]).output
    assert "mqtt" in top and "station" in top
    # The old form: flags straight after `provision` go to `provision mqtt`.
    old = runner.invoke(app, ["provision", "--count", "1"])
    assert old.exit_code == 2 and "--out" in old.output
    new = runner.invoke(app, ["provision", "mqtt", "--count", "1"])
    assert new.exit_code == 2 and "--out" in new.output


def test_provision_station_refuses_a_bad_id_and_a_short_password() -> None:
    bad = runner.invoke(app, ["provision", "station", "a/b"])
    assert bad.exit_code == 2 and "station id" in bad.output
    short = runner.invoke(app, ["provision", "station", "cs-1", "--password", "short"])
    assert short.exit_code == 2 and "16 to 40" in short.output


def test_listen_is_host_and_port() -> None:
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("9000")
    with pytest.raises(ValueError, match="keyfile"):
        tls_context(Path("cert.pem"), None)
    assert default_bridge_id(9000).startswith("ocpp-") and default_bridge_id(9000).endswith("-9000")
