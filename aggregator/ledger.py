"""The dispatch ledger: an append-only record per request of what was agreed and what was
delivered, for settlement. In Redis, one stream per request (``{prefix}:ledger:{id}``);
in memory for the demo.

Entries are flat string maps with a ``kind``: ``answer`` (each answer given: accepted
terms, partial, rejected, completed or cancelled), ``step`` (each control step while the
request runs: requested, allocated, delivered and baseline kW, energies so far, setpoints
sent, vehicles, and a signal service's score so far), ``vehicles`` (each settlement
interval: every vehicle's metered and baseline kWh, as columns), ``firming`` (each
settlement interval of a firming request: energy outside the band and ramp violations,
with the fleet and on plain charging) and ``departure`` (a driver who unplugged while it
ran, with their energy and target). Scaled out, every
entry also has ``term``: the fencing token of the leader that wrote it, checked by Redis
as it appends (:class:`aggregator.fence.FencedLedger`). Writes never hold up a control step: the service queues them and a
writer drains the queue; while Redis is away they wait (bounded) and go out, in order,
when it is back, so nothing acknowledged is lost to a short outage.

A request that was only ever rejected leaves a stream of nothing but its refusals: that
stream expires (``V2G_REJECTED_LEDGER_TTL_S``, a day by default), so refused requests,
bad or hostile, cannot fill Redis. The first answer that is not a refusal (the same id
sent again, and accepted) makes the stream permanent again.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aggregator.firming import FirmingInterval
from aggregator.settlement import Departure, VehicleInterval
from broker.models import DispatchProgress, DispatchResult, NodeStatus
from core.errors import TransportError

Entry = dict[str, str]
MAX_OWED = 1_000_000  # entries held while the store is away; the oldest go first beyond


def answer_entry(result: DispatchResult) -> Entry:
    """A ledger entry for an answer (its JSON, plus the fields a reader filters on)."""
    return {
        "kind": "answer",
        "ts": f"{result.ts.timestamp():.3f}",
        "status": result.status,
        "json": result.model_dump_json(),
    }


def step_entry(p: DispatchProgress, setpoints: int) -> Entry:
    """A ledger entry for one control step of a running request."""
    return {
        "kind": "step",
        "ts": f"{p.ts.timestamp():.3f}",
        "requested_kw": repr(p.requested_kw),
        "allocated_kw": repr(p.allocated_kw),
        "delivered_kw": repr(p.delivered_kw),
        "baseline_kw": repr(p.baseline_kw),
        "requested_kwh": repr(p.requested_kwh),
        "delivered_kwh": repr(p.delivered_kwh),
        "vehicles": str(p.vehicles),
        "setpoints": str(setpoints),
        **({"baseline_kwh": repr(p.baseline_kwh)} if p.baseline_kwh is not None else {}),
        **({"delivery_start": f"{p.delivery_start.timestamp():.3f}"} if p.delivery_start else {}),
        **({"score": repr(p.score)} if p.score is not None else {}),
        **({"fcr_share": repr(p.fcr_share)} if p.fcr_share is not None else {}),
    }


GRID_STREAM = "_grid"
"""The ledger stream of the grid's conflicts and excesses (not a request id: those never
start with '_')."""


def grid_entry(ts: float, nodes: Sequence[NodeStatus]) -> Entry | None:
    """A ledger entry for a step where a limit held vehicles below their floor or a node
    was over a limit it could not hold; None when neither happened."""
    held = {n.node: n.conflicts for n in nodes if n.conflicts}
    over = {n.node: n.over_limit_kw for n in nodes if n.over_limit_kw > 0.0}
    if not held and not over:
        return None
    return {
        "kind": "grid",
        "ts": f"{ts:.3f}",
        "conflicts": json.dumps(held),
        "over_limit_kw": json.dumps(over),
    }


def vehicles_entry(iv: VehicleInterval) -> Entry:
    """A ledger entry for one settlement interval, every vehicle in it as columns."""
    return {
        "kind": "vehicles",
        "ts": f"{iv.end:.3f}",
        "start": f"{iv.start:.3f}",
        "end": f"{iv.end:.3f}",
        "json": json.dumps(
            {
                "vehicle_id": iv.vehicle_ids,
                "metered_kwh": np.round(iv.metered_kwh, 4).tolist(),
                "baseline_kwh": np.round(iv.baseline_kwh, 4).tolist(),
            },
            separators=(",", ":"),
        ),
    }


def firming_entry(iv: FirmingInterval) -> Entry:
    """A ledger entry for one settlement interval of a firming request: its node's energy
    outside the band and ramp violations, with the fleet and on plain charging."""
    return {
        "kind": "firming",
        "ts": f"{iv.end:.3f}",
        "start": f"{iv.start:.3f}",
        "end": f"{iv.end:.3f}",
        "node": iv.node,
        "outside_band_kwh": f"{iv.outside_band_kwh:.4f}",
        "ramp_violations": str(iv.ramp_violations),
        "baseline_outside_band_kwh": f"{iv.baseline_outside_band_kwh:.4f}",
        "baseline_ramp_violations": str(iv.baseline_ramp_violations),
    }


def firming_of(e: Entry) -> FirmingInterval:
    """The interval a ``firming`` entry books (the reverse of :func:`firming_entry`)."""
    return FirmingInterval(
        start=float(e["start"]),
        end=float(e["end"]),
        node=e.get("node", ""),
        outside_band_kwh=float(e["outside_band_kwh"]),
        ramp_violations=int(e["ramp_violations"]),
        baseline_outside_band_kwh=float(e["baseline_outside_band_kwh"]),
        baseline_ramp_violations=int(e["baseline_ramp_violations"]),
    )


def departure_entry(d: Departure) -> Entry:
    """A ledger entry for a driver who unplugged while the request ran."""
    return {
        "kind": "departure",
        "ts": f"{d.ts:.3f}",
        "vehicle_id": d.vehicle_id,
        "energy_kwh": f"{d.energy_kwh:.4f}",
        "target_kwh": f"{d.target_kwh:.4f}",
        "short_kwh": f"{d.short_kwh:.4f}",
        "announced": f"{d.announced:.3f}",
        "early": "1" if d.early else "0",
        "short": "1" if d.short else "0",
    }


class Ledger(Protocol):
    async def append(self, entries: Sequence[tuple[str, Entry]]) -> None: ...

    async def read(self, request_id: str) -> list[Entry]: ...

    async def close(self) -> None: ...


class MemoryLedger:
    """The ledger in this process (the demo, tests)."""

    def __init__(self) -> None:
        self.streams: dict[str, list[Entry]] = {}

    async def append(self, entries: Sequence[tuple[str, Entry]]) -> None:
        for rid, entry in entries:
            self.streams.setdefault(rid, []).append(dict(entry))

    async def read(self, request_id: str) -> list[Entry]:
        return [dict(e) for e in self.streams.get(request_id, [])]

    async def close(self) -> None:
        return None


REJECTED_TTL_S = 86_400.0
# Runs after the XADD of a rejection: a stream that holds only it (new), or that already
# expires (only refusals so far), expires; the books of a request that ran never do.
_EXPIRE_IF_REFUSED_ONLY = """
if redis.call('XLEN', KEYS[1]) == 1 or redis.call('TTL', KEYS[1]) > 0 then
  return redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""


def is_refusal(entry: Mapping[str, str]) -> bool:
    """Whether a ledger entry is a ``rejected`` answer."""
    return entry.get("kind") == "answer" and entry.get("status") == "rejected"


class RedisLedger:
    """One Redis stream per request, appended in a pipeline per batch (XADD)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "v2g",
        timeout_s: float = 2.0,
        rejected_ttl_s: float = REJECTED_TTL_S,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.rejected_ttl_s = rejected_ttl_s
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def key(self, request_id: str) -> str:
        return f"{self.prefix}:ledger:{request_id}"

    async def append(self, entries: Sequence[tuple[str, Entry]]) -> None:
        if not entries:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid, entry in entries:
                    pipe.xadd(self.key(rid), entry)  # type: ignore[arg-type]
                self.queue_expiry(pipe, entries)
                await pipe.execute()
        except (RedisError, OSError) as err:
            raise TransportError(
                f"writing the ledger to Redis at {self.url} failed: {err}"
            ) from err

    def queue_expiry(self, pipe: Any, entries: Sequence[tuple[str, Entry]]) -> None:
        """Queue on ``pipe``, after the entries' XADDs, the expiry of the streams of
        requests only ever refused, and PERSIST for those that got any other answer."""
        ttl = max(1, round(self.rejected_ttl_s))
        for rid, entry in entries:
            if entry.get("kind") != "answer":
                continue
            if is_refusal(entry):
                pipe.eval(_EXPIRE_IF_REFUSED_ONLY, 1, self.key(rid), ttl)
            else:
                pipe.persist(self.key(rid))

    async def apply_expiry(self, entries: Sequence[tuple[str, Entry]]) -> None:
        """:meth:`queue_expiry` on its own, for entries appended another way (fenced)."""
        if not any(e.get("kind") == "answer" for _, e in entries):
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self.queue_expiry(pipe, entries)
                await pipe.execute()
        except (RedisError, OSError) as err:
            raise TransportError(
                f"setting the ledger's expiry in Redis at {self.url} failed: {err}"
            ) from err

    async def read(
        self,
        request_id: str,
        *,
        page: int | None = None,
        on_page: Callable[[int, int], None] | None = None,
    ) -> list[Entry]:
        """Every entry of a request's books, in order; with ``page``, read that many at a
        time, calling ``on_page(read so far, total)`` after each (a progress bar)."""
        key = self.key(request_id)
        out: list[Entry] = []
        try:
            if page is None:
                raw = await self._redis.xrange(key)
                out.extend(_entry(fields) for _, fields in raw or [])
                return out
            total = int(await self._redis.xlen(key))
            start: str = "-"
            while True:
                raw = await self._redis.xrange(key, min=start, max="+", count=page)
                if not raw:
                    break
                out.extend(_entry(fields) for _, fields in raw)
                if on_page is not None:
                    on_page(len(out), max(total, len(out)))
                if len(raw) < page:
                    break
                start = "(" + _text(raw[-1][0])  # exclusive: after the last one read
        except (RedisError, OSError) as err:
            raise TransportError(
                f"reading the ledger from Redis at {self.url} failed: {err};"
                " is Redis running? (check --redis / V2G_REDIS_URL)"
            ) from err
        return out

    async def close(self) -> None:
        await self._redis.aclose()


def _entry(fields: Mapping[Any, Any] | None) -> Entry:
    return {_text(k): _text(v) for k, v in (fields or {}).items()}


def _text(x: bytes | str | None) -> str:
    return x.decode() if isinstance(x, bytes) else (x or "")


class LedgerWriter:
    """Entries queued by the control loop, written in order by ``drain`` (bounded)."""

    def __init__(self, ledger: Ledger, max_owed: int = MAX_OWED) -> None:
        self.ledger = ledger
        self.owed: deque[tuple[str, Entry]] = deque(maxlen=max_owed)
        self.written = 0
        self.failed_writes = 0
        # Fields every entry gets from now on (scale-out: the leader's term, its token).
        self.stamp: Entry = {}

    def add(self, request_id: str, entry: Mapping[str, str]) -> None:
        self.owed.append((request_id, {**entry, **self.stamp}))

    async def drain(self, batch: int = 10_000) -> bool:
        """Write what is owed, oldest first; False (and kept) if the store is away."""
        while self.owed:
            chunk = [self.owed[i] for i in range(min(batch, len(self.owed)))]
            try:
                await self.ledger.append(chunk)
            except TransportError:
                self.failed_writes += 1
                return False
            for _ in chunk:
                self.owed.popleft()
            self.written += len(chunk)
            await asyncio.sleep(0)
        return True
