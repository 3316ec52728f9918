"""A real, locked-down Mosquitto for the security tests, started per test module.

Credentials come from ``v2g.provision`` (the code behind ``v2g provision``) into a temporary
directory; the broker config is broker/mosquitto/mosquitto.conf with only the paths and
ports changed (and its commented TLS listener switched on), and the ACL is
broker/mosquitto/acl verbatim. The broker runs as a subprocess on free 127.0.0.1 ports and
is stopped by its PID at teardown. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from tests.support.servers import rewrite_prod_conf
from v2g import provision as prov

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "broker" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "broker" / "mosquitto" / "acl"
VEHICLES = ("ev-0000", "ev-0001")
START_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _mosquitto() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(path, os.X_OK):
        pytest.fail("the security tests need the mosquitto binary (apt-get install mosquitto)")
    return path


def derive_conf(tmp: Path, port: int, tls_port: int, pki: prov.CertBundle) -> str:
    """mosquitto.conf with test ports and paths; fails loudly if the original changed shape."""
    replace = {
        "listener 1883 127.0.0.1": f"listener {port} {HOST}",
        "password_file /etc/mosquitto/v2g/passwd": f"password_file {tmp / 'passwd'}",
        "acl_file /etc/mosquitto/v2g/acl": f"acl_file {tmp / 'acl'}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {tmp / 'data'}/",
        "#listener 8883 0.0.0.0": f"listener {tls_port} {HOST}",
        "#cafile /etc/mosquitto/v2g/ca.crt": f"cafile {pki.ca_file}",
        "#certfile /etc/mosquitto/v2g/server.crt": f"certfile {pki.server.cert_file}",
        "#keyfile /etc/mosquitto/v2g/server.key": f"keyfile {pki.server.key_file}",
        "#tls_version tlsv1.2": "tls_version tlsv1.2",
        "#require_certificate true": "require_certificate true",
        "#use_identity_as_username true": "use_identity_as_username true",
        "#use_username_as_clientid true": "use_username_as_clientid true",
    }
    return rewrite_prod_conf(replace)


@dataclass(frozen=True, slots=True)
class Broker:
    port: int
    tls_port: int
    creds: prov.Provisioned
    pki: prov.CertBundle
    log_file: Path

    def password(self, user: str) -> str:
        return self.creds.password(user)

    def tls_context(self, user: str | None = None, *, ca: Path | None = None) -> ssl.SSLContext:
        """Client TLS context trusting the test CA, with ``user``'s client cert if given."""
        ctx = ssl.create_default_context(cafile=str(ca or self.pki.ca_file))
        if user is not None:
            c = self.pki.clients[user]
            ctx.load_cert_chain(str(c.cert_file), str(c.key_file))
        return ctx

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log_file.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"mosquitto did not listen on {HOST}:{port} in {START_TIMEOUT_S}s")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("mosquitto")
    creds = prov.provision(tmp, VEHICLES, homeassistant=prov.ACL_HOMEASSISTANT, certs=True)
    assert creds.certs is not None
    shutil.copyfile(ACL, tmp / "acl")
    (tmp / "data").mkdir()
    port, tls_port = free_port(), free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(derive_conf(tmp, port, tls_port, creds.certs))
    log_file = tmp / "mosquitto.log"
    with log_file.open("wb") as log_fh:
        proc = subprocess.Popen(
            [_mosquitto(), "-c", str(conf)], stdout=log_fh, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_port(port, proc, log_file)
        _wait_for_port(tls_port, proc, log_file)
        yield Broker(port, tls_port, creds, creds.certs, log_file)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=5.0)


@contextlib.asynccontextmanager
async def client(
    broker: Broker,
    user: str | None,
    password: str | None = None,
    *,
    tls: ssl.SSLContext | None = None,
    identifier: str | None = None,
    timeout: float = CLIENT_TIMEOUT_S,
) -> AsyncIterator[aiomqtt.Client]:
    """An MQTT 5 client logged in as ``user`` (its provisioned password unless given)."""
    if user is not None and password is None and tls is None:
        password = broker.password(user)
    async with aiomqtt.Client(
        HOST,
        broker.tls_port if tls is not None else broker.port,
        username=user,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls,
        timeout=timeout,
    ) as c:
        yield c
