"""Two aggregators share the telemetry on an MQTT 5 shared subscription and one of them
leads (a Redis lease with fencing tokens). Killed (kill -9) mid-dispatch, the leader is
replaced within the lease TTL plus two control steps by the other, restored from the
snapshot in Redis, and the dispatch goes on on target. Frozen (SIGSTOP) past its lease,
the leader is replaced the same way, and when it wakes it steps down: its token is
stale, so Redis refuses its writes.

Both aggregators are real ``v2g aggregator`` processes with ``V2G_SHARE_GROUP`` on the
test's own Mosquitto and Redis; the fleet runs in the test (multiplexed connections) on
the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from agents.fleet import SimFleet
from agents.runtime import AgentRuntime
from aggregator.lease import FencedOut, fenced_hset
from aggregator.scaleout import scale_keys
from broker.models import DispatchRequest, FleetStatus, to_epoch
from broker.settings import Settings
from core.clock import SimClock
from tests.support.figures import Recorder
from tests.support.harness import SIM_START, make_fleet
from tests.support.loop import on_target, request, spy
from tests.support.processes import aggregator_env, aggregator_process

pytestmark = pytest.mark.integration

GROUP = "aggregators"
LEASE_TTL_S = 2.0  # wall
DURATION_S = 600.0  # simulated: long enough to outlast the takeover
VEHICLES = 30


@dataclass
class Pair:
    """Two aggregator processes of one share group, a fleet, and what the test sees."""

    cfg: Settings
    clock: SimClock
    fleet: SimFleet
    names: dict[str, str]
    logs: dict[str, Path]
    redis: aioredis.Redis
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    statuses: asyncio.Queue[tuple[float, FleetStatus]] = field(default_factory=asyncio.Queue)

    @property
    def keys(self) -> dict[str, str]:
        return scale_keys(self.cfg.redis_prefix)

    @property
    def step_wall(self) -> float:
        return self.cfg.control_step_s / self.cfg.speed

    def tails(self) -> str:
        return "\n".join(
            f"--- {k}:\n{p.read_text(errors='replace')[-2500:]}" for k, p in self.logs.items()
        )

    def drain(self) -> None:
        while not self.statuses.empty():
            self.statuses.get_nowait()

    async def status_where(
        self, what: str, ok: Callable[[FleetStatus], bool], timeout: float = 20.0
    ) -> tuple[float, FleetStatus]:
        """(monotonic arrival, status) of the first fleet status from now on where ``ok``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    at, s = await self.statuses.get()
                    if ok(s):
                        return at, s
        except TimeoutError:
            print(self.tails())
            pytest.fail(f"no fleet status with {what} within {timeout} s")

    async def lease(self) -> tuple[str | None, int]:
        """(the process holding the lease, "a" or "b" or None; the latest token issued)."""
        value, token = await self.redis.mget(self.keys["lease"], self.keys["token"])
        text = value.decode() if value else ""
        who = next((k for k, v in self.names.items() if text.startswith(f"{v}|")), None)
        return who, int(token or 0)

    async def members(self) -> dict[str, dict[str, Any]]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.keys["members"])  # type: ignore[misc]
        by_name = {v: k for k, v in self.names.items()}
        return {by_name[k.decode()]: json.loads(v) for k, v in raw.items()}

    async def statuses_per_step(self, seconds: float = 3.0) -> float:
        """Fleet statuses per control step over ``seconds``: 1 with one leader, 2 with two."""
        self.drain()
        await asyncio.sleep(seconds)
        return self.statuses.qsize() * self.step_wall / seconds

    async def takeover(self, by: str, timeout: float) -> tuple[float, int]:
        """Wait until ``by`` holds the lease; (seconds waited, its token)."""
        t0 = time.monotonic()
        async with asyncio.timeout(timeout):
            while True:
                who, token = await self.lease()
                if who == by:
                    return time.monotonic() - t0, token
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_aggregators(cfg: Settings, tid: str, tmp_path: Path) -> AsyncIterator[Pair]:
    wall_anchor = time.time()
    clock = SimClock(speed=cfg.speed, wall_anchor=wall_anchor, sim_anchor=SIM_START)
    fleet = make_fleet(cfg, clock, count=VEHICLES, seed=7)
    agents = AgentRuntime(
        settings=cfg,
        clock=clock,
        fleet=fleet,
        mode="multiplexed",
        connections=2,
        client_prefix=f"ftest-{tid}-ev",
    )
    env = aggregator_env(cfg, wall_anchor) | {
        "V2G_SHARE_GROUP": GROUP,
        "V2G_LEASE_TTL_S": str(LEASE_TTL_S),
    }
    names = {"a": f"agg-a-{tid}", "b": f"agg-b-{tid}"}
    logs = {k: tmp_path / f"aggregator-{k}.log" for k in names}
    r = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    pair = Pair(cfg, clock, fleet, names, logs, r)
    agents_task = asyncio.create_task(agents.run(), name="agents")
    try:
        async with (
            spy(cfg, cfg.topics.fleet_status) as events,
            aggregator_process(env | {"V2G_CLIENT_ID": names["a"]}, logs["a"]) as proc_a,
            aggregator_process(env | {"V2G_CLIENT_ID": names["b"]}, logs["b"]) as proc_b,
        ):
            pair.procs = {"a": proc_a, "b": proc_b}

            async def sort_events() -> None:
                while True:
                    ev = await events.get()
                    if ev.payload:
                        s = FleetStatus.model_validate_json(ev.payload)
                        pair.statuses.put_nowait((time.monotonic(), s))

            sorter = asyncio.create_task(sort_events())
            try:
                yield pair
            finally:
                sorter.cancel()
                for proc in pair.procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(18)  # SIGCONT: a frozen process must be able to die
    finally:
        agents_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10.0):
                await agents_task
        await r.aclose()


async def start_dispatch(pair: Pair, rid: str) -> float:
    """All vehicles online, then a discharge at half the fleet's capability, on target."""
    n = len(pair.fleet)
    _, s0 = await pair.status_where(
        f"all {n} vehicles online", lambda s: s.vehicles_online == n and s.capability
    )
    assert s0.capability is not None
    power = round(0.5 * s0.capability.min_power_kw, 1)
    assert power < -20.0, f"no export capability to test with: {s0.capability}"
    answer = await request(
        pair.cfg, DispatchRequest(request_id=rid, power_kw=power, duration_s=DURATION_S)
    )
    assert answer.status == "accepted", answer
    await pair.status_where(f"power on {power} kW", lambda s: on_target(s.power_kw, power))
    return power


def back_on_target(n: int, rid: str, power: float) -> Callable[[FleetStatus], bool]:
    return lambda s: (
        s.vehicles_online == n
        and [d.request_id for d in s.dispatches] == [rid]
        and on_target(s.power_kw, power)
    )


async def test_two_aggregators_share_telemetry_one_leads_and_the_other_takes_over_on_kill(
    settings: Settings,
    test_id: str,
    tmp_path: Path,
    figure: Recorder,
) -> None:
    rid = f"scale-{test_id}"
    budget_s = LEASE_TTL_S + 2 * settings.control_step_s / settings.speed
    async with two_aggregators(settings, test_id, tmp_path) as pair:
        n = len(pair.fleet)
        power = await start_dispatch(pair, rid)
        leader, old_token = await pair.lease()
        assert leader is not None, "no leader holds the lease"
        follower = "b" if leader == "a" else "a"
        # -- shared ingest, one leader ----------------------------------------------------
        per_step = await pair.statuses_per_step()
        seen = await pair.members()
        assert set(seen) == {"a", "b"}, seen
        got = {k: seen[k]["received"] for k in seen}
        total = sum(got.values())
        assert all(g > 0.15 * total for g in got.values()), f"telemetry not split: {got}"
        assert [k for k in seen if seen[k]["leader"]] == [leader], seen
        assert seen[follower]["forwarded"] > 0 and seen[leader]["merged"] > 0, seen
        assert per_step <= 1.3, f"{per_step:.2f} fleet statuses per control step: two leaders?"
        # -- kill -9 the leader -----------------------------------------------------------
        pair.drain()
        pair.procs[leader].kill()
        killed, killed_sim = time.monotonic(), pair.clock.now()
        await pair.procs[leader].wait()
        lease_s, new_token = await pair.takeover(follower, LEASE_TTL_S + 10.0)
        first_at, _ = await pair.status_where(
            "a status from the new leader", lambda s: to_epoch(s.ts) > killed_sim + 1e-3
        )
        back_at, back = await pair.status_where(
            f"{n} online, the dispatch restored, power on {power} kW",
            back_on_target(n, rid, power),
        )
        held = [(await pair.status_where("a status", lambda s: True))[1] for _ in range(4)]
        assert pair.procs[follower].returncode is None, pair.tails()
        # -- fencing: the dead leader's token no longer writes ------------------------------
        keys = pair.keys
        snap_token = await pair.redis.hget(keys["fleet"], "token")  # type: ignore[misc]
        with pytest.raises(FencedOut):
            await fenced_hset(
                pair.redis,
                token_key=keys["token"],
                key=keys["fleet"],
                token=old_token,
                mapping={"ids": "written-by-a-dead-leader"},
            )
        still: bytes | None = await pair.redis.hget(keys["fleet"], "ids")  # type: ignore[misc]

    first_s, back_s = first_at - killed, back_at - killed
    print(
        f"\nscale-out: telemetry split {got}; leader {leader} (token {old_token}) killed;"
        f" lease to {follower} after {lease_s:.2f} s (token {new_token}); first status"
        f" {first_s:.2f} s, on target again {back_s:.2f} s after the kill; {back.power_kw} kW"
        f" of {power}"
    )
    share = 100 * min(got.values()) / total
    figure("scale-out: telemetry share of the smaller process", share, "%", limit="> 15 %")
    figure("scale-out: leader kill -9 -> lease taken over", lease_s, "s wall")
    figure(
        "... -> first fleet status of the new leader",
        first_s,
        "s wall",
        limit=f"<= {budget_s:g} s (TTL + 2 steps)",
    )
    figure("... -> dispatch on target again (2 %)", back_s, "s wall")
    assert new_token > old_token, (old_token, new_token)
    assert int(snap_token or 0) == new_token, "the snapshot is not the new leader's"
    assert still is not None and still != b"written-by-a-dead-leader"
    assert first_s <= budget_s, f"takeover took {first_s:.2f} s > {budget_s} s"
    assert all(on_target(s.power_kw, power) for s in held), [s.power_kw for s in held]
    assert all([d.request_id for d in s.dispatches] == [rid] for s in held)


async def test_a_leader_frozen_past_its_lease_is_replaced_and_steps_down_when_it_wakes(
    settings: Settings,
    test_id: str,
    tmp_path: Path,
    figure: Recorder,
) -> None:
    rid = f"freeze-{test_id}"
    async with two_aggregators(settings, test_id, tmp_path) as pair:
        n = len(pair.fleet)
        power = await start_dispatch(pair, rid)
        leader, old_token = await pair.lease()
        assert leader is not None
        follower = "b" if leader == "a" else "a"
        pair.procs[leader].send_signal(19)  # SIGSTOP: a GC pause, a frozen VM
        lease_s, new_token = await pair.takeover(follower, LEASE_TTL_S + 10.0)
        await pair.status_where("a status from the new leader", lambda s: True)
        await asyncio.sleep(0.5)
        pair.procs[leader].send_signal(18)  # SIGCONT: it wakes up believing it leads
        woke = time.monotonic()
        # It must find out it lost, and the group must be back to one leader on target.
        for _ in range(200):  # 10 s
            if not (await pair.members())[leader]["leader"]:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"the woken leader did not step down:\n{pair.tails()}")
        stepped_down_s = time.monotonic() - woke
        await pair.status_where(
            f"{n} online, the dispatch restored, power on {power} kW",
            back_on_target(n, rid, power),
        )
        per_step = await pair.statuses_per_step()
        who, token = await pair.lease()
        snap_token = await pair.redis.hget(pair.keys["fleet"], "token")  # type: ignore[misc]
        log = pair.logs[leader].read_text(errors="replace")
        books = await pair.redis.xrange(f"{settings.redis_prefix}:ledger:{rid}")
        terms = [int(fields.get(b"term", b"0")) for _, fields in books]

    print(
        f"\nscale-out: leader {leader} frozen; lease to {follower} after {lease_s:.2f} s"
        f" (token {old_token} -> {new_token}); woken, it stepped down within"
        f" {stepped_down_s:.2f} s; {per_step:.2f} statuses per step afterwards"
    )
    figure("scale-out: frozen leader -> lease taken over", lease_s, "s wall")
    figure("... woken old leader -> stepped down", stepped_down_s, "s wall", limit="<= 1 lease TTL")
    assert new_token > old_token
    assert (who, token) == (follower, new_token), "the woken leader took the lease back"
    assert int(snap_token or 0) == new_token, "the woken leader's snapshot overwrote the new one"
    assert "leader_stepped_down" in log or "leader_fenced_out" in log
    assert per_step <= 1.3, f"{per_step:.2f} fleet statuses per control step: two leaders?"
    assert stepped_down_s <= LEASE_TTL_S
    # The ledger: every entry written by a leader's term, and none of the woken one's
    # after its successor's (its late entries are refused by Redis, not appended).
    assert old_token in terms and new_token in terms, terms
    assert terms == sorted(terms), f"an old term's books came after a newer one's: {terms}"
