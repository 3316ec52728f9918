"""Simulation scenarios: a YAML file, checked by pydantic so a mistake names its field.

A scenario says which fleet (size, seed, mix of driver patterns), when and for how long
to simulate, at which step, and what the grid asks of the fleet: fixed power requests
and, optionally, a regulation-like signal to follow. It may also put the fleet under a
grid (``grid:`` a topology file or inline ``nodes:``, the fleet spread over its nodes by
``fleet.nodes``), with node meters (``meters:`` a CSV, ``pv:`` a built-in solar
profile per node), dynamic ``limits:`` and a pandapower ``powerflow:`` (v2g/simgrid.py). ``load_scenario`` reads one;
``ScenarioError`` says what is wrong, one line per field.
"""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import numpy as np
import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agents.profiles import PATTERNS
from broker.models import SIGNAL_SERVICES, Service, to_epoch
from broker.topics import check_id
from core.errors import V2GError
from core.physics import Array
from v2g import units

MAX_STEPS = 1_000_000


class ScenarioError(V2GError):
    """A scenario file that cannot be read or does not validate; the message names the field."""


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string like '900', '900s', '15m', '4h', '1d'."""
    return units.seconds(value) if isinstance(value, str) else value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0.0, allow_inf_nan=False)]


def _start_or_offset(value: Any) -> Any:
    """'+6h' (from the scenario start) stays a string; anything else must be an aware time."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("+"):
            parse_duration(text[1:])
            return text
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{text!r} is neither an ISO 8601 time with a zone nor an offset like '+6h'"
            ) from None
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError(f"{value.isoformat()} has no time zone; add Z or +00:00")
    return value


StartOrOffset = Annotated[datetime | str, BeforeValidator(_start_or_offset)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PatternName = Literal["home", "workplace", "depot"]


def _default_mix() -> dict[PatternName, float]:
    return {"home": 0.6, "workplace": 0.3, "depot": 0.1}


class FleetSpec(_Strict):
    """The simulated fleet (agents/profiles.py generate_fleet)."""

    vehicles: Annotated[int, Field(ge=1, le=10_000_000)]
    seed: int = 1
    mix: dict[PatternName, Annotated[float, Field(ge=0.0)]] = Field(default_factory=_default_mix)
    id_prefix: str = "ev"
    nodes: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)
    """With a grid: the share of the fleet under each node (seeded; empty: the root)."""

    def weights(self) -> dict[str, float]:
        """The mix as generate_fleet takes it."""
        return {str(k): float(v) for k, v in self.mix.items()}

    @field_validator("mix")
    @classmethod
    def _some_weight(cls, mix: dict[PatternName, float]) -> dict[PatternName, float]:
        if not mix or sum(mix.values()) <= 0.0:
            raise ValueError(f"needs at least one pattern with weight > 0 ({sorted(PATTERNS)})")
        return mix


class RequestSpec(_Strict):
    """One dispatch request, submitted at the first simulated step at or after its start."""

    id: str
    service: Service = Service.MANUAL
    power_kw: float
    start: StartOrOffset
    duration: Seconds

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_id(value, "request id")

    @field_validator("service")
    @classmethod
    def _not_a_signal(cls, value: Service) -> Service:
        if value in SIGNAL_SERVICES:
            raise ValueError(
                f"{value.value} follows a signal: describe it under 'regulation:', not as a"
                " fixed power request"
            )
        return value


class RegulationSpec(_Strict):
    """A regulation-like signal the fleet follows around its baseline.

    The dispatcher has no signal service yet, so the simulation turns the signal into one
    short power request per step: power_kw = baseline_kw + value * capacity_kw.
    """

    capacity_kw: Annotated[float, Field(gt=0.0)]
    start: StartOrOffset
    duration: Seconds
    signal: Annotated[str, Field(min_length=1)] = "regd"
    seed: int = 0
    id_prefix: str = "reg"

    @field_validator("signal")
    @classmethod
    def _regd_or_csv(cls, value: str) -> str:
        if value != "regd" and not value.lower().endswith(".csv"):
            raise ValueError(f"{value!r}: use 'regd' (a seeded synthetic signal) or a .csv path")
        return value


class PVSpec(_Strict):
    """A solar plant's AC output as a node's meter (v2g/solar.py: pvlib, TMY3 Greensboro)."""

    node: str
    ac_kw: Annotated[float, Field(gt=0.0, le=1e6)]
    tilt_deg: Annotated[float, Field(ge=0.0, le=90.0)] = 25.0
    azimuth_deg: Annotated[float, Field(ge=0.0, lt=360.0)] = 180.0
    load_kw: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0
    """A constant load behind the same meter (the site's own consumption)."""


class LimitSpec(_Strict):
    """A dynamic limit on a node for a while (the tighter of it and the static one holds)."""

    node: str
    start: StartOrOffset
    duration: Seconds
    import_kw: Annotated[float, Field(ge=0.0)] | None = None
    export_kw: Annotated[float, Field(ge=0.0)] | None = None


class FirmingSpec(_Strict):
    """A firming service on a node: keep its net power (meter + vehicles) inside [min_kw,
    max_kw] and its change under ``ramp_kw_per_min`` (each may be absent: open), inside
    the limits and the drivers' floors (aggregator/grid_alloc.py, ``firming_band``)."""

    node: str
    start: StartOrOffset
    duration: Seconds
    min_kw: float | None = None
    max_kw: float | None = None
    ramp_kw_per_min: Annotated[float, Field(gt=0.0)] | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.min_kw is None and self.max_kw is None and self.ramp_kw_per_min is None:
            raise ValueError("give min_kw, max_kw or ramp_kw_per_min")
        if self.min_kw is not None and self.max_kw is not None and self.min_kw > self.max_kw:
            raise ValueError(f"min_kw {self.min_kw:g} is above max_kw {self.max_kw:g}")
        return self


class PowerflowSpec(_Strict):
    """A pandapower network beside the run: node powers on its buses, a power flow every
    ``every`` steps (v2g/powerflow.py)."""

    network: Annotated[str, Field(min_length=1)] = "cigre_lv"
    every: Annotated[int, Field(ge=1)] = 1
    buses: dict[str, str | int] = Field(default_factory=dict)
    """Grid node -> bus name or index (unmapped nodes with power go on the network's load
    buses in turn)."""
    keep_loads: bool = True
    """Keep the network's own loads (its other customers, at their nominal power); false:
    only the scenario's nodes load it."""


class Scenario(_Strict):
    """A whole simulation: the fleet, the clock, and what the grid asks."""

    name: str = "scenario"
    description: str = ""
    fleet: FleetSpec
    start: AwareDatetime
    duration: Seconds
    step_s: Seconds = 900.0
    requests: list[RequestSpec] = Field(default_factory=list)
    regulation: RegulationSpec | None = None
    grid: str | dict[str, Any] | None = None
    """A grid topology: a YAML path (relative to the scenario file) or inline ``nodes:``."""
    meters: str | None = None
    """A CSV of node meters, ``time_s,node,power_kw`` (s from the start; held to the next row)."""
    pv: list[PVSpec] = Field(default_factory=list)
    limits: list[LimitSpec] = Field(default_factory=list)
    firming: list[FirmingSpec] = Field(default_factory=list)
    powerflow: PowerflowSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.grid is None and (
            self.meters
            or self.pv
            or self.limits
            or self.firming
            or self.powerflow
            or self.fleet.nodes
        ):
            raise ValueError("meters, pv, limits, firming, powerflow and fleet.nodes need a grid:")
        if self.duration < self.step_s:
            raise ValueError(
                f"duration {self.duration:g} s is shorter than step_s {self.step_s:g} s"
            )
        if self.duration / self.step_s > MAX_STEPS:
            raise ValueError(f"duration / step_s is over {MAX_STEPS} steps; use a longer step_s")
        seen: set[str] = set()
        for r in self.requests:
            if r.id in seen:
                raise ValueError(f"requests: id {r.id!r} is used twice")
            seen.add(r.id)
        return self

    @property
    def t0(self) -> float:
        return to_epoch(self.start)

    @property
    def n_steps(self) -> int:
        return math.ceil(self.duration / self.step_s - 1e-9)

    def at(self, start: datetime | str) -> float:
        """Epoch seconds of a request's start (an aware time or '+offset' from the start)."""
        if isinstance(start, str):
            return self.t0 + float(parse_duration(start[1:]))
        return to_epoch(start)

    def with_overrides(self, *, vehicles: int | None = None, seed: int | None = None) -> Scenario:
        """The same scenario for another fleet size (request power and regulation capacity
        scale with it) or another seed."""
        fleet = self.fleet
        update: dict[str, Any] = {}
        if seed is not None:
            fleet = fleet.model_copy(update={"seed": seed})
        if vehicles is not None and vehicles != fleet.vehicles:
            if vehicles < 1:
                raise ScenarioError(f"--vehicles must be >= 1, got {vehicles}")
            k = vehicles / fleet.vehicles
            fleet = fleet.model_copy(update={"vehicles": vehicles})
            update["requests"] = [
                r.model_copy(update={"power_kw": r.power_kw * k}) for r in self.requests
            ]
            if self.regulation is not None:
                update["regulation"] = self.regulation.model_copy(
                    update={"capacity_kw": self.regulation.capacity_kw * k}
                )
        update["fleet"] = fleet
        return self.model_copy(update=update)


def describe(err: ValidationError) -> str:
    """One line per problem, each naming its field as a dotted path (requests.1.power_kw)."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if p != "[key]") or "(top level)"
        msg = str(e["msg"]).removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{where}: {msg}{shown}")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate already-parsed YAML/JSON data."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(f"{source} is not a valid scenario:\n{describe(err)}") from None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; a relative CSV signal path is taken from its folder."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ScenarioError(f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ScenarioError(f"{path} is not valid YAML: {err}") from None
    scenario = parse_scenario(data, str(path))
    rel: dict[str, Any] = {}
    for key in ("grid", "meters"):
        value = getattr(scenario, key)
        if isinstance(value, str) and not Path(value).is_absolute():
            rel[key] = str(path.parent / value)
    pf = scenario.powerflow
    if pf is not None and pf.network.endswith(".json") and not Path(pf.network).is_absolute():
        rel["powerflow"] = pf.model_copy(update={"network": str(path.parent / pf.network)})
    if rel:
        scenario = scenario.model_copy(update=rel)
    reg = scenario.regulation
    if reg is not None and reg.signal != "regd" and not Path(reg.signal).is_absolute():
        reg = reg.model_copy(update={"signal": str(path.parent / reg.signal)})
        scenario = scenario.model_copy(update={"regulation": reg})
    return scenario


# -- regulation signals ----------------------------------------------------------------


def regd_signal(n: int, step_s: float, seed: int) -> Array:
    """A seeded RegD-like signal in [-1, 1]: fast, mean-reverting and close to energy-neutral.

    PJM's RegD swings within minutes and nets about zero energy over a quarter hour or so;
    this mimics it with a mean-reverting random walk (time constant ~5 min) plus a slow
    oscillation, its running energy pulled back toward zero.
    """
    rng = np.random.default_rng(seed)
    a = math.exp(-step_s / 300.0)
    noise = rng.normal(0.0, math.sqrt(1.0 - a * a), size=n)
    x = np.empty(n)
    level = 0.0
    for i in range(n):  # n steps of the clock, not vehicles: a scalar recurrence
        level = a * level + noise[i]
        x[i] = level
    t = np.arange(n) * step_s
    slow = 0.4 * np.sin(2.0 * np.pi * t / 1800.0 + rng.uniform(0.0, 2.0 * np.pi))
    value = 0.6 * x + slow
    value -= np.convolve(value, np.ones(5) / 5.0, mode="same") * 0.5  # pull energy toward 0
    return np.asarray(np.clip(value, -1.0, 1.0), dtype=np.float64)


def csv_signal(path: Path, t0: float, times: Array) -> Array:
    """A signal from CSV at ``times`` (held from each row to the next).

    Columns: ``offset_s,value`` (seconds from the regulation start) or ``time,value``
    (ISO 8601 with a zone). Values must lie in [-1, 1].
    """
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise ScenarioError(
            f"regulation.signal: cannot read {path}: {err.strerror or err}"
        ) from None
    if not rows:
        raise ScenarioError(f"regulation.signal: {path} has no rows")
    keys = set(rows[0])
    if "value" not in keys or not keys & {"offset_s", "time"}:
        raise ScenarioError(
            f"regulation.signal: {path} needs columns offset_s,value or time,value; has {sorted(keys)}"
        )
    at: list[float] = []
    val: list[float] = []
    for i, row in enumerate(rows, start=2):
        try:
            if "offset_s" in keys:
                at.append(t0 + float(row["offset_s"]))
            else:
                moment = datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    raise ValueError("time has no zone")
                at.append(moment.timestamp())
            v = float(row["value"])
        except (TypeError, ValueError) as err:
            raise ScenarioError(f"regulation.signal: {path} line {i}: {err}") from None
        if not -1.0 <= v <= 1.0:
            raise ScenarioError(f"regulation.signal: {path} line {i}: value {v} is outside [-1, 1]")
        val.append(v)
    order = np.argsort(np.array(at), kind="stable")
    a, v_arr = np.array(at)[order], np.array(val)[order]
    idx = np.clip(np.searchsorted(a, times, side="right") - 1, 0, len(a) - 1)
    return np.asarray(v_arr[idx], dtype=np.float64)
