"""Message models of the wire contract (DESIGN.md). Field names are a contract: add, never rename.

Models validate what comes off the network: NaN and infinity, out-of-range values,
strings where numbers are due and naive datetimes are all refused. Unknown extra
fields are ignored in what machines send (telemetry, status), so that newer senders stay
readable, and refused in what operators send (requests, amendments, signals, cancels):
there a typo such as ``strat`` for ``start`` would silently change what the fleet does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from broker.topics import ID_PATTERN, check_id
from core.clock import Anchor

# The bounds below are defined once, here: the hand decoders and encoders of
# broker/codec.py check the same names (tests/unit/test_codec.py holds them to the models).
# They are generous physical sanity limits (a 1 MW vehicle charger does not exist), not
# business rules: they keep absurd numbers out of the fleet arrays.
MAX_VEHICLE_KW = 1000.0
"""Largest power magnitude of one vehicle (power_kw within +-this, ratings up to it)."""
MAX_CAPACITY_KWH = 1000.0
"""Largest battery capacity of one vehicle."""
MAX_NODE_KW = 1e7
"""Largest limit, meter reading or band of one grid node (10 GW: above any substation)."""
MAX_LIMIT_INTERVALS = 1000
"""At most this many intervals in one dynamic limits message (a day at 90 s resolution)."""
SEQ_LIMIT = 2**63
"""A report's seq is below this: the fleet keeps seq as int64, and a bigger one, let
through, would break the fold of every report of the step."""

VehicleId = Annotated[str, AfterValidator(lambda v: check_id(v, "vehicle_id"))]
RequestId = Annotated[str, AfterValidator(lambda v: check_id(v, "request_id"))]
NodeId = Annotated[str, AfterValidator(lambda v: check_id(v, "node"))]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Efficiency = Annotated[float, Field(gt=0.0, le=1.0)]
VehiclePowerKw = Annotated[float, Field(ge=-MAX_VEHICLE_KW, le=MAX_VEHICLE_KW)]
RatingKw = Annotated[float, Field(ge=0.0, le=MAX_VEHICLE_KW)]
CapacityKwh = Annotated[float, Field(gt=0.0, le=MAX_CAPACITY_KWH)]
Seq = Annotated[int, Field(ge=0, lt=SEQ_LIMIT)]
NodeKw = Annotated[float, Field(strict=True, ge=-MAX_NODE_KW, le=MAX_NODE_KW)]
LimitKw = Annotated[float, Field(strict=True, ge=0.0, le=MAX_NODE_KW)]
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


class OperatorMessage(WireModel):
    """Base for what an operator sends: an unknown field is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


class Telemetry(WireModel):
    """What a vehicle reports every interval on ``v2g/vehicles/{vid}/telemetry``."""

    vehicle_id: VehicleId
    seq: Seq
    ts: UtcTime
    plugged_in: bool
    soc: Fraction
    capacity_kwh: CapacityKwh
    power_kw: VehiclePowerKw
    max_charge_kw: RatingKw
    max_discharge_kw: RatingKw
    charge_efficiency: Efficiency
    discharge_efficiency: Efficiency
    min_soc: Fraction
    target_soc: Fraction
    departure: UtcTime | None = None
    # Extension (the grid): the grid node the vehicle is plugged in under; absent = none
    # said (the aggregator counts it under the grid's root). A new node means it moved.
    node: NodeId | None = None


# Telemetry's float fields, in its order: the float columns of a batch, and of the fleet's
# decoded reports (broker/columns.py), where departure is NaN when unknown.
TELEMETRY_FLOAT_COLUMNS = (
    "soc",
    "capacity_kwh",
    "power_kw",
    "max_charge_kw",
    "max_discharge_kw",
    "charge_efficiency",
    "discharge_efficiency",
    "min_soc",
    "target_soc",
    "departure",
)


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
    FIRMING = "firming"  # extension (the grid): hold a node's net power in a band


SIGNAL_SERVICES = frozenset({Service.FREQUENCY_REGULATION, Service.FREQUENCY_CONTAINMENT})


class DispatchRequest(OperatorMessage):
    """A grid operator's request: fleet net power ``power_kw`` for ``duration_s`` from ``start``."""

    # Operators send "service": "manual" as a string; unknown fields stay refused.
    model_config = ConfigDict(strict=False, extra="forbid")

    request_id: RequestId
    service: Service = Service.MANUAL
    power_kw: Annotated[float, Field(strict=True)] | None = None
    capacity_kw: Annotated[float, Field(strict=True, gt=0.0)] | None = None
    start: UtcTime | None = None
    duration_s: Annotated[float, Field(strict=True, gt=0.0)]
    priority: Annotated[int, Field(strict=True)] | None = None
    # Extension (the grid): served by the vehicles under this node only; power_kw is then
    # their net power. Firming (service "firming") needs it, and takes a band instead of
    # power_kw: the node's net power (meter + vehicles) within [min_kw, max_kw] and/or
    # its change per minute within ramp_kw_per_min; each absent = open, not all three.
    node: NodeId | None = None
    min_kw: NodeKw | None = None
    max_kw: NodeKw | None = None
    ramp_kw_per_min: Annotated[float, Field(strict=True, gt=0.0, le=MAX_NODE_KW)] | None = None

    @model_validator(mode="after")
    def _power_or_capacity(self) -> Self:
        band = (self.min_kw, self.max_kw, self.ramp_kw_per_min)
        if self.service is Service.FIRMING:
            if self.node is None:
                raise ValueError("service firming needs node (the grid node to hold)")
            if self.power_kw is not None or self.capacity_kw is not None:
                raise ValueError(
                    "service firming takes no power_kw or capacity_kw: give min_kw, max_kw"
                    " and/or ramp_kw_per_min"
                )
            if all(v is None for v in band):
                raise ValueError(
                    "service firming needs at least one of min_kw, max_kw, ramp_kw_per_min"
                )
            if self.min_kw is not None and self.max_kw is not None and self.min_kw > self.max_kw:
                raise ValueError(f"min_kw {self.min_kw:g} is above max_kw {self.max_kw:g}")
            return self
        if any(v is not None for v in band):
            raise ValueError(
                f"min_kw, max_kw and ramp_kw_per_min belong to service firming, not"
                f" {self.service.value}"
            )
        if self.service in SIGNAL_SERVICES:
            if self.capacity_kw is None:
                raise ValueError(f"service {self.service.value} needs capacity_kw (> 0)")
        elif self.power_kw is None:
            raise ValueError(f"service {self.service.value} needs power_kw (signed, + charges)")
        return self


# "started" (an extension): a request planned for later has begun, at ts.
ResultStatus = Literal["accepted", "partial", "rejected", "started", "completed", "cancelled"]
# What a result answers: the request itself, or an amendment or cancel of it. A refused
# amendment leaves the request running: only a "rejected" answer to the request ends it.
AnswerTo = Literal["request", "amend", "cancel"]


class DispatchAmend(OperatorMessage):
    """New terms for a request in flight on ``v2g/dispatch/{request_id}/amend`` (an
    extension): its power, its duration from its start, or both."""

    power_kw: Annotated[float, Field(strict=True)] | None = None
    duration_s: Annotated[float, Field(strict=True, gt=0.0)] | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.power_kw is None and self.duration_s is None:
            raise ValueError("an amendment needs power_kw, duration_s or both")
        return self


class DispatchCancel(OperatorMessage):
    """A cancel on ``v2g/dispatch/{request_id}/cancel``: ``{}`` (the id is the topic's)."""


class DispatchSignal(OperatorMessage):
    """One sample of the signal a frequency service follows, on
    ``v2g/dispatch/{request_id}/signal``: a regulation ``value`` in -1..1 (the share of the
    capacity to move, + toward import), or, for containment, the grid ``frequency_hz``."""

    value: Annotated[float, Field(strict=True, ge=-1.0, le=1.0)] | None = None
    frequency_hz: Annotated[float, Field(strict=True, ge=45.0, le=65.0)] | None = None
    ts: UtcTime

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.value is None) == (self.frequency_hz is None):
            raise ValueError("a signal carries exactly one of value (-1..1) or frequency_hz")
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
    # For a service that follows a signal: the performance score (0..1) so far.
    score: float | None = None
    # For containment: the least share of full activation delivered 30 s after a step
    # in frequency, over the steps so far (1 = full).
    fcr_share: float | None = None
    # What this answers (an extension): a "rejected" answer to an amend or cancel leaves
    # the request as it was.
    answer_to: AnswerTo = "request"
    # When its delivery window opened: its first setpoints in force (null before). The
    # books (requested, delivered, baseline) run from here to start + duration_s.
    delivery_start: UtcTime | None = None
    # Extension (the grid, firming): the energy the node's net power spent outside the
    # band over the request (kWh); None for other services.
    outside_band_kwh: float | None = None
    ts: UtcTime


class DispatchRejection(WireModel):
    """The answer to an operator message whose request id cannot be read (an extension),
    on ``v2g/dispatch/rejected``: why it was refused, and the start of what came."""

    ts: UtcTime
    reason: str
    request_id: str | None = None
    topic: str
    payload_head: str

    def to_json(self) -> bytes:
        """The notice as compact JSON, without ``request_id`` when it is not known."""
        return self.model_dump_json(exclude_none=True).encode()


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
    baseline_kwh: float | None = None  # the baseline's energy over the window so far
    vehicles: int
    elapsed_s: float
    remaining_s: float
    score: float | None = None  # a signal service's performance score so far (0..1)
    fcr_share: float | None = None  # containment: least share of activation at 30 s
    delivery_start: UtcTime | None = None  # its first setpoints in force: the books start
    # Why allocated_kw is not what the first answer said (amended, or the fleet changed).
    reason: str | None = None
    # Extension (the grid, firming): the energy the node's net power spent outside the
    # band so far (kWh, both sides counted positive); None for other services.
    outside_band_kwh: float | None = None


class CapabilityWindow(WireModel):
    """The fleet net power range that can be held for the whole window from now."""

    duration_s: float
    min_power_kw: float
    max_power_kw: float
    # False when no constant power can be held for the whole window (cars that must
    # charge flat out leave inside it and the rest cannot make up for them): then
    # min = max = the power the fleet comes closest to holding.
    feasible: bool = True


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


# -- The grid under the fleet: an extension (issue 11) --------------------------------------
# A node's meter and limits come from a site meter or a distribution operator and change
# what the fleet does: like operator messages, an unknown field is refused, never ignored.


class GridMeter(OperatorMessage):
    """A node's net power without the fleet's vehicles, on ``v2g/grid/{node}/meter``:
    load minus local generation, its children's included (+ import, - export)."""

    ts: UtcTime
    power_kw: NodeKw


class LimitInterval(OperatorMessage):
    """Import and export limits (magnitudes, kW; null = none) from ``start`` for
    ``duration_s``."""

    start: UtcTime
    duration_s: Annotated[float, Field(strict=True, gt=0.0)]
    import_kw: LimitKw | None = None
    export_kw: LimitKw | None = None


class GridLimits(OperatorMessage):
    """A node's dynamic limits, retained on ``v2g/grid/{node}/limits``: within an interval
    its limits hold, outside every interval the safe values (null = none). A dynamic limit
    never loosens the node's static one: the tighter holds. Intervals may not overlap."""

    ts: UtcTime
    intervals: Annotated[list[LimitInterval], Field(max_length=MAX_LIMIT_INTERVALS)]
    safe_import_kw: LimitKw | None = None
    safe_export_kw: LimitKw | None = None

    @model_validator(mode="after")
    def _no_overlap(self) -> Self:
        spans = sorted((i.start.timestamp(), i.duration_s) for i in self.intervals)
        for (s0, d0), (s1, _) in pairwise(spans):
            if s1 < s0 + d0:
                raise ValueError(
                    f"intervals overlap (one from {from_epoch(s0).isoformat()} for {d0:g} s,"
                    f" the next from {from_epoch(s1).isoformat()}): send one limit per moment"
                )
        return self


class NodeCapability(WireModel):
    """The capability windows of the vehicles under one node, within the limits of the
    node and its ancestors minus their meters: retained on ``v2g/grid/{node}/capability``."""

    node: str
    ts: UtcTime
    windows: list[CapabilityWindow]
    vehicles: int = 0


class NodeStatus(WireModel):
    """One grid node in the fleet status (an extension, issue 11; ``FleetStatus.nodes``): its vehicles' net power, its meter and limits in force (null = none),
    the headroom left, how far it is over a limit it cannot hold (0 when held), and the
    vehicles a limit holds below their floor."""

    node: str
    power_kw: float
    meter_kw: float | None
    import_limit_kw: float | None
    export_limit_kw: float | None
    headroom_import_kw: float | None
    headroom_export_kw: float | None
    vehicles: int
    over_limit_kw: float = 0.0
    conflicts: list[str] = Field(default_factory=list)


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
    # Extension: what an operator should know, in words (e.g. a clock mismatch).
    warnings: list[str] = Field(default_factory=list)
    # Extension (the grid, issue 11): one entry per grid node when the aggregator runs
    # with --grid (empty without), and how many vehicles named no node of the grid
    # (counted under the root).
    nodes: list[NodeStatus] = Field(default_factory=list)
    unknown_node: int = 0


class ClockAnchor(WireModel):
    """The fleet's platform clock, retained on ``v2g/clock`` (an extension): simulated time
    ``sim_start`` at wall time ``wall_start``, running ``speed`` simulated seconds per wall
    second. Every process that publishes it re-publishes it every few wall seconds
    (``refreshed_at``, wall time); one not refreshed for a while is from a fleet that has
    stopped, and the next process to start creates a new one."""

    sim_start: UtcTime
    wall_start: UtcTime
    speed: Annotated[float, Field(gt=0.0)]
    refreshed_at: UtcTime
    set_by: str = ""  # the client id of the process that created it

    @classmethod
    def of(cls, anchor: Anchor, *, refreshed_at: float, set_by: str) -> ClockAnchor:
        return cls(
            sim_start=from_epoch(anchor.sim_start),
            wall_start=from_epoch(anchor.wall_start),
            speed=anchor.speed,
            refreshed_at=from_epoch(refreshed_at),
            set_by=set_by,
        )

    @property
    def anchor(self) -> Anchor:
        return Anchor(to_epoch(self.sim_start), to_epoch(self.wall_start), self.speed)


# -- Batched messages for bridges (OEM clouds, depot gateways): an extension ----------------
#
# One message carries many vehicles, as columns: ``vehicle_id`` is a list, and every other
# per-vehicle field is a list of the same length, under the field's own name (the names of
# ``Telemetry`` and ``Setpoint``). Times inside the columns are epoch seconds (UTC by
# definition) rather than ISO strings: parsing a column of ISO strings costs a Python call
# per vehicle, numbers are parsed and range-checked in pydantic's Rust core. Each message
# also carries one ISO 8601 time with its zone, so a message stays readable by eye.

MAX_BATCH_VEHICLES = 10_000
"""At most this many vehicles in one batch message; a bridge splits a bigger fleet."""

# Rust-side checks only (no Python call per element): the id pattern of broker.topics.
_BatchId = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
# Epoch seconds between 2001 and 2100: catches milliseconds sent as seconds, and NaN.
EPOCH_MIN_S = 1e9
EPOCH_MAX_S = 4_102_444_800.0
EpochS = Annotated[float, Field(gt=EPOCH_MIN_S, lt=EPOCH_MAX_S)]


_Cap = Field(max_length=MAX_BATCH_VEHICLES)
_IdColumn = Annotated[list[_BatchId], Field(min_length=1, max_length=MAX_BATCH_VEHICLES)]
_SeqColumn = Annotated[list[Seq], _Cap]
_EpochColumn = Annotated[list[EpochS], _Cap]
_BoolColumn = Annotated[list[bool], _Cap]
_FractionColumn = Annotated[list[Fraction], _Cap]
_EfficiencyColumn = Annotated[list[Efficiency], _Cap]
_RatingColumn = Annotated[list[RatingKw], _Cap]
_PowerColumn = Annotated[list[VehiclePowerKw], _Cap]
_CapacityColumn = Annotated[list[CapacityKwh], _Cap]
_DepartureColumn = Annotated[list[EpochS | None], _Cap]
_NodeColumn = Annotated[list[_BatchId | None], _Cap]


class TelemetryBatch(WireModel):
    """Many vehicles' ``Telemetry`` on ``v2g/bridges/{bridge_id}/telemetry``, as columns.

    Every column has one entry per vehicle, in the order of ``vehicle_id``, with the same
    range checks as ``Telemetry``; ``ts`` and ``departure`` are epoch seconds
    (``departure`` null while unknown). ``sent_at`` is when the bridge sent the batch.
    """

    bridge_id: _BatchId
    sent_at: UtcTime
    vehicle_id: _IdColumn
    seq: _SeqColumn
    ts: _EpochColumn
    plugged_in: _BoolColumn
    soc: _FractionColumn
    capacity_kwh: _CapacityColumn
    power_kw: _PowerColumn
    max_charge_kw: _RatingColumn
    max_discharge_kw: _RatingColumn
    charge_efficiency: _EfficiencyColumn
    discharge_efficiency: _EfficiencyColumn
    min_soc: _FractionColumn
    target_soc: _FractionColumn
    departure: _DepartureColumn
    # Extension (the grid): each vehicle's grid node (null: none said); the column may be
    # absent altogether, as from a bridge that predates it.
    node: _NodeColumn | None = None

    @model_validator(mode="after")
    def _columns_line_up(self) -> Self:
        n = len(self.vehicle_id)
        for name in TELEMETRY_BATCH_COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} entries, not {n}")
        if self.node is not None and len(self.node) != n:
            raise ValueError(f"column node has {len(self.node)} entries, not {n}")
        return self

    def __len__(self) -> int:
        return len(self.vehicle_id)

    @classmethod
    def from_telemetry(cls, bridge_id: str, sent_at: datetime, batch: list[Telemetry]) -> Self:
        """The same reports as one batch (for tests and small bridges)."""
        return cls.model_validate(
            {
                "bridge_id": bridge_id,
                "sent_at": sent_at,
                "vehicle_id": [t.vehicle_id for t in batch],
                "seq": [t.seq for t in batch],
                "ts": [t.ts.timestamp() for t in batch],
                "plugged_in": [t.plugged_in for t in batch],
                **{
                    k: [getattr(t, k) for t in batch]
                    for k in TELEMETRY_FLOAT_COLUMNS
                    if k != "departure"
                },
                "departure": [
                    None if t.departure is None else t.departure.timestamp() for t in batch
                ],
                # Only when some report names a node: a batch without them stays as it was.
                **(
                    {"node": [t.node for t in batch]}
                    if any(t.node is not None for t in batch)
                    else {}
                ),
            }
        )


TELEMETRY_BATCH_COLUMNS = ("vehicle_id", "seq", "ts", "plugged_in", *TELEMETRY_FLOAT_COLUMNS)


class FcrDroop(WireModel):
    """Extension (issue 13): the frequency containment droop a ``SetpointBatch``'s
    ``fcr_capacity_kw`` follow: activation 0 inside ``deadband_hz`` of ``nominal_hz``,
    linear to ±1 at ±``full_activation_hz`` (positive above nominal: absorb), and
    ``frequency_hz``, the frequency the batch's ``power_kw`` were computed at."""

    frequency_hz: Annotated[float, Field(ge=45.0, le=65.0)]
    nominal_hz: Annotated[float, Field(ge=45.0, le=65.0)] = 50.0
    deadband_hz: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    full_activation_hz: Annotated[float, Field(gt=0.0, le=5.0)] = 0.2

    @model_validator(mode="after")
    def _deadband_inside(self) -> Self:
        if self.deadband_hz >= self.full_activation_hz:
            raise ValueError(
                f"deadband_hz ({self.deadband_hz}) must be below full_activation_hz"
                f" ({self.full_activation_hz})"
            )
        return self

    def activation(self, hz: float) -> float:
        """The required activation in -1..1 at ``hz`` (aggregator/scoring.fcr_activation)."""
        dev = hz - self.nominal_hz
        beyond = max(abs(dev) - self.deadband_hz, 0.0)
        share = beyond / (self.full_activation_hz - self.deadband_hz)
        return max(-1.0, min(1.0, share if dev >= 0 else -share))


class SetpointBatch(WireModel):
    """Setpoints of many vehicles behind one bridge, on ``v2g/bridges/{bridge_id}/setpoints``.

    One request and one issue time for the whole message; ``power_kw`` and ``valid_until``
    (epoch seconds) are columns in the order of ``vehicle_id``. Only changed setpoints
    (and refreshes before expiry) travel, as with ``Setpoint``.
    """

    bridge_id: _BatchId
    request_id: RequestId
    issued_at: UtcTime
    vehicle_id: _IdColumn
    power_kw: _PowerColumn
    valid_until: _EpochColumn
    # Extension (issue 13), both or neither: of each vehicle's power_kw, the part
    # fcr_capacity_kw x activation(fcr.frequency_hz) is frequency containment. A bridge that
    # can droop at the charger holds power_kw - that part plus the droop at its local
    # frequency; any other keeps following power_kw (the central path).
    fcr: FcrDroop | None = None
    fcr_capacity_kw: _RatingColumn | None = None

    @model_validator(mode="after")
    def _columns_line_up(self) -> Self:
        n = len(self.vehicle_id)
        if len(self.power_kw) != n or len(self.valid_until) != n:
            raise ValueError(
                f"power_kw has {len(self.power_kw)} entries and valid_until"
                f" {len(self.valid_until)}, vehicle_id {n}: they must be equal"
            )
        if (self.fcr is None) != (self.fcr_capacity_kw is None):
            raise ValueError("fcr and fcr_capacity_kw go together: give both or neither")
        if self.fcr_capacity_kw is not None and len(self.fcr_capacity_kw) != n:
            raise ValueError(
                f"fcr_capacity_kw has {len(self.fcr_capacity_kw)} entries, vehicle_id {n}:"
                " they must be equal"
            )
        if min(self.valid_until) <= self.issued_at.timestamp():
            raise ValueError("every valid_until must be after issued_at")
        return self

    def to_json(self) -> bytes:
        """Compact JSON; without the FCR extension when it is not used (as before it)."""
        return self.model_dump_json(exclude_none=True).encode()

    def __len__(self) -> int:
        return len(self.vehicle_id)
