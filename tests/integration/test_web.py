"""The web view in a real browser: Debian's Chromium, driven by Playwright, against an
aggregator, a simulated fleet and ``v2g web``, each a process of its own on the real
Mosquitto (and Redis), on this test's own topic prefix.

The page must show the fleet live, refuse a wrong token, and after a login send a
request that the aggregator accepts and the page then tracks. A screenshot is saved as an
artifact (``tmp/artifacts/`` or ``$TEST_ARTIFACTS``); with ``TEST_WEB_SCREENSHOT=PATH``
the same picture is also written there (how ``docs/web-view.png`` is made, see README).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

from broker.settings import Settings
from tests.support.processes import aggregator_env, aggregator_process, v2g_process
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# Read at import: the settings fixture clears V2G_* variables, so these are TEST_*.
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "tmp" / "artifacts")
SCREENSHOT = os.environ.get("TEST_WEB_SCREENSHOT")
TOKEN = "browser-test-token"
WAIT_MS = 30_000  # any one thing the page must show, in wall milliseconds
DOCS_FILL_S = 40.0  # with TEST_WEB_SCREENSHOT: wall s of chart first (the request runs 60)


def chromium() -> str:
    """Debian's Chromium (scripts/test installs it); Playwright's own downloads are never
    used, so a missing browser fails here with what to do."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            "the browser test needs Debian's Chromium: apt-get install -y chromium"
            " (scripts/test installs it when run as root)",
            pytrace=False,
        )
    return path


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).text_content()) or ""


async def until_text_changes(page: Page, selector: str, before: str) -> str:
    await page.wait_for_function(
        "([sel, old]) => document.querySelector(sel).textContent !== old",
        arg=[selector, before],
        timeout=WAIT_MS,
    )
    return await text(page, selector)


@pytest.mark.timeout(180)
async def test_the_web_view_shows_the_fleet_live_and_sends_a_request_after_a_login(
    settings: Settings, redis_keys: None, retained_cleanup: None, tmp_path: Path
) -> None:
    started = time.monotonic()
    cfg = settings.model_copy(update={"speed": 30.0})
    env = aggregator_env(cfg, time.time())
    port, ro_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}/"
    web_env = env | {"V2G_WEB_TOKEN": TOKEN, "V2G_LOG_FORMAT": "kv"}
    agents = ["agents", "--count", "40", "--seed", "3", "--mode", "multiplexed"]
    async with (
        aggregator_process(env, tmp_path / "aggregator.log"),
        v2g_process(agents, env, tmp_path / "agents.log"),
        v2g_process(["web", "--listen", f"127.0.0.1:{port}"], web_env, tmp_path / "web.log") as web,
        v2g_process(["web", "--listen", f"127.0.0.1:{ro_port}"], env, tmp_path / "ro.log"),
        async_playwright() as pw,
    ):
        # Root (CI) needs --no-sandbox; a small /dev/shm in a container needs the other.
        browser = await pw.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await _open(page, url)

            # Live: the fleet's numbers arrive, then move on as the platform clock runs.
            await page.wait_for_function(
                "() => /^[1-9]/.test(document.getElementById('online').textContent)",
                timeout=WAIT_MS,
            )
            assert await text(page, "#link") == "live"
            assert re.fullmatch(r"\d+", await text(page, "#online"))
            clock = await text(page, "#clock")
            assert (await until_text_changes(page, "#clock", clock)) != clock
            assert re.fullmatch(r"[−+]\d+ … [−+]\d+ kW", await text(page, "#band"))
            assert await page.locator("#capability tbody tr").count() == 5
            await page.wait_for_selector("#power-line", state="attached", timeout=WAIT_MS)

            # Without a token at start, the page is read-only and says so.
            ro = await browser.new_page()
            await _open(ro, f"http://127.0.0.1:{ro_port}/")
            await ro.locator("#readonly").wait_for(timeout=WAIT_MS)
            assert "read-only" in await text(ro, "#readonly")
            assert await ro.locator("#login").is_hidden()
            assert await ro.locator("#send").is_hidden()
            await ro.close()

            # A wrong token is refused; the right one opens the request form.
            assert await page.locator("#send").is_hidden()
            await page.fill("#token", "not-the-token")
            await page.click("#login button")
            await page.wait_for_function(
                "() => document.getElementById('loginmsg').textContent.includes('wrong token')",
                timeout=WAIT_MS,
            )
            await page.fill("#token", TOKEN)
            await page.click("#login button")
            await page.wait_for_selector("#send:not([hidden])", timeout=WAIT_MS)

            # Send a discharge the fleet can hold, and follow it on the page.
            band = await page.evaluate("fetch('/api/state').then(r => r.json())")
            power = round(0.4 * band["status"]["capability"]["min_power_kw"])
            assert power < 0, band["status"]
            await page.fill("#power_kw", str(power))
            await page.fill("#duration", "30m")
            await page.fill("#request_id", "web-e2e-1")
            await page.click("#request button[type=submit]")
            await page.wait_for_function(
                "() => /web-e2e-1 (accepted|partial)/.test(document.getElementById('answer').textContent)",
                timeout=WAIT_MS,
            )
            row = page.locator('#dispatches tr[data-request="web-e2e-1"]')
            await row.locator("td.status", has_text="started").wait_for(timeout=WAIT_MS)
            assert float((await row.locator("td").nth(3).text_content()) or "nan") == power
            # A flat line has no height, which Playwright calls hidden: attached is what counts.
            await page.wait_for_selector("#requested-line", state="attached", timeout=WAIT_MS)
            assert await row.locator("button", has_text="cancel").count() == 1
            await page.wait_for_function(  # energy delivered: the books move too
                """() => {
                    const row = document.querySelector('#dispatches tr[data-request="web-e2e-1"]');
                    return row !== null && /^-[0-9.]*[1-9]/.test(row.cells[6].textContent);
                }""",
                timeout=WAIT_MS,
            )
            if SCREENSHOT:
                # For the README: let the chart fill (half an hour of platform time).
                await asyncio.sleep(DOCS_FILL_S)
            shot = _save(await page.screenshot(full_page=True))
            assert shot.stat().st_size > 10_000  # a picture of the page, not a blank

            # Amend it (two prompts: new power, duration kept), then cancel it (a confirm).
            answers = iter([str(power // 2), "", ""])
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept(next(answers))))
            await row.locator("button", has_text="amend").click()
            await page.wait_for_function(
                "() => /web-e2e-1 accepted.*amended/.test(document.getElementById('answer').textContent)",
                timeout=WAIT_MS,
            )
            await page.wait_for_function(
                """(kw) => {
                    const row = document.querySelector('#dispatches tr[data-request="web-e2e-1"]');
                    return row !== null && Number(row.cells[3].textContent) === kw;
                }""",
                arg=power // 2,
                timeout=WAIT_MS,
            )
            await row.locator("button", has_text="cancel").click()
            await row.locator("td.status", has_text="cancelled").wait_for(timeout=WAIT_MS)
            assert await row.locator("button").count() == 0  # ended: nothing left to do
            # The browser logs the wrong token's 401 itself; nothing else may go wrong.
            assert [e for e in errors if "status of 401" not in e] == []
        finally:
            await browser.close()
        # The view stops cleanly on SIGTERM, streams open or not.
        web.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10.0):
            assert await web.wait() == 0
    log = (tmp_path / "web.log").read_text()
    assert "event=web_login " in log and "event=web_action action=dispatch" in log, log
    assert "reason=signal" in log, log
    print(f"browser test took {time.monotonic() - started:.1f} s wall")


async def _open(page: Page, url: str) -> None:
    """Open the page once ``v2g web`` answers (it connects to the broker first)."""
    deadline = time.monotonic() + 20.0
    while True:
        try:
            await page.goto(url, timeout=5_000)
            return
        except Exception:  # the server is not up yet: connection refused
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _save(png: bytes) -> Path:
    """The screenshot as a test artifact, and where TEST_WEB_SCREENSHOT asks for it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web-view.png"
    shot.write_bytes(png)
    if SCREENSHOT:
        Path(SCREENSHOT).write_bytes(png)
    return shot
