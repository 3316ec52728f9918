"""Who gets each answer, and how many refusals are answered at all.

Every operator message gets an answer: a request, amendment or cancel that is refused
is answered on its request's result topic when its request id can be read, else on
``{prefix}/dispatch/rejected``; one that asked for answers on an MQTT 5 response topic
gets each of them there too. A refusal that must not reach a request's followers (a
second request reusing a running request's id) goes to its sender only.

Pure: the service reads messages and publishes what :func:`messages` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import orjson

from broker.link import Outgoing
from broker.models import DispatchRejection, DispatchResult
from broker.replies import ReplyTo
from broker.topics import ID_PATTERN, Topics

# An oversize or broken payload's request id is looked for in its first bytes only: a
# flood of large garbage must cost a bounded scan, never a parse of the whole.
SNIFF_BYTES = 4096
PAYLOAD_HEAD_CHARS = 200
_ID_IN_TEXT = re.compile(rb'"request_id"\s*:\s*"(' + ID_PATTERN.encode() + rb')"')
_ID = re.compile(ID_PATTERN)

Kind = Literal["requests", "cancel", "amend"]


def read_request_id(payload: bytes, *, parse: bool) -> str | None:
    """The request id a request's payload names, if it can be read: from the parsed JSON
    (``parse``: the payload is small enough to parse), else from a bounded scan."""
    if parse:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            rid = doc.get("request_id")
            return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None
    found = _ID_IN_TEXT.search(payload, 0, SNIFF_BYTES)
    return found.group(1).decode() if found else None


def payload_head(payload: bytes) -> str:
    """The start of a payload, as text, for an answer or a log line."""
    return payload[: PAYLOAD_HEAD_CHARS * 4].decode("utf-8", "replace")[:PAYLOAD_HEAD_CHARS]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An operator message refused before it reached the dispatcher."""

    kind: Kind
    request_id: str | None  # None when it cannot be read
    reason: str
    topic: str
    payload_head: str
    reply: ReplyTo | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    """An answer and where it goes: on its request's result topic (a DispatchResult) or
    on ``dispatch/rejected`` (a DispatchRejection) if ``public``, and to ``replies``."""

    answer: DispatchResult | DispatchRejection
    public: bool
    replies: tuple[ReplyTo, ...] = ()


def replies(*candidates: ReplyTo | None) -> tuple[ReplyTo, ...]:
    """The distinct response addresses among ``candidates``."""
    return tuple(dict.fromkeys(r for r in candidates if r is not None))


def messages(routed: list[Routed], topics: Topics) -> list[Outgoing]:
    """The MQTT messages for ``routed`` answers (QoS 1, not retained)."""
    out: list[Outgoing] = []
    for r in routed:
        body = r.answer.to_json()
        if r.public:
            topic = (
                topics.dispatch_result(r.answer.request_id)
                if isinstance(r.answer, DispatchResult)
                else topics.dispatch_rejected
            )
            out.append(Outgoing(topic, body, qos=1))
        out += [Outgoing(a.topic, body, qos=1, properties=a.properties()) for a in r.replies]
    return out


class Budget:
    """At most ``per_s`` answers a second on average, ``burst`` at once: a flood of
    garbage is counted and logged, but cannot make the aggregator flood the broker."""

    def __init__(self, per_s: float, burst: float | None = None) -> None:
        self.per_s = per_s
        self.burst = per_s if burst is None else burst
        self._tokens = self.burst
        self._at: float | None = None
        self.spent = 0
        self.denied = 0

    def take(self, now: float) -> bool:
        """Spend one answer at wall time ``now`` (monotonic seconds); False if none is left."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.spent += 1
            return True
        self.denied += 1
        return False
