"""``v2g reset``: remove one deployment's retained topics and Redis keys, nothing else.

Retained messages are found by subscribing to ``{topic prefix}/#`` for a moment (the
broker sends every retained message under it at once) and cleared by publishing an empty
retained payload on each topic. Redis keys are found by SCAN (never KEYS, which blocks
a shared server) on ``{redis prefix}:*``, and each one is checked to start with
``{redis prefix}:`` before it is deleted, so a prefix never reaches another deployment's
keys (``v2g`` does not touch ``v2g-demo:...``).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.settings import Settings
from core.errors import TransportError
from v2g.operator import operator_link

QUIET_S = 0.5  # the retained messages have all come once the broker is this quiet
SCAN_COUNT = 1000


@dataclass(slots=True)
class Found:
    """What a deployment left behind."""

    topics: list[str] = field(default_factory=list)  # with a retained message
    keys: list[str] = field(default_factory=list)
    live: int = 0  # messages that were not retained: something of it still runs

    def __bool__(self) -> bool:
        return bool(self.topics or self.keys)


def redis_pattern(prefix: str) -> str:
    """A SCAN pattern for the keys under ``{prefix}:``, the prefix's glob characters escaped."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + ":*"


async def find(settings: Settings, *, timeout_s: float = 10.0) -> Found:
    """Every retained topic under the topic prefix and every key under the Redis prefix."""
    found = Found()
    found.topics, found.live = await _retained(settings, timeout_s)
    found.keys = await _keys(settings, timeout_s)
    return found


async def remove(settings: Settings, found: Found, *, timeout_s: float = 10.0) -> None:
    """Clear ``found``'s retained topics and delete its keys."""
    if found.topics:
        async with operator_link(settings, [], connect_timeout=timeout_s) as (link, _):
            for topic in found.topics:
                await link.publish(topic, b"", qos=1, retain=True)
    if found.keys:
        r = _redis(settings, timeout_s)
        try:
            for i in range(0, len(found.keys), SCAN_COUNT):
                await r.unlink(*found.keys[i : i + SCAN_COUNT])
        except (RedisError, OSError) as err:
            raise TransportError(
                f"deleting keys in Redis at {settings.redis_url} failed: {err}"
            ) from err
        finally:
            await r.aclose()


async def _retained(settings: Settings, timeout_s: float) -> tuple[list[str], int]:
    head = settings.topic_prefix + "/"
    topics: set[str] = set()
    live = 0
    subs = [(f"{head}#", 1)]
    async with operator_link(settings, subs, connect_timeout=timeout_s) as (_, queue):
        # The broker sends the retained messages right after SUBACK: wait until they stop.
        clock = asyncio.get_running_loop().time
        end = clock() + timeout_s
        quiet = clock() + QUIET_S
        while True:
            try:
                async with asyncio.timeout_at(min(quiet, end)):
                    ev = await queue.get()
            except TimeoutError:
                break
            if not ev.topic.startswith(head):  # some brokers deliver beyond the filter
                continue
            if not ev.retain:  # live traffic: does not hold up the end of the retained burst
                live += 1
                continue
            quiet = clock() + QUIET_S
            if ev.payload:
                topics.add(ev.topic)
    return sorted(topics), live


async def _keys(settings: Settings, timeout_s: float) -> list[str]:
    head = settings.redis_prefix + ":"
    r = _redis(settings, timeout_s)
    try:
        keys = [
            k.decode() if isinstance(k, bytes) else str(k)
            async for k in r.scan_iter(match=redis_pattern(settings.redis_prefix), count=SCAN_COUNT)
        ]
    except (RedisError, OSError) as err:
        raise TransportError(
            f"scanning Redis at {settings.redis_url} failed: {err};"
            " is Redis running? (check --redis / V2G_REDIS_URL)"
        ) from err
    finally:
        await r.aclose()
    return sorted(k for k in set(keys) if k.startswith(head))


def _redis(settings: Settings, timeout_s: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
