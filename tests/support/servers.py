"""Mosquitto and Redis of a fault test's own, on free loopback ports, killable by PID.

The fault tests kill and restart these servers (kill -9, SIGSTOP) without touching the
shared ones on 1883/6379. Mosquitto runs broker/mosquitto/mosquitto.conf with only its
paths, port and authentication changed, so its persistence settings are the production
ones; Redis runs with AOF on (fsync every second), as docker-compose.yml runs it.
Every wait is bounded; every process is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
PROD_CONF = REPO / "broker" / "mosquitto" / "mosquitto.conf"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.access(path, os.X_OK):
        pytest.fail(f"the fault tests need {name} (apt-get install {package})", pytrace=False)
    return path


def rewrite_prod_conf(replace: dict[str, str]) -> str:
    """broker/mosquitto/mosquitto.conf with whole lines replaced, run as this user.

    Fails loudly if the original no longer has a line to replace, so that tests keep
    testing the config that ships.
    """
    seen: set[str] = set()
    out: list[str] = []
    for line in PROD_CONF.read_text().splitlines():
        key = line.strip()
        if key in replace:
            seen.add(key)
            line = replace[key]
        out.append(line)
    missing = set(replace) - seen
    assert not missing, f"{PROD_CONF} no longer has the lines the test rewrites: {sorted(missing)}"
    # As root Mosquitto would switch to user "mosquitto", who cannot read or write the
    # test's directory.
    out.append(f"user {getpass.getuser()}")
    return "\n".join(out) + "\n"


def fault_conf(data_dir: Path, port: int) -> str:
    """The production mosquitto.conf, anonymous on a test port with its data in ``data_dir``.

    Authentication is the security tests' subject; here only persistence and limits
    matter, and they stay as shipped.
    """
    return rewrite_prod_conf(
        {
            "listener 1883 127.0.0.1": f"listener {port} {HOST}",
            "allow_anonymous false": "allow_anonymous true",
            "password_file /etc/mosquitto/v2g/passwd": "",
            "acl_file /etc/mosquitto/v2g/acl": "",
            "persistence_location /var/lib/mosquitto/": f"persistence_location {data_dir}/",
        }
    )


@dataclass
class Server:
    """One server process on ``port``: start, kill -9, freeze/thaw, stop."""

    name: str
    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        assert self.proc is None, f"{self.name} is already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.02)
        pytest.fail(
            f"{self.name} did not listen on {HOST}:{self.port} in {timeout}s:\n{self.tail()}"
        )

    def kill(self) -> None:
        """kill -9: no goodbye, no final save."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5.0)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), kill -9 if it does not go within 5 s."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Mosquitto(Server):
    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"


class Redis(Server):
    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


def make_mosquitto(tmp: Path) -> Mosquitto:
    data = tmp / "mosquitto-data"
    data.mkdir(exist_ok=True)
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(fault_conf(data, port))
    argv = [_binary("mosquitto", "mosquitto"), "-c", str(conf)]
    return Mosquitto("mosquitto", argv, port, tmp / "mosquitto.log")


def make_redis(tmp: Path) -> Redis:
    data = tmp / "redis-data"
    data.mkdir(exist_ok=True)
    port = free_port()
    argv = [
        _binary("redis-server", "redis-server"),
        "--port", str(port),
        "--bind", HOST,
        "--dir", str(data),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--protected-mode", "yes",
    ]  # fmt: skip
    return Redis("redis", argv, port, tmp / "redis.log")
