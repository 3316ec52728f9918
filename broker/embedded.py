"""An embedded MQTT broker (amqtt) on a free loopback port, for the zero-setup demo.

Fine for a few hundred vehicles at modest acceleration (~2-3k msg/s); use Mosquitto
for anything larger (PERF-NOTES.md).
"""

from __future__ import annotations

import logging
import socket
import warnings
from types import TracebackType
from typing import Any, Self


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """``async with EmbeddedBroker() as b:`` serves MQTT on ``b.url`` until the block ends."""

    # amqtt speaks MQTT 3.1.1 only: clients that try 5 first are refused (and logged as
    # "Invalid protocol ... 5") before they fall back, so its clients say 3.1.1 at once.
    PROTOCOL = "3.1.1"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        from amqtt.broker import Broker  # imported late: only the demo needs it

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        # amqtt logs every connection at INFO and warns about its own deprecations.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._broker = Broker(config)
            await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
