"""The web view outlives its broker: the page keeps answering, says the broker is
unreachable while it is down, and is live again once it is back."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.figures import Recorder
from tests.support.processes import v2g_process
from tests.support.servers import Mosquitto, free_port


def _state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/state", timeout=2.0) as r:
        state: dict[str, Any] = json.loads(r.read())
    return state


async def _until_broker(url: str, connected: bool, within_s: float) -> float:
    """Wall seconds until the view reports the broker link as ``connected``."""
    t0 = time.monotonic()
    async with asyncio.timeout(within_s):
        while True:
            try:
                if (await asyncio.to_thread(_state, url))["broker_connected"] is connected:
                    return time.monotonic() - t0
            except OSError:  # not listening yet
                pass
            await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
async def test_the_web_view_says_when_its_broker_is_gone_and_recovers(
    mosquitto: Mosquitto, tmp_path: Path, test_id: str, figure: Recorder
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("V2G_")} | {
        "V2G_RECONNECT_MIN_S": "0.05",
        "V2G_RECONNECT_MAX_S": "0.5",
        "V2G_KEEPALIVE_S": "5",
    }
    args = ["web", "--listen", f"127.0.0.1:{port}", "--broker", mosquitto.url]
    args += ["--topic-prefix", f"webfault/{test_id}"]
    async with v2g_process(args, env, tmp_path / "web.log"):
        await _until_broker(url, True, 15.0)
        mosquitto.kill()
        down = await _until_broker(url, False, 10.0)
        figure("web view: broker loss shown after", down, "s", limit="< 3 s")
        assert down < 3.0  # the page hears of it within a check or two
        mosquitto.start()
        back = await _until_broker(url, True, 15.0)
        figure("web view: live again after broker restart", back, "s", limit="< 10 s")
        assert back < 10.0
