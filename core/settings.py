"""The settings of every process, by concern; broker.settings.Settings puts them together.

Each concern's fields and defaults are written once, here (or, for the connection, in
broker/settings.py, the bus edge): a field's default is the one source the ``V2G_*``
variables, the CLI's flag help and the README table all read. The field names are the
``V2G_*`` variable names, a contract: never rename one.

These are mixins of fields without a settings source of their own; only
:class:`broker.settings.Settings` reads flags and the environment.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class ClockSettings(BaseModel):
    """The platform clock (core/clock.py): speed, anchor and how it is shared."""

    speed: float = Field(1.0, gt=0.0, description="simulated seconds per wall second")
    clock_anchor: float | None = Field(
        None,
        description="wall time (ISO 8601 or epoch s) at which simulated time equals"
        " sim_start; default: when the fleet's first process started",
    )
    sim_start: float | None = Field(
        None,
        description="simulated time (ISO 8601 or epoch s) the clock starts at; default:"
        " the wall time when the fleet's first process started",
    )
    clock_wait_s: float = Field(
        1.5, gt=0.0, description="wall seconds to wait for the fleet's retained clock anchor"
    )
    clock_refresh_s: float = Field(
        10.0,
        gt=0.0,
        description="wall seconds between re-publishes of the clock anchor; one not"
        " refreshed for 3 of these is from a stopped fleet",
    )

    @field_validator("sim_start", "clock_anchor", mode="before")
    @classmethod
    def _time_from_iso_or_epoch(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            try:
                return float(text)
            except ValueError:
                pass
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"{v!r} is not a time: give ISO 8601 with a zone (2026-12-03T06:00:00Z)"
                    " or epoch seconds"
                ) from None
            if moment.tzinfo is None:
                raise ValueError(f"{v!r} has no time zone; add Z or +00:00")
            return moment.timestamp()
        return v


class ControlLoopSettings(BaseModel):
    """The pace of the loop: telemetry, control steps, setpoint life, status and summaries."""

    telemetry_interval_s: float = Field(5.0, gt=0.0)
    control_step_s: float = Field(5.0, gt=0.0)
    stale_after_s: float | None = Field(
        None,
        gt=0.0,
        description="silence after which a vehicle counts as unknown;"
        " default 3 telemetry intervals",
    )
    setpoint_ttl_s: float = Field(60.0, gt=0.0)
    status_every_wall_s: float = Field(5.0, gt=0.0)
    summary_every_wall_s: float = Field(
        60.0, gt=0.0, description="how often the agents log a summary of their fleet"
    )

    @property
    def stale_s(self) -> float:
        """Silence (simulated s) after which a vehicle's data counts as unknown, not as zero."""
        return self.stale_after_s or 3.0 * self.telemetry_interval_s


class DispatchPolicySettings(BaseModel):
    """The aggregator's dispatch policy: how requests are split, bounded and kept."""

    allocation: Literal["proportional", "cost"] = Field(
        "proportional",
        description="how a request is split: proportional to headroom (fast, sticky) or"
        " least cost (throughput cost and energy cycled so far: spreads battery wear)",
    )
    rejected_ledger_ttl_s: float = Field(
        86_400.0,
        gt=0.0,
        description="wall seconds the ledger stream of a request that was only ever"
        " rejected is kept in Redis",
    )
    max_request_kw: float = Field(1_000_000.0, gt=0.0)
    max_request_duration_s: float = Field(7 * 86_400.0, gt=0.0)
    grid_file: str | None = Field(
        None,
        description="grid topology (YAML, issue 11): every step's setpoints, plain"
        " charging included, are held under its nodes' limits; unset: no grid",
    )


class ScaleOutSettings(BaseModel):
    """Several aggregators on one MQTT 5 shared subscription (README "Scale-out"), sharing
    state through Redis, one dispatcher leader at a time by a Redis lease."""

    share_group: str | None = Field(
        None,
        description="MQTT 5 shared-subscription group for telemetry and status"
        " ($share/GROUP/...); unset: one aggregator, as before",
    )
    lease_ttl_s: float = Field(
        10.0,
        gt=0.0,
        description="leader lease, wall seconds: a dead leader is replaced within it"
        " plus two control steps",
    )
    share_retention_s: float = Field(
        60.0,
        gt=0.0,
        description="wall seconds the rows a process forwards to the leader stay in Redis",
    )

    @field_validator("share_group")
    @classmethod
    def _group_is_one_level(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "+#/")):
            raise ValueError(f"share group {v!r} must be non-empty, without '+', '#' or '/'")
        return v


class LogSettings(BaseModel):
    """How a process logs: one event a line, key=value or JSON."""

    log_format: Literal["kv", "json"] = "kv"
    log_level: str = "info"


class MetricsSettings(BaseModel):
    """Where a process serves its Prometheus metrics (README "Metrics"); off by default."""

    metrics: str | None = Field(
        None,
        description="serve Prometheus metrics on HOST:PORT (a bare PORT listens on"
        " 127.0.0.1); unset: no metrics endpoint",
    )

    @field_validator("metrics")
    @classmethod
    def _is_listen_address(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        host, port = listen_address(v)
        return f"{host}:{port}"


def listen_address(text: str, *, bare_port: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` or, with ``bare_port``, ``PORT`` (host 127.0.0.1) -> (host, port);
    ValueError saying how to write one. An IPv6 host is written in brackets: ``[::1]:9464``."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep and bare_port:
        host, port_text = "127.0.0.1", raw
    host = host.strip("[]")
    port = int(port_text) if port_text.isdigit() else -1
    if not host or not 0 <= port <= 65535:
        form = "HOST:PORT or PORT" if bare_port else "HOST:PORT (an IPv6 host in brackets)"
        raise ValueError(f"{text!r} is not an address to listen on; use {form}")
    return host, port
