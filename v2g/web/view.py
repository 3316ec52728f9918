"""What the web page shows, folded from the broker's messages: pure, no I/O.

The aggregator's retained fleet status and capability, and the dispatch answers and
progress it publishes, are the only source; this keeps the last of each, an hour of fleet
power against what the active requests asked for, and the recent requests."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from broker.models import (
    Capability,
    DispatchProgress,
    DispatchResult,
    FleetStatus,
    to_epoch,
)

HISTORY_S = 3600.0  # the chart: the last hour of platform time
MAX_POINTS = 720  # one point per 5 s of platform time at most over that hour
MAX_DISPATCHES = 50  # the table: the most recently heard-of requests


@dataclass(slots=True)
class DispatchRow:
    """One request as the page lists it: the last answer, progress and status line heard."""

    request_id: str
    service: str | None = None
    # The last answer's status; "active" when only the fleet status named it (it ran before
    # this view started), "ended" once it no longer does.
    status: str = "active"
    reason: str | None = None
    requested_kw: float | None = None
    allocated_kw: float | None = None
    delivered_kw: float | None = None
    requested_kwh: float | None = None
    delivered_kwh: float | None = None
    shortfall_kw: float | None = None
    vehicles: int | None = None
    remaining_s: float | None = None
    score: float | None = None
    active: bool = False
    ts: float = 0.0  # platform epoch s of the last message about it

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


Point = tuple[float, float, float | None, float | None, float | None]


@dataclass
class FleetView:
    """The page's state. ``version`` counts changes, so a stream knows when to send."""

    status: FleetStatus | None = None
    capability: Capability | None = None
    # (platform epoch s, fleet power kW, requested kW of the active requests or None,
    # the 15-minute capability band's min and max kW or None)
    history: deque[Point] = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    dispatches: OrderedDict[str, DispatchRow] = field(default_factory=OrderedDict)
    broker_connected: bool = False  # the reader's link, so the page can say it is stale
    unreadable: int = 0  # messages this view could not read (logged and dropped)
    version: int = 0

    def on_broker(self, connected: bool) -> bool:
        """Note the broker link's state; True when it changed."""
        if connected == self.broker_connected:
            return False
        self.broker_connected = connected
        self.version += 1
        return True

    def _row(self, request_id: str, ts: float) -> DispatchRow:
        row = self.dispatches.pop(request_id, None) or DispatchRow(request_id)
        row.ts = max(row.ts, ts)
        self.dispatches[request_id] = row  # most recent last
        while len(self.dispatches) > MAX_DISPATCHES:
            self.dispatches.popitem(last=False)
        return row

    def on_status(self, s: FleetStatus) -> None:
        ts = to_epoch(s.ts)
        self.status = s
        requested = sum(d.requested_kw for d in s.dispatches) if s.dispatches else None
        # Keep the chart's points at least HISTORY_S / MAX_POINTS apart; the newest wins.
        gap = HISTORY_S / MAX_POINTS
        if self.history and ts < self.history[-1][0]:
            self.history.clear()  # the clock went back (a new fleet, a new run)
        band = s.capability
        point: Point = (
            ts,
            s.power_kw,
            requested,
            None if band is None else band.min_power_kw,
            None if band is None else band.max_power_kw,
        )
        if len(self.history) > 1 and ts - self.history[-2][0] < gap:
            self.history[-1] = point
        else:
            self.history.append(point)
        while self.history and self.history[0][0] < ts - HISTORY_S:
            self.history.popleft()
        live = {d.request_id for d in s.dispatches}
        for d in s.dispatches:
            row = self._row(d.request_id, ts)
            row.active = True
            row.service = d.service
            row.requested_kw = d.requested_kw
            row.allocated_kw = d.allocated_kw
            row.delivered_kw = d.delivered_kw
            row.delivered_kwh = d.delivered_kwh
        for rid, row in self.dispatches.items():
            # A running request the status no longer lists has ended (its final answer
            # may have come before this view started); one accepted for later has not.
            if rid not in live and row.status in ("active", "started"):
                row.active = False
                if row.status == "active":
                    row.status = "ended"  # seen running, its answer never heard here
        self.version += 1

    def on_capability(self, c: Capability) -> None:
        self.capability = c
        self.version += 1

    def on_result(self, r: DispatchResult) -> None:
        row = self._row(r.request_id, to_epoch(r.ts))
        if r.answer_to == "request" and r.status in ("accepted", "partial"):
            row.active = True  # running now or scheduled: it can be amended or cancelled
        if r.answer_to == "request" or r.status in ("completed", "cancelled"):
            # An answer to an amendment or a cancel that did not end the request leaves
            # its status as it was (refused new terms leave the old ones): only the why.
            row.status = r.status
        row.reason = r.reason
        if r.requested_kw is not None:
            row.requested_kw = r.requested_kw
        row.allocated_kw = r.allocated_kw
        row.shortfall_kw = r.shortfall_kw
        row.vehicles = r.vehicles
        if r.delivered_kwh is not None:
            row.delivered_kwh = r.delivered_kwh
        if r.requested_kwh is not None:
            row.requested_kwh = r.requested_kwh
        if r.score is not None:
            row.score = r.score
        if r.status in ("completed", "cancelled") or (
            r.status == "rejected" and r.answer_to == "request"
        ):
            row.active = False
        self.version += 1

    def on_progress(self, p: DispatchProgress) -> None:
        row = self._row(p.request_id, to_epoch(p.ts))
        if row.status in ("active", "accepted", "partial"):
            row.status = "started"
        row.requested_kw = p.requested_kw
        row.allocated_kw = p.allocated_kw
        row.delivered_kw = p.delivered_kw
        row.requested_kwh = p.requested_kwh
        row.delivered_kwh = p.delivered_kwh
        row.vehicles = p.vehicles
        row.remaining_s = p.remaining_s
        if p.score is not None:
            row.score = p.score
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as JSON-ready values."""
        s = self.status
        return {
            "version": self.version,
            "broker_connected": self.broker_connected,
            "unreadable": self.unreadable,
            "status": None if s is None else s.model_dump(mode="json"),
            "capability": None
            if self.capability is None
            else self.capability.model_dump(mode="json"),
            "history": [list(p) for p in self.history],
            "dispatches": [row.as_dict() for row in reversed(self.dispatches.values())],
            "rejected": {} if s is None else dict(sorted(s.rejected.items())),
        }
