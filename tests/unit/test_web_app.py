"""The web view's HTTP side: read-only without a token, actions only after a login, bad
actions refused before anything reaches the broker, no asset from anywhere else."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from broker.models import Service
from broker.settings import Settings
from v2g.cli import app as cli_app
from v2g.web.app import (
    MAX_WRONG,
    STATIC,
    WRONG_WINDOW_S,
    ActionRefused,
    Live,
    _Sessions,
    build_request,
    create_app,
)
from v2g.web.options import parse_listen

JSON = {"Content-Type": "application/json"}


def client(token: str | None) -> TestClient:
    settings = Settings(topic_prefix="web-unit", broker_url="mqtt://127.0.0.1:9")
    return TestClient(create_app(settings, Live(), token=token, answer_timeout_s=2.0))


def test_without_a_token_the_view_is_read_only_and_says_how_to_change_that() -> None:
    c = client(None)
    assert c.get("/api/whoami").json() == {
        "read_only": True,
        "logged_in": False,
        "topic_prefix": "web-unit",
    }
    for url in ("/api/dispatch", "/api/dispatch/r1/cancel", "/api/login"):
        r = c.post(url, json={"power_kw": -10, "token": "x"})
        assert r.status_code == 403, url
        assert "--token" in r.json()["error"]


def test_actions_need_a_login_and_a_wrong_token_is_refused() -> None:
    c = client("s3cret")
    assert c.post("/api/dispatch", json={"power_kw": -10}).json() == {"error": "log in first"}
    assert c.post("/api/login", json={"token": "nope"}).status_code == 401
    assert not c.get("/api/whoami").json()["logged_in"]
    r = c.post("/api/login", json={"token": "s3cret"})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "s3cret" not in cookie and "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert c.get("/api/whoami").json()["logged_in"]
    c.post("/api/logout")
    assert not c.get("/api/whoami").json()["logged_in"]
    assert c.post("/api/dispatch", json={"power_kw": -10}).status_code == 403


def test_guessing_the_token_locks_every_login_for_a_while() -> None:
    c = client("s3cret")
    for _ in range(MAX_WRONG):
        assert c.post("/api/login", json={"token": "guess"}).status_code == 401
    locked = c.post("/api/login", json={"token": "s3cret"})  # even the right one, for now
    assert locked.status_code == 429 and "too many wrong tokens" in locked.json()["error"]
    assert int(locked.headers["retry-after"]) > 0
    bearer = c.post("/api/dispatch", json={}, headers={"Authorization": "Bearer s3cret"})
    assert bearer.status_code == 429


def test_the_lock_lifts_once_the_wrong_tokens_are_old() -> None:
    now = [0.0]
    sessions = _Sessions("s3cret", clock=lambda: now[0])
    for _ in range(MAX_WRONG):
        assert not sessions.check("guess")
    assert not sessions.check("s3cret") and sessions.locked_for() == WRONG_WINDOW_S
    now[0] = WRONG_WINDOW_S + 0.1
    assert sessions.check("s3cret")


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"power_kw": "lots"}, 400, "power_kw: 'lots' is not a number"),
        ({"power_kw": -10, "duration": "soon"}, 400, "duration"),
        ({"power_kw": -10, "colour": "red"}, 400, "unknown fields ['colour']"),
        ({"power_kw": -10, "request_id": "a/b"}, 400, "invalid request"),
        ({"power_kw": -10, "duration": -300}, 400, "invalid request"),
        ({"power_kw": -10, "start": "tomorrow"}, 400, "ISO 8601"),
        ({"power_kw": -10, "start": "2026-12-07T18:00:00"}, 400, "invalid request"),
    ],
)
def test_a_bad_request_is_refused_before_it_reaches_the_broker(
    body: dict[str, object], status: int, says: str
) -> None:
    # The broker URL is a closed port: an action that got past validation would fail 504.
    r = client("t").post("/api/dispatch", json=body, headers={"Authorization": "Bearer t"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_an_action_must_be_json_so_a_cross_site_form_cannot_send_one() -> None:
    r = client("t").post(
        "/api/dispatch",
        content="power_kw=-10",
        headers={"Authorization": "Bearer t", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415


def test_an_amendment_needs_new_terms() -> None:
    c = client("t")
    auth = {"Authorization": "Bearer t"}
    assert c.post("/api/dispatch/r1/amend", json={}, headers=auth).status_code == 400
    r = c.post("/api/dispatch/r%2Fx/cancel", json={}, headers=auth)
    assert r.status_code in (400, 404)  # an id with a slash never reaches the broker


def test_the_form_builds_the_same_request_the_cli_sends() -> None:
    req = build_request({"power_kw": "-500", "duration": "15m", "request_id": "evening-1"})
    assert (req.request_id, req.power_kw, req.duration_s, req.service) == (
        "evening-1",
        -500.0,
        900.0,
        Service.MANUAL,
    )
    fresh = build_request({"service": "frequency_regulation", "capacity_kw": 300, "duration": 3600})
    assert fresh.request_id.startswith("web-") and fresh.capacity_kw == 300.0
    with pytest.raises(ActionRefused, match="invalid request"):
        build_request({"duration": "15m"})  # neither power nor capacity


def test_a_relative_start_counts_from_the_platform_clock_as_the_cli_does() -> None:
    now = datetime(2024, 6, 3, 21, 0, 12, 400000, tzinfo=UTC).timestamp()
    req = build_request({"power_kw": 300, "start": "+30m", "duration": "1h"}, now=now)
    assert req.start == datetime(2024, 6, 3, 21, 30, 12, tzinfo=UTC)
    with pytest.raises(ActionRefused, match="platform clock"):
        build_request({"power_kw": 300, "start": "+30m"})


def test_the_page_loads_nothing_from_anywhere_else() -> None:
    c = client(None)
    page = c.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith(("/static/", "data:")) for a in assets), assets
    for path in sorted(STATIC.iterdir()):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name
        assert c.get(f"/static/{path.name}").status_code == 200


def test_state_is_the_views_snapshot() -> None:
    snap = client(None).get("/api/state").json()
    assert set(snap) == {
        "version",
        "broker_connected",
        "unreadable",
        "status",
        "capability",
        "history",
        "dispatches",
        "rejected",
    }


def test_the_page_ships_as_package_data() -> None:
    pyproject = tomllib.loads((STATIC.parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    data = pyproject["tool"]["setuptools"]["package-data"]["v2g"]
    assert "web/static/*" in data
    assert {p.name for p in STATIC.iterdir()} == {"index.html", "app.js", "style.css"}


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0))],
)
def test_listen_reads_host_and_port(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_listen_address_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


def test_the_web_command_takes_the_operator_flags_and_its_token_from_the_environment() -> None:
    page = CliRunner().invoke(cli_app, ["web", "--help"], terminal_width=200).output
    for flag in ("--listen", "--token", "--broker", "--topic-prefix", "--log-format"):
        assert flag in page
    assert "V2G_WEB_TOKEN" in page
    assert re.search(r"^\s+v2g web\b", page, re.MULTILINE), page


@pytest.mark.timeout(30)
def test_a_valid_action_with_no_broker_is_answered_with_what_went_wrong() -> None:
    r = client("t").post("/api/dispatch/r1/cancel", json={}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 504
    assert "127.0.0.1:9" in r.json()["error"] or "broker" in r.json()["error"], r.text
