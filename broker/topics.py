"""Topic names of the wire contract (DESIGN.md), built and parsed in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import InvalidMessage

# Ids travel inside topic levels, so they must not contain MQTT wildcards or separators.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}"
_ID_RE = re.compile(ID_PATTERN)


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid vehicle or request id, else raise ValueError."""
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value[:80]!r} is not valid: use 1-64 letters, digits, '_', '.', ':' or '-'"
            " (no '/', '+', '#' or spaces)"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of the contract under one configurable prefix (default ``v2g``)."""

    prefix: str = "v2g"

    def telemetry(self, vehicle_id: str) -> str:
        return f"{self.prefix}/vehicles/{vehicle_id}/telemetry"

    def vehicle_status(self, vehicle_id: str) -> str:
        return f"{self.prefix}/vehicles/{vehicle_id}/status"

    def setpoint(self, vehicle_id: str) -> str:
        return f"{self.prefix}/vehicles/{vehicle_id}/setpoint"

    def no_v2g(self, vehicle_id: str) -> str:
        """The owner's "no V2G until departure" hold (an extension): ``ON``/``OFF``, retained;
        the Home Assistant switch commands and shows it."""
        return f"{self.prefix}/vehicles/{vehicle_id}/no_v2g"

    @property
    def dispatch_requests(self) -> str:
        return f"{self.prefix}/dispatch/requests"

    def dispatch_result(self, request_id: str) -> str:
        return f"{self.prefix}/dispatch/{request_id}/result"

    def dispatch_progress(self, request_id: str) -> str:
        return f"{self.prefix}/dispatch/{request_id}/progress"

    def dispatch_cancel(self, request_id: str) -> str:
        return f"{self.prefix}/dispatch/{request_id}/cancel"

    def dispatch_amend(self, request_id: str) -> str:
        return f"{self.prefix}/dispatch/{request_id}/amend"

    def dispatch_signal(self, request_id: str) -> str:
        return f"{self.prefix}/dispatch/{request_id}/signal"

    @property
    def dispatch_rejected(self) -> str:
        """Refusals of operator messages whose request id cannot be read."""
        return f"{self.prefix}/dispatch/rejected"

    def operator_responses(self, operator: str) -> str:
        """A private MQTT 5 response topic for one operator client."""
        return f"{self.prefix}/operators/{operator}/responses"

    @property
    def fleet_status(self) -> str:
        return f"{self.prefix}/fleet/status"

    @property
    def fleet_capability(self) -> str:
        return f"{self.prefix}/fleet/capability"

    @property
    def fleet_forecast(self) -> str:
        return f"{self.prefix}/fleet/forecast"

    @property
    def clock(self) -> str:
        """The fleet's clock anchor (retained): every process of a fleet runs on it."""
        return f"{self.prefix}/clock"

    # Bridges (OEM clouds, depot gateways) carry many vehicles: batched, columnar messages.
    def bridge_telemetry(self, bridge_id: str) -> str:
        return f"{self.prefix}/bridges/{bridge_id}/telemetry"

    def bridge_setpoints(self, bridge_id: str) -> str:
        return f"{self.prefix}/bridges/{bridge_id}/setpoints"

    # The grid under the fleet (an extension): per node, a meter and dynamic limits coming
    # in, the capability of the vehicles under it going out.
    def grid_meter(self, node: str) -> str:
        return f"{self.prefix}/grid/{node}/meter"

    def grid_limits(self, node: str) -> str:
        return f"{self.prefix}/grid/{node}/limits"

    def grid_capability(self, node: str) -> str:
        return f"{self.prefix}/grid/{node}/capability"

    # Subscription filters.
    @property
    def all_grid_meters(self) -> str:
        return f"{self.prefix}/grid/+/meter"

    @property
    def all_grid_limits(self) -> str:
        return f"{self.prefix}/grid/+/limits"

    @property
    def all_telemetry(self) -> str:
        return f"{self.prefix}/vehicles/+/telemetry"

    @property
    def all_vehicle_status(self) -> str:
        return f"{self.prefix}/vehicles/+/status"

    @property
    def all_no_v2g(self) -> str:
        return f"{self.prefix}/vehicles/+/no_v2g"

    @property
    def all_setpoints(self) -> str:
        return f"{self.prefix}/vehicles/+/setpoint"

    @property
    def all_cancels(self) -> str:
        return f"{self.prefix}/dispatch/+/cancel"

    @property
    def all_amends(self) -> str:
        return f"{self.prefix}/dispatch/+/amend"

    @property
    def all_signals(self) -> str:
        return f"{self.prefix}/dispatch/+/signal"

    @property
    def all_results(self) -> str:
        return f"{self.prefix}/dispatch/+/result"

    @property
    def all_progress(self) -> str:
        return f"{self.prefix}/dispatch/+/progress"

    @property
    def all_bridge_telemetry(self) -> str:
        return f"{self.prefix}/bridges/+/telemetry"

    @property
    def all_bridge_setpoints(self) -> str:
        return f"{self.prefix}/bridges/+/setpoints"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a contract topic into (kind, id).

        kind is one of ``telemetry``, ``status``, ``setpoint``, ``no_v2g`` (id: vehicle),
        ``requests``, ``rejected`` (id: ""), ``result``, ``progress``, ``cancel``, ``amend``, ``signal`` (id: request),
        ``bridge_telemetry``, ``bridge_setpoints`` (id: bridge),
        ``grid_meter``, ``grid_limits``, ``grid_capability`` (id: node).
        Raises InvalidMessage(reason="topic") for anything else.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise InvalidMessage("topic", f"{topic[:120]!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if parts == ["dispatch", "requests"]:
            return "requests", ""
        if parts == ["dispatch", "rejected"]:
            return "rejected", ""
        if (len(parts) == 3 and parts[0] == "vehicles" and parts[2] in _VEHICLE_KINDS) or (
            len(parts) == 3 and parts[0] == "dispatch" and parts[2] in _DISPATCH_KINDS
        ):
            kind, ident = parts[2], parts[1]
        elif len(parts) == 3 and parts[0] == "bridges" and parts[2] in _BRIDGE_KINDS:
            kind, ident = f"bridge_{parts[2]}", parts[1]
        elif len(parts) == 3 and parts[0] == "grid" and parts[2] in _GRID_KINDS:
            kind, ident = f"grid_{parts[2]}", parts[1]
        else:
            raise InvalidMessage("topic", f"{topic[:120]!r} is not a contract topic")
        if not _ID_RE.fullmatch(ident):
            raise InvalidMessage("topic", f"id {ident[:80]!r} in topic is not a valid id")
        return kind, ident


# An MQTT 5 response topic is where the aggregator publishes on a sender's behalf: a valid
# publish topic of bounded length, and not one of the contract's own topics (a sender must
# not make the aggregator speak on a vehicle's setpoint topic or the fleet status).
MAX_REPLY_TOPIC = 256


def check_reply_topic(topic: str, prefix: str) -> str:
    """Return ``topic`` if the aggregator may answer on it, else raise ValueError saying why."""
    if not topic or len(topic.encode()) > MAX_REPLY_TOPIC:
        raise ValueError(f"response topic must be 1-{MAX_REPLY_TOPIC} bytes")
    if any(c in topic for c in "+#\x00"):
        raise ValueError(f"response topic {topic[:80]!r} has a wildcard or a NUL")
    if topic.startswith("$"):
        raise ValueError(f"response topic {topic[:80]!r} is a broker ($) topic")
    if topic.startswith(prefix + "/") and not topic.startswith(f"{prefix}/operators/"):
        raise ValueError(
            f"response topic {topic[:80]!r} is inside the platform's topics; use"
            f" {prefix}/operators/<you>/... or a topic outside {prefix}/"
        )
    return topic


_VEHICLE_KINDS = frozenset({"telemetry", "status", "setpoint", "no_v2g"})
_DISPATCH_KINDS = frozenset({"result", "progress", "cancel", "amend", "signal"})
_BRIDGE_KINDS = frozenset({"telemetry", "setpoints"})
_GRID_KINDS = frozenset({"meter", "limits", "capability"})
