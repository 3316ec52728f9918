"""Station credentials: OCPP Security Profile 1/2 (HTTP Basic auth, with TLS for 2).

A station is provisioned with ``v2g provision station ID``: a random password, stored as a
salted scrypt hash in Redis under ``{redis prefix}:ocpp:station:{id}``. The gateway checks
the ``Authorization`` header of the websocket upgrade against it before any OCPP is spoken.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as aioredis

# OCPP 2.0.1/2.1 Part 2 (A00.FR.505): the station id is at most 48 characters (the
# identity of the URL path) and serves as the Basic auth username; this platform also
# uses it in vehicle ids, so it must be a valid id of the wire contract.
STATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,47}")
PASSWORD_BYTES = 24  # 32 URL-safe characters; OCPP allows 16-40 for the basic auth password
# scrypt at n=2**14, r=8: ~16 MiB and ~50 ms a check; a station authenticates once a
# connection, so this costs nothing in steady state and a lot to a guesser.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SALT_BYTES = 16

Verdict = Literal["ok", "unprovisioned", "unknown", "bad_password", "no_credentials"]


def check_station_id(station_id: str) -> str:
    """Return ``station_id`` if it is valid, else raise ValueError saying what is allowed."""
    if not STATION_ID_RE.fullmatch(station_id):
        raise ValueError(
            f"station id {station_id[:60]!r} is not valid: use 1-48 letters, digits, '_', '.',"
            " ':' or '-', starting with a letter or digit"
        )
    return station_id


def new_password() -> str:
    """A strong random password (32 URL-safe characters)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (hex) of ``password`` with a fresh random salt."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password` (constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(username, password) of an HTTP ``Authorization: Basic ...`` header, None if absent
    or not Basic or not decodable."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class StationStore(Protocol):
    """Where station credentials live (Redis in production, a dict in unit tests)."""

    async def password_hash(self, station_id: str) -> str | None: ...


@dataclass(slots=True)
class RedisStations:
    """Station credentials under ``{prefix}:ocpp:station:{id}`` (a hash: ``password``)."""

    redis: aioredis.Redis
    prefix: str

    def key(self, station_id: str) -> str:
        return f"{self.prefix}:ocpp:station:{station_id}"

    async def password_hash(self, station_id: str) -> str | None:
        value = await self.redis.hget(self.key(station_id), "password")
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def provision(self, station_id: str, password: str) -> None:
        """Store ``password``'s salted hash for ``station_id`` (replacing any older one)."""
        check_station_id(station_id)
        await self.redis.hset(self.key(station_id), mapping={"password": hash_password(password)})


async def authenticate(
    store: StationStore, station_id: str, header: str | None, *, open_mode: bool
) -> Verdict:
    """Judge a connection's credentials: ``ok`` and ``unprovisioned`` (open mode, a station
    that is not provisioned) may go on; everything else is refused with HTTP 401.

    A provisioned station is checked even in open mode: a wrong password is refused."""
    stored = await store.password_hash(station_id)
    creds = parse_basic(header)
    if stored is None:
        return "unprovisioned" if open_mode else ("no_credentials" if creds is None else "unknown")
    if creds is None:
        return "no_credentials"
    user, password = creds
    # scrypt takes ~50 ms of CPU by design; hashlib releases the GIL for it, so a thread
    # keeps the event loop (every other station) running through a reconnect storm.
    if user != station_id or not await asyncio.to_thread(verify_password, password, stored):
        return "bad_password"
    return "ok"
