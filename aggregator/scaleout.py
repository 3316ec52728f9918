"""Scale-out: several aggregator processes share the telemetry, one of them dispatches.

Enabled by ``V2G_SHARE_GROUP``; unset, nothing here runs and one aggregator works alone.

* **Shared ingest.** Every process subscribes to telemetry and status through an MQTT 5
  shared subscription (``$share/<group>/<prefix>/vehicles/+/telemetry`` ...), so the
  broker hands each message to one of them. Each validates what it gets (the service's
  ``on_message``, unchanged) and, once per control step, a follower forwards its rows as
  one compact binary entry (numpy columns) on a Redis stream, ``{prefix}:ingest``,
  trimmed to ``V2G_SHARE_RETENTION_S``.
* **One leader.** A Redis lease (:mod:`aggregator.lease`) picks the process that
  dispatches. Each control step the leader reads every entry since its cursor and folds
  them, with what it received itself, in one vectorised ``apply_arrays``; then it
  allocates and publishes setpoints, results, fleet status and capability as a lone
  aggregator does. Dispatch requests and cancels are not shared: every process gets
  them, followers hold the recent ones for a takeover.
* **Takeover.** When the leader dies its lease expires; another process takes it with
  a higher fencing token, restores fleet and dispatch books from the snapshot, reads the
  stream from the snapshot's cursor and goes on. The snapshot is written through the
  leader's :class:`aggregator.fence.Fence`, with the token, so a paused old leader that
  wakes up cannot overwrite the new leader's state; the dispatch ledger's entries carry
  the token of the term that wrote them and are appended only while it is the latest
  (:class:`aggregator.fence.FencedLedger`), so it cannot add books the new leader keeps
  already.
* **Members.** Every process notes what it received in ``{prefix}:members`` (one field
  each, JSON), for operators and tests.

This module knows nothing of the service: the lease loop decides, and the service asks
(:meth:`ScaleOut.leadership`, a :class:`Leadership` value each step); forwarding and
collecting pass :class:`Rows`; on a takeover the service resets and restores itself.

What is not fenced: MQTT publishes. A leader paused mid-step may, on waking, finish that
step's publishes before it sees that its lease is gone; setpoints carry a short
``valid_until`` and the next leader's supersede them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from aggregator.fence import Fence
from aggregator.lease import FencedOut, RedisLease, lease_keys
from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import DispatchRequest, Telemetry, VehicleStatus, from_epoch
from broker.replies import ReplyTo
from broker.settings import Settings
from core.errors import TransportError

START = "0-0"  # a stream id before every entry
READ_COUNT = 500  # stream entries per XREAD
READ_LIMIT = 20_000  # entries merged per control step at most; the rest wait a step
REDIS_TIMEOUT_S = 2.0


def shared_subscriptions(settings: Settings, subs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``subs`` with the vehicles' telemetry and status filters (own and bridges') moved
    onto the shared subscription ``$share/<group>/...``; unchanged if no group is set."""
    group = settings.share_group
    if not group:
        return subs
    t = settings.topics
    shared = {t.all_telemetry, t.all_vehicle_status, t.all_bridge_telemetry}
    return [(f"$share/{group}/{f}" if f in shared else f, q) for f, q in subs]


# -- the forwarded rows ----------------------------------------------------------------
@dataclass(slots=True)
class Rows:
    """What one process received in one step: reports as columns, in parts by the bridge
    that carried them ("" for vehicles that report for themselves), and statuses in the
    order they arrived."""

    parts: list[tuple[str, TelemetryArrays]] = field(default_factory=list)
    status_ids: list[str] = field(default_factory=list)
    status_online: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    status_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return sum(len(a) for _, a in self.parts) + len(self.status_ids)

    @classmethod
    def of(
        cls,
        telemetry: Sequence[Telemetry | TelemetryRow],
        status: Sequence[VehicleStatus],
        batches: Sequence[tuple[str, TelemetryArrays]],
    ) -> Rows:
        """A step's validated reports, statuses and bridges' batches as rows (one pass)."""
        rows = cls(parts=list(batches))
        if telemetry:
            rows.parts.insert(0, ("", TelemetryArrays.from_telemetry(list(telemetry))))
        if status:
            rows.status_ids = [s.vehicle_id for s in status]
            rows.status_online = np.fromiter((s.online for s in status), bool, len(status))
            rows.status_ts = np.fromiter(
                (s.ts.timestamp() for s in status), np.float64, len(status)
            )
        return rows

    def statuses(self) -> list[VehicleStatus]:
        """The statuses, as the models they arrived as."""
        return [
            VehicleStatus.model_construct(vehicle_id=v, online=bool(on), ts=from_epoch(ts))
            for v, on, ts in zip(
                self.status_ids, self.status_online.tolist(), self.status_ts.tolist(), strict=True
            )
        ]


def encode_rows(process: str, rows: Rows) -> dict[str, bytes]:
    """One stream entry: ids newline-joined, every other column as raw little-endian bytes."""
    parts = [a for _, a in rows.parts if len(a)]
    segments = [[b, len(a)] for b, a in rows.parts if len(a)]
    out: dict[str, bytes] = {
        "proc": process.encode(),
        "segs": json.dumps(segments).encode(),
        "s_ids": "\n".join(rows.status_ids).encode(),
        "s_on": rows.status_online.astype("u1").tobytes(),
        "s_ts": rows.status_ts.astype("<f8").tobytes(),
    }
    if parts:
        a = TelemetryArrays.concat(parts)
        out |= {
            "ids": "\n".join(a.vehicle_id).encode(),
            "seq": a.seq.astype("<i8").tobytes(),
            "ts": a.ts.astype("<f8").tobytes(),
            "plug": a.plugged_in.astype("u1").tobytes(),
        }
        out |= {f"v:{k}": v.astype("<f8").tobytes() for k, v in a.values.items()}
        if a.node is not None:  # extension (the grid): "" where a report names none
            out["node"] = "\n".join("" if n is None else n for n in a.node).encode()
    return out


def decode_rows(entry: dict[bytes, bytes]) -> Rows:
    """The inverse of :func:`encode_rows` (columns are copied out of the entry's bytes)."""
    rows = Rows()
    s_ids = entry.get(b"s_ids", b"").decode()
    if s_ids:
        rows.status_ids = s_ids.split("\n")
        rows.status_online = np.frombuffer(entry[b"s_on"], "u1").astype(bool)
        rows.status_ts = np.frombuffer(entry[b"s_ts"], "<f8").astype(np.float64)
    segments: list[list[Any]] = json.loads(entry.get(b"segs", b"[]"))
    if not segments:
        return rows
    ids = entry[b"ids"].decode().split("\n")
    seq = np.frombuffer(entry[b"seq"], "<i8").astype(np.int64)
    ts = np.frombuffer(entry[b"ts"], "<f8").astype(np.float64)
    plug = np.frombuffer(entry[b"plug"], "u1").astype(bool)
    values = {
        k[2:].decode(): np.frombuffer(v, "<f8").astype(np.float64)
        for k, v in entry.items()
        if k.startswith(b"v:")
    }
    node_text = entry.get(b"node")
    nodes: list[str | None] | None = None
    if node_text is not None:
        nodes = [n or None for n in node_text.decode().split("\n")]
    start = 0
    for bridge, n in segments:
        end = start + int(n)
        part_nodes = None if nodes is None else nodes[start:end]
        rows.parts.append(
            (
                str(bridge),
                TelemetryArrays(
                    vehicle_id=ids[start:end],
                    seq=seq[start:end],
                    ts=ts[start:end],
                    plugged_in=plug[start:end],
                    values={k: v[start:end] for k, v in values.items()},
                    node=part_nodes if part_nodes and any(part_nodes) else None,
                ),
            )
        )
        start = end
    return rows


# -- the coordinator --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Leadership:
    """This process's role for one control step, as the lease decided it."""

    is_leader: bool
    term: int | None = None  # the fencing token of this term, while leading
    took_over: bool = False  # leads now, not at the last step: restore before stepping


@dataclass(slots=True)
class Held:
    """Requests and cancels a follower kept, handed to it when it takes over."""

    requests: list[tuple[DispatchRequest, ReplyTo | None]]
    cancels: list[tuple[str, ReplyTo | None]]


@dataclass(slots=True)
class ScaleStats:
    forwarded_rows: int = 0
    forwarded_entries: int = 0
    forward_failures: int = 0
    merged_rows: int = 0
    merged_entries: int = 0
    promotions: int = 0
    demotions: int = 0
    fenced: int = 0


class ScaleOut:
    """One aggregator process's part in a scaled-out group: its lease, its forwarding and
    (while it leads) its collecting. ``run()`` as a task; before each control step the
    service asks :meth:`leadership`, then a follower calls :meth:`hold` and
    :meth:`forward`, a leader :meth:`collect` (and, taking over, :meth:`promoted`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        holder: str,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.settings = settings
        self.log = logger or structlog.get_logger("aggregator.scaleout")
        self.holder = holder
        prefix = settings.redis_prefix
        self.redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        self.lease = RedisLease(
            self.redis, prefix=prefix, holder=holder, ttl_s=settings.lease_ttl_s
        )
        # What the leader alone may write (the snapshot, the ledger) goes through this.
        self.fence = Fence(
            self.redis,
            token_key=self.lease.token_key,
            holder=holder,
            term=lambda: self.lease.token,
            on_fenced=self.fenced_out,
            logger=self.log,
            timeout_s=REDIS_TIMEOUT_S * 2,
        )
        self.stream_key = f"{prefix}:ingest"
        self.members_key = f"{prefix}:members"
        self.cursor = START  # the last stream entry merged
        self.saved_cursor = START  # the cursor before the latest merge: what snapshots record
        self.leading = False
        self.stats = ScaleStats()
        step_wall = settings.control_step_s / settings.speed
        # Requests and cancels a follower keeps for a takeover: those that may have
        # reached a leader that died before its snapshot recorded them.
        self._hold_s = settings.lease_ttl_s + 3.0 * step_wall
        self._held: deque[tuple[float, tuple[DispatchRequest | str, ReplyTo | None]]] = deque(
            maxlen=10_000
        )
        self._poll_s = max(0.05, min(settings.lease_ttl_s / 3.0, step_wall / 2.0))
        self._last_warning = 0.0
        self.received_telemetry = 0  # reports this process took off the broker

    # -- the lease --------------------------------------------------------------------
    async def run(self) -> None:
        """Hold or seek the lease, and note this process in the members hash, until
        cancelled. Redis trouble is logged (at most every 5 s) and retried."""
        lease = self.lease
        while True:
            try:
                if lease.token is not None:
                    if not await lease.renew():
                        self.log.warning("leader_lease_lost", holder=self.holder)
                else:
                    token = await lease.acquire()
                    if token is not None:
                        self.log.info("leader_lease_acquired", holder=self.holder, token=token)
                await self._note_member()
            except TransportError as err:
                now = time.monotonic()
                if now - self._last_warning >= 5.0:
                    self._last_warning = now
                    self.log.warning("leader_lease_error", holder=self.holder, error=str(err))
            if lease.token is not None:
                await asyncio.sleep(lease.ttl_s / 3.0)
            else:  # try again as the holder's lease runs out, or at the next poll
                await asyncio.sleep(min(self._poll_s, lease.free_in + 0.005))

    async def _note_member(self) -> None:
        entry = {
            "received": self.received_telemetry,
            "forwarded": self.stats.forwarded_rows,
            "merged": self.stats.merged_rows,
            "leader": self.leading,
            "token": self.lease.token,
            "wall": time.time(),
        }
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(self.members_key, self.holder, json.dumps(entry))
                    pipe.pexpire(self.members_key, round(self.settings.share_retention_s * 1e3))
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as err:
            raise TransportError(f"noting this process in {self.members_key}: {err}") from err

    def fenced_out(self, err: FencedOut) -> None:
        """A write was refused: a newer leader exists, whatever our lease says."""
        self.stats.fenced += 1
        self.lease.token = self.lease.value = None
        self.lease.valid_until = 0.0
        self.log.error("leader_fenced_out", holder=self.holder, error=str(err))

    async def close(self, *, release: bool = True) -> None:
        """Give the lease up (the next leader need not wait for it to expire) and close."""
        try:
            if release and self.lease.token is not None:
                await self.lease.release()
        except TransportError as err:
            self.log.warning("leader_lease_release_failed", error=str(err))
        finally:
            await self.redis.aclose()

    # -- the control step -------------------------------------------------------------
    def leadership(self) -> Leadership:
        """This process's role for the coming control step, as the lease decides it. A
        leader that was not one at the last step is taking over: the service restores
        itself, then calls :meth:`promoted`."""
        held = self.lease.held
        if not held and self.leading:
            self.leading = False
            self.stats.demotions += 1
            self.log.warning("leader_stepped_down", holder=self.holder)
        token = self.lease.token
        if not held or token is None:
            return Leadership(is_leader=False)
        return Leadership(is_leader=True, term=token, took_over=not self.leading)

    def resume(self, cursor: str | None) -> None:
        """Read the forwarded rows on from ``cursor`` (a restored snapshot's; None: from
        the start of the stream)."""
        self.cursor = self.saved_cursor = cursor or START

    def promoted(self, *, vehicles: int, dispatches: int, restore_ms: float) -> Held:
        """Note that this process now leads, restored from the last leader's snapshot.
        Returns the requests and cancels held for a takeover: those that reached the old
        leader and may have died with it (submitting one it had already taken gets its
        answer again, not a second dispatch)."""
        horizon = time.monotonic() - self._hold_s
        held = [item for at, item in self._held if at >= horizon]
        self._held.clear()
        self.leading = True
        self.stats.promotions += 1
        self.log.info(
            "leader_promoted",
            holder=self.holder,
            token=self.lease.token,
            vehicles=vehicles,
            dispatches=dispatches,
            held_requests=len(held),
            cursor=self.cursor,
            restore_ms=restore_ms,
        )
        return Held(
            requests=[(r, reply) for r, reply in held if isinstance(r, DispatchRequest)],
            cancels=[(r, reply) for r, reply in held if isinstance(r, str)],
        )

    def hold(
        self,
        requests: Sequence[tuple[DispatchRequest, ReplyTo | None]],
        cancels: Sequence[tuple[str, ReplyTo | None]],
    ) -> None:
        """A follower's step: keep the requests and cancels it got, for a takeover."""
        now = time.monotonic()
        self._held.extend((now, r) for r in requests)
        self._held.extend((now, c) for c in cancels)
        while self._held and self._held[0][0] < now - self._hold_s:
            self._held.popleft()

    async def forward(self, rows: Rows) -> None:
        """A follower's step: what it received, as one stream entry, to the leader."""
        now = time.monotonic()
        self.received_telemetry += sum(len(a) for _, a in rows.parts)
        if not len(rows):
            return
        fields = encode_rows(self.holder, rows)
        keep_ms = round(self.settings.share_retention_s * 1e3)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(
                        self.stream_key,
                        fields,  # type: ignore[arg-type]
                        minid=f"{int(time.time() * 1e3) - keep_ms}-0",
                        approximate=True,
                    )
                    pipe.pexpire(self.stream_key, keep_ms)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as err:
            self.stats.forward_failures += 1
            if now - self._last_warning >= 5.0:
                self._last_warning = now
                self.log.warning(
                    "forward_failed",
                    error=str(err) or type(err).__name__,
                    rows=len(rows),
                    note="the vehicles report again next interval",
                )
            return
        self.stats.forwarded_rows += len(rows)
        self.stats.forwarded_entries += 1

    async def collect(self, received: int) -> Rows:
        """At the start of a leader's step: the rows the other processes forwarded since
        the last step. ``received``: the reports the leader itself took off the broker."""
        self.received_telemetry += received
        self.saved_cursor = self.cursor  # at least once: a replayed report is just stale
        return await self._read()

    async def _read(self) -> Rows:
        """Every stream entry after the cursor (up to READ_LIMIT), as one Rows."""
        out = Rows()
        sids: list[list[str]] = []
        son: list[np.ndarray] = []
        sts: list[np.ndarray] = []
        read = 0
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S * 2):
                while read < READ_LIMIT:
                    got: Any = await self.redis.xread(
                        {self.stream_key: self.cursor}, count=READ_COUNT
                    )
                    entries: list[tuple[bytes, dict[bytes, bytes]]] = got[0][1] if got else []
                    for entry_id, entry in entries:
                        rows = decode_rows(entry)
                        out.parts.extend(rows.parts)
                        sids.append(rows.status_ids)
                        son.append(rows.status_online)
                        sts.append(rows.status_ts)
                        self.stats.merged_rows += len(rows)
                        self.cursor = entry_id.decode()
                    read += len(entries)
                    if len(entries) < READ_COUNT:
                        break
        except (RedisError, OSError, TimeoutError) as err:
            now = time.monotonic()
            if now - self._last_warning >= 5.0:
                self._last_warning = now
                self.log.warning("merge_read_failed", error=str(err) or type(err).__name__)
        self.stats.merged_entries += read
        if sids:
            out.status_ids = [v for ids in sids for v in ids]
            out.status_online = np.concatenate(son)
            out.status_ts = np.concatenate(sts)
        return out


def scale_keys(prefix: str) -> dict[str, str]:
    """Every Redis key a scaled-out group uses, by role (for docs, tests and cleanup)."""
    lease, token = lease_keys(prefix)
    return {
        "fleet": f"{prefix}:fleet",
        "lease": lease,
        "token": token,
        "ingest": f"{prefix}:ingest",
        "members": f"{prefix}:members",
    }
