"""Broker credentials for a fleet: Mosquitto password file, credentials file, optional certs.

``v2g provision --out DIR`` (v2g/commands/tools.py) calls :func:`provision`. It

- adds every user to ``DIR/passwd`` with ``mosquitto_passwd -b`` (the file is created on
  first use, appended to afterwards); vehicles log in with their vehicle id as username,
  which the ACL's ``%u`` patterns rely on (broker/mosquitto/acl);
- draws a strong random password per user (``secrets``), and records user -> password in
  ``DIR/credentials.json`` (mode 0600). Users already recorded there keep their password
  unless ``rotate`` is asked for, so running it again only adds the new vehicles;
- with ``certs``, creates a throwaway CA (``DIR/certs/ca.crt``), a server certificate for
  127.0.0.1/localhost and one client certificate per user (CN = username), with the
  ``openssl`` command line tool. The CA key stays in ``DIR/certs``: it is meant for tests
  and trials, not production (see SECURITY.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker.topics import check_id
from core.errors import V2GError

Role = Literal["vehicle", "aggregator", "operator", "homeassistant"]

# The ACL (broker/mosquitto/acl) grants rights to these usernames by name, and its
# pattern lines apply to every user: no vehicle may take one of these names.
ACL_AGGREGATOR = "aggregator"
ACL_OPERATOR = "operator"
ACL_HOMEASSISTANT = "homeassistant"  # the Home Assistant bridge, and Home Assistant itself
RESERVED_NAMES = frozenset({ACL_AGGREGATOR, ACL_OPERATOR, ACL_HOMEASSISTANT})

PASSWORD_BYTES = 24  # 192 bits, 32 URL-safe characters
CERT_DAYS = 30
TOOL_TIMEOUT_S = 30.0


class ProvisionError(V2GError):
    """Provisioning could not be done (bad ids, a missing tool, a tool that failed)."""


@dataclass(frozen=True, slots=True)
class Credential:
    username: str
    password: str
    role: Role


@dataclass(frozen=True, slots=True)
class ClientCert:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class CertBundle:
    """The files of a throwaway PKI under ``DIR/certs``."""

    ca_file: Path
    ca_key_file: Path
    server: ClientCert
    clients: dict[str, ClientCert]


@dataclass(frozen=True, slots=True)
class Provisioned:
    out_dir: Path
    passwd_file: Path
    credentials_file: Path
    created: list[Credential]
    kept: list[Credential]
    certs: CertBundle | None

    @property
    def all(self) -> list[Credential]:
        return [*self.kept, *self.created]

    def password(self, username: str) -> str:
        for cred in self.all:
            if cred.username == username:
                return cred.password
        raise KeyError(username)


# -- inputs ------------------------------------------------------------------------------
def vehicle_ids(
    vehicles: str | None = None, count: int | None = None, prefix: str = "ev"
) -> list[str]:
    """Vehicle ids from ``ev-0000,ev-0001`` or from a count and a prefix (``ev-0000``...)."""
    if vehicles is not None and count is not None:
        raise ProvisionError("give either a vehicle list or a count, not both")
    if vehicles is not None:
        ids = [v.strip() for v in vehicles.split(",") if v.strip()]
    elif count is not None:
        if count < 0:
            raise ProvisionError(f"count must be >= 0, not {count}")
        width = max(4, len(str(count - 1))) if count else 4
        ids = [f"{prefix}-{i:0{width}d}" for i in range(count)]
    else:
        ids = []
    return check_vehicle_ids(ids)


def check_vehicle_ids(ids: Iterable[str]) -> list[str]:
    """Valid, distinct ids that are not the ACL's reserved usernames; else ProvisionError."""
    out: list[str] = []
    seen: set[str] = set()
    for vid in ids:
        try:
            check_id(vid, "vehicle id")
        except ValueError as err:
            raise ProvisionError(str(err)) from None
        if vid in RESERVED_NAMES:
            raise ProvisionError(
                f"vehicle id {vid!r} is reserved: the ACL grants that username its own rights"
            )
        if vid in seen:
            raise ProvisionError(f"vehicle id {vid!r} is given twice")
        seen.add(vid)
        out.append(vid)
    return out


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


# -- files -------------------------------------------------------------------------------
def mosquitto_passwd_path() -> str:
    tool = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
    )
    if tool is None:
        raise ProvisionError(
            "mosquitto_passwd not found on PATH; install Mosquitto (e.g. `apt-get install"
            " mosquitto`, which ships it) or put its directory on PATH"
        )
    return tool


def add_to_passwd(passwd_file: Path, username: str, password: str) -> None:
    """Add or update one user in a Mosquitto password file (created if absent)."""
    tool = mosquitto_passwd_path()
    args = [tool, "-b", str(passwd_file), username, password]
    if not passwd_file.exists():
        args.insert(1, "-c")
    _run(args, f"mosquitto_passwd for {username!r}")
    passwd_file.chmod(0o600)


def load_credentials(path: Path) -> dict[str, dict[str, str]]:
    """``{username: {"password": ..., "role": ...}}`` from a credentials file, {} if absent."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProvisionError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ProvisionError(f"{path} is not a JSON object of user -> password")
    out: dict[str, dict[str, str]] = {}
    for user, entry in raw.items():
        if isinstance(entry, str):
            out[str(user)] = {"password": entry, "role": "vehicle"}
        elif isinstance(entry, dict) and isinstance(entry.get("password"), str):
            out[str(user)] = {"password": entry["password"], "role": str(entry.get("role", ""))}
        else:
            raise ProvisionError(f"{path}: entry for {user!r} has no password")
    return out


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    path.chmod(0o600)


# -- the whole job -----------------------------------------------------------------------
def provision(
    out_dir: Path,
    vehicles: Sequence[str] = (),
    *,
    aggregator: str | None = ACL_AGGREGATOR,
    operator: str | None = ACL_OPERATOR,
    homeassistant: str | None = None,
    certs: bool = False,
    rotate: bool = False,
) -> Provisioned:
    """Create or extend ``out_dir``'s passwd and credentials.json (and certs with ``certs``)."""
    wanted: list[tuple[str, Role]] = [(v, "vehicle") for v in check_vehicle_ids(vehicles)]
    services: list[tuple[str | None, Role]] = [
        (aggregator, "aggregator"),
        (operator, "operator"),
        (homeassistant, "homeassistant"),
    ]
    for name, role in services:
        if name:
            check_id(name, f"{role} username")
            if name in vehicles:
                raise ProvisionError(f"{role} username {name!r} is also a vehicle id")
            wanted.append((name, role))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    passwd_file = out_dir / "passwd"
    cred_file = out_dir / "credentials.json"
    known = load_credentials(cred_file)
    created: list[Credential] = []
    kept: list[Credential] = []
    for user, role in wanted:
        if user in known and not rotate and passwd_file.exists():
            kept.append(Credential(user, known[user]["password"], role))
            continue
        cred = Credential(user, new_password(), role)
        add_to_passwd(passwd_file, user, cred.password)
        known[user] = {"password": cred.password, "role": role}
        created.append(cred)
        # Save after each user so a failure half-way leaves passwd and json in step.
        write_private(cred_file, json.dumps(known, indent=2, sort_keys=True) + "\n")
    if not cred_file.exists():
        write_private(cred_file, json.dumps(known, indent=2, sort_keys=True) + "\n")
    bundle = make_certs(out_dir / "certs", [u for u, _ in wanted]) if certs else None
    return Provisioned(out_dir, passwd_file, cred_file, created, kept, bundle)


def env_lines(cred: Credential, broker_url: str, certs: CertBundle | None = None) -> list[str]:
    """What one process needs to connect, as ``NAME=value`` lines for an env file."""
    lines = [
        f"V2G_BROKER_URL={broker_url}",
        f"V2G_USERNAME={cred.username}",
        f"V2G_PASSWORD={cred.password}",
    ]
    if certs is not None:
        lines.append(f"V2G_TLS_CA_FILE={certs.ca_file}")
        client = certs.clients.get(cred.username)
        if client is not None:
            lines.append(f"V2G_TLS_CERT_FILE={client.cert_file}")
            lines.append(f"V2G_TLS_KEY_FILE={client.key_file}")
    return lines


# -- a throwaway PKI with the openssl command line tool ---------------------------------
_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_EXT = """\
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
{san}
"""


def openssl_path() -> str:
    tool = shutil.which("openssl")
    if tool is None:
        raise ProvisionError("openssl not found on PATH; it is needed for --certs")
    return tool


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ProvisionError(f"{what} failed: {err}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ProvisionError(f"{what} failed (exit {done.returncode}): {' '.join(detail[-3:])}")


def _ec_key(ossl: str, key: Path, what: str) -> None:
    """A P-256 private key at ``key``."""
    cmd = [ossl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    _run([*cmd, "-out", str(key)], f"openssl genpkey ({what})")


def make_ca(cert_dir: Path, cn: str = "v2g throwaway CA") -> tuple[Path, Path]:
    """A self-signed CA (P-256 key, CERT_DAYS days): returns (ca.crt, ca.key)."""
    ossl = openssl_path()
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert_dir.chmod(0o700)
    conf = cert_dir / "ca.cnf"
    conf.write_text(_CA_CONF.format(cn=cn))
    key, crt = cert_dir / "ca.key", cert_dir / "ca.crt"
    _ec_key(ossl, key, "CA")
    key.chmod(0o600)
    _run(
        [
            ossl,
            "req",
            "-x509",
            "-new",
            "-key",
            str(key),
            "-out",
            str(crt),
            "-days",
            str(CERT_DAYS),
            "-sha256",
            "-config",
            str(conf),
        ],
        "openssl req (CA)",
    )
    conf.unlink(missing_ok=True)
    return crt, key


def make_leaf(
    cert_dir: Path,
    name: str,
    cn: str,
    ca: tuple[Path, Path],
    *,
    server: bool,
) -> ClientCert:
    """A certificate signed by ``ca`` for a server (127.0.0.1, localhost) or a client (CN)."""
    ossl = openssl_path()
    ca_crt, ca_key = ca
    key, csr, crt = cert_dir / f"{name}.key", cert_dir / f"{name}.csr", cert_dir / f"{name}.crt"
    ext = cert_dir / f"{name}.ext"
    ext.write_text(
        _LEAF_EXT.format(
            eku="serverAuth" if server else "clientAuth",
            san="subjectAltName = IP:127.0.0.1, DNS:localhost" if server else "",
        )
    )
    _ec_key(ossl, key, name)
    key.chmod(0o600)
    _run(
        [ossl, "req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}"],
        f"openssl req ({name})",
    )
    _run(
        [
            ossl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_crt),
            "-CAkey",
            str(ca_key),
            "-set_serial",
            str(secrets.randbits(63)),
            "-days",
            str(CERT_DAYS),
            "-sha256",
            "-extfile",
            str(ext),
            "-extensions",
            "leaf",
            "-out",
            str(crt),
        ],
        f"openssl x509 ({name})",
    )
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)
    return ClientCert(crt, key)


def make_certs(cert_dir: Path, usernames: Sequence[str]) -> CertBundle:
    """CA (reused if ``cert_dir`` has one), server cert, and a client cert per username."""
    ca_crt, ca_key = cert_dir / "ca.crt", cert_dir / "ca.key"
    if not (ca_crt.exists() and ca_key.exists()):
        ca_crt, ca_key = make_ca(cert_dir)
    server_crt, server_key = cert_dir / "server.crt", cert_dir / "server.key"
    if server_crt.exists() and server_key.exists():
        server = ClientCert(server_crt, server_key)
    else:
        server = make_leaf(cert_dir, "server", "localhost", (ca_crt, ca_key), server=True)
    clients: dict[str, ClientCert] = {}
    for user in usernames:
        check_id(user, "username")
        crt, key = cert_dir / f"client-{user}.crt", cert_dir / f"client-{user}.key"
        if crt.exists() and key.exists():
            clients[user] = ClientCert(crt, key)
        else:
            clients[user] = make_leaf(
                cert_dir, f"client-{user}", user, (ca_crt, ca_key), server=False
            )
    return CertBundle(ca_crt, ca_key, server, clients)
