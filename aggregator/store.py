"""Where fleet state and active dispatches persist: Redis, or memory for the demo.

Both stores take and give a :class:`Snapshot`; the aggregator writes one per control
step and reads one at start, so a restarted aggregator resumes where it stopped.
In Redis a snapshot is one hash: the fleet as binary numpy columns (one field each,
PERF-NOTES.md: a million vehicles in well under a second) plus the dispatch books as JSON.
:func:`encode_snapshot` and :func:`decode_snapshot` are its one encoding, for the plain
store here and the leader's fenced one (:mod:`aggregator.fence`) alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.errors import TransportError


@dataclass(slots=True)
class Snapshot:
    ids: list[str]
    columns: dict[str, np.ndarray]
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    saved_at: float = 0.0
    # Scale-out: the last stream entry of forwarded rows this state includes (where a new
    # leader reads on from); None when not scaled out.
    ingest_cursor: str | None = None


Field = bytes | str | float | int


def encode_snapshot(snapshot: Snapshot) -> dict[str, Field]:
    """A snapshot as the fields of its Redis hash."""
    mapping: dict[str, Field] = {
        "ids": "\n".join(snapshot.ids),
        "dtypes": json.dumps({k: v.dtype.str for k, v in snapshot.columns.items()}),
        "dispatches": json.dumps(snapshot.dispatches),
        "saved_at": snapshot.saved_at,
    }
    if snapshot.ingest_cursor is not None:
        mapping["ingest_cursor"] = snapshot.ingest_cursor
    for name, arr in snapshot.columns.items():
        mapping[f"col:{name}"] = np.ascontiguousarray(arr).tobytes()
    return mapping


def decode_snapshot(raw: dict[bytes, bytes]) -> Snapshot | None:
    """The inverse of :func:`encode_snapshot` (None for an empty hash: nothing saved)."""
    if not raw:
        return None
    text = raw[b"ids"].decode()
    ids = text.split("\n") if text else []
    dtypes: dict[str, str] = json.loads(raw[b"dtypes"])
    columns = {
        name: np.frombuffer(raw[f"col:{name}".encode()], dtype=np.dtype(dt)).copy()
        for name, dt in dtypes.items()
        if f"col:{name}".encode() in raw
    }
    cursor = raw.get(b"ingest_cursor")
    return Snapshot(
        ids=ids,
        columns=columns,
        dispatches=json.loads(raw.get(b"dispatches", b"[]")),
        saved_at=float(raw.get(b"saved_at", b"0")),
        ingest_cursor=cursor.decode() if cursor is not None else None,
    )


class StateStore(Protocol):
    """The one interface the aggregator persists through."""

    async def save(self, snapshot: Snapshot) -> None: ...

    async def load(self) -> Snapshot | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """An in-process store: survives nothing, needs nothing (the demo's default)."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None

    async def save(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    async def load(self) -> Snapshot | None:
        return self._snapshot

    async def close(self) -> None:
        return None


class RedisStore:
    """Snapshots in one Redis hash ``{prefix}:fleet``, written atomically (MULTI/EXEC)."""

    def __init__(self, url: str, *, prefix: str = "v2g", timeout_s: float = 2.0) -> None:
        self.url = url
        self.key = f"{prefix}:fleet"
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    async def save(self, snapshot: Snapshot) -> None:
        mapping = encode_snapshot(snapshot)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.key)
                pipe.hset(self.key, mapping=mapping)  # type: ignore[arg-type]
                await pipe.execute()
        except (RedisError, OSError) as err:
            raise TransportError(
                f"saving fleet state to Redis at {self.url} failed: {err}"
            ) from err

    async def load(self) -> Snapshot | None:
        try:
            raw: dict[bytes, bytes] = await self._redis.hgetall(self.key)  # type: ignore[assignment]
        except (RedisError, OSError) as err:
            raise TransportError(
                f"reading fleet state from Redis at {self.url} failed: {err};"
                " is Redis running? (check --redis / V2G_REDIS_URL)"
            ) from err
        return decode_snapshot(raw)

    async def clear(self) -> None:
        await self._redis.delete(self.key)

    async def close(self) -> None:
        await self._redis.aclose()
