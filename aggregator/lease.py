"""A leader lease in Redis, with fencing tokens.

One key holds the lease (``SET key value NX PX ttl``); a second counts acquisitions
(``INCR``), and the count is the holder's *fencing token*. Acquiring does both in one Lua
script, so no holder ever lacks a token. Renewing and releasing are compare-and-pexpire
and compare-and-delete scripts: a holder whose lease has already passed to someone else
can neither extend nor drop it.

A lease alone cannot stop a paused holder (a GC pause, SIGSTOP, a frozen VM) from acting
after it expired. So the writes only the leader may do carry its token, and Redis checks
it in the same script as the write (:func:`fenced_hset`, :func:`fenced_xadd`): once a
newer leader has taken the lease, an old token is refused, whatever the old holder
believes. The snapshot and the ledger reach these scripts through one
:class:`aggregator.fence.Fence`; this module knows neither them nor the service.

Errors (all from :mod:`core.errors`)::

    V2GError
    ├── TransportError
    │   └── LeaseUnavailable   Redis did not answer in time: retry later, and stop
    │                          leading once the local lease deadline passes
    └── FencedOut              a newer leader exists: stop leading; retrying will not help

Times are wall seconds (Redis expires keys on its own clock), measured locally with a
monotonic clock; the holder stops counting itself leader ``margin`` before the key
would expire, to cover clock drift and the request's own latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from core.errors import TransportError, V2GError

FENCED = "FENCED"

# KEYS: lease, token counter. ARGV: holder, ttl ms.
# -> {token, value} if acquired, else {0, ms until the holder's lease expires}.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  local value = ARGV[1] .. '|' .. token
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return {token, value}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
# KEYS: lease. ARGV: value, ttl ms. -> 1 if still ours and extended, else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease. ARGV: value. -> 1 if it was ours and is gone, else 0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: token counter, hash. ARGV: token, ttl ms (0: none), field, value, ...
# Replaces the whole hash, only if the token is the latest one handed out.
_FENCED_HSET = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is not the current ' .. tostring(current))
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: token counter, then the streams. ARGV: token, then per entry: the index in KEYS of
# its stream, its field count n, and n field/value pairs. Appends them all, in order, only
# if the token is the latest one.
_FENCED_XADD = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is not the current ' .. tostring(current))
end
local ids = {}
local i = 2
while i <= #ARGV do
  local width = 2 * tonumber(ARGV[i + 1])
  ids[#ids + 1] = redis.call('XADD', KEYS[tonumber(ARGV[i])], '*', unpack(ARGV, i + 2, i + 1 + width))
  i = i + 2 + width
end
return ids
"""


class LeaseUnavailable(TransportError):
    """Redis did not answer a lease operation in time, or refused it."""


class FencedOut(V2GError):
    """A write carried a fencing token older than the current one: a newer leader exists."""

    def __init__(self, token: int, detail: str) -> None:
        super().__init__(f"write with fencing token {token} refused: {detail}")
        self.token = token


def lease_keys(prefix: str) -> tuple[str, str]:
    """(lease key, token counter key) under a Redis prefix. With a hash tag in the prefix
    (``{v2g}``) they share a Redis Cluster slot with the fleet's other keys."""
    return f"{prefix}:leader", f"{prefix}:leader:token"


async def _call(what: str, timeout_s: float, fn: Callable[[], Any]) -> Any:
    try:
        async with asyncio.timeout(timeout_s):
            return await fn()
    except TimeoutError:
        raise LeaseUnavailable(f"{what}: Redis did not answer within {timeout_s:g}s") from None
    except ResponseError as err:
        if str(err).startswith(FENCED):
            raise
        raise LeaseUnavailable(f"{what}: Redis refused it: {err}") from err
    except (RedisError, OSError) as err:
        raise LeaseUnavailable(f"{what}: {err}; is Redis running? (V2G_REDIS_URL)") from err


class RedisLease:
    """One process's handle on the leader lease. Not shared between processes or tasks
    that disagree about who holds it: one per process, driven by one loop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        holder: str,
        ttl_s: float,
        timeout_s: float = 1.0,
        margin: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``holder`` names this process in the lease's value (``holder|token``);
        ``timeout_s`` bounds every Redis call; the holder counts itself leader until
        ``ttl_s * (1 - margin)`` after it sent its last successful acquire or renew."""
        if ttl_s <= 0 or not 0.0 <= margin < 1.0:
            raise ValueError(f"lease needs ttl_s > 0 and 0 <= margin < 1, got {ttl_s}, {margin}")
        if "|" in holder:
            raise ValueError(f"holder {holder!r} must not contain '|'")
        self.redis = redis
        self.key, self.token_key = lease_keys(prefix)
        self.holder = holder
        self.ttl_s = ttl_s
        self.timeout_s = min(timeout_s, ttl_s / 2)
        self.margin = margin
        self._now = monotonic
        self.token: int | None = None
        self.value: str | None = None
        self.valid_until = 0.0
        # After a failed acquire: seconds until the holder's lease expires, unless renewed
        # (a follower may sleep that long and try again the moment it can succeed).
        self.free_in = 0.0

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    @property
    def held(self) -> bool:
        """Ours, as far as we can know without asking: acquired or renewed recently enough."""
        return self.token is not None and self._now() < self.valid_until

    def _lost(self) -> None:
        self.token = self.value = None
        self.valid_until = 0.0

    async def acquire(self) -> int | None:
        """Take the lease if nobody holds it; returns the new fencing token, or None."""
        sent = self._now()
        got = await _call(
            "acquiring the leader lease",
            self.timeout_s,
            lambda: self.redis.eval(
                _ACQUIRE, 2, self.key, self.token_key, self.holder, self._ttl_ms
            ),
        )
        token, value = int(got[0]), got[1]
        if not token:
            left_ms = int(value)  # -1: a lease without expiry (set by hand): poll on
            self.free_in = left_ms / 1000.0 if left_ms >= 0 else self.ttl_s
            return None
        self.token = token
        self.value = value.decode() if isinstance(value, bytes) else str(value)
        self.valid_until = sent + self.ttl_s * (1.0 - self.margin)
        return token

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and the token dropped) if not."""
        if self.value is None:
            return False
        sent = self._now()
        value = self.value
        ok = await _call(
            "renewing the leader lease",
            self.timeout_s,
            lambda: self.redis.eval(_RENEW, 1, self.key, value, self._ttl_ms),
        )
        if not ok:
            self._lost()
            return False
        self.valid_until = sent + self.ttl_s * (1.0 - self.margin)
        return True

    async def release(self) -> bool:
        """Give the lease up if it is still ours (a graceful stop: the next leader need not
        wait for it to expire). The token stays spent: the next holder gets a higher one."""
        value = self.value
        self._lost()
        if value is None:
            return False
        done = await _call(
            "releasing the leader lease",
            self.timeout_s,
            lambda: self.redis.eval(_RELEASE, 1, self.key, value),
        )
        return bool(done)

    async def current(self) -> tuple[str | None, int]:
        """(the lease's value ``holder|token`` or None if free, the latest token issued)."""
        value, token = await _call(
            "reading the leader lease",
            self.timeout_s,
            lambda: self.redis.mget(self.key, self.token_key),
        )
        text = value.decode() if isinstance(value, bytes) else value
        return text, int(token or 0)


async def fenced_hset(
    redis: aioredis.Redis,
    *,
    token_key: str,
    key: str,
    token: int,
    mapping: Mapping[str, bytes | str | float | int],
    ttl_s: float = 0.0,
    timeout_s: float = 5.0,
) -> None:
    """Replace hash ``key`` with ``mapping`` in one script, only if ``token`` is still the
    latest fencing token; raises FencedOut if a newer leader exists, LeaseUnavailable if
    Redis does not answer within ``timeout_s``."""
    if not mapping:
        raise ValueError("fenced_hset needs at least one field")
    args: list[Any] = [str(token), max(0, round(ttl_s * 1000))]
    for name, value in mapping.items():
        args += [name, value]
    try:
        await _call(
            f"writing {key}",
            timeout_s,
            lambda: redis.eval(_FENCED_HSET, 2, token_key, key, *args),
        )
    except ResponseError as err:
        raise FencedOut(token, str(err)) from None


async def fenced_xadd(
    redis: aioredis.Redis,
    *,
    token_key: str,
    token: int,
    entries: Sequence[tuple[str, Mapping[str, str]]],
    timeout_s: float = 5.0,
) -> list[str]:
    """Append each ``(stream key, fields)`` of ``entries``, in order, in one script, only
    if ``token`` is still the latest fencing token (for the leader's append-only books,
    e.g. the dispatch ledger's streams); returns their ids. Raises FencedOut if a newer
    leader exists, LeaseUnavailable if Redis does not answer within ``timeout_s``.

    The streams and the token counter must share a Redis Cluster slot: a hash tag in the
    prefix (``{v2g}``) does that."""
    if not entries:
        return []
    slots: dict[str, int] = {}  # stream key -> its index in KEYS (1 is the token counter)
    args: list[Any] = [str(token)]
    for key, fields in entries:
        if not fields:
            raise ValueError(f"fenced_xadd: an entry for {key} has no fields")
        args += [slots.setdefault(key, len(slots) + 2), len(fields)]
        for name, value in fields.items():
            args += [name, value]
    try:
        ids = await _call(
            f"appending to {len(slots)} stream(s)",
            timeout_s,
            lambda: redis.eval(_FENCED_XADD, 1 + len(slots), token_key, *slots, *args),
        )
    except ResponseError as err:
        raise FencedOut(token, str(err)) from None
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
