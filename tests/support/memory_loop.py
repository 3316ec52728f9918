"""The control loop closed in memory, without I/O: control step (dispatcher) -> setpoints
-> SimFleet -> telemetry -> FleetState, for unit tests of the dispatcher and its parts.

The step is the aggregator's own (``ControlStep.decide``, aggregator/control_step.py)
over the test's fleet state and dispatcher."""

from __future__ import annotations

from agents.fleet import SimFleet
from agents.profiles import generate_fleet
from agents.telemetry import telemetry_payloads
from aggregator.control_step import ControlStep
from aggregator.dispatch import Dispatcher
from aggregator.fleet_state import FleetState
from aggregator.inbox import Inbox
from broker.models import DispatchRequest, Telemetry
from broker.settings import Settings

T0 = 1_795_651_200.0 + 21 * 3600  # 21:00 UTC: most home cars are plugged in
STEP = 5.0
REACT_S = 1.0  # the chargers act on a setpoint within a second


def fleet_and_state(n: int = 80, seed: int = 4) -> tuple[SimFleet, FleetState]:
    fleet = SimFleet(generate_fleet(n, seed), T0, step_s=STEP)
    state = FleetState()
    state.apply_telemetry([Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, T0)])
    return fleet, state


def run_loop(
    fleet: SimFleet, state: FleetState, d: Dispatcher, t: float, steps: int
) -> tuple[float, list]:
    """Close the loop in memory: control step -> setpoints -> fleet -> telemetry -> state
    (requests are the test's to submit to ``d``)."""
    control = ControlStep(settings=Settings(control_step_s=STEP), state=state, dispatcher=d)
    outs = []
    for _ in range(steps):
        view = state.view(t, 3 * STEP)
        out = control.decide(Inbox(), t, view).output
        for row, p, until in zip(out.rows, out.power_kw, out.valid_until, strict=True):
            fleet.set_setpoint(fleet.index[state.ids[row]], float(p), float(until))
        for row in out.release_rows:
            fleet.set_setpoint(fleet.index[state.ids[row]], 0.0, t)
        outs.append(out)
        t += STEP
        close_loop(fleet, state, t)
    return t, outs


def close_loop(fleet: SimFleet, state: FleetState, t: float) -> None:
    """The fleet moves to ``t`` and every vehicle reports."""
    fleet.tick(t)
    state.apply_telemetry([Telemetry.model_validate_json(p) for p in telemetry_payloads(fleet, t)])


def req(power: float, duration: float = 900.0, rid: str = "r1", **kw: object) -> DispatchRequest:
    return DispatchRequest(request_id=rid, power_kw=power, duration_s=duration, **kw)  # type: ignore[arg-type]
