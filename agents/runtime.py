"""The agents' MQTT runtime: a simulated fleet that reports telemetry and obeys setpoints.

Two ways to connect, as real fleets do:

* ``per-vehicle``: one MQTT connection per vehicle, each with its own last will; realistic,
  and right for small fleets.
* ``multiplexed``: a few connections carry many vehicles' topics, as an OEM telematics
  bridge does. A dropped bridge has no per-vehicle will: the aggregator notices the
  silence (stale telemetry) instead.

  With ``batch=True`` each connection is a bridge that sends its vehicles' telemetry as
  one ``TelemetryBatch`` per interval on ``v2g/bridges/{bridge_id}/telemetry`` (split
  at ``MAX_BATCH_VEHICLES``) and takes their setpoints as ``SetpointBatch`` messages on
  ``v2g/bridges/{bridge_id}/setpoints`` (and still one by one, from an aggregator that
  does not know the bridge yet). The bridge id is the connection's client id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Literal

import aiomqtt
import numpy as np
import structlog
from numpy.typing import NDArray
from pydantic import ValidationError

from agents.fleet import SimFleet
from agents.telemetry import status_payload, telemetry_batch_payloads, telemetry_payloads
from broker.clientid import client_id
from broker.link import MqttLink, Outgoing
from broker.models import Setpoint, SetpointBatch, to_epoch
from broker.settings import Settings
from core.clock import Clock, raise_if_cancelled
from core.errors import TransportError

Mode = Literal["per-vehicle", "multiplexed"]
# A change of power larger than this is reported at once, not at the next interval.
REPORT_ON_CHANGE_KW = 0.01


class AgentRuntime:
    """Runs a :class:`SimFleet` against a broker until cancelled."""

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Clock,
        fleet: SimFleet,
        mode: Mode = "per-vehicle",
        connections: int = 4,
        client_prefix: str | None = None,
        batch: bool = False,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """``batch``: multiplexed connections act as bridges and send batched telemetry.

        Client ids (broker/clientid.py): ``{topic prefix}-{vehicle_id}`` per vehicle, and
        ``{topic prefix}-{bridge_id}`` per bridge, a bridge named after the fleet's first
        vehicle (``ev-0000-mux0``), so two agent processes with their own vehicles never
        share one. ``client_prefix`` replaces the topic prefix in them (and names the
        bridges ``{client_prefix}-mux{j}``)."""
        if mode not in ("per-vehicle", "multiplexed"):
            raise ValueError(f"mode must be per-vehicle or multiplexed, got {mode!r}")
        if batch and mode != "multiplexed":
            raise ValueError("batched telemetry needs mode multiplexed (a bridge per connection)")
        self.batch = batch
        self.settings = settings
        self.clock = clock
        self.fleet = fleet
        self.mode = mode
        self.topics = settings.topics
        self.log = logger or structlog.get_logger("agents")
        self.rejected: Counter[str] = Counter()
        self.setpoints_received = 0
        self.setpoints_applied = 0
        self._issued = np.full(len(fleet.ids), -np.inf)  # issued_at of the last one applied
        self.react_wall_s = 0.05
        self._heard = asyncio.Event()
        self.ticks = 0
        t = self.topics
        head = client_prefix or settings.topic_prefix
        if mode == "per-vehicle":
            self.links = [
                MqttLink(
                    settings=settings,
                    client_id=client_id(head, vid),
                    handler=self.on_message,
                    subscriptions=[(t.setpoint(vid), 1)],
                    will=self._will_of(vid),
                    birth=self._birth_of([vid]),
                    logger=self.log,
                )
                for vid in fleet.ids
            ]
            self._link_of = list(range(len(fleet.ids)))
            self.bridge_ids: list[str] = []
        else:
            k = max(1, min(connections, len(fleet.ids) or 1))
            self._link_of = [i % k for i in range(len(fleet.ids))]
            stem = client_prefix or (fleet.ids[0][:56] if fleet.ids else "agents")
            self.bridge_ids = [f"{stem}-mux{j}" for j in range(k)]
            self.links = [
                MqttLink(
                    settings=settings,
                    client_id=self.bridge_ids[j] if client_prefix else client_id(head, bid),
                    handler=self.on_message,
                    subscriptions=[
                        *([(t.all_setpoints, 1)] if j == 0 else []),
                        *([(t.bridge_setpoints(bid), 1)] if batch else []),
                    ],
                    birth=self._birth_of(fleet.ids[j::k]),
                    logger=self.log,
                )
                for j, bid in enumerate(self.bridge_ids)
            ]
        self._link_rows = np.array(self._link_of, dtype=np.intp)

    def _will_of(self, vid: str) -> Callable[[], Outgoing]:
        # Made at each connect, so the will carries the time of the connection it guards.
        def will() -> Outgoing:
            return Outgoing(
                self.topics.vehicle_status(vid),
                status_payload(vid, False, self.clock.now()),
                1,
                True,
            )

        return will

    def _birth_of(self, ids: list[str]) -> Callable[[], list[Outgoing]]:
        def birth() -> list[Outgoing]:
            now = self.clock.now()
            return [
                Outgoing(self.topics.vehicle_status(v), status_payload(v, True, now), 1, True)
                for v in ids
            ]

        return birth

    def on_message(self, message: aiomqtt.Message) -> None:
        """A setpoint for one of our vehicles: validate it and hand it to the fleet."""
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        topic = str(message.topic)
        if self.batch and topic.endswith("/setpoints"):
            self._on_setpoint_batch(topic, bytes(payload))
            return
        try:
            sp = Setpoint.model_validate_json(payload)
        except ValidationError as err:
            self.rejected["schema"] += 1
            self.log.warning(
                "setpoint_rejected", topic=topic[:120], error=str(err.errors()[0].get("msg"))
            )
            return
        if topic != self.topics.setpoint(sp.vehicle_id):
            self.rejected["identity"] += 1
            return
        index = self.fleet.index.get(sp.vehicle_id)
        if index is None:
            return  # another agent process's vehicle
        self.setpoints_received += 1
        # QoS 1 may deliver a setpoint twice, and a persistent session may hand over old
        # ones after an outage: apply each at most once, and never one older than the
        # order in force (it would undo it). A newer one that is already over still
        # counts: it ends the order in force (that is how a release is sent).
        issued, until = to_epoch(sp.issued_at), to_epoch(sp.valid_until)
        if issued <= self._issued[index]:
            self.rejected["superseded"] += 1
            return
        self._issued[index] = issued
        self.setpoints_applied += 1
        self.fleet.set_setpoint(index, sp.power_kw, until)
        self._heard.set()

    def _on_setpoint_batch(self, topic: str, payload: bytes) -> None:
        """A bridge's setpoints: the same rules as one by one (each applied at most once,
        never one older than the order in force), vectorised over the batch."""
        try:
            sb = SetpointBatch.model_validate_json(payload)
        except ValidationError as err:
            self.rejected["schema"] += 1
            self.log.warning(
                "setpoint_rejected", topic=topic[:120], error=str(err.errors()[0].get("msg"))
            )
            return
        if topic != self.topics.bridge_setpoints(sb.bridge_id) or sb.bridge_id not in (
            self.bridge_ids
        ):
            self.rejected["identity"] += 1
            return
        got = list(map(self.fleet.index.get, sb.vehicle_id))
        mine = np.array([i is not None for i in got], dtype=bool)
        index = np.array([i for i in got if i is not None], dtype=np.intp)
        power = np.array(sb.power_kw)[mine]
        until = np.array(sb.valid_until)[mine]
        issued = to_epoch(sb.issued_at)
        self.setpoints_received += int(index.size)
        # A newer setpoint that is already over still counts: it ends the order in force
        # (that is how a release is sent), as one by one.
        superseded = issued <= self._issued[index]
        if superseded.any():
            self.rejected["superseded"] += int(superseded.sum())
        ok = ~superseded
        if not ok.any():
            return
        index = index[ok]
        self._issued[index] = issued
        self.setpoints_applied += int(index.size)
        self.fleet.setpoint_kw[index] = power[ok]
        self.fleet.setpoint_until[index] = until[ok]
        self._heard.set()

    async def run(self) -> None:
        """Connect every link, then tick and report until cancelled; go offline cleanly."""
        ids = [link.client_id for link in self.links]
        where = self.settings.deployment()
        self.log.info(
            "deployment",
            role="agents",
            broker=where["broker"],
            topic_prefix=where["topic_prefix"],
            client_ids=ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]} ({len(ids)})",
        )
        async with asyncio.TaskGroup() as tg:
            for i, link in enumerate(self.links):
                tg.create_task(link.run(), name=f"agent-link-{i}")
            tg.create_task(self._react_loop(), name="agent-react")
            tg.create_task(self._summary_loop(), name="agent-summary")
            try:
                await self._tick_loop()
            finally:
                # The links are still up here; the task group closes them after this.
                await self._say_offline()

    def summary(self) -> dict[str, int]:
        """What the fleet is doing, as counts: how many are plugged in, how many follow a
        setpoint in force (the rest charge on their baseline), and since the start how
        many departed, left early and left short of what plain charging would have given."""
        f = self.fleet
        return {
            "vehicles": len(f),
            "plugged": int(f.plugged.sum()),
            "following": int((f.plugged & (f.now < f.setpoint_until)).sum()),
            "departed": f.departed,
            "left_early": f.left_early,
            "drivers_short": f.short,
            "setpoints_applied": self.setpoints_applied,
            "setpoints_rejected": sum(self.rejected.values()),
        }

    async def _summary_loop(self) -> None:
        """Log :meth:`summary` every ``summary_every_wall_s`` wall seconds: a running fleet
        says what it does without anyone subscribing to its telemetry."""
        while True:
            await asyncio.sleep(self.settings.summary_every_wall_s)
            self.log.info("agents_summary", **self.summary())

    async def _react_loop(self) -> None:
        """Act on new setpoints within ~50 ms, as a charger does, not at the next report,
        and report at once the vehicles whose power changed (report on change), so the
        aggregator's meter knows when each change happened.

        Setpoints that arrive together are applied together: one vectorised tick per burst.
        """
        while True:
            await self._heard.wait()
            await asyncio.sleep(self.react_wall_s)
            self._heard.clear()
            before = self.fleet.power.copy()
            now = self._advance(self.clock.now())
            changed = np.flatnonzero(np.abs(self.fleet.power - before) > REPORT_ON_CHANGE_KW)
            if changed.size:
                await self._publish_telemetry(now, changed)

    def _advance(self, now: float) -> float:
        now = max(now, self.fleet.now)  # the wall clock may step back a little
        dep = self.fleet.tick(now)
        if dep.short:
            self.log.warning(
                "drivers_short", count=dep.short, vehicles=",".join(dep.short_ids[:20])
            )
        return now

    async def _tick_loop(self) -> None:
        timeout = self.settings.publish_timeout_s * 3
        await asyncio.gather(*(link.wait_connected(timeout) for link in self.links))
        self.log.info(
            "agents_connected",
            vehicles=len(self.fleet),
            mode=self.mode,
            links=len(self.links),
            misbehaving=int(self.fleet.faults.misbehaving().sum()),
        )
        interval = self.settings.telemetry_interval_s
        next_t = self.clock.now()
        while True:
            await self.tick(self.clock.now())
            raise_if_cancelled()
            next_t += interval
            now = self.clock.now()
            if next_t < now:
                next_t = now
            await self.clock.sleep(next_t - now)

    async def tick(self, now: float) -> None:
        """Advance the fleet to ``now`` and publish every vehicle's telemetry."""
        now = self._advance(now)
        self.ticks += 1
        await self._publish_telemetry(now, np.arange(len(self.fleet)))

    async def _publish_telemetry(self, now: float, rows: NDArray[np.intp]) -> None:
        t = self.topics
        per_link: list[list[Outgoing]] = [[] for _ in self.links]
        if self.batch:
            of_link = self._link_rows[rows]
            for j, bridge_id in enumerate(self.bridge_ids):
                mine = rows[of_link == j]
                if mine.size:
                    per_link[j] = [
                        Outgoing(t.bridge_telemetry(bridge_id), body, qos=0)
                        for body in telemetry_batch_payloads(self.fleet, now, mine, bridge_id)
                    ]
            await self._publish_per_link(per_link)
            return
        payloads = telemetry_payloads(self.fleet, now, rows)
        ids = self.fleet.ids
        for i, body in zip(rows.tolist(), payloads, strict=True):
            per_link[self._link_of[i]].append(Outgoing(t.telemetry(ids[i]), body, qos=0))
        await self._publish_per_link(per_link)

    async def _publish_per_link(self, per_link: list[list[Outgoing]]) -> None:
        await asyncio.gather(
            *(
                link.publish_many(msgs)
                for link, msgs in zip(self.links, per_link, strict=True)
                if msgs
            )
        )

    async def _say_offline(self) -> None:
        """A clean disconnect suppresses the will, so say offline explicitly."""
        now = self.clock.now()
        t = self.topics
        for link, ids in self._ids_per_link():
            if not link.connected:
                continue
            msgs = [
                Outgoing(t.vehicle_status(v), status_payload(v, False, now), 1, True) for v in ids
            ]
            with contextlib.suppress(TimeoutError, TransportError):
                async with asyncio.timeout(5.0):
                    await link.publish_many(msgs)

    def _ids_per_link(self) -> list[tuple[MqttLink, list[str]]]:
        groups: list[list[str]] = [[] for _ in self.links]
        for i, vid in enumerate(self.fleet.ids):
            groups[self._link_of[i]].append(vid)
        return list(zip(self.links, groups, strict=True))
