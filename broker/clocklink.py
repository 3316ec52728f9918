"""The platform clock on the bus: read the fleet's retained anchor on ``{prefix}/clock``,
settle on a clock, log it, and keep the anchor fresh while the process runs.

The rules (adopt, create, explicit settings that disagree, ties) are pure, in
core/clock.py; this module only moves the anchor over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiomqtt
import structlog
from pydantic import ValidationError

from broker import clientid
from broker.link import MqttLink
from broker.models import ClockAnchor, from_epoch
from broker.settings import Settings
from core.clock import Anchor, Given, Settled, SimClock, raise_if_cancelled, reconcile, settle
from core.errors import PublishRefused, TransportError, V2GError

log = structlog.get_logger("clock")

# An anchor not refreshed for this many refresh periods is from a fleet that stopped.
STALE_PERIODS = 3.0


@dataclass(frozen=True, slots=True)
class SharedClock:
    """The clock a process runs on, how it was settled, and its settings with the
    clock's speed (adopted from the fleet when the process gave none)."""

    clock: SimClock
    settled: Settled
    settings: Settings


def explicit(settings: Settings) -> Given:
    """The clock settings given by flag or ``V2G_*`` variable (None: not given)."""
    given = settings.model_fields_set
    return Given(
        speed=settings.speed if "speed" in given else None,
        sim_start=settings.sim_start if "sim_start" in given else None,
        wall_anchor=settings.clock_anchor if "clock_anchor" in given else None,
    )


def is_stale(anchor: ClockAnchor, *, wall_now: float, refresh_s: float) -> bool:
    """True if no process has refreshed ``anchor`` for STALE_PERIODS refresh periods."""
    return wall_now - anchor.refreshed_at.timestamp() > STALE_PERIODS * refresh_s


@dataclass(slots=True)
class _Seen:
    """The latest retained anchor on the topic (None: none, or cleared)."""

    anchor: ClockAnchor | None = None
    any: asyncio.Event = field(default_factory=asyncio.Event)  # one has come since start
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # one came since cleared


@contextlib.asynccontextmanager
async def shared_clock(
    settings: Settings, *, client_id: str | None = None, create: bool = True
) -> AsyncIterator[SharedClock]:
    """Settle this process's clock on the fleet's anchor and log it.

    The clock link has a connection of its own, ``client_id`` (default
    ``{prefix}-clock-{host}-{pid}``, broker/clientid.py: never a main link's id).

    ``create``: this process starts (part of) a fleet, so with no anchor on the bus it
    creates one, and while the block runs it re-publishes the anchor it runs on every
    ``clock_refresh_s``. Without ``create`` (a command that only reads the clock) the
    connection closes when the block ends and nothing is published.
    """
    topic = settings.topics.clock
    seen = _Seen()
    if client_id is None:
        client_id = clientid.client_id(settings.topic_prefix, "clock", per_process=True)

    def handler(m: aiomqtt.Message) -> None:
        if str(m.topic) != topic:
            return
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else b""
        if not payload:
            seen.anchor = None
        else:
            try:
                seen.anchor = ClockAnchor.model_validate_json(payload)
            except ValidationError as err:
                log.warning("clock_anchor_invalid", topic=topic, error=str(err)[:200])
                return
        seen.any.set()
        seen.changed.set()

    link = MqttLink(
        settings=settings, client_id=client_id, handler=handler, subscriptions=[(topic, 1)]
    )
    async with link.running(settings.publish_timeout_s, name="clock-mqtt"):
        clock, settled, keeper = await _settle(link, seen, settings, client_id, create)
        try:
            yield SharedClock(
                clock, settled, settings.model_copy(update={"speed": settled.anchor.speed})
            )
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError, V2GError):
                    await keeper


async def _settle(
    link: MqttLink, seen: _Seen, settings: Settings, client_id: str, create: bool
) -> tuple[SimClock, Settled, asyncio.Task[None] | None]:
    """:func:`shared_clock`'s start, on a connected ``link``: the clock, how it was settled,
    and the task that keeps the anchor fresh on the bus (None: this process does not)."""
    topic = settings.topics.clock
    # A retained anchor arrives right after the subscription; none: wait it out.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settings.clock_wait_s):
            await seen.any.wait()
    wall = time.time()
    fleet = seen.anchor
    if fleet is not None and is_stale(fleet, wall_now=wall, refresh_s=settings.clock_refresh_s):
        log.info(
            "clock_anchor_stale",
            topic=topic,
            anchor=fleet.anchor.describe(),
            refreshed_at=fleet.refreshed_at.isoformat(),
            note="no process has kept it fresh: its fleet has stopped; starting a new clock",
        )
        fleet = None
    given = explicit(settings)
    settled = settle(None if fleet is None else fleet.anchor, given, now=wall, create=create)
    clock = settled.anchor.clock()
    _log_clock(settled, clock, topic, fleet)
    keeper = None
    if settled.publish:
        # The anchor keeps naming the process that created it.
        set_by = fleet.set_by if fleet is not None and fleet.set_by else client_id
        try:
            await _publish(link, topic, settled.anchor, set_by)
        except PublishRefused as err:  # e.g. a vehicle's login under the ACL
            log.warning(
                "clock_anchor_not_published",
                topic=topic,
                error=str(err)[:200],
                note="this process runs on the clock but cannot share it; start the"
                " aggregator first so the others adopt its clock",
            )
        else:
            keeper = asyncio.create_task(
                _keep(link, topic, settled.anchor, clock, seen, settings, set_by, given),
                name="clock-keeper",
            )
    return clock, settled, keeper


def _log_clock(settled: Settled, clock: SimClock, topic: str, fleet: ClockAnchor | None) -> None:
    a = settled.anchor
    fields = {
        "speed": a.speed,
        "sim_start": from_epoch(a.sim_start).isoformat(),
        "wall_start": from_epoch(a.wall_start).isoformat(),
        "platform_now": from_epoch(clock.now()).isoformat(),
        "source": settled.source,
        "topic": topic,
    }
    if fleet is not None and settled.source == "adopted":
        fields["set_by"] = fleet.set_by
    log.info("platform_clock", **fields)
    if settled.source == "local" and (a.speed != 1.0 or a.sim_start != a.wall_start):
        log.warning(
            "clock_anchor_missing",
            topic=topic,
            note="no fleet clock on the bus (is the fleet running, on this topic prefix?);"
            " counting from this command's own --speed/--sim-start",
        )
    if settled.conflict is not None:
        assert fleet is not None
        log.warning(
            "clock_conflict",
            detail=settled.conflict,
            this_process=a.describe(),
            fleet=f"{fleet.anchor.describe()} (set by {fleet.set_by or 'unknown'})",
            note="the explicit setting wins for this process, which does not publish it;"
            " processes on different clocks disagree on every time on the wire: give all"
            " the same --speed/--sim-start (or none, to adopt the fleet's)",
        )


async def _publish(link: MqttLink, topic: str, anchor: Anchor, set_by: str) -> None:
    msg = ClockAnchor.of(anchor, refreshed_at=time.time(), set_by=set_by)
    await link.publish(topic, msg.to_json(), qos=1, retain=True)


async def _keep(
    link: MqttLink,
    topic: str,
    mine: Anchor,
    clock: SimClock,
    seen: _Seen,
    settings: Settings,
    set_by: str,
    given: Given,
) -> None:
    """Re-publish ``mine`` every refresh period, and settle ties with anchors that other
    processes publish (reconcile in core/clock.py)."""
    refresh = settings.clock_refresh_s
    last_pub = time.monotonic()
    while True:
        raise_if_cancelled()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, last_pub + refresh - time.monotonic())):
                await seen.changed.wait()
        seen.changed.clear()
        wall = time.time()
        # A stale anchor (the one this process replaced) is as good as none.
        fresh = seen.anchor is not None and not is_stale(
            seen.anchor, wall_now=wall, refresh_s=refresh
        )
        other = seen.anchor.anchor if fresh and seen.anchor is not None else None
        verdict = reconcile(mine, other, given, now=wall)
        if verdict == "ignore":
            assert other is not None
            log.warning(
                "clock_conflict",
                this_process=mine.describe(),
                fleet=other.describe(),
                note="another process published a clock this one's explicit settings"
                " contradict; this one keeps its own and stops publishing it",
            )
            return
        if verdict == "adopt":
            assert other is not None
            log.warning(
                "clock_anchor_adopted",
                was=mine.describe(),
                now=other.describe(),
                note="two processes created the fleet's clock at once; the earlier wins",
            )
            clock.move_to(wall_anchor=other.wall_start, sim_anchor=other.sim_start)
            mine = other
            set_by = seen.anchor.set_by if seen.anchor is not None else set_by
        due = time.monotonic() - last_pub >= refresh - 1e-3
        if verdict == "republish" or due:
            try:
                await _publish(link, topic, mine, set_by)
            except (TransportError, V2GError) as err:
                log.warning("clock_anchor_not_published", topic=topic, error=str(err)[:200])
            last_pub = time.monotonic()
