"""Which gateway process holds a station's websocket, recorded in Redis with fencing.

Several ``v2g ocpp`` processes can serve one fleet (behind a load balancer, each with its
own bridge id). When a station connects, its process claims it: one Lua script bumps the
station's term (``INCR {prefix}:ocpp:term:{id}``) and sets
``{prefix}:ocpp:owner:{id}`` = ``{bridge_id}|{term}`` with a TTL. Every process renews its
claims with compare-and-pexpire; a renewal that finds another value has lost the
station (it reconnected elsewhere, maybe while the old socket was still half-open), and
that process drops the connection and stops reporting and commanding the station. The
aggregator sends setpoints to the bridge a vehicle last reported through, so they reach
the new process without anything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

# KEYS: owner, term. ARGV: bridge id, ttl ms. -> "bridge|term"
_CLAIM = """
local term = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. term
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
# KEYS: owner, ... ARGV: ttl ms, value, ... -> one 1 (still ours) or 0 (lost) per key
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: owner. ARGV: value. Deletes the claim only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(slots=True)
class Ownership:
    """This process's claims on stations (station id -> the value it wrote)."""

    redis: aioredis.Redis
    prefix: str
    bridge_id: str
    ttl_s: float = 30.0
    claims: dict[str, str] = field(default_factory=dict)

    def key(self, station_id: str) -> str:
        return f"{self.prefix}:ocpp:owner:{station_id}"

    async def claim(self, station_id: str) -> str:
        """Take the station (a newer connection always wins); returns ``bridge|term``."""
        value = await self.redis.eval(
            _CLAIM,
            2,
            self.key(station_id),
            f"{self.prefix}:ocpp:term:{station_id}",
            self.bridge_id,
            int(self.ttl_s * 1000),
        )
        text = value.decode() if isinstance(value, bytes) else str(value)
        self.claims[station_id] = text
        return text

    async def renew(self) -> list[str]:
        """Extend every claim; returns the stations this process has lost."""
        ids = list(self.claims)
        if not ids:
            return []
        kept = await self.redis.eval(
            _RENEW,
            len(ids),
            *(self.key(i) for i in ids),
            int(self.ttl_s * 1000),
            *(self.claims[i] for i in ids),
        )
        lost = [i for i, ok in zip(ids, kept, strict=True) if not int(ok)]
        for i in lost:
            del self.claims[i]
        return lost

    def drop(self, station_id: str) -> str | None:
        """Stop renewing a claim (the station disconnected); returns its value, for
        :meth:`release`."""
        return self.claims.pop(station_id, None)

    async def release(self, dropped: Iterable[tuple[str, str]]) -> None:
        """Delete dropped claims that are still ours (a newer claim is left alone)."""
        for sid, value in list(dropped):
            await self.redis.eval(_RELEASE, 1, self.key(sid), value)

    async def owner(self, station_id: str) -> str | None:
        value = await self.redis.get(self.key(station_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
