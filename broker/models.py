"""Message models of the wire contract (DESIGN.md). Field names are a contract: add, never rename.

Models validate what comes off the network: NaN and infinity, out-of-range values,
strings where numbers are due and naive datetimes are all refused. Unknown extra
fields are ignored so that newer senders stay readable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from broker.topics import check_id

VehicleId = Annotated[str, AfterValidator(lambda v: check_id(v, "vehicle_id"))]
RequestId = Annotated[str, AfterValidator(lambda v: check_id(v, "request_id"))]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Efficiency = Annotated[float, Field(gt=0.0, le=1.0)]
# Bounds are generous physical sanity limits (a 1 MW vehicle charger does not exist),
# not business rules: they keep absurd numbers out of the fleet arrays.
VehiclePowerKw = Annotated[float, Field(ge=-1000.0, le=1000.0)]
RatingKw = Annotated[float, Field(ge=0.0, le=1000.0)]
UtcTime = Annotated[AwareDatetime, AfterValidator(lambda v: v.astimezone(UTC))]


class WireModel(BaseModel):
    """Base for every message: strict types, finite numbers, extra fields ignored."""

    model_config = ConfigDict(
        strict=True, allow_inf_nan=False, extra="ignore", frozen=True, ser_json_inf_nan="null"
    )

    def to_json(self) -> bytes:
        """The message as compact JSON bytes."""
        return self.model_dump_json().encode()


def to_epoch(moment: datetime) -> float:
    """Epoch seconds of an aware datetime (the platform's internal time)."""
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    """Aware UTC datetime from epoch seconds."""
    return datetime.fromtimestamp(seconds, tz=UTC)


class Telemetry(WireModel):
    """What a vehicle reports every interval on ``v2g/vehicles/{vid}/telemetry``."""

    vehicle_id: VehicleId
    seq: Annotated[int, Field(ge=0)]
    ts: UtcTime
    plugged_in: bool
    soc: Fraction
    capacity_kwh: Annotated[float, Field(gt=0.0, le=1000.0)]
    power_kw: VehiclePowerKw
    max_charge_kw: RatingKw
    max_discharge_kw: RatingKw
    charge_efficiency: Efficiency
    discharge_efficiency: Efficiency
    min_soc: Fraction
    target_soc: Fraction
    departure: UtcTime | None = None


class VehicleStatus(WireModel):
    """Retained liveness of a vehicle on ``v2g/vehicles/{vid}/status`` (also its last will)."""

    vehicle_id: VehicleId
    online: bool
    ts: UtcTime


class Setpoint(WireModel):
    """Power a vehicle is asked to hold until ``valid_until`` (signed, + charges)."""

    vehicle_id: VehicleId
    request_id: RequestId
    power_kw: VehiclePowerKw
    issued_at: UtcTime
    valid_until: UtcTime

    @model_validator(mode="after")
    def _valid_after_issue(self) -> Self:
        if self.valid_until <= self.issued_at:
            raise ValueError("valid_until must be after issued_at")
        return self


class Service(StrEnum):
    PEAK_SHAVING = "peak_shaving"
    FREQUENCY_REGULATION = "frequency_regulation"
    FREQUENCY_CONTAINMENT = "frequency_containment"
    DEMAND_RESPONSE = "demand_response"
    ENERGY_ARBITRAGE = "energy_arbitrage"
    MANUAL = "manual"


SIGNAL_SERVICES = frozenset({Service.FREQUENCY_REGULATION, Service.FREQUENCY_CONTAINMENT})


class DispatchRequest(WireModel):
    """A grid operator's request: fleet net power ``power_kw`` for ``duration_s`` from ``start``."""

    model_config = ConfigDict(strict=False)  # operators send "service": "manual" as a string

    request_id: RequestId
    service: Service = Service.MANUAL
    power_kw: Annotated[float, Field(strict=True)] | None = None
    capacity_kw: Annotated[float, Field(strict=True, gt=0.0)] | None = None
    start: UtcTime | None = None
    duration_s: Annotated[float, Field(strict=True, gt=0.0)]
    priority: Annotated[int, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def _power_or_capacity(self) -> Self:
        if self.service in SIGNAL_SERVICES:
            if self.capacity_kw is None:
                raise ValueError(f"service {self.service.value} needs capacity_kw (> 0)")
        elif self.power_kw is None:
            raise ValueError(f"service {self.service.value} needs power_kw (signed, + charges)")
        return self


ResultStatus = Literal["accepted", "partial", "rejected", "completed", "cancelled"]


class DispatchAmend(WireModel):
    """New terms for a request in flight on ``v2g/dispatch/{request_id}/amend`` (an
    extension): its power, its duration from its start, or both."""

    power_kw: Annotated[float, Field(strict=True)] | None = None
    duration_s: Annotated[float, Field(strict=True, gt=0.0)] | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.power_kw is None and self.duration_s is None:
            raise ValueError("an amendment needs power_kw, duration_s or both")
        return self


class ScheduledInterval(WireModel):
    """What the schedule can deliver of a request in one interval (an extension)."""

    start: UtcTime
    duration_s: float
    power_kw: float
    energy_kwh: float


class DispatchResult(WireModel):
    """The aggregator's answer on ``v2g/dispatch/{request_id}/result``."""

    request_id: str
    status: ResultStatus
    reason: str | None = None
    requested_kw: float | None = None
    allocated_kw: float = 0.0
    shortfall_kw: Annotated[float, Field(ge=0.0)] = 0.0
    vehicles: Annotated[int, Field(ge=0)] = 0
    delivered_kwh: float | None = None
    requested_kwh: float | None = None
    baseline_kwh: float | None = None
    # For a request planned ahead: what the fleet can deliver in each interval.
    schedule: list[ScheduledInterval] | None = None
    ts: UtcTime


class DispatchProgress(WireModel):
    """Requested vs delivered so far, on ``v2g/dispatch/{request_id}/progress`` each step."""

    request_id: str
    ts: UtcTime
    requested_kw: float
    allocated_kw: float
    delivered_kw: float
    baseline_kw: float
    requested_kwh: float
    delivered_kwh: float
    vehicles: int
    elapsed_s: float
    remaining_s: float


class CapabilityWindow(WireModel):
    """The fleet net power range that can be held for the whole window from now."""

    duration_s: float
    min_power_kw: float
    max_power_kw: float


class Capability(WireModel):
    """The capability envelope, retained on ``v2g/fleet/capability``."""

    ts: UtcTime
    windows: list[CapabilityWindow]
    vehicles: int = 0


class ForecastPeriod(WireModel):
    """One hourly market period of the availability forecast."""

    start: UtcTime
    duration_s: float
    min_power_kw: float  # most the fleet can export for the whole period (<= 0)
    max_power_kw: float  # most it can import (>= 0)
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]  # 0: no history for this hour yet
    samples: Annotated[int, Field(ge=0)]


class FleetForecast(WireModel):
    """The next 24 hourly periods, retained on ``v2g/fleet/forecast`` (an extension)."""

    ts: UtcTime
    periods: list[ForecastPeriod]


class ActiveDispatch(WireModel):
    request_id: str
    service: str
    requested_kw: float
    allocated_kw: float
    delivered_kw: float
    delivered_kwh: float


class FleetStatus(WireModel):
    """Fleet summary, retained on ``v2g/fleet/status`` every control step."""

    ts: UtcTime
    vehicles_online: int
    vehicles_plugged_in: int
    energy_kwh: float
    power_kw: float
    capability: CapabilityWindow | None = None
    available_charge_kw: float = 0.0
    available_discharge_kw: float = 0.0
    dispatches: list[ActiveDispatch] = Field(default_factory=list)
    degraded: bool = False
    rejected: dict[str, int] = Field(default_factory=dict)
